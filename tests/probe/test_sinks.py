"""Sinks: memory, local store, and how sink specs are parsed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_moe import FakeLM, batch, fake_sites  # noqa: E402

from moescope.probe import LocalSink, MemorySink, NullSink, attach, make_sink  # noqa: E402


def test_local_sink_writes_frames_into_the_store(tmp_path):
    from moescope.analysis.store import AnalysisStore as Store

    model = FakeLM(layers=2, capacity_factor=1.0)
    ids, mask = batch(b=3, s=7, pad_right=(0, 2, 4))
    root = tmp_path / "store"
    with attach(model, sink=f"local:{root}", run="local-run", checkpoint="ck", frame_rows=1,
                sites=fake_sites(model)) as probe:
        for step in range(3):
            probe.set_step(step)
            probe.set_domains(["a", "b", "c"])
            model(ids, attention_mask=mask)
    store = Store(root)
    try:
        real = int(mask.sum())
        counts = store.sql("SELECT (SELECT count(*) FROM routing) AS r, (SELECT count(*) FROM token_stats) AS t, "
                           "(SELECT sum(tokens) FROM expert_step) AS e", run="local-run").iloc[0]
        assert counts.r == 3 * real * 2 * 2 and counts.t == 3 * real * 2 and counts.e == counts.r
        by_step = store.sql("SELECT step, count(*) AS n FROM routing GROUP BY step ORDER BY step", run="local-run")
        assert by_step.n.tolist() == [real * 4] * 3
        layers = store.layers("local-run")
        assert sorted(layers.module_path) == ["layers.0.moe", "layers.1.moe"]
        assert "ck" in set(store.checkpoints("local-run").checkpoint)
        ledger = store.ledger("local-run")
        row = ledger[ledger.producer == probe.producer].iloc[0]
        assert row.sent == probe.stats()["frames"] == row.stored and bool(row.closed)
    finally:
        store.close()


def test_default_local_sink_uses_the_configured_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_STORE", str(tmp_path / "configured"))
    sink = make_sink("local")
    try:
        assert isinstance(sink, LocalSink) and sink.store.root == (tmp_path / "configured").absolute()
    finally:
        sink.close()


def test_make_sink_builds_and_passes_through_sinks():
    assert isinstance(make_sink("memory"), MemorySink)
    assert isinstance(make_sink("null"), NullSink)
    mine = MemorySink()
    assert make_sink(mine) is mine
    with pytest.raises(ValueError, match="unknown sink 'ftp://x'"):
        make_sink("ftp://x")
    with pytest.raises(TypeError, match="send/flush/close"):
        make_sink(42)


def test_a_failing_sink_is_counted_and_reported_in_the_next_frame():
    class FlakySink(MemorySink):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def send(self, frame):
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("sink away")
            super().send(frame)

    model = FakeLM()
    ids, mask = batch()
    sink = FlakySink()
    with attach(model, sink=sink, run="flaky", sites=fake_sites(model), frame_rows=1) as probe:
        model(ids, attention_mask=mask)
        probe.flush()
        model(ids, attention_mask=mask)
    assert probe.stats()["dropped_frames"] == 1 and probe.stats()["failures"] == 1
    assert sink.frames[0].seq == 1 and sink.frames[0].dropped_seqs == [0]
    assert sink.frames[0].meta["layers"], "layer registrations ride on the next frame"


def test_null_sink_counts_rows():
    model = FakeLM()
    ids, mask = batch()
    sink = NullSink()
    with attach(model, sink=sink, run="null", sites=fake_sites(model)):
        model(ids, attention_mask=mask)
    assert sink.frames >= 1 and sink.rows > 0


def test_tables_needs_the_memory_sink():
    model = FakeLM()
    with attach(model, sink="null", run="nt", sites=fake_sites(model)) as probe:
        with pytest.raises(ValueError, match="sink='memory'"):
            probe.tables()
