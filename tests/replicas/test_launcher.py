"""`pensieve serve-replicas`: its flags, the replica flags of `pensieve serve`, the router's command line."""
from __future__ import annotations

import argparse

import pytest

from pensieve.cli import build_parser
from pensieve.replicas.cli import replica_settings
from pensieve.replicas.launcher import RouterConfig, Worker, gpu_ids, router_command

WORKERS = [Worker("http://127.0.0.1:8100", "tcp://127.0.0.1:5600"), Worker("http://127.0.0.1:8101", "tcp://127.0.0.1:5601")]


def test_serve_replicas_flags_and_the_replicas_serve_arguments() -> None:
    args = build_parser().parse_args(["serve-replicas", "--replicas", "3", "--policy", "kv_aware", "--",
                                      "/models/m", "--cache-mode", "gpu"])
    assert args.replicas == 3 and args.policy == "kv_aware" and args.port == 8000
    assert args.serve_args[-3:] == ["/models/m", "--cache-mode", "gpu"]
    assert build_parser().parse_args(["serve-replicas"]).policy == "cache_aware"


def test_replica_settings_of_serve() -> None:
    args = build_parser().parse_args(["serve", "--replica-name", "r-1", "--replica-peers",
                                      "r-0=http://a:8100/, r-2=https://b:8100", "--kv-events-endpoint", "tcp://*:5600"])
    assert replica_settings(args) == {"replica_name": "r-1", "kv_events_endpoint": "tcp://*:5600",
                                      "replica_peers": (("r-0", "http://a:8100"), ("r-2", "https://b:8100"))}
    for bad in (["--replica-name", "a.b"], ["--replica-peers", "r-0:http://a"], ["--replica-peers", "r-0=a:80"]):
        with pytest.raises(SystemExit):
            replica_settings(build_parser().parse_args(["serve", *bad]))
    plain = replica_settings(argparse.Namespace(replica_name=None, replica_peers=None, kv_events_endpoint=None))
    assert plain == {"replica_name": None, "replica_peers": (), "kv_events_endpoint": None}


def test_router_command_per_policy() -> None:
    cmd = router_command(WORKERS, RouterConfig(port=9000))
    assert cmd[cmd.index("--policy") + 1] == "cache_aware"
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--worker-urls") + 3] == [w.url for w in WORKERS]
    assert cmd[cmd.index("--cb-failure-threshold") + 1] == "1"   # a dead replica is out after one failure
    assert "--kv-event-source" not in cmd
    kv = router_command(WORKERS, RouterConfig(policy="kv_aware", block_size=32))
    sources = [kv[i + 1] for i, a in enumerate(kv) if a == "--kv-event-source"]
    assert sources == [f"{w.url}={w.kv_events}" for w in WORKERS]
    assert kv[kv.index("--kv-event-block-size") + 1] == "32"
    with pytest.raises(ValueError, match="KV event endpoint"):
        router_command([Worker("http://127.0.0.1:8100")], RouterConfig(policy="kv_aware"))
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(policy="fastest")


def test_gpu_groups_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert gpu_ids() == ["2", "3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_ids() == []
