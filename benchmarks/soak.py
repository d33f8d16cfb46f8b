"""Soak: a steady probe -> Redis -> worker stream for a bounded time, sampling memory.

    python benchmarks/soak.py [--minutes 10] [--rows-per-frame 100000] [--frames-per-s 5]

Everything on loopback: an own redis-server on a free port, one Celery worker and beat
(compaction every 30 s) as subprocesses, the producer (RedisSink) in this process. RSS
of the worker (with its pool children) and of this probe process is sampled every
--sample-s seconds; the script prints each sample, then start / end / max per process
and the ledger check of the run (every frame stored exactly once).
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

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import free_port, step_tables  # noqa: E402

from moescope.frame import Frame  # noqa: E402

RUN = "bench-ingest"  # the run id step_tables writes into its rows


def rss_mb(pid: int, with_children: bool = False) -> float:
    pids = [pid]
    if with_children:
        try:
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    ap.add_argument("--rows-per-frame", type=int, default=100_000)
    ap.add_argument("--frames-per-s", type=float, default=5.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server not on PATH", file=sys.stderr)
        return 2
    from moescope.collector.check import check_run
    from moescope.analysis.store import AnalysisStore as Store
    from moescope.probe.redis_sink import RedisSink

    work = Path(tempfile.mkdtemp(prefix="moescope-soak-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    procs = [subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)],
                              stdout=subprocess.DEVNULL)]
    env = {**os.environ, "MOESCOPE_BROKER_URL": url, "MOESCOPE_STORE": str(work / "store"), "MOESCOPE_COMPACT_INTERVAL_S": "30"}
    env.pop("MOESCOPE_DATABASE_URL", None)
    celery = [sys.executable, "-m", "celery", "-A", "moescope.collector.celery_app"]
    time.sleep(0.5)
    worker = subprocess.Popen([*celery, "worker", "--pool=solo", "--ingest-threads=2", "--without-gossip", "--without-mingle",
                               "-n", f"soak-{uuid.uuid4().hex[:4]}@%h", "--loglevel=WARNING"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(worker)
    procs.append(subprocess.Popen([*celery, "beat", "--loglevel=WARNING", f"--schedule={work / 'beat-schedule'}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    templates = [step_tables(args.rows_per_frame, step, seed=step) for step in range(4)]
    sink = RedisSink(url, spool_dir=work / "spool", ack_poll_s=0.2)
    samples: dict[str, list[float]] = {"worker": [], "probe": []}
    print(f"soak: {args.minutes:g} min, {args.rows_per_frame:,} rows/frame at {args.frames_per_s:g} frames/s; store {work}",
          flush=True)
    seq, start = 0, time.monotonic()
    end, next_sample, period = start + args.minutes * 60, start + 3, 1.0 / args.frames_per_s
    try:
        while time.monotonic() < end:
            sink.send(Frame(RUN, "soak", seq, tables=templates[seq % 4]))
            seq += 1
            if time.monotonic() >= next_sample:
                w, p = rss_mb(worker.pid, with_children=True), rss_mb(os.getpid())
                samples["worker"].append(w)
                samples["probe"].append(p)
                queued, unacked = sink.backlog()
                print(f"t={time.monotonic() - start:6.0f}s worker_rss={w:7.1f} MB probe_rss={p:7.1f} MB frames={seq} "
                      f"unacked={unacked} queued={queued}", flush=True)
                next_sample += args.sample_s
            time.sleep(max(0.0, start + seq * period - time.monotonic()))
        sink.send(Frame(RUN, "soak", seq, tables=templates[seq % 4], final=True))
        seq += 1
        sink.close()
        for name, values in samples.items():
            if values:
                print(f"{name:<7} RSS MB: start {values[0]:.1f}  end {values[-1]:.1f}  max {max(values):.1f}  "
                      f"(end/start {values[-1] / values[0]:.2f}x)")
        store = Store(work / "store")
        text, code = check_run(store, RUN)
        print(text.splitlines()[-1], f"({seq} frames, {seq * args.rows_per_frame:,} routing rows)")
        store.close()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
