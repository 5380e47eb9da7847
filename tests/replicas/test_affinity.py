"""The routing check: 30 interleaved conversations of each kind through vllm-router in front of 3 replicas keep
>= 90% of the cached share one replica alone gets on the same conversations, with the same (greedy) answers;
round-robin's share on the resent histories is reported beside (its other kinds: benchmarks/results/replicas)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pensieve.replicas.workload import KINDS, WorkloadConfig, answers, cached_share, run_workload, summary
from tests.replicas.conftest import replicas, router

CFG = WorkloadConfig(conversations=30, turns=3, max_tokens=4, concurrency=8, first_words=24, next_words=8,
                     think_s=(0.1, 0.4))


def test_affinity_keeps_the_cache_of_one_replica(demo_weights: tuple, tmp_path: Path) -> None:
    with replicas(demo_weights, 1) as (single,):
        alone = asyncio.run(run_workload(single.url, CFG))
    with replicas(demo_weights, 3) as reps, router(reps, "cache_aware", tmp_path) as url:
        routed = asyncio.run(run_workload(url, CFG))
    with replicas(demo_weights, 3) as reps, router(reps, "round_robin", tmp_path) as url:
        spread = asyncio.run(run_workload(url, CFG, kinds=["history"]))

    report = {"one replica": summary(alone), "cache_aware": summary(routed),
              "round_robin": summary(spread, ["history"])}
    print(json.dumps(report, indent=1))
    for name, recs, kinds in (("one replica", alone, KINDS), ("cache_aware", routed, KINDS),
                              ("round_robin", spread, ["history"])):
        assert not [r for r in recs if r.error], (name, [r for r in recs if r.error][:3])
        assert len(recs) == len(kinds) * CFG.conversations * CFG.turns
    for kind in KINDS:
        base = cached_share(alone, kind)
        assert base > 0.5, (kind, base)   # the conversations do reuse their history on one replica
        assert cached_share(routed, kind) >= 0.9 * base, (kind, report)
    # the conversations were spread, not all kept on one replica (as a session hash does with keyless clients)
    for kind in KINDS:
        assert len(report["cache_aware"][kind]["replicas"]) == 3
        assert report["cache_aware"][kind]["busiest_replica_share"] <= 0.7, report["cache_aware"][kind]
    # round-robin loses the resent histories (a turn lands where its history is with probability 1/3)
    assert cached_share(spread, "history") < 0.6 * cached_share(alone, "history")
    assert answers(routed) == answers(alone)
    assert answers(spread) == {k: v for k, v in answers(alone).items() if k[0] == "history"}
