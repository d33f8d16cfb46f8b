"""End-to-end ingest rate: probe RedisSink -> Redis stream -> Celery worker -> store, all on
this machine (loopback), against the naive alternative of one Celery task per
token-layer JSON message, measured in the same run.

    python benchmarks/bench_ingest.py [--seconds 60] [--rows-per-frame 500000]
                                      [--workers 1 --ingest-threads 2] [--naive-seconds 15]
                                      [--pre-encoded]

Frames look like a training step of a mid-size MoE: 8 MoE layers, top-2, a sequential
position column, Zipf token ids, skewed expert choice; each also carries token_stats
(one row per token-layer) and expert_step. The producer keeps at most a few frames in
flight (it waits on the sink's backlog), so the figure is the sustained rate the
workers store, not the rate Redis accepts. --pre-encoded XADDs already-encoded frames
(the probe usually runs on another machine and its encoding is not the worker's cost).

Also measured in the same run, on the same frames and with as many threads as the
workers have: the raw limit (pyarrow writing the frames' tables to Parquet with the
store's options, nothing else), and the worker's own path in this process (decode +
Store.write_frame) with the time split by phase, so the gap to the raw write is located.

Prints routing rows/s for each path and the stream path's ratio to the raw write.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from moescope.collector.celery_app import app
from moescope.frame import Frame, encode
from moescope.schema import EXPERT_STEP, ROUTING, TOKEN_STATS

RUN = "bench-ingest"
LAYERS, K, E = 8, 2, 8


def step_tables(rows: int, step: int, seed: int) -> dict[str, pa.Table]:
    """One training step's tables with `rows` routing rows (tokens = rows / (LAYERS * K))."""
    rng = np.random.default_rng(seed)
    tokens = max(1, rows // (LAYERS * K))
    n_tl = tokens * LAYERS
    layer_TL = np.repeat(np.arange(LAYERS, dtype=np.int16), tokens)
    pos_TL = np.tile(np.arange(tokens, dtype=np.int32) % 2048, LAYERS)
    tok_TL = np.tile(np.minimum(rng.zipf(1.3, tokens), 50_000).astype(np.int32), LAYERS)
    probs_E = rng.dirichlet(np.ones(E) * 0.7)
    experts_N = rng.choice(E, size=n_tl * K, p=probs_E).astype(np.int16)
    common = {"run": pa.array([RUN] * 1).take(np.zeros(n_tl * K, np.int64)),
              "checkpoint": pa.array(["step-0"]).take(np.zeros(n_tl * K, np.int64))}
    routing = pa.Table.from_pydict({
        **common, "step": np.full(n_tl * K, step), "rank": np.zeros(n_tl * K, np.int32),
        "microbatch": np.zeros(n_tl * K, np.int32), "seq": np.repeat(pos_TL // 2048, K).astype(np.int32),
        "pos": np.repeat(pos_TL, K), "token_id": np.repeat(tok_TL, K), "layer": np.repeat(layer_TL, K),
        "slot": np.tile(np.arange(K, dtype=np.int8), n_tl), "expert": experts_N,
        "weight": rng.random(n_tl * K, dtype=np.float32), "dropped": rng.random(n_tl * K) < 0.02,
        "domain": pa.array(["web"]).take(np.zeros(n_tl * K, np.int64)),
        "phase": pa.array(["train"]).take(np.zeros(n_tl * K, np.int64)), "probe_set": pa.nulls(n_tl * K, pa.string())},
        schema=ROUTING)
    token_stats = pa.Table.from_pydict({
        "run": common["run"].slice(0, n_tl), "checkpoint": common["checkpoint"].slice(0, n_tl),
        "step": np.full(n_tl, step), "rank": np.zeros(n_tl, np.int32), "microbatch": np.zeros(n_tl, np.int32),
        "seq": (pos_TL // 2048).astype(np.int32), "pos": pos_TL, "token_id": tok_TL, "layer": layer_TL,
        "entropy": rng.random(n_tl, dtype=np.float32) * 2, "logsumexp": rng.random(n_tl, dtype=np.float32),
        "margin": rng.random(n_tl, dtype=np.float32), "domain": pa.array(["web"]).take(np.zeros(n_tl, np.int64)),
        "phase": pa.array(["train"]).take(np.zeros(n_tl, np.int64)), "probe_set": pa.nulls(n_tl, pa.string())},
        schema=TOKEN_STATS)
    n_le = LAYERS * E
    expert_step = pa.Table.from_pydict({
        "run": [RUN] * n_le, "checkpoint": ["step-0"] * n_le, "step": [step] * n_le, "rank": [0] * n_le,
        "layer": np.repeat(np.arange(LAYERS), E), "expert": np.tile(np.arange(E), LAYERS), "num_tokens": [tokens] * n_le,
        "tokens": [tokens * K // E] * n_le, "dropped": [0] * n_le, "top1": [tokens // E] * n_le,
        "prob_sum": [tokens / E] * n_le, "weight_sum": [tokens / E] * n_le, "phase": ["train"] * n_le}, schema=EXPERT_STEP)
    return {"routing": routing, "token_stats": token_stats, "expert_step": expert_step}


# ---------------------------------------------------------------- the naive alternative
_naive_store = None


@app.task(name="bench.naive_token", ignore_result=True)
def naive_token(message: dict) -> None:
    """One token at one layer, as JSON: builds and stores a K-row frame (what per-row ingestion costs)."""
    global _naive_store
    from moescope.analysis.store import AnalysisStore as Store
    from moescope.settings import get_settings

    if _naive_store is None:
        s = get_settings()
        _naive_store = Store(s.store, s.database_url)
    k = len(message["experts"])
    cols = {"run": [message["run"]] * k, "checkpoint": ["step-0"] * k, "step": [message["step"]] * k, "rank": [0] * k,
            "microbatch": [0] * k, "seq": [0] * k, "pos": [message["pos"]] * k, "token_id": [message["token_id"]] * k,
            "layer": [message["layer"]] * k, "slot": list(range(k)), "expert": message["experts"],
            "weight": message["weights"], "dropped": [False] * k, "domain": [None] * k, "phase": ["train"] * k,
            "probe_set": [None] * k}
    _naive_store.write_frame(Frame(run=message["run"], producer=message["producer"], seq=message["seq"],
                                   tables={"routing": pa.Table.from_pydict(cols, schema=ROUTING)}))


# ---------------------------------------------------------------- harness
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(env, n, threads, extra=()):
    procs = []
    for i in range(n):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "moescope.collector.celery_app", "worker", f"--ingest-threads={threads}",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"bench{i}-{uuid.uuid4().hex[:4]}@%h",
             "--loglevel=WARNING", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def stored_routing_rows(store, run) -> int:
    from sqlalchemy import func, select

    from moescope.collector import metadata as md

    with store.engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(md.segments.c.rows), 0)).where(
            md.segments.c.table_name == "routing", md.segments.c.run == run)).scalar())


