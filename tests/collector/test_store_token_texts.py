"""Token texts in the metadata DB (SQLite and PostgreSQL): the first text of an id wins, bounded per run."""
from __future__ import annotations

import pyarrow as pa

from moescope import token_texts as tt
from moescope.collector.store import Store
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP


def _frame(run: str, producer: str, seq: int, texts: list) -> Frame:
    table = pa.Table.from_pydict({
        "run": [run], "checkpoint": ["c"], "step": [seq], "rank": [0], "layer": [0], "expert": [0], "num_tokens": [1],
        "tokens": [1], "dropped": [0], "top1": [1], "prob_sum": [1.0], "weight_sum": [1.0], "phase": ["train"]},
        schema=EXPERT_STEP)
    return Frame(run=run, producer=producer, seq=seq, tables={"expert_step": table}, meta={"token_texts": texts})


def test_texts_are_stored_once_per_run_and_read_back_by_id(tmp_path, database_url, monkeypatch):
    store = Store(tmp_path / "store", database_url)
    try:
        assert store.write_frame(_frame("a", "p0", 0, [[1, "one"], [2, "two"]]))
        assert store.write_frame(_frame("a", "p1", 0, [[2, "deux"], [3, "three"]]))  # another producer: 2 stays "two"
        assert store.write_frame(_frame("b", "q0", 0, [[1, "uno"]]))
        assert store.token_texts("a") == {1: "one", 2: "two", 3: "three"}
        assert store.token_texts("a", [3, 1, 99]) == {1: "one", 3: "three"}
        assert store.token_texts("b") == {1: "uno"}
        assert store.token_texts("a", range(5000)) == {1: "one", 2: "two", 3: "three"}  # many ids: several IN lists

        monkeypatch.setattr(tt, "MAX_TEXTS_PER_RUN", 4)  # a producer sending endless ids fills the run's quota only
        assert store.write_frame(_frame("a", "p0", 1, [[i, f"t{i}"] for i in range(10, 20)]))
        assert len(store.token_texts("a")) == 4
    finally:
        store.close()


def test_a_deleted_run_recreated_under_its_name_has_none_of_its_old_texts(tmp_path, database_url):
    store = Store(tmp_path / "store", database_url)
    try:
        assert store.write_frame(_frame("a", "p0", 0, [[1, "old"], [2, "gone"]]))
        assert store.token_texts("a") == {1: "old", 2: "gone"}
        store.delete_run("a")
        assert store.write_frame(_frame("a", "p1", 0, [[1, "new"]]))
        assert store.token_texts("a") == {1: "new"}
    finally:
        store.close()
