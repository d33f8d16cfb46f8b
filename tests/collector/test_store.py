"""The segment store: exactly-once writes, compaction without double counting, export."""
import os
import sys
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from moescope.collector.store import StoreError, UnknownRun
from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import Frame, decode, encode
from moescope.schema import EXPERT_STEP

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import routing_table  # noqa: E402



def frame(run, seq, n=50, producer="p0"):
    expert_step = pa.Table.from_pydict({
        "run": [run], "checkpoint": ["c0"], "step": [0], "rank": [0], "layer": [0], "expert": [1], "num_tokens": [n],
        "tokens": [n], "dropped": [0], "top1": [n], "prob_sum": [1.0], "weight_sum": [1.0], "phase": ["train"]},
        schema=EXPERT_STEP)
    return Frame(run=run, producer=producer, seq=seq, tables={"routing": routing_table(run, n, seq), "expert_step": expert_step},
                 meta={"layers": [{"layer": 0, "module_path": "layers.0.mlp.router", "num_experts": 8, "top_k": 2,
                                   "router_kind": "softmax-topk", "capacity_factor": None}],
                       "checkpoints": [{"checkpoint": "c0", "step": 0}]})


def test_write_frame_is_idempotent_by_frame_id(store):
    f = decode(encode(frame("r1", 0)))
    assert store.write_frame(f) is True
    assert store.write_frame(f) is False
    assert store.sql("SELECT count(*) AS n FROM routing", run="r1").n[0] == 50
    assert store.ledger("r1").stored.tolist() == [1]


def test_compaction_keeps_every_row_once_and_readers_see_the_same_counts(store):
    for seq in range(12):
        store.write_frame(frame("r1", seq))
    before = store.sql("SELECT count(*) AS n, sum(expert) AS s FROM routing", run="r1")
    tables = sorted(store._live_segments("r1"))  # routing, expert_step and the rollups the store derived
    assert {"routing", "expert_step", "coact_step"} <= set(tables)
    assert store.compact(min_files=4) == 12 * len(tables)
    after = store.sql("SELECT count(*) AS n, sum(expert) AS s FROM routing", run="r1")
    assert before.equals(after) and after.n[0] == 600
    live = store.segment_paths("routing", "r1")
    assert len(live) == 1 and os.path.basename(live[0]).startswith("c-")
    # Retired files are removed only after the grace period, so in-flight readers finish.
    assert store.sweep(grace_s=0) == 12 * len(tables)


def test_ledger_reports_missing_sequence_numbers_until_they_arrive(store):
    for seq in (0, 1, 3):
        store.write_frame(frame("r1", seq))
    last = frame("r1", 4)
    last.final = True
    store.write_frame(last)
    ledger = store.ledger("r1")
    assert ledger.sent[0] == 5 and ledger.missing[0] == 1 and ledger.missing_seqs[0] == [2]
    store.write_frame(frame("r1", 2))
    assert store.ledger("r1").missing[0] == 0


def test_runs_checkpoints_and_layers_come_from_frame_metadata(store):
    store.write_frame(frame("r1", 0))
    runs = store.runs()
    assert runs.run.tolist() == ["r1"] and runs.routing_rows[0] == 50 and runs.layers[0] == 1
    assert store.checkpoints("r1").checkpoint.tolist() == ["c0"]
    assert store.layers("r1").module_path.tolist() == ["layers.0.mlp.router"]


def test_export_writes_a_self_contained_duckdb_of_one_run(store, tmp_path):
    store.write_frame(frame("r1", 0))
    store.write_frame(frame("r2", 0, producer="p1"))
    out = store.export("r1", tmp_path / "r1.duckdb")
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT run) FROM routing").fetchone() == (50, 1)
    assert con.execute("SELECT checkpoint FROM checkpoints").fetchall() == [("c0",)]
    with pytest.raises(StoreError, match="refusing to overwrite"):
        store.export("r1", out)


def test_unknown_run_names_the_run_and_lists_known_ones(store):
    store.write_frame(frame("r1", 0))
    with pytest.raises(UnknownRun, match="unknown run 'nope'.*r1"):
        store.checkpoints("nope")


def test_unwritable_store_directory_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        with pytest.raises(StoreError, match="not writable"):
            Store(locked / "store")
    finally:
        locked.chmod(0o700)


def test_unwritable_store_path_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        Store(tmp_path / "afile" / "store")