def bench_stream(args, env, url, store) -> float:
    import redis

    from moescope.probe.redis_sink import RedisSink

    templates = [step_tables(args.rows_per_frame, step, seed=step) for step in range(4)]
    encoded = [encode(Frame(RUN, "bench-pre", i, tables=t)) for i, t in enumerate(templates)] if args.pre_encoded else None
    procs = start_workers({**env, "MOESCOPE_STREAM": "moescope:frames"}, args.workers, args.ingest_threads,
                          ["--pool=solo"])
    sink = RedisSink(url, spool_dir=Path(env["MOESCOPE_STORE"]).parent / "spool", ack_poll_s=0.1,
                     queue_bytes=512 << 20, spill_budget_bytes=4 << 30)
    client = redis.Redis.from_url(url)
    seq, in_flight = 0, args.in_flight
    try:
        time.sleep(3)  # worker start-up
        warm_end = time.monotonic() + args.warmup
        t0 = r0 = None
        end = warm_end + args.seconds
        while True:
            now = time.monotonic()
            if t0 is None and now >= warm_end:
                t0, r0 = now, stored_routing_rows(store, RUN)
            if now >= end:
                break
            if args.pre_encoded:
                if _in_flight(client) < in_flight:
                    client.xadd("moescope:frames", {"frame": _fresh_id(encoded[seq % 4], seq)}, maxlen=64, approximate=True)
                    seq += 1
                else:
                    time.sleep(0.005)
            elif sum(sink.backlog()) < in_flight:
                sink.send(Frame(RUN, "bench-p0", seq, tables=templates[seq % 4]))
                seq += 1
            else:
                time.sleep(0.005)
        t1, r1 = time.monotonic(), stored_routing_rows(store, RUN)
    finally:
        sink.close()
        stop(procs)
    rate = (r1 - r0) / (t1 - t0)
    mode = "pre-encoded XADD" if args.pre_encoded else "RedisSink (encode in this process)"
    print(f"stream ingest  [{mode}]: {r1 - r0:,} routing rows in {t1 - t0:.1f}s = {rate / 1e6:.2f} M rows/s "
          f"({args.workers} worker(s) x {args.ingest_threads} thread(s), {args.rows_per_frame:,} rows/frame)", flush=True)
    return rate


