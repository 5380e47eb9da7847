"""Processes of a replicated deployment on one host: N `pensieve serve` replicas and a vllm-router in front.

The router is vllm-router (a Rust binary from PyPI). Its `kv_aware` policy routes a request to the replica
that already holds the longest prefix of its tokens, learnt from the KV events each replica publishes, and
keeps a request that names a session (`X-Session-ID`) on the replica its session started on; other
policies are there for comparison. docs/REPLICAS.md has the why and the numbers.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

POLICIES = ("kv_aware", "cache_aware", "consistent_hash", "sticky_least_loaded", "power_of_two", "round_robin",
            "random")


@dataclass(frozen=True)
class Worker:
    """A replica as the router sees it: its HTTP address and, if it publishes them, its KV event endpoint."""

    url: str
    kv_events: str | None = None


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "cache_aware"
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 29000
    session_ttl_s: int = 3600            # kv_aware: how long an idle session stays on its replica
    block_size: int = 16                 # the replicas' KV block size (kv_aware hashes blocks of this many tokens)
    model: str = "pensieve"              # kv_aware: the model identity the replicas' events belong to
    health_interval_s: int = 1           # a dead replica is out of rotation after this many seconds
    retries: int = 3                     # attempts of a failed request (each may pick another replica)
    api_key: str | None = None           # key the router presents to the replicas, if they require one

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")


def router_command(workers: Sequence[Worker], cfg: RouterConfig) -> list[str]:
    """The vllm-router command line for these workers."""
    exe = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    cmd = [exe, "--worker-urls", *[w.url for w in workers], "--policy", cfg.policy,
           "--host", cfg.host, "--port", str(cfg.port),
           "--prometheus-host", cfg.host, "--prometheus-port", str(cfg.metrics_port),
           "--health-check-interval-secs", str(cfg.health_interval_s), "--health-failure-threshold", "1",
           "--health-success-threshold", "1", "--health-check-timeout-secs", "2",
           "--retry-max-retries", str(cfg.retries), "--retry-initial-backoff-ms", "100",
           # the first failed request opens a replica's circuit: the next ones (and the retries) go to the others
           # at once, not after the next health check; it closes when a request succeeds again after 5 s
           "--cb-failure-threshold", "1", "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "5",
           "--worker-startup-timeout-secs", "600", "--worker-startup-check-interval", "1",
           "--log-level", "warning"]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if cfg.policy == "kv_aware":
        cmd += ["--kv-aware-session-affinity-ttl-secs", str(cfg.session_ttl_s),
                "--kv-event-block-size", str(cfg.block_size), "--kv-event-model", cfg.model]
        for w in workers:
            if w.kv_events is None:
                raise ValueError(f"kv_aware needs every replica's KV event endpoint; {w.url} has none")
            cmd += ["--kv-event-source", f"{w.url}={w.kv_events}"]
    return cmd


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Polls `url` until it answers 200; fails early if `proc` exits (its log's tail in the error)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


def gpu_ids() -> list[str]:
    """The GPUs this host lets us use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


class RouterProcess:
    """vllm-router in front of `workers`, as a child process; a context manager (logs to `log`)."""

    def __init__(self, workers: Sequence[Worker], cfg: RouterConfig, log: Path) -> None:
        self.workers, self.cfg, self.log = list(workers), cfg, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def start(self, timeout_s: float = 60.0) -> RouterProcess:
        with open(self.log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(router_command(self.workers, self.cfg), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_http_ok(self.url + "/readiness", timeout_s, self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Deployment:
    """Replica processes plus the router process; `stop()` (or leaving the `with` block) ends them all."""

    num_replicas: int
    serve_args: list[str]
    router: RouterConfig = field(default_factory=RouterConfig)
    replica_port: int = 8100              # replica i listens on replica_port + i
    kv_events_port: int = 5600            # replica i publishes KV events on kv_events_port + i
    gpus_per_replica: int = 1
    forward_stateful: bool = True         # replicas forward a turn continuing a peer's response to that peer
    log_dir: Path | None = None
    startup_timeout_s: float = 900.0
    procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    workers: list[Worker] = field(default_factory=list, init=False)
    router_process: RouterProcess | None = field(default=None, init=False)

    def _log(self, name: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self._log(name), "wb")  # noqa: SIM115 - the child owns it until it exits
        # its own process group: a Ctrl-C in the terminal reaches the launcher, which stops the children in order
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start(self) -> Deployment:
        if self.num_replicas < 1:
            raise ValueError("need at least one replica")
        if self.log_dir is None:
            import tempfile

            self.log_dir = Path(tempfile.mkdtemp(prefix="pensieve-replicas-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        gpus = gpu_ids()
        if gpus and len(gpus) < self.num_replicas * self.gpus_per_replica:
            raise ValueError(f"{self.num_replicas} replicas x {self.gpus_per_replica} GPUs need "
                             f"{self.num_replicas * self.gpus_per_replica} GPUs; this host has {len(gpus)}")
        host = self.router.host
        try:
            events = self.router.policy == "kv_aware"   # the only policy that reads KV events
            quiet = [] if any(a.split("=")[0] == "--log-level" for a in self.serve_args) else ["--log-level", "warning"]
            urls = {f"replica-{i}": f"http://{host}:{self.replica_port + i}" for i in range(self.num_replicas)}
            for i, (name, url) in enumerate(urls.items()):
                env = dict(os.environ)
                if gpus:  # one GPU group per replica; without GPUs every replica runs on the CPU
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * self.gpus_per_replica:(i + 1) * self.gpus_per_replica])
                peers = ",".join(f"{n}={u}" for n, u in urls.items() if n != name)
                # warnings only, unless asked: the router's health check would log an access line a second
                cmd = [sys.executable, "-m", "pensieve.cli", "serve", *self.serve_args, *quiet, "--host", host,
                       "--port", url.rsplit(":", 1)[1], "--replica-name", name]
                if peers and self.forward_stateful:
                    cmd += ["--replica-peers", peers]
                kv_events = f"tcp://{host}:{self.kv_events_port + i}" if events else None
                if kv_events:
                    cmd += ["--kv-events-endpoint", kv_events]
                self.procs.append(self._spawn(cmd, name, env))
                self.workers.append(Worker(url, kv_events))
            for i, (w, proc) in enumerate(zip(self.workers, self.procs)):
                wait_http_ok(w.url + "/health", self.startup_timeout_s, proc, self._log(f"replica-{i}"))
            self.router_process = RouterProcess(self.workers, self.router, self._log("router")).start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return f"http://{self.router.host}:{self.router.port}"

    def kill_replica(self, i: int) -> None:
        """SIGKILL replica i (what a crash looks like to the router and the clients)."""
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        """Router first (no new requests reach a stopping replica), then the replicas, gracefully, then by force."""
        if self.router_process is not None:
            self.router_process.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
