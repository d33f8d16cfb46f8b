"""Segments on object storage: an S3-compatible server on loopback (moto), metadata in PostgreSQL.

Ingest, queries, compaction, retention, quarantine and export work on s3://bucket/prefix;
two Celery workers that share no directory ingest one stream into one bucket; the demo
records into a bucket and `moescope serve` shows it; the path guard holds for keys.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import duckdb
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import free_port, make_frame, wait_until  # noqa: E402

from moescope.analysis import compute_metric, segment_footers  # noqa: E402
from moescope.analysis.store import AnalysisStore as Store  # noqa: E402
from moescope.cli import main  # noqa: E402
from moescope.collector.check import check_run  # noqa: E402
from moescope.collector.store import StoreError  # noqa: E402

pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

README = Path(__file__).resolve().parents[2] / "README.md"


class S3Server:
    """moto's standalone S3 server on a free loopback port, in a process of its own."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._up, 30, what="moto_server to answer")

    def _up(self) -> bool:
        assert self.proc.poll() is None, "moto_server exited"
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server, with this process's AWS_* environment pointing at it."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3):
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def test_ingest_query_compact_retain_and_export_on_object_storage(tmp_path, s3, bucket, postgres_schema_url):
    store = Store(f"s3://{bucket}/moescope", postgres_schema_url)
    assert store.remote and store.root == f"s3://{bucket}/moescope"
    frames = [make_frame("r1", "p0", seq, n=300, final=seq == 9) for seq in range(10)]
    for frame in frames:
        assert store.write_frame(frame)
    assert not store.write_frame(frames[3])  # exactly once, as on disk
    assert store.write_frame(make_frame("r2", "q0", 0, n=50, final=True))
    keys = s3.keys(bucket, "moescope/segments/routing/run=r1/")
    assert len(keys) == 10 and all(k.endswith(".parquet") for k in keys)
    assert store.sql("SELECT count(*) AS n FROM routing", run="r1").n[0] == 3000
    assert store.sql("SELECT count(*) AS n FROM routing").n[0] == 3050
    assert check_run(store, "r1")[1] == 0

    # The cache what-if reads the objects' footers through DuckDB, a directory's through pyarrow: the same answer.
    local = Store(tmp_path / "local")
    for frame in frames:
        local.write_frame(frame)
    hits = compute_metric(store, "expert_cache", "r1", cache_sizes=[1, 2, 3])
    assert len(hits) and hits.equals(compute_metric(local, "expert_cache", "r1", cache_sizes=[1, 2, 3]))
    assert all(segment_footers.KEPT.get(f).full() for f in store.segment_paths("routing", "r1"))  # ranges read
    local.close()

    by_expert = store.sql("SELECT expert, count(*) AS n FROM routing GROUP BY ALL ORDER BY ALL", run="r1")
    assert store.compact("r1", min_files=2) >= 10
    assert len(store.segment_paths("routing", "r1")) == 1
    assert store.sql("SELECT expert, count(*) AS n FROM routing GROUP BY ALL ORDER BY ALL", run="r1").equals(by_expert)
    assert store.sweep(grace_s=0) >= 10  # retired objects are deleted
    assert len(s3.keys(bucket, "moescope/segments/routing/run=r1/")) == 1

    out = store.export("r1", tmp_path / "r1.duckdb")  # a local file, read from the bucket
    with duckdb.connect(str(out), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM routing").fetchone()[0] == 3000

    # Retention: the run's objects go, and only its own ("run=r1" is a prefix of "run=r1x").
    assert store.write_frame(make_frame("r1x", "x0", 0, n=20, final=True))
    store.delete_run("r1")
    left = s3.keys(bucket, "moescope/segments/")
    assert left and not any("/run=r1/" in k for k in left) and any("/run=r1x/" in k for k in left)
    assert store.delete_runs_before(time.time() + 1) == 2
    assert s3.keys(bucket, "moescope/segments/") == []
    assert store.runs().empty
    store.close()


def test_unreadable_object_is_quarantined_and_the_rest_stays_queryable(s3, bucket, postgres_schema_url):
    store = Store(f"s3://{bucket}/q", postgres_schema_url)
    for seq in range(3):
        store.write_frame(make_frame("hurt", "p0", seq, n=100, final=seq == 2))
    bad = store.segment_paths("routing", "hurt")[0]
    key = bad.split(f"s3://{bucket}/", 1)[1]
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"not parquet")
    assert store.sql("SELECT count(*) AS n FROM routing", run="hurt").n[0] == 200
    [row] = store.quarantined("hurt").itertuples()
    assert row.table_name == "routing" and row.rows == 100
    assert s3.keys(bucket, f"q/quarantine/{key.split('/', 1)[1]}")  # kept for inspection, out of the tree
    text, code = check_run(store, "hurt")
    assert code == 1 and "quarantined" in text
    store.close()


def test_keys_outside_the_prefix_are_refused(s3, bucket, postgres_schema_url):
    store = Store(f"s3://{bucket}/inner", postgres_schema_url)
    s3.client().put_object(Bucket=bucket, Key="outside/keep.parquet", Body=b"x")
    for rel in ("../outside/keep.parquet", "/outside/keep.parquet", "segments/../../outside/keep.parquet"):
        with pytest.raises(StoreError, match="outside the store"):
            store.files.path(rel)
    store.write_frame(make_frame("r", "p0", 0, n=10, final=True))
    from sqlalchemy import insert

    from moescope.collector import metadata as md

    with store.engine.begin() as conn:  # metadata that names a key beyond the prefix
        conn.execute(insert(md.segments).values(path="../outside/keep.parquet", run="r", table_name="routing", rows=1,
                                                created_at=time.time()))
    store.delete_run("r")
    assert s3.keys(bucket, "outside/") == ["outside/keep.parquet"]
    store.close()


