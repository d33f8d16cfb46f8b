"""Alert rules, events and evaluation state through Store methods, on SQLite and PostgreSQL;
an older store (alert tables without the new columns) opens and keeps its rules."""
from __future__ import annotations

import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sqlalchemy import create_engine

from moescope.analysis import alerts
from moescope.collector.alert_records import DuplicateAlertRule
from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import Frame

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))
from synth_runs import E, StepData, T, collapsed_layer, make_layer_tables, uniform_layer  # noqa: E402

RULE = dict(name="dead", metric="dead_experts", run=None, layer=None, expert=None, comparison=">", threshold=0.0,
            aggregation="window", window_steps=5, ema_alpha=None, for_evaluations=1, webhook="http://h/x",
            enabled=True, created_at=1.0)
EVENT = dict(layer=None, state="firing", value=3.0, step=7, evidence={"per_layer": {"1": 3.0}}, created_at=2.0)
STATE = {"last_step": 7, "streak": 1, "firing": True, "ema": None}


@pytest.fixture
def meta_store(tmp_path, database_url):
    s = Store(tmp_path / "store", database_url)
    yield s
    s.close()


def test_rules_are_inserted_found_by_id_or_name_and_names_are_unique(meta_store):
    rid = meta_store.insert_alert_rule(RULE)
    assert meta_store.alert_rule(rule_id=rid)["name"] == "dead" and meta_store.alert_rule(name="dead")["id"] == rid
    assert meta_store.alert_rule(name="nope") is None and meta_store.alert_rule(rule_id=rid + 1) is None
    with pytest.raises(DuplicateAlertRule, match="already exists"):
        meta_store.insert_alert_rule(RULE)
    other = meta_store.insert_alert_rule({**RULE, "name": "off", "enabled": False})
    assert [r["id"] for r in meta_store.alert_rules()] == [rid, other]
    assert [r["id"] for r in meta_store.alert_rules(enabled_only=True)] == [rid]


def test_an_evaluation_writes_state_and_events_once_and_a_stale_one_writes_nothing(meta_store):
    rid = meta_store.insert_alert_rule(RULE)
    assert meta_store.alert_state(rid, "r") is None
    [eid] = meta_store.save_alert_evaluation(rid, "r", None, STATE, [EVENT])
    assert meta_store.alert_state(rid, "r")["last_step"] == 7
    # Two evaluators read last_step 7; the first to write wins, the other writes nothing.
    assert meta_store.save_alert_evaluation(rid, "r", 7, {**STATE, "last_step": 9}, []) == []
    assert meta_store.save_alert_evaluation(rid, "r", 7, {**STATE, "last_step": 9}, [EVENT]) is None
    assert meta_store.save_alert_evaluation(rid, "r", None, STATE, [EVENT]) is None  # first-state race lost
    assert [e["id"] for e in meta_store.alert_events(rule_id=rid)] == [eid]
    [event] = meta_store.alert_events(run="r")
    assert event["evidence"] == EVENT["evidence"] and event["attempts"] == 0 and event["notified"] is False


def test_a_delivery_attempt_is_claimed_once_and_counted(meta_store):
    rid = meta_store.insert_alert_rule(RULE)
    [eid] = meta_store.save_alert_evaluation(rid, "r", None, STATE, [EVENT])
    [row] = meta_store.undelivered_alert_events(max_attempts=2)
    assert row["webhook"] == "http://h/x" and row["rule"] == "dead" and row["attempts"] == 0
    assert meta_store.claim_alert_delivery(eid, 0) is True
    assert meta_store.claim_alert_delivery(eid, 0) is False  # someone else already counted attempt 1
    assert meta_store.claim_alert_delivery(eid, 1) is True
    assert meta_store.undelivered_alert_events(max_attempts=2) == []  # two tries: no more
    meta_store.mark_alert_delivered(eid)
    assert meta_store.alert_events()[0]["notified"] is True


def test_deleting_a_rule_or_a_run_removes_its_events_and_state(meta_store, tmp_path):
    rid = meta_store.insert_alert_rule(RULE)
    meta_store.add_checkpoint("r", "c0", 0)
    meta_store.save_alert_evaluation(rid, "r", None, STATE, [EVENT])
    meta_store.delete_run("r")
    assert meta_store.alert_events() == [] and meta_store.alert_state(rid, "r") is None
    meta_store.save_alert_evaluation(rid, "r", None, STATE, [EVENT])
    assert meta_store.delete_alert_rule(rid) is True and meta_store.delete_alert_rule(rid) is False
    assert meta_store.alert_events() == [] and meta_store.alert_state(rid, "r") is None


def test_a_rule_firing_before_state_was_kept_is_seen_as_firing(meta_store):
    rid = meta_store.insert_alert_rule(RULE)
    from moescope.collector import metadata as md

    with meta_store.engine.begin() as conn:  # an event row as older versions wrote it, with no state row
        conn.execute(md.alert_events.insert().values(rule_id=rid, run="r", notified=True, **EVENT))
    assert meta_store.alert_state(rid, "r") == {"rule_id": rid, "run": "r", "last_step": None, "streak": 0,
                                                "firing": True, "ema": None}