def _in_flight(client) -> int:
    """Entries not yet read by the ingest group plus those read and not yet acknowledged."""
    try:
        groups = client.xinfo_groups("moescope:frames")
    except Exception:  # noqa: BLE001 - the group appears when the first worker starts
        return 0
    return int(groups[0].get("lag") or 0) + int(groups[0]["pending"]) if groups else 0


def _fresh_id(data: bytes, seq: int) -> bytes:
    # Same bytes, new frame id and seq: rewrite the JSON header (ids are fixed-width hex, seq may grow).
    import json
    import struct

    (hlen,) = struct.unpack_from("<I", data, 4)
    header = json.loads(data[8 : 8 + hlen])
    header.update(frame_id=uuid.uuid4().hex, seq=seq)
    new = json.dumps(header, separators=(",", ":")).encode()
    return data[:4] + struct.pack("<I", len(new)) + new + data[8 + hlen :]


def bench_naive(args, env, store) -> float:
    procs = start_workers({**env, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")},
                          1, 1, ["--pool=prefork", f"--concurrency={os.cpu_count() or 2}", "--include=bench_ingest"])
    try:
        time.sleep(4)
        rng = np.random.default_rng(0)
        sent, t_end = 0, time.monotonic() + args.naive_seconds
        while time.monotonic() < t_end:  # enqueue as fast as possible for the window
            naive_token.delay({"run": "bench-naive", "producer": "naive", "seq": sent, "step": 0, "layer": sent % LAYERS,
                               "pos": sent, "token_id": int(rng.integers(50_000)),
                               "experts": rng.choice(E, K, replace=False).tolist(), "weights": rng.random(K).tolist()})
            sent += 1
        t0, r0 = time.monotonic(), stored_routing_rows(store, "bench-naive")
        time.sleep(args.naive_seconds)
        t1, r1 = time.monotonic(), stored_routing_rows(store, "bench-naive")
    finally:
        stop(procs)
    rate = (r1 - r0) / (t1 - t0)
    print(f"naive ingest   [one Celery task per token-layer JSON message]: {r1 - r0:,} routing rows in {t1 - t0:.1f}s "
          f"= {rate:,.0f} rows/s ({sent:,} messages enqueued)", flush=True)
    return rate


def _threaded_rate(fn, items, threads: int, seconds: float) -> float:
    """Routing rows/s of calling fn(item) -> rows from `threads` threads for `seconds`."""
    import itertools
    import threading

    counter, lock, stop_at = itertools.count(), threading.Lock(), time.monotonic() + seconds
    done = [0]

    def loop():
        while time.monotonic() < stop_at:
            rows = fn(items[next(counter) % len(items)])
            with lock:
                done[0] += rows

    t0 = time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return done[0] / (time.monotonic() - t0)


def bench_raw_and_worker_path(args, work: Path) -> float:
    """The raw Parquet write of the frames' tables (the limit) and decode + write_frame in this process."""
    import pyarrow.parquet as pq

    from moescope.collector import store as store_mod
    from moescope.frame import decode

    threads = args.workers * args.ingest_threads
    templates = [step_tables(args.rows_per_frame, step, seed=step) for step in range(4)]
    raw_dir = work / "raw"
    raw_dir.mkdir()

    def raw(tables):
        for name, table in tables.items():
            strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
            pq.write_table(table, raw_dir / f"{name}-{uuid.uuid4().hex}.parquet", use_dictionary=strings,
                           **store_mod._INGEST_PARQUET_KW)
        return tables["routing"].num_rows

    raw_rate = _threaded_rate(raw, templates, threads, args.raw_seconds)
    print(f"raw Parquet write [the limit: pyarrow, store options, {threads} thread(s)]: {raw_rate / 1e6:.2f} M rows/s",
          flush=True)
    shutil.rmtree(raw_dir, ignore_errors=True)

    encoded = [encode(Frame(RUN, "bench-pre", i, tables=t)) for i, t in enumerate(templates)]
    store = store_mod.Store(work / "inproc")
    phases = {"decode": 0.0, "write_frame": 0.0}
    seqs = iter(range(10**9))

    def worker_path(data):
        t0 = time.perf_counter()
        frame = decode(_fresh_id(data, next(seqs)))
        t1 = time.perf_counter()
        store.write_frame(frame)
        t2 = time.perf_counter()
        phases["decode"] += t1 - t0
        phases["write_frame"] += t2 - t1
        return frame.tables["routing"].num_rows

    rate = _threaded_rate(worker_path, encoded, threads, args.raw_seconds)
    total = sum(phases.values()) or 1.0
    print(f"worker path in process [decode + Store.write_frame, {threads} thread(s)]: {rate / 1e6:.2f} M rows/s "
          f"= {rate / raw_rate:.2f}x raw; time: decode {phases['decode'] / total:.0%}, "
          f"write_frame {phases['write_frame'] / total:.0%}", flush=True)
    store.close()
    return raw_rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window of the stream path (default 60)")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rows-per-frame", type=int, default=500_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ingest-threads", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=12, help="frames the producer keeps unacknowledged (default 12)")
    ap.add_argument("--naive-seconds", type=float, default=15.0)
    ap.add_argument("--raw-seconds", type=float, default=15.0, help="window of the raw-write and in-process paths")
    ap.add_argument("--pre-encoded", action="store_true", help="XADD pre-encoded frames instead of using RedisSink")
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server not on PATH", file=sys.stderr)
        return 2

    from moescope.analysis.store import AnalysisStore as Store

    work = Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", str(work)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "MOESCOPE_BROKER_URL": url, "MOESCOPE_STORE": str(work / "store"), "MOESCOPE_CLAIM_IDLE_S": "30"}
    if args.database_url:
        env["MOESCOPE_DATABASE_URL"] = args.database_url
    print(f"machine: {os.cpu_count()} CPU cores; redis on loopback; store {work / 'store'}", flush=True)
    try:
        time.sleep(0.5)
        from moescope.collector.celery_app import configure
        from moescope.settings import get_settings

        configure(get_settings(broker_url=url, store=str(work / "store"), database_url=args.database_url))
        store = Store(work / "store", args.database_url)
        raw_rate = bench_raw_and_worker_path(args, work)
        stream_rate = bench_stream(args, env, url, store)
        print(f"ratio stream / raw Parquet write: {stream_rate / raw_rate:.2f}x", flush=True)
        naive_rate = bench_naive(args, env, store) if args.naive_seconds > 0 else 0.0
        if naive_rate:
            print(f"ratio stream / naive: {stream_rate / naive_rate:,.0f}x")
        store.close()
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