def test_store_on_object_storage_mistakes_are_one_line(s3, bucket, postgres_schema_url, monkeypatch, capsys):
    monkeypatch.delenv("MOESCOPE_DATABASE_URL", raising=False)
    cases = [(["runs", "--store", f"s3://{bucket}/x"], "needs a database"),
             (["runs", "--store", "s3://no-such-bucket-here/x", "--database-url", postgres_schema_url], "no-such-bucket-here"),
             (["demo", "--steps", "1", "--no-serve", "--store", "s3://no-such-bucket-here/x",
               "--database-url", postgres_schema_url], "not writable")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err


def test_two_workers_sharing_no_directory_ingest_one_stream_into_one_bucket(tmp_path, s3, bucket, redis_server,
                                                                           postgres_schema_url, monkeypatch):
    from ingest_helpers import Workers, wait_drained

    from moescope.probe.redis_sink import RedisSink

    url = f"s3://{bucket}/shared"
    pool = Workers(redis_server.url, url, postgres_schema_url, tmp_path / "logs")
    pool.env.update(s3.env())
    try:
        pool.start(workdir=tmp_path / "machine-a")
        pool.start(workdir=tmp_path / "machine-b")
        sinks = [RedisSink(redis_server.url, spool_dir=tmp_path / f"spool-{p}", ack_poll_s=0.1, close_timeout_s=60)
                 for p in ("p0", "p1")]
        for seq in range(15):
            for producer, sink in zip(("p0", "p1"), sinks):
                sink.send(make_frame("s3run", producer, seq, n=400, final=seq == 14))
        for sink in sinks:
            sink.close()
            assert sink.unacked == [] and sink.stats["acked"] == 15, pool.logs()
        wait_drained(redis_server.client())
    finally:
        pool.stop_all()
    for machine in ("machine-a", "machine-b"):  # nothing of the store lands on either worker's disk
        assert not [p for p in (tmp_path / machine).rglob("*") if p.suffix in (".parquet", ".sqlite")]

    store = Store(url, postgres_schema_url)
    ledger = store.ledger("s3run").set_index("producer")
    assert ledger.loc[["p0", "p1"], ["sent", "stored", "missing", "dropped"]].values.tolist() == [[15, 15, 0, 0]] * 2
    assert store.sql("SELECT count(*) AS n FROM routing", run="s3run").n[0] == 2 * 15 * 400
    assert store.sql("SELECT sum(tokens) AS n FROM expert_step", run="s3run").n[0] == 2 * 15 * 400
    assert len(s3.keys(bucket, "shared/segments/routing/run=s3run/")) == 30
    assert check_run(store, "s3run")[1] == 0
    assert store.compact("s3run", min_files=2) >= 60
    assert [len(store.segment_paths(t, "s3run")) for t in ("routing", "expert_step")] == [1, 1]
    assert store.sql("SELECT count(*) AS n FROM routing", run="s3run").n[0] == 2 * 15 * 400
    out = store.export("s3run", tmp_path / "s3run.duckdb")
    with duckdb.connect(str(out), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM routing").fetchone()[0] == 2 * 15 * 400
    store.close()


def _readme_object_storage_commands() -> list[list[str]]:
    section = README.read_text().split("## Production", 1)[1].split("\n## ", 1)[0]
    [block] = [b for b in re.findall(r"```text\n(.*?)```", section, flags=re.S) if "s3://" in b]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_demo_on_object_storage_records_and_serve_shows_it(tmp_path, s3, postgres_schema_url):
    commands = _readme_object_storage_commands()
    assert [c[:2] for c in commands] == [["moescope", "demo"], ["moescope", "serve"]]
    bucket = commands[0][commands[0].index("--store") + 1].split("/")[2]
    s3.client().create_bucket(Bucket=bucket)
    env = {**os.environ, **s3.env(), "MOESCOPE_DATABASE_URL": postgres_schema_url}
    env.pop("MOESCOPE_STORE", None)
    demo = subprocess.run([sys.executable, "-m", "moescope", *commands[0][1:], "--quiet"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    run = re.search(r"run (\S+):", demo.stdout).group(1)
    assert not list(tmp_path.rglob("*.parquet"))  # segments went to the bucket; checkpoints stay local files
    assert list((tmp_path / "moescope-checkpoints" / run).glob("*.pt"))

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moescope", *commands[1][1:], "--port", str(port)], env=env,
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        def runs():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=10) as resp:
                    return json.load(resp)
            except OSError:
                return None
        listed = {r["run"]: r for r in wait_until(runs, 120, interval=0.5, what="moescope serve")}
        store = Store(commands[0][commands[0].index("--store") + 1], postgres_schema_url, create=False)
        rows = int(store.sql("SELECT count(*) AS n FROM routing", run=run).n[0])
        assert rows > 0 and listed[run]["routing_rows"] == rows
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs/health", timeout=60) as resp:
            health = {r["run"]: r for r in json.load(resp)}
        assert run in health  # computed from the segments in the bucket
        store.close()
    finally:
        server.terminate()
        server.wait(15)
