"""End-to-end ingest rate: probe RedisSink -> Redis stream -> Celery worker(s) -> store, all on
this machine (loopback), against the raw Parquet write of the same frames and the naive
alternative of one Celery task per token-layer JSON message, measured in the same run.

    python benchmarks/bench_ingest.py [--seconds 60] [--rows-per-frame 500000]
                                      [--workers 1 --ingest-threads 2] [--naive-seconds 15]
                                      [--pre-encoded] [--workers 1,2,4 --rounds 2]

Frames are cut by the probe's own Framer from synthetic router outputs shaped like a
training step of a mid-size MoE: 8 MoE layers, E=8, top-2, sequences of 2048 positions,
Zipf token ids, skewed expert choice. Like every probe frame they carry token_stats,
expert_step and the rollups the probe counts (meta "rollups": true), so the store writes
them as they come; frames without rollups (imports, other producers) make the store
derive them, measured separately in process. The producer keeps a few frames in flight
(it waits on the group's backlog), so the figure is the sustained rate the workers
store, not the rate Redis accepts. --pre-encoded XADDs already-encoded frames (the probe
usually runs on another machine and its encoding is not the worker's cost).

Also measured in the same run, on the same frames, with as many threads as one worker
has: the raw limit (pyarrow writing every table the store writes to Parquet with the
store's options, nothing else), and the worker's own path in this process (decode +
Store.write_frame) with the time split by phase. During each stream window the CPU
seconds of the worker processes, the Redis server and this (producer) process are read
from /proc, per million routing rows, so the gap to the raw write is located.

With a list of worker counts (--workers 1,2,4, or 1x2,1x4,2x2 for processes x consumer
threads) the stream path is measured once per entry, in that order, --rounds times; each
entry's median is printed with its ratio to the first entry's (scaling on this machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
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
from moescope.schema import ROUTING, TABLES

RUN = "bench-ingest"
LAYERS, K, E, SEQ_LEN = 8, 2, 8, 2048


def probe_frame(rows: int, step: int, seed: int, producer: str = "bench") -> Frame:
    """One training step as the probe ships it, about `rows` routing rows, cut by the probe's own Framer.

    Sequences of SEQ_LEN positions, Zipf token ids, skewed top-K expert choice, one domain;
    the frame carries token_stats, expert_step and the rollups the probe counts (meta
    "rollups": true), so the store writes them as they are.
    """
    import torch

    from moescope.probe.adapters.base import RouterSite
    from moescope.probe.capture import AGG_NUM_TOKENS, AGG_PROB, AGG_ROWS, AGG_TOKENS, AGG_TOP1, AGG_WEIGHT, CallTensors
    from moescope.probe.framer import ForwardRecord, Framer, SiteRecord

    rng = np.random.default_rng(seed)
    tokens = max(1, rows // (LAYERS * K))
    length = min(SEQ_LEN, tokens)
    batch = max(1, tokens // length)
    t = batch * length
    sites = [RouterSite(f"model.layers.{layer}.mlp.gate", layer, E, K, "softmax-topk") for layer in range(LAYERS)]
    log_p = np.log(rng.dirichlet(np.ones(E) * 0.7))
    records = []
    for site in sites:
        ids_TK = np.argsort(log_p - np.log(-np.log(rng.random((t, E)))), axis=1)[:, :K]  # Gumbel top-K
        weights_TK = rng.random((t, K), dtype=np.float32)
        stats_T3 = np.stack([rng.random(t, dtype=np.float32) * 2, rng.random(t, dtype=np.float32) + 3,
                             rng.random(t, dtype=np.float32)], 1)
        dropped_TK = rng.random((t, K)) < 0.02
        agg_6E = np.zeros((AGG_ROWS, E))
        for row, ids, values in ((AGG_TOKENS, ids_TK, 1.0), (AGG_WEIGHT, ids_TK, weights_TK), (AGG_TOP1, ids_TK[:, 0], 1.0)):
            np.add.at(agg_6E[row], ids.ravel(), np.ravel(values) if np.ndim(values) else values)
        agg_6E[AGG_PROB], agg_6E[AGG_NUM_TOKENS] = t / E, t
        call = CallTensors(torch.from_numpy(ids_TK.astype(np.int16)), torch.from_numpy(weights_TK),
                           torch.from_numpy(stats_T3), torch.from_numpy(dropped_TK))
        records.append(SiteRecord(site, torch.from_numpy(agg_6E), [call]))
    input_ids_BS = torch.from_numpy(np.minimum(rng.zipf(1.3, (batch, length)), 50_000))
    framer = Framer(RUN, producer, sites, sample_rate=1.0)
    framer.add(ForwardRecord("step-0", step, 0, 0, "train", ["web"] * batch, batch, length, 0, input_ids_BS, None, None,
                             sites=records))
    return framer.emit()


def step_tables(rows: int, step: int, seed: int) -> dict[str, pa.Table]:
    """The per-token tables and expert_step of probe_frame, without rollups (what an import or another producer sends)."""
    return {name: t for name, t in probe_frame(rows, step, seed).tables.items() if name in TABLES}


def without_rollups(frame: Frame) -> Frame:
    """The same frame as a producer that does not count rollups sends it: the store derives them."""
    meta = {k: v for k, v in frame.meta.items() if k != "rollups"}
    return dataclasses.replace(frame, tables={n: t for n, t in frame.tables.items() if n in TABLES}, meta=meta)


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


def bench_stream(args, env, url, store, templates: list[Frame], workers: int, threads: int) -> tuple[float, float]:
    """Routing rows/s stored by `workers` worker processes of `threads` consumer threads over the window; prints CPU
    seconds per process kind."""
    import redis

    from moescope.probe.redis_sink import RedisSink

    stream = f"moescope:frames:w{workers}-{uuid.uuid4().hex[:6]}"  # a stream of its own: no leftovers between runs
    producer = f"bench-{stream[-6:]}"  # sequence numbers start at 0 again for each measurement
    encoded = [encode(dataclasses.replace(f, producer=producer, seq=i)) for i, f in enumerate(templates)]
    procs = start_workers({**env, "MOESCOPE_STREAM": stream}, workers, threads, ["--pool=solo"])
    sink = RedisSink(url, stream=stream, spool_dir=Path(env["MOESCOPE_STORE"]).parent / f"spool-{stream[-6:]}",
                     ack_poll_s=0.1, maxlen=64, queue_bytes=512 << 20, spill_budget_bytes=4 << 30)
    client = redis.Redis.from_url(url)
    seq, in_flight = 0, max(args.in_flight, 2 * workers * threads)
    try:
        _wait_for_consumers(client, stream, workers * threads)
        warm_end = time.monotonic() + args.warmup
        t0 = r0 = cpu0 = None
        end = warm_end + args.seconds
        while True:
            now = time.monotonic()
            if t0 is None and now >= warm_end:
                t0, r0, cpu0, load0 = now, stored_routing_rows(store, RUN), _cpu(procs, client), os.getloadavg()[0]
            if now >= end:
                break
            if args.pre_encoded:
                if _in_flight(client, stream) < in_flight:
                    client.xadd(stream, {"frame": _fresh_id(encoded[seq % len(encoded)], seq)}, maxlen=64, approximate=True)
                    seq += 1
                else:
                    time.sleep(0.02)  # a frame takes ~0.1-1 s to store: polling faster only costs CPU
            elif sum(sink.backlog()) < in_flight:
                template = templates[seq % len(templates)]
                sink.send(Frame(RUN, producer, seq, tables=template.tables, meta=template.meta))
                seq += 1
            else:
                time.sleep(0.02)
        t1, r1, cpu1, load1 = time.monotonic(), stored_routing_rows(store, RUN), _cpu(procs, client), os.getloadavg()[0]
    finally:
        sink.close()
        stop(procs)
    rate = (r1 - r0) / (t1 - t0)
    mode = "pre-encoded XADD" if args.pre_encoded else "RedisSink (encode in this process)"
    per_m = {k: (cpu1[k] - cpu0[k]) / max(r1 - r0, 1) * 1e6 for k in cpu0}
    print(f"stream ingest  [{mode}, {workers} worker(s) x {threads} thread(s)]: {r1 - r0:,} routing rows in "
          f"{t1 - t0:.1f}s = {rate / 1e6:.2f} M rows/s; CPU s per M rows: workers {per_m['workers']:.2f}, "
          f"redis-server {per_m['redis']:.2f}, producer {per_m['producer']:.2f} (all {sum(per_m.values()):.2f}); "
          f"load average {load0:.1f} -> {load1:.1f}", flush=True)
    return rate, sum(per_m.values())


def _cpu(procs, client) -> dict[str, float]:
    """CPU seconds so far of the worker processes, the Redis server, and this (producer) process."""
    def of(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return {"workers": sum(of(p.pid) for p in procs), "redis": of(int(client.info("server")["process_id"])),
            "producer": time.process_time()}


def _wait_for_consumers(client, stream: str, n: int, timeout: float = 300.0) -> None:
    """Until `n` consumers have joined the ingest group (worker start-up takes long on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            groups = client.xinfo_groups(stream)
        except Exception:  # noqa: BLE001 - no stream yet
            groups = []
        if groups and int(groups[0]["consumers"]) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{n} consumers did not join the ingest group of {stream} within {timeout:.0f}s")


def _in_flight(client, stream: str) -> int:
    """Entries not yet read by the ingest group plus those read and not yet acknowledged."""
    try:
        groups = client.xinfo_groups(stream)
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


def _threaded_rate(fn, items, threads: int, seconds: float) -> tuple[float, float]:
    """Routing rows/s of calling fn(item) -> rows from `threads` threads for `seconds`, and CPU seconds per M rows."""
    import itertools
    import threading

    counter, lock, stop_at = itertools.count(), threading.Lock(), time.monotonic() + seconds
    done = [0]

    def loop():
        while time.monotonic() < stop_at:
            rows = fn(items[next(counter) % len(items)])
            with lock:
                done[0] += rows

    t0, cpu0 = time.monotonic(), time.process_time()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return done[0] / (time.monotonic() - t0), (time.process_time() - cpu0) / max(done[0], 1) * 1e6


def bench_raw(args, work: Path, templates: list[Frame], label: str = "the limit") -> tuple[float, float]:
    """The raw Parquet write of the frames' tables with the store's options: the limit (rows/s, CPU s per M rows)."""
    import pyarrow.parquet as pq

    from moescope.collector.segment_fs import INGEST_PARQUET_KW

    threads = args.ingest_threads
    raw_dir = work / "raw"
    raw_dir.mkdir()

    def raw(frame):
        for name, table in frame.tables.items():  # every table the store writes, rollups included
            strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
            pq.write_table(table, raw_dir / f"{name}-{uuid.uuid4().hex}.parquet", use_dictionary=strings,
                           **INGEST_PARQUET_KW)
        return frame.tables["routing"].num_rows

    raw_rate, cpu = _threaded_rate(raw, templates, threads, args.raw_seconds)
    print(f"raw Parquet write [{label}: pyarrow, store options, {threads} thread(s)]: {raw_rate / 1e6:.2f} M rows/s; "
          f"CPU s per M rows {cpu:.2f}; load average {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(raw_dir, ignore_errors=True)
    return raw_rate, cpu


def bench_worker_path(args, work: Path, templates: list[Frame], raw_rate: float) -> None:
    """decode + Store.write_frame in this process, on frames with and without the probe's rollups."""
    from moescope.collector.store import Store
    from moescope.frame import decode

    threads = args.ingest_threads
    for label, frames in (("frames with the probe's rollups", templates),
                          ("frames without rollups: the store derives them", [without_rollups(f) for f in templates])):
        encoded = [encode(dataclasses.replace(f, producer=f"bench-{label[:11]}", seq=i)) for i, f in enumerate(frames)]
        store = Store(work / f"inproc-{uuid.uuid4().hex[:6]}")
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

        rate, cpu = _threaded_rate(worker_path, encoded, threads, args.raw_seconds)
        total = sum(phases.values()) or 1.0
        print(f"worker path in process [decode + Store.write_frame, {threads} thread(s), {label}]: "
              f"{rate / 1e6:.2f} M rows/s = {rate / raw_rate:.2f}x raw; CPU s per M rows {cpu:.2f}; time: decode "
              f"{phases['decode'] / total:.0%}, write_frame {phases['write_frame'] / total:.0%}", flush=True)
        store.close()


def _label(count: tuple[int, int]) -> str:
    return f"{count[0]} worker(s) x {count[1]} thread(s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window of the stream path (default 60)")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rows-per-frame", type=int, default=500_000)
    ap.add_argument("--workers", default="1", help="worker processes, or NxT for N processes of T threads; a list "
                    "(1,2,4 or 1x2,1x4,2x2) measures the stream path once per entry, in this order, repeated --rounds "
                    "times, and prints each entry's ratio to the first")
    ap.add_argument("--rounds", type=int, default=1, help="repeats of the --workers list (medians are reported)")
    ap.add_argument("--skip-in-process", action="store_true", help="measure only the raw write and the stream path")
    ap.add_argument("--ingest-threads", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=12, help="frames the producer keeps unacknowledged (default 12)")
    ap.add_argument("--naive-seconds", type=float, default=15.0)
    ap.add_argument("--raw-seconds", type=float, default=15.0, help="window of the raw-write and in-process paths")
    ap.add_argument("--pre-encoded", action="store_true", help="XADD pre-encoded frames instead of using RedisSink")
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args(argv)
    try:
        # "N" or "NxT": N worker processes of T consumer threads (default --ingest-threads)
        counts = [tuple(int(x) for x in (f"{w}x{args.ingest_threads}" if "x" not in w else w).split("x"))
                  for w in args.workers.split(",")]
        if not counts or any(len(c) != 2 or min(c) < 1 for c in counts):
            raise ValueError
    except ValueError:
        print(f"--workers must be counts like 1,2,4 or 1x2,2x2 separated by commas, got {args.workers!r}", file=sys.stderr)
        return 2
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
    print(f"machine: {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}; redis on loopback; "
          f"store {work / 'store'}", flush=True)
    try:
        time.sleep(0.5)
        from moescope.collector.celery_app import configure
        from moescope.settings import get_settings

        configure(get_settings(broker_url=url, store=str(work / "store"), database_url=args.database_url))
        store = Store(work / "store", args.database_url)
        templates = [probe_frame(args.rows_per_frame, step, seed=step) for step in range(4)]
        raw_rate, raw_cpu = bench_raw(args, work, templates)
        if not args.skip_in_process:
            bench_worker_path(args, work, templates, raw_rate)
        rates: dict[tuple, list[float]] = {n: [] for n in counts}
        cpus: dict[tuple, list[float]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                rate, cpu = bench_stream(args, env, url, store, templates, *n)
                rates[n].append(rate)
                cpus[n].append(cpu)
        # The machine's load drifts: the limit is the mean of a raw window before and one after the stream path.
        after, after_cpu = bench_raw(args, work, templates, "the limit, again")
        raw_rate, raw_cpu = (raw_rate + after) / 2, (raw_cpu + after_cpu) / 2
        stream_rate, stream_cpu = statistics.median(rates[counts[0]]), statistics.median(cpus[counts[0]])
        print(f"ratio stream / raw Parquet write: {stream_rate / raw_rate:.2f}x ({_label(counts[0])}, against the mean "
              f"of both raw windows, {raw_rate / 1e6:.2f} M rows/s); CPU per row: raw / stream = "
              f"{raw_cpu:.2f} / {stream_cpu:.2f} = {raw_cpu / stream_cpu:.2f}x", flush=True)
        if len(counts) > 1:
            for n in counts:
                med = statistics.median(rates[n])
                print(f"scaling: {_label(n)}: {med / 1e6:.2f} M rows/s (median of {len(rates[n])}) = "
                      f"{med / stream_rate:.2f}x {_label(counts[0])}", flush=True)
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
