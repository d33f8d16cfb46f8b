"""Real servers for the ingest tests: an own redis-server, Celery worker subprocesses, frames."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import redis

from moescope.collector.stream import GROUP
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING

STREAM = "moescope:frames"
LAYERS = [{"layer": i, "module_path": f"layers.{i}.mlp.gate", "num_experts": 8, "top_k": 2,
           "router_kind": "softmax-topk", "capacity_factor": None} for i in range(2)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server of our own on a free port, without persistence (restarts come back empty)."""

    def __init__(self, workdir: Path):
        self.port, self.workdir, self.proc = free_port(), workdir, None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 10, what="redis-server to start")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


class Workers:
    """Starts `celery -A moescope.collector.celery_app worker` subprocesses; kills them all at teardown."""

    def __init__(self, broker_url: str, store_root: Path, database_url: str | None, logdir: Path):
        self.env = {**os.environ, "MOESCOPE_BROKER_URL": broker_url, "MOESCOPE_STORE": str(store_root),
                    "MOESCOPE_CLAIM_IDLE_S": "3", "PYTHONUNBUFFERED": "1"}
        if database_url:
            self.env["MOESCOPE_DATABASE_URL"] = database_url
        else:
            self.env.pop("MOESCOPE_DATABASE_URL", None)
        self.logdir, self.procs, self._ready = logdir, [], 0
        logdir.mkdir(parents=True, exist_ok=True)

    def start(self, ingest_threads: int = 1, *, wait: bool = True, workdir: Path | None = None) -> subprocess.Popen:
        """workdir: the worker's own working and temporary directory, as on a machine of its own."""
        name = f"w{len(self.procs)}-{uuid.uuid4().hex[:6]}@%h"
        log = open(self.logdir / f"worker-{len(self.procs)}.log", "wb")
        env = self.env
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            env = {**self.env, "TMPDIR": str(workdir)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "moescope.collector.celery_app", "worker", "--pool=solo",
             f"--ingest-threads={ingest_threads}", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", name, "--loglevel=INFO"], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        if wait:  # ready once its consumers have joined the group
            client = redis.Redis.from_url(self.env["MOESCOPE_BROKER_URL"])
            wait_until(lambda: self._consumers(client) >= self._ready + ingest_threads or proc.poll() is not None, 60,
                       what="the worker's stream consumers")
            assert proc.poll() is None, self.logs()
            self._ready += ingest_threads
        return proc

    def _consumers(self, client) -> int:
        try:
            return len(client.xinfo_consumers(STREAM, GROUP))
        except redis.ResponseError:  # no stream or group yet
            return 0

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.logdir.glob("worker-*.log")))

    def kill9(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def routing_table(run: str, n: int, seed: int, step: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {
        "run": [run] * n, "checkpoint": ["c0"] * n, "step": np.full(n, step), "rank": np.zeros(n, np.int32),
        "microbatch": np.zeros(n, np.int32), "seq": rng.integers(0, 4, n, dtype=np.int32),
        "pos": rng.integers(0, 64, n, dtype=np.int32), "token_id": rng.integers(0, 256, n, dtype=np.int32),
        "layer": rng.integers(0, 2, n).astype(np.int16), "slot": np.zeros(n, np.int8),
        "expert": rng.integers(0, 8, n).astype(np.int16), "weight": rng.random(n, dtype=np.float32),
        "dropped": rng.random(n) < 0.1, "domain": ["code"] * n, "phase": ["train"] * n, "probe_set": [None] * n,
    }
    return pa.Table.from_pydict(cols, schema=ROUTING)


def make_frame(run: str, producer: str, seq: int, n: int = 200, *, final: bool = False) -> Frame:
    expert_step = pa.Table.from_pydict({
        "run": [run], "checkpoint": ["c0"], "step": [seq], "rank": [0], "layer": [0], "expert": [1], "num_tokens": [n],
        "tokens": [n], "dropped": [0], "top1": [n], "prob_sum": [1.0], "weight_sum": [1.0], "phase": ["train"]},
        schema=EXPERT_STEP)
    return Frame(run=run, producer=producer, seq=seq, final=final,
                 tables={"routing": routing_table(run, n, seed=seq, step=seq), "expert_step": expert_step},
                 meta={"layers": LAYERS, "checkpoints": [{"checkpoint": "c0", "step": 0}]} if seq == 0 else {})


def wait_drained(client: redis.Redis, timeout: float = 60) -> None:
    """Until the ingest group has read every stream entry and acknowledged all it read."""
    def drained():
        group = next(g for g in client.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
        last = client.xinfo_stream(STREAM)["last-generated-id"]
        return group["last-delivered-id"] == last and group["pending"] == 0
    wait_until(drained, timeout, what="the ingest group to drain the stream")


def redis_available() -> bool:
    return shutil.which("redis-server") is not None
