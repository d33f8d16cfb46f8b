"""Alert rules, events and per-(rule, run) evaluation state in the metadata DB.

A mixin of `Store`, so the store stays the one owner of the metadata DB: the alerts
module (moescope.analysis.alerts) decides what a rule means, this module only reads and
writes its rows. Every write that must not be duplicated by two evaluators running at
once (beat and a CLI) is a compare-and-set on the row it changes.
"""
from __future__ import annotations

import time

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from moescope.collector import metadata as md

_EVENT_STATES = ("firing", "resolved")


class DuplicateAlertRule(ValueError):
    """A rule name that is already taken."""


class AlertRecords:
    """Store methods for alert_rules, alert_events and alert_state (needs `self.engine`)."""

    engine = None  # set by Store.__init__

    # ------------------------------------------------------------ rules
    def insert_alert_rule(self, values: dict) -> int:
        """Insert one rule; returns its id. DuplicateAlertRule when the name is taken."""
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(insert(md.alert_rules).values(**values)).inserted_primary_key[0])
        except IntegrityError:
            raise DuplicateAlertRule(f"an alert rule named {values.get('name')!r} already exists") from None

    def alert_rules(self, *, enabled_only: bool = False) -> list[dict]:
        """Every rule (ordered by id) as a dict of its columns."""
        q = select(md.alert_rules).order_by(md.alert_rules.c.id)
        if enabled_only:
            q = q.where(md.alert_rules.c.enabled.is_(True))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def alert_rule(self, *, rule_id: int | None = None, name: str | None = None) -> dict | None:
        """One rule by id or by name; None when there is none."""
        c = md.alert_rules.c
        q = select(md.alert_rules).where(c.id == rule_id if rule_id is not None else c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return None if row is None else dict(row._mapping)

    def delete_alert_rule(self, rule_id: int) -> bool:
        """Delete a rule with its events and state; False when it did not exist."""
        with self.engine.begin() as conn:
            gone = conn.execute(delete(md.alert_rules).where(md.alert_rules.c.id == rule_id)).rowcount
            conn.execute(delete(md.alert_events).where(md.alert_events.c.rule_id == rule_id))
            conn.execute(delete(md.alert_state).where(md.alert_state.c.rule_id == rule_id))
        return bool(gone)

    # ------------------------------------------------------------ events
    def alert_events(self, *, rule_id: int | None = None, run: str | None = None, limit: int = 200) -> list[dict]:
        """Stored firing / resolved events, newest first."""
        ev = md.alert_events.c
        q = select(md.alert_events).where(ev.state.in_(_EVENT_STATES))
        if rule_id is not None:
            q = q.where(ev.rule_id == rule_id)
        if run is not None:
            q = q.where(ev.run == run)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q.order_by(ev.id.desc()).limit(limit))]
        for r in rows:
            r["attempts"] = r.get("attempts") or 0  # rows from before delivery attempts were counted
        return rows

    def undelivered_alert_events(self, max_attempts: int) -> list[dict]:
        """Events of rules with a webhook, not delivered yet, tried fewer than `max_attempts` times; oldest first.

        Events written before attempts were counted (attempts NULL) are not sent late.
        """
        ev, ru = md.alert_events.c, md.alert_rules.c
        q = (select(md.alert_events, ru.webhook, ru.name.label("rule"), ru.metric, ru.layer.label("rule_layer"),
                    ru.expert, ru.comparison, ru.threshold, ru.aggregation)
             .join(md.alert_rules, ru.id == ev.rule_id)
             .where(ev.state.in_(_EVENT_STATES), ev.notified.is_(False), ru.webhook.is_not(None),
                    ev.attempts < max_attempts)
             .order_by(ev.id))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        return rows

    def claim_alert_delivery(self, event_id: int, attempts: int) -> bool:
        """Count one delivery attempt, if nobody else counted it first (compare-and-set on attempts)."""
        ev = md.alert_events.c
        with self.engine.begin() as conn:
            return conn.execute(update(md.alert_events).where(ev.id == event_id, ev.notified.is_(False),
                                                              ev.attempts == attempts)
                                .values(attempts=attempts + 1)).rowcount == 1

    def mark_alert_delivered(self, event_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(md.alert_events).where(md.alert_events.c.id == event_id).values(notified=True))

    # ------------------------------------------------------------ evaluation state
    def alert_state(self, rule_id: int, run: str) -> dict | None:
        """Where evaluation of (rule, run) stands: last_step, streak, firing, ema; None before its first evaluation.

        A rule evaluated before this state was kept has only its events: its firing flag
        is then taken from the newest one, so it does not fire twice.
        """
        st = md.alert_state.c
        with self.engine.connect() as conn:
            row = conn.execute(select(md.alert_state).where(st.rule_id == rule_id, st.run == run)).first()
            if row is not None:
                return dict(row._mapping)
            ev = md.alert_events.c
            last = conn.execute(select(ev.state).where(ev.rule_id == rule_id, ev.run == run, ev.state.in_(_EVENT_STATES))
                                .order_by(ev.id.desc()).limit(1)).first()
        if last is not None and last[0] == "firing":
            return {"rule_id": rule_id, "run": run, "last_step": None, "streak": 0, "firing": True, "ema": None}
        return None

    def save_alert_evaluation(self, rule_id: int, run: str, expected_last_step: int | None, state: dict,
                              events: list[dict]) -> list[int] | None:
        """Store the new state and the events it produced, in one transaction.

        Compare-and-set on last_step: when another evaluator advanced (rule, run) since
        `expected_last_step` was read, nothing is written and None is returned.
        """
        st = md.alert_state.c
        values = {"last_step": state["last_step"], "streak": state["streak"], "firing": state["firing"],
                  "ema": state.get("ema"), "updated_at": time.time()}
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(select(st.last_step).where(st.rule_id == rule_id, st.run == run)).first()
                if exists is None:
                    conn.execute(insert(md.alert_state).values(rule_id=rule_id, run=run, **values))
                else:
                    same = st.last_step.is_(None) if expected_last_step is None else st.last_step == expected_last_step
                    changed = conn.execute(update(md.alert_state).where(st.rule_id == rule_id, st.run == run, same)
                                           .values(**values)).rowcount
                    if changed != 1:
                        conn.rollback()
                        return None
                ids = [int(conn.execute(insert(md.alert_events).values(rule_id=rule_id, run=run, notified=False,
                                                                       attempts=0, **e)).inserted_primary_key[0])
                       for e in events]
        except IntegrityError:  # another evaluator inserted the first state row
            return None
        return ids
