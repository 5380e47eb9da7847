"""A replica killed mid-run (SIGKILL of its `pensieve serve` process, started by `serve-replicas`' launcher):
clients that resend the history continue on the other replica; a previous_response_id chain stored on the
dead replica ends with a clear 404; no other turn fails except those in flight on it when it died, and at most
one Responses turn that reached it before the router knew (vllm-router retries chat and completions on
another replica, but proxies the Responses API without retrying; the first failure opens the replica's circuit)."""
from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from pensieve.replicas.launcher import Deployment, RouterConfig
from pensieve.replicas.workload import KINDS, TurnRecord, WorkloadConfig, run_workload
from tests.loopback import free_port

CFG = WorkloadConfig(conversations=16, turns=4, max_tokens=4, concurrency=6, first_words=16, next_words=6,
                     think_s=(0.3, 0.6))
SERVE = ["--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "512", "--num-cpu-blocks", "512",
         "--max-model-len", "1024", "--log-level", "warning"]


def _consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        base = free_port()
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def _owner(rec: TurnRecord) -> str | None:
    # a forwarded turn names the replica that answered first, then the one that forwarded it
    return rec.replica.split(",")[0].strip() if rec.replica else None


def test_killed_replica_fails_only_its_own_turns(tmp_path: Path) -> None:
    from pensieve.model.tiny_llama import tiny_llama_path

    deployment = Deployment(2, [str(tiny_llama_path()), *SERVE], RouterConfig(port=free_port(), metrics_port=free_port()),
                            replica_port=_consecutive_free_ports(2), log_dir=tmp_path)
    done: list[TurnRecord] = []
    killed_at: list[float] = []

    def kill_midway(rec: TurnRecord) -> None:
        done.append(rec)
        if len(done) == len(KINDS) * CFG.conversations * 2 and not killed_at:  # halfway through the turns
            killed_at.append(time.monotonic())
            deployment.kill_replica(1)

    with deployment:
        records = asyncio.run(run_workload(deployment.url, CFG, on_turn=kill_midway))
    assert killed_at, "the run ended before the kill"
    kill = killed_at[0]

    # 5xx and dropped connections only for turns that were in flight on the replica when it died
    failed = [r for r in records if r.error and r.status != 404]
    in_flight = [r for r in failed if r.started < kill]
    assert len(in_flight) <= CFG.concurrency
    discovered = [r for r in failed if r.started >= kill]
    assert len(discovered) <= 1 and all(r.kind == "response" and r.status == 502 for r in discovered), discovered

    by_conv: dict[tuple[str, int], list[TurnRecord]] = {}
    for r in records:
        by_conv.setdefault((r.kind, r.conversation), []).append(r)
    moved = 0
    for (kind, _), turns in by_conv.items():
        last = turns[-1]
        if kind != "response":  # the history travels with the request: every conversation finishes
            assert last.error is None and last.turn == CFG.turns - 1, turns
            before = [t for t in turns if t.error is None and t.finished < kill]
            if before and _owner(before[-1]) == "replica-1":
                moved += 1
                after = [t for t in turns if t.error is None and t.started > kill]
                assert after and all(_owner(t) == "replica-0" for t in after)
        else:
            owners = {_owner(t) for t in turns if t.error is None}
            if last.error is None:
                assert last.turn == CFG.turns - 1
            else:   # the chain's state died with its replica: a clear 404, then the client stops
                assert last.status == 404 and "replica-1" in last.error and "resend" in last.error, last
                assert owners == {"replica-1"}
    assert moved > 0   # some conversations really continued on the surviving replica
    assert any(r.status == 404 for r in records)   # and some chains really lost their replica
