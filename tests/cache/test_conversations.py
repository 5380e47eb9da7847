"""ConversationOwners: which cached blocks a delete or an expiry may free, as turns re-record a conversation."""
from pensieve.cache.conversations import ConversationOwners


def test_owners_follow_each_turn_and_free_only_what_nobody_owns():
    owners = ConversationOwners()
    owners.record("a", [b"sys", b"a1"], now=0.0)
    owners.record("b", [b"sys", b"b1"], now=0.0)
    owners.record("a", [b"sys", b"a1", b"a2"], now=1.0, tokens=[1, 2, 3])   # the next turn grew it
    assert owners["a"].keys == [b"sys", b"a1", b"a2"] and owners["a"].tokens == [1, 2, 3]
    owners.record("b", [b"sys", b"b2"], now=1.0)                            # a turn that dropped b1
    assert owners.remove("b") == [b"b2"]            # the shared system prompt stays: "a" owns it
    assert owners.remove("b") is None               # already gone
    assert sorted(owners.remove("a")) == [b"a1", b"a2", b"sys"]
    assert len(owners) == 0 and owners._owners == {}


def test_recording_touches_only_the_conversations_keys():
    """A turn's bookkeeping must not grow with every conversation ever cached (it was a pass over all counts)."""
    owners = ConversationOwners()
    for i in range(2000):
        owners.record(f"c{i}", [f"{i}/{j}".encode() for j in range(50)], now=0.0)
    counts = owners._owners

    class Watched(type(counts)):
        def items(self):   # the old rule rebuilt the counter through items() at every record
            raise AssertionError("a pass over every owner count")

    owners._owners = Watched(counts)
    owners.record("c7", [f"7/{j}".encode() for j in range(51)], now=1.0)
    assert owners._owners[b"7/50"] == 1 and b"6/0" in owners._owners