OLD_SCHEMA = [  # the alert tables as the first release created them
    """CREATE TABLE alert_rules (id {serial}, name VARCHAR(200) NOT NULL UNIQUE, metric VARCHAR(100) NOT NULL,
       run VARCHAR(200), layer INTEGER, expert INTEGER, comparison VARCHAR(4) NOT NULL, threshold FLOAT NOT NULL,
       window_steps INTEGER NOT NULL, for_evaluations INTEGER NOT NULL, webhook TEXT, enabled BOOLEAN NOT NULL,
       created_at FLOAT NOT NULL)""",
    """CREATE TABLE alert_events (id {serial}, rule_id INTEGER NOT NULL, run VARCHAR(200) NOT NULL, layer INTEGER,
       state VARCHAR(20) NOT NULL, value FLOAT, step INTEGER, evidence JSON, notified BOOLEAN NOT NULL,
       created_at FLOAT NOT NULL)""",
    """INSERT INTO alert_rules (name, metric, comparison, threshold, window_steps, for_evaluations, enabled, created_at)
       VALUES ('old', 'maxvio', '>', 2.0, 10, 1, TRUE, 0.0)""",
    """INSERT INTO alert_events (rule_id, run, state, value, step, evidence, notified, created_at)
       VALUES (1, 'r', 'firing', 3.0, 4, '{{}}', FALSE, 0.0)""",
]


def test_an_older_store_gains_the_new_alert_columns_and_keeps_its_rules(tmp_path, database_url):
    (tmp_path / "store").mkdir()
    url = database_url or f"sqlite:///{tmp_path / 'store' / 'meta.sqlite'}"
    serial = "SERIAL PRIMARY KEY" if url.startswith("postgresql") else "INTEGER PRIMARY KEY AUTOINCREMENT"
    old = create_engine(url)
    with old.begin() as conn:
        for statement in OLD_SCHEMA:
            conn.exec_driver_sql(statement.format(serial=serial))
    old.dispose()
    store = Store(tmp_path / "store", database_url)
    try:
        [rule] = alerts.list_rules(store)
        assert rule["name"] == "old" and rule["aggregation"] == "window" and rule["window_steps"] == 10
        [event] = alerts.list_events(store)
        assert event["attempts"] == 0 and event["state"] == "firing"
        assert store.undelivered_alert_events(max_attempts=5) == []  # an old event is not sent late
        assert store.alert_state(1, "r")["firing"] is True
        assert alerts.add_rule(store, "new", "cv", ">", 1.0, aggregation="ema", ema_span=9)["ema_alpha"] == 0.2
        Store(tmp_path / "store", database_url).close()  # opening again finds the columns present
    finally:
        store.close()


def _collapse_run(store, steps):
    """Run "r": layer 1 routes every token to expert 0 at the given steps, spreads tokens evenly otherwise."""
    for step, collapsed in steps:
        layer = collapsed_layer(1) if collapsed else uniform_layer(1)
        s = StepData(step=step, checkpoint="c0", token_ids_T=np.zeros(T, int), layers=[uniform_layer(0), layer])
        parts = [make_layer_tables("r", s, ls) for ls in s.layers]
        tables = {n: pa.concat_tables([p[n] for p in parts]) for n in ("routing", "token_stats", "expert_step")}
        store.write_frame(Frame(run="r", producer="p", seq=step, tables=tables, frame_id=uuid.uuid4().hex, meta={}))


def test_live_evaluation_fires_and_resolves_on_each_backend(meta_store):
    _collapse_run(meta_store, [(0, False)])
    rule = alerts.add_rule(meta_store, "dead", "dead_experts", ">=", 1, run="r", layer=1, aggregation="step")
    assert alerts.evaluate_alerts(meta_store) == []
    _collapse_run(meta_store, [(1, True), (2, True), (3, False)])
    events = alerts.evaluate_alerts(meta_store)
    assert [(ev["state"], ev["step"], ev["value"]) for ev in events] == [("firing", 1, E - 1), ("resolved", 3, 0.0)]
    assert [ev["state"] for ev in alerts.list_events(meta_store, rule_id=rule["id"])] == ["resolved", "firing"]


def test_evaluators_running_at_once_record_each_transition_once(meta_store):
    _collapse_run(meta_store, [(0, False)])
    alerts.add_rule(meta_store, "dead", "dead_experts", ">=", 1, run="r", layer=1, aggregation="step")
    alerts.evaluate_alerts(meta_store)
    _collapse_run(meta_store, [(1, True), (2, True)])
    stores = [Store(meta_store.root, meta_store.database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def evaluate(s):
        barrier.wait()
        return alerts.evaluate_alerts(s)

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            results = list(pool.map(evaluate, stores))
    finally:
        for s in stores:
            s.close()
    # Whichever evaluators won, the firing transition exists once, reported by exactly one of them.
    assert sum(len(r) for r in results) == 1
    assert [ev["state"] for ev in alerts.list_events(meta_store)] == ["firing"]