def test_store_on_postgresql_metadata_writes_and_reads_back(tmp_path, postgres_url):
    pytest.importorskip("psycopg")
    run = f"pg-{uuid.uuid4().hex[:8]}"
    store = Store(tmp_path / "store", postgres_url)
    try:
        assert store.write_frame(frame(run, 0, producer=f"p-{run}"))
        assert store.sql("SELECT count(*) AS n FROM routing", run=run).n[0] == 50
        assert store.ledger(run).stored.tolist() == [1]
    finally:
        store.close()


def test_retention_deletes_runs_older_than_the_cutoff_and_nothing_else(store):
    store.write_frame(frame("old", 0, producer="p-old"))
    store.write_frame(frame("new", 0, producer="p-new"))
    with store.engine.begin() as conn:
        from sqlalchemy import update

        from moescope.collector import metadata as md

        conn.execute(update(md.ingest_ledger).where(md.ingest_ledger.c.run == "old").values(stored_at=1000.0))
        conn.execute(update(md.runs).where(md.runs.c.run == "old").values(created_at=1000.0))
    assert store.delete_runs_before(cutoff=2000.0) == 1
    assert store.runs().run.tolist() == ["new"]
    assert not (store.root / "segments" / "routing" / "run=old").exists()
    assert store.sql("SELECT count(*) AS n FROM routing").n[0] == 50
    with pytest.raises(UnknownRun):
        store.ledger("old")


def test_arrow_answers_a_query_as_an_arrow_table(store):
    from ingest_helpers import make_frame

    assert store.write_frame(make_frame("arrow", "pa", 0, n=12))
    table = store.arrow("SELECT expert, count(*) AS n FROM routing WHERE layer >= ? GROUP BY expert", [0], run="arrow")
    assert isinstance(table, pa.Table) and sum(table.column("n").to_pylist()) == 12



def with_meta(f, **meta):
    f.meta.update(meta)
    return decode(encode(f))


def test_run_config_is_kept_when_the_run_was_created_without_one(tmp_path, database_url, caplog):
    store = Store(tmp_path / "store", database_url)
    first, other = {"probe": {"producer": "p0", "sample_rate": 1.0}}, {"probe": {"producer": "p1", "sample_rate": 1.0}}
    try:
        store.add_checkpoint("a", "c0", step=0)  # the run row exists (config SQL NULL) before any frame
        assert store.run_config("a") == {}
        assert store.write_frame(with_meta(frame("a", 0, producer="a0"), run_config=first))
        assert store.run_config("a") == first
        store.write_frame(frame("b", 0, producer="b0"))  # created by a frame that carries no config (JSON null)
        assert store.write_frame(with_meta(frame("b", 1, producer="b0"), run_config=first))
        assert store.run_config("b") == first
        # A different config later: the first stays, and that is logged once per run.
        caplog.set_level("INFO", logger="moescope.collector.store")
        for seq in (0, 1):
            assert store.write_frame(with_meta(frame("a", seq, producer="a1"), run_config=other))
        assert store.write_frame(with_meta(frame("b", 0, producer="b1"), run_config=first))  # the same: no log
        assert store.run_config("a") == first and store.run_config("b") == first
        assert [r.getMessage() for r in caplog.records if "run_config" in r.getMessage()] == [
            "store: run 'a' keeps its first run_config; producer 'a1' sent a different one"]
    finally:
        store.close()


def test_frames_decoded_with_their_one_value_dictionaries_store_the_same_rows_as_plain_ones(store, tmp_path):
    """What a worker stores (decode keep_dictionaries=True) reads back exactly as the plain decode's rows,
    as plain strings, and compacts together with them."""
    import pyarrow.parquet as pq

    plain = Store(tmp_path / "plain")
    for seq in range(4):
        data = encode(frame("r", seq))
        kept = decode(data, keep_dictionaries=True)
        assert pa.types.is_dictionary(kept.tables["routing"].schema.field("run").type)
        assert store.write_frame(kept if seq % 2 else decode(data))  # both kinds in one run
        assert plain.write_frame(decode(data))
    q = "SELECT * FROM routing ORDER BY ALL"
    assert store.sql(q, run="r").equals(plain.sql(q, run="r"))
    for path in store.segment_paths("routing", "r"):
        assert pq.read_table(path).schema.field("run").type == pa.string()
    assert store.compact(min_files=2) >= 4
    assert store.sql(q, run="r").equals(plain.sql(q, run="r"))
    assert store.metric("load_share", run="r").equals(plain.metric("load_share", run="r"))
    plain.close()
