"""Segments on object storage against local disk, measured in one run: ingest rows/s and queries.

    python benchmarks/bench_object_store.py [--frames 24] [--rows-per-frame 200000] [--repeat 5]
                                            [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

Both stores keep their metadata in the same PostgreSQL database (a fresh schema each,
dropped at the end), so only where the segments live differs: a local directory, or
s3://bucket/prefix on moto's S3 server started on loopback. The S3 server is a local
process: this measures the code path (one PUT per segment, DuckDB reading through the
fsspec filesystem, HTTP on loopback), not a real S3 network's latency or bandwidth.

Per store, in this order: Store.write_frame of the same probe frames (one thread), then
each query through Store.sql as the dashboard runs it (its first run, then the median of
--repeat more: a process keeps the objects it read, segments never change), then
compaction, then the queries again on the compacted files. Prints rows/s and seconds,
and object storage's ratio to local disk.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import RUN, probe_frame  # noqa: E402  (frames of run RUN, as the probe ships them)

from moescope.analysis.store import AnalysisStore as Store  # noqa: E402

QUERIES = {
    "expert load per step (GROUP BY step, layer, expert)":
        "SELECT step, layer, expert, count(*) AS n FROM routing GROUP BY ALL",
    "drop rate per layer": "SELECT layer, avg(dropped::INT) AS d FROM routing GROUP BY layer",
    "one step's rows (filter)": "SELECT count(*) AS n FROM routing WHERE step = 3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    import boto3

    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    client = boto3.client("s3")
    for _ in range(300):
        try:
            client.create_bucket(Bucket="bench")
            return proc, env
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def schema_url(base: str, engine, name: str) -> str:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {name}"))
    return f"{base}?options=-csearch_path%3D{name}"


def query_times(store: Store, sql: str, repeat: int) -> tuple[float, float]:
    """The first run (object storage: nothing of the files in this process yet) and the median of the rest."""
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        store.sql(sql, run=RUN)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def measure(store: Store, frames, repeat: int) -> dict[str, float]:
    rows = sum(f.tables["routing"].num_rows for f in frames)
    t0 = time.perf_counter()
    for frame in frames:
        store.write_frame(frame)
    out = {"ingest rows/s": rows / (time.perf_counter() - t0)}
    for when in ("", ", compacted"):
        if when:
            t0 = time.perf_counter()
            store.compact(RUN, min_files=2)
            out["compaction, s"] = time.perf_counter() - t0
        for name, sql in QUERIES.items():
            out[f"{name}{when}, first, s"], out[f"{name}{when}, again, s"] = query_times(store, sql, repeat)
    assert int(store.sql("SELECT count(*) AS n FROM routing", run=RUN).n[0]) == rows
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--rows-per-frame", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, text

    templates = [probe_frame(args.rows_per_frame, step, seed=step) for step in range(4)]
    frames = [dataclasses.replace(templates[i % 4], seq=i, frame_id=uuid.uuid4().hex, final=i == args.frames - 1)
              for i in range(args.frames)]
    rows = sum(f.tables["routing"].num_rows for f in frames)
    print(f"{args.frames} frames, {rows:,} routing rows; load average {os.getloadavg()[0]:.1f}", flush=True)

    moto, _ = start_moto()
    engine = create_engine(args.database_url)
    schemas = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    work = Path(tempfile.mkdtemp(prefix="bench-objects-"))
    results = {}
    try:
        for label, location, schema in (("local disk", work / "store", schemas[0]),
                                        ("object storage (moto on loopback)", "s3://bench/moescope", schemas[1])):
            store = Store(location, schema_url(args.database_url, engine, schema))
            results[label] = measure(store, frames, args.repeat)
            store.close()
            print(f"  {label}: done; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        with engine.begin() as conn:
            for schema in schemas:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()
        moto.kill()
        shutil.rmtree(work, ignore_errors=True)

    local, remote = results["local disk"], results["object storage (moto on loopback)"]
    print("\n| measure | local disk | object storage | object / local |\n|---|---|---|---|")
    for key in local:
        fmt = (lambda v: f"{v:,.0f}") if key.endswith("rows/s") else (lambda v: f"{v:.3f}")
        print(f"| {key} | {fmt(local[key])} | {fmt(remote[key])} | {remote[key] / local[key]:.2f}x |")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
