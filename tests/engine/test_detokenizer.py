"""Incremental detokenization against real (small, trained here) tokenizers, and stop checking."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pensieve.engine.detokenizer import IncrementalDetokenizer, StopChecker, StopResult
from pensieve.sampling_params import SamplingParams

SENTENCES = [
    "héllo 世界 🙂 how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, déjà vu: 日本語のテキスト",
    "emoji 🙂🙃🎉 and more 世界, hello world",
]
# Characters the tokenizers never saw: byte-level BPE splits them into partial-UTF-8 tokens.
UNSEEN = "héllo 世界 🙂 你好吗 👋🏽 Ωμέγα ñandú — the end"


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace_bpe() -> Tokenizer:
    """SentencePiece-style: '▁' marks a leading space, which decode drops on the first token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(SENTENCES * 10, trainer)
    return tok


def stream(
    tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True, seed: int = 0
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feeds `ids` in random chunks of 1-3; returns the deltas (flush last) and the detokenizer."""
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3)
        deltas.append(detok.append(ids[i : i + k]))
        i += k
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("skip", [True, False])
def test_random_id_streams_match_full_decode(byte_bpe, skip):
    rng = random.Random(42)
    vocab = byte_bpe.get_vocab_size()
    for trial in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 50))]
        deltas, detok = stream(byte_bpe, [], ids, skip=skip, seed=trial)
        full = byte_bpe.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full
        assert detok.text == full
        assert detok.num_output_tokens == len(ids)


def test_multibyte_characters_are_held_back_until_complete(byte_bpe):
    ids = byte_bpe.encode(UNSEEN).ids
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)  # the stream really splits characters
    detok = IncrementalDetokenizer(byte_bpe, [])
    deltas = [detok.append([i]) for i in ids]
    assert "" in deltas
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == UNSEEN and detok.text == UNSEEN
    assert detok.flush() == ""


def test_prompt_context_is_not_emitted(byte_bpe):
    prompt = byte_bpe.encode("héllo 世界 and").ids
    out = byte_bpe.encode(" 你好 🙂 fox").ids
    deltas, detok = stream(byte_bpe, prompt, out)
    full = byte_bpe.decode(prompt + out)
    expected = full[len(byte_bpe.decode(prompt)) :]
    assert "".join(deltas) == expected == " 你好 🙂 fox"


def test_leading_spaces_survive_sentencepiece_style_decoding(metaspace_bpe):
    text = "hello world, the lazy dog jumps over the quick brown fox"
    ids = metaspace_bpe.encode(text).ids
    naive = "".join(metaspace_bpe.decode([i]) for i in ids)
    assert naive != text  # per-token decoding loses the spaces: the window is what keeps them
    deltas, _ = stream(metaspace_bpe, [], ids)
    assert "".join(deltas) == metaspace_bpe.decode(ids) == text


def test_sentencepiece_style_with_prompt_and_random_ids(metaspace_bpe):
    rng = random.Random(7)
    vocab = metaspace_bpe.get_vocab_size()
    prompt = metaspace_bpe.encode("how are you").ids
    for trial in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        deltas, _ = stream(metaspace_bpe, [], ids, seed=trial)
        assert "".join(deltas) == metaspace_bpe.decode(ids)
        deltas, _ = stream(metaspace_bpe, prompt, ids, seed=trial)
        expected = metaspace_bpe.decode(prompt + ids)[len(metaspace_bpe.decode(prompt)) :]
        assert "".join(deltas) == expected


def test_each_step_decodes_a_small_window(byte_bpe):
    class Recording:
        """The real tokenizer, recording how many ids each decode call gets."""

        def __init__(self) -> None:
            self.sizes: list[int] = []

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.sizes.append(len(ids))
            return byte_bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = byte_bpe.encode(UNSEEN * 6).ids
    spy = Recording()
    detok = IncrementalDetokenizer(spy, byte_bpe.encode("a long prompt " * 50).ids)
    for i in ids:
        detok.append([i])
    assert detok.text == UNSEEN * 6
    assert len(ids) > 100 and max(spy.sizes) <= 10


def test_transformers_fast_tokenizer_is_accepted(byte_bpe):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, eos_token="<eos>")
    ids = hf.encode(UNSEEN, add_special_tokens=False) + [hf.eos_token_id]
    deltas, detok = stream(hf, [], ids)
    assert "".join(deltas) == detok.text == UNSEEN


# ---- stop checking ---------------------------------------------------------------------------


def run_request(
    tok: Tokenizer,
    ids: list[int],
    params: SamplingParams,
    eos: set[int] = frozenset(),
    prompt_len: int = 3,
    max_model_len: int = 1000,
) -> tuple[StopResult | None, str, str, int]:
    """The engine's per-step loop: detokenize, check, stream the safe part.

    Returns (result, final text, concatenation of what was streamed, tokens generated).
    """
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=params.skip_special_tokens)
    checker = StopChecker(params, set(eos), max_model_len)
    out: list[int] = []
    sent = 0
    streamed = ""
    for tok_id in ids:
        out.append(tok_id)
        detok.append([tok_id])
        result = checker.check(len(out), tok_id, detok.text, prompt_len)
        text = detok.text
        if result is not None:
            if result.truncate_to is not None:
                text = text[: result.truncate_to]
            else:
                detok.flush()
                text = detok.text
            assert text.startswith(streamed)  # nothing streamed earlier is taken back
            return result, text, streamed + text[sent:], len(out)
        safe = checker.safe_text_len(text)
        assert safe >= sent
        streamed += text[sent:safe]
        sent = safe
    return None, detok.text, streamed, len(out)


def test_stop_string_across_token_boundaries(byte_bpe):
    text = "The quick brown fox jumps over the lazy dog."
    ids = byte_bpe.encode(text).ids
    params = SamplingParams(stop=["k bro"], max_tokens=100)
    result, final, streamed, n = run_request(byte_bpe, ids, params)
    assert result == StopResult("stop", "k bro", len("The quic"))
    assert final == streamed == "The quic"
    assert n < len(ids)


def test_include_stop_str_in_output(byte_bpe):
    ids = byte_bpe.encode("The quick brown fox jumps").ids
    params = SamplingParams(stop=["k bro"], include_stop_str_in_output=True, max_tokens=100)
    result, final, streamed, _ = run_request(byte_bpe, ids, params)
    assert result.stop_reason == "k bro"
    assert final == streamed == "The quick bro"


def test_earliest_of_several_stop_strings_wins(byte_bpe):
    ids = byte_bpe.encode("hello world, the lazy dog").ids
    # Both are in the text checked at once: the match that starts first wins, not the first listed.
    checker = StopChecker(SamplingParams(stop=["lazy", "the la", "zzz"]), set(), 1000)
    text = byte_bpe.decode(ids)
    assert checker.check(len(ids), ids[-1], text, 3) == StopResult("stop", "the la", text.index("the la"))


def test_stop_string_with_multibyte_characters(byte_bpe):
    ids = byte_bpe.encode(UNSEEN).ids
    result, final, streamed, _ = run_request(byte_bpe, ids, SamplingParams(stop=["吗 👋"], max_tokens=200))
    assert result.stop_reason == "吗 👋"
    assert final == streamed == "héllo 世界 🙂 你好"


def test_safe_text_len_holds_back_partial_stop_strings():
    checker = StopChecker(SamplingParams(stop=["world", "wxyz", "!"]), set(), 100)
    assert checker.safe_text_len("hello wor") == len("hello ")
    assert checker.safe_text_len("hello w") == len("hello ")  # "w" starts both stop strings
    assert checker.safe_text_len("hello") == 5
    assert checker.safe_text_len("") == 0
    assert checker.safe_text_len("wo") == 0
    included = StopChecker(SamplingParams(stop=["world"], include_stop_str_in_output=True), set(), 100)
    assert included.safe_text_len("hello wor") == len("hello wor")
    assert StopChecker(SamplingParams(), set(), 100).safe_text_len("hello wor") == 9


def test_streaming_never_sends_a_stop_string_prefix_that_is_later_cut(byte_bpe):
    text = "hello world, the lazy dog jumps over the quick brown fox"
    ids = byte_bpe.encode(text).ids
    for stop in ["lazy", "fox", "dog jumps", "the q", "o"]:
        result, final, streamed, _ = run_request(byte_bpe, ids, SamplingParams(stop=[stop], max_tokens=100))
        assert result.stop_reason == stop
        assert final == streamed == text[: text.index(stop)]


def test_stop_token_ids_and_min_tokens(byte_bpe):
    ids = byte_bpe.encode("the lazy dog").ids
    stop_id = ids[1]
    result, _, _, n = run_request(byte_bpe, ids, SamplingParams(stop_token_ids=[stop_id]))
    assert result == StopResult("stop", stop_id) and n == 2
    # Not yet at min_tokens: the stop id is ignored (the sampler would not have produced it).
    late = ids + [stop_id]
    result, _, _, n = run_request(byte_bpe, late, SamplingParams(stop_token_ids=[stop_id], min_tokens=3))
    assert result == StopResult("stop", stop_id) and n == len(late)


def test_stop_strings_before_min_tokens_do_not_count(byte_bpe):
    ids = byte_bpe.encode("the lazy dog and the cat").ids
    result, final, _, _ = run_request(byte_bpe, ids, SamplingParams(stop=["the"], min_tokens=3))
    assert result.stop_reason == "the"
    assert final == "the lazy dog and "


def test_eos_stops_unless_ignored(byte_bpe):
    eos = byte_bpe.token_to_id("<eos>")
    ids = byte_bpe.encode("the lazy dog").ids + [eos] + byte_bpe.encode(" again").ids
    result, final, streamed, n = run_request(byte_bpe, ids, SamplingParams(max_tokens=100), eos={eos})
    assert result == StopResult("stop", None) and final == streamed == "the lazy dog"
    assert n == ids.index(eos) + 1
    params = SamplingParams(ignore_eos=True, max_tokens=100)
    result, final, _, n = run_request(byte_bpe, ids, params, eos={eos})
    assert result is None and n == len(ids) and final == "the lazy dog again"


def test_max_tokens_and_max_model_len(byte_bpe):
    ids = byte_bpe.encode("the lazy dog jumps over the quick brown fox").ids
    result, final, streamed, n = run_request(byte_bpe, ids, SamplingParams(max_tokens=4))
    assert result == StopResult("length", None) and n == 4
    assert final == streamed == byte_bpe.decode(ids[:4])
    # Prompt 3 + 5 generated reaches a model length of 8.
    result, _, _, n = run_request(byte_bpe, ids, SamplingParams(max_tokens=None), max_model_len=8)
    assert result == StopResult("length", None) and n == 5
    # A stop token on the last allowed step reports "stop", not "length".
    params = SamplingParams(max_tokens=4, stop_token_ids=[ids[3]])
    assert run_request(byte_bpe, ids, params)[0] == StopResult("stop", ids[3])
