"""Alert rules, events and evaluation state through Store methods, on SQLite and PostgreSQL;
an older SQLite store (alert tables without the new columns) opens and keeps its rules."""
from __future__ import annotations

import sqlite3

import pytest

from moescope.collector.alert_records import DuplicateAlertRule
from moescope.collector.store import Store

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


OLD_SCHEMA = """
CREATE TABLE alert_rules (id INTEGER PRIMARY KEY AUTOINCREMENT, name VARCHAR(200) NOT NULL UNIQUE,
  metric VARCHAR(100) NOT NULL, run VARCHAR(200), layer INTEGER, expert INTEGER, comparison VARCHAR(4) NOT NULL,
  threshold FLOAT NOT NULL, window_steps INTEGER NOT NULL, for_evaluations INTEGER NOT NULL, webhook TEXT,
  enabled BOOLEAN NOT NULL, created_at FLOAT NOT NULL);
CREATE TABLE alert_events (id INTEGER PRIMARY KEY AUTOINCREMENT, rule_id INTEGER NOT NULL, run VARCHAR(200) NOT NULL,
  layer INTEGER, state VARCHAR(20) NOT NULL, value FLOAT, step INTEGER, evidence JSON, notified BOOLEAN NOT NULL,
  created_at FLOAT NOT NULL);
INSERT INTO alert_rules VALUES (1, 'old', 'maxvio', NULL, NULL, NULL, '>', 2.0, 10, 1, NULL, 1, 0.0);
INSERT INTO alert_events VALUES (1, 1, 'r', NULL, 'firing', 3.0, 4, '{}', 0, 0.0);
"""


def test_an_older_sqlite_store_gains_the_new_alert_columns_and_keeps_its_rules(tmp_path):
    from moescope.analysis import alerts

    (tmp_path / "store").mkdir()
    with sqlite3.connect(tmp_path / "store" / "meta.sqlite") as db:
        db.executescript(OLD_SCHEMA)
    store = Store(tmp_path / "store")
    try:
        [rule] = alerts.list_rules(store)
        assert rule["name"] == "old" and rule["aggregation"] == "window" and rule["window_steps"] == 10
        [event] = alerts.list_events(store)
        assert event["attempts"] == 0 and event["state"] == "firing"
        assert store.undelivered_alert_events(max_attempts=5) == []  # an old event is not sent late
        assert store.alert_state(1, "r")["firing"] is True
        assert alerts.add_rule(store, "new", "cv", ">", 1.0, aggregation="ema", ema_span=9)["ema_alpha"] == 0.2
        Store(tmp_path / "store").close()  # opening again finds the columns present
    finally:
        store.close()
