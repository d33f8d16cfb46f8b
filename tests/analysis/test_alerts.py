"""Alert rules: validation, firing after N consecutive breaches, resolving, webhooks on a real HTTP server."""
import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, StepData, T, collapsed_layer, make_layer_tables, uniform_layer  # noqa: E402
from moescope.analysis import alerts  # noqa: E402
from moescope.frame import Frame  # noqa: E402


class HookServer:
    """A tiny webhook receiver on 127.0.0.1: collects JSON bodies, answers with `answers` in turn (then 204)."""

    def __init__(self):
        received, answers = [], []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(answers.pop(0) if answers else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received, self.answers = received, answers
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_server():
    server = HookServer()
    yield server
    server.close()


@pytest.fixture
def hook(hook_server):
    """(url, bodies received) of a webhook receiver on loopback."""
    return hook_server.url, hook_server.received


def _write_step(store, step, collapsed):
    ids = np.random.default_rng(step).integers(0, 6, T)
    layer = collapsed_layer(1) if collapsed else spread_top1_layer(1)
    s = StepData(step=step, checkpoint="c0", token_ids_T=ids, layers=[uniform_layer(0), layer])
    _frame(store, s)


def spread_top1_layer(layer):
    """A healthy top-1 layer: tokens spread evenly over all experts, uniform router."""
    ls = collapsed_layer(layer)
    ls.experts_TK = (np.arange(T) % E)[:, None]
    probs = np.full((T, E), 1.0 / E)
    ls.probs_TE, ls.logits_TE = probs, np.zeros((T, E))
    return ls


def _frame(store, s):
    parts = [make_layer_tables("live", s, ls) for ls in s.layers]
    tables = {n: pa.concat_tables([p[n] for p in parts]) for n in ("routing", "token_stats", "expert_step")}
    meta = {"layers": [{"layer": 0, "module_path": "l0", "num_experts": E, "top_k": 2, "router_kind": "softmax"},
                       {"layer": 1, "module_path": "l1", "num_experts": E, "top_k": 1, "router_kind": "softmax"}]}
    store.write_frame(Frame(run="live", producer="p", seq=s.step, tables=tables, frame_id=uuid.uuid4().hex, meta=meta))


def test_rule_fires_after_consecutive_breaching_steps_then_resolves_and_posts_json(store, hook):
    url, received = hook
    _write_step(store, 0, collapsed=False)
    rule = alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, for_evaluations=2, webhook=url)
    assert rule["scope"] == "run" and rule["aggregation"] == "window"
    assert alerts.evaluate_alerts(store, now=1.0) == []          # healthy
    _write_step(store, 1, collapsed=True)
    assert alerts.evaluate_alerts(store, now=2.0) == []          # first breaching step
    assert alerts.evaluate_alerts(store, now=2.5) == []          # no new step: nothing more has breached
    _write_step(store, 2, collapsed=True)
    seen = []
    fired = alerts.evaluate_alerts(store, now=3.0, notify=seen.append)  # second consecutive breaching step: fires
    assert [e["state"] for e in fired] == ["firing"] and fired[0]["value"] == E - 1 and fired[0]["step"] == 2
    assert fired[0]["evidence"]["per_layer"] == {"0": 0.0, "1": float(E - 1)}
    assert alerts.evaluate_alerts(store, now=4.0) == []          # still firing: no new event
    _write_step(store, 3, collapsed=False)
    resolved = alerts.evaluate_alerts(store, now=5.0)
    assert [(e["state"], e["step"]) for e in resolved] == [("resolved", 3)]
    assert [b["state"] for b in received] == ["firing", "resolved"]
    body = received[0]
    assert body["rule"] == "dead" and body["run"] == "live" and body["step"] == 2 and body["value"] == E - 1
    assert body["evidence"]["per_layer"]["1"] == E - 1 and seen[0]["state"] == "firing"
    assert body["aggregation"] == "window" and body["attempt"] == 1
    events = alerts.list_events(store, rule_id=rule["id"])
    assert [e["state"] for e in events] == ["resolved", "firing"] and all(e["notified"] for e in events)


def test_steps_that_arrive_between_evaluations_are_each_evaluated_in_order(store):
    _write_step(store, 0, collapsed=False)
    alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, for_evaluations=2)
    assert alerts.evaluate_alerts(store) == []
    for step, collapsed in ((1, True), (2, True), (3, False)):
        _write_step(store, step, collapsed)
    events = alerts.evaluate_alerts(store)  # one evaluation catches up three steps
    assert [(e["state"], e["step"]) for e in events] == [("firing", 2), ("resolved", 3)]


def test_breach_streak_is_reset_by_a_healthy_step(store):
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "mv", "maxvio", ">=", 1.0, layer=1, window_steps=1, for_evaluations=2)
    assert alerts.evaluate_alerts(store) == []
    _write_step(store, 1, collapsed=False)
    assert alerts.evaluate_alerts(store) == []
    _write_step(store, 2, collapsed=True)
    assert alerts.evaluate_alerts(store) == []  # streak restarted at 1
    _write_step(store, 3, collapsed=True)
    fired = alerts.evaluate_alerts(store)
    assert fired[0]["layer"] == 1 and fired[0]["value"] == pytest.approx(E - 1)


def test_expert_scope_and_entropy_rules(store):
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "e3-dead", "dead_experts", ">=", 1, layer=1, expert=3, window_steps=5)
    alerts.add_rule(store, "e0-dead", "dead_experts", ">=", 1, layer=1, expert=0, window_steps=5)
    alerts.add_rule(store, "collapse", "entropy", "<", 0.5, layer=1, window_steps=5)
    fired = {e["rule"] for e in alerts.evaluate_alerts(store)}
    assert fired == {"e3-dead", "collapse"}


def test_webhook_failures_are_counted_and_never_break_evaluation(store):
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "dead", "dead_experts", ">", 0, webhook="http://127.0.0.1:9/nothing-listens")
    before = alerts.NOTIFY_STATS["failed"]

    def broken(_):
        raise RuntimeError("callback bug")

    fired = alerts.evaluate_alerts(store, notify=broken)
    assert len(fired) == 1 and fired[0]["notified"] is False
    assert alerts.NOTIFY_STATS["failed"] == before + 2
    assert alerts.list_events(store)[0]["notified"] is False


@pytest.mark.parametrize("kw, msg", [
    ({"metric": "loss"}, "unknown alert metric 'loss'"),
    ({"comparison": "=="}, "unknown comparison '=='"),
    ({"threshold": "high"}, "threshold must be a finite number"),
    ({"window_steps": 0}, "window_steps must be a positive int"),
    ({"window_steps": 2**31}, "window_steps must be a positive int"),
    ({"for_evaluations": 1.5}, "for_evaluations must be a positive int"),
    ({"layer": 2**63}, "layer must be a non-negative int"),
    ({"name": "12"}, "must not be all digits"),
    ({"name": "٣"}, "must not be all digits"),
    ({"name": "a\x00b"}, "control characters"),
    ({"aggregation": "mean"}, "aggregation must be one of step, window, ema"),
    ({"aggregation": "ema", "ema_alpha": 0.5, "ema_span": 3}, "exactly one of ema_alpha"),
    ({"aggregation": "ema", "ema_alpha": 0.0}, "ema_alpha must be in"),
    ({"aggregation": "ema", "ema_span": 0.5}, "ema_span must be at least 1"),
    ({"aggregation": "step", "window_steps": 3}, "window_steps applies to aggregation 'window' only"),
    ({"ema_alpha": 0.3}, "apply to aggregation 'ema' only"),
    ({"webhook": "https://hooks.example.com/x\r\nHost: evil"}, "control character"),
    ({"metric": "entropy", "expert": 2}, "has no per-expert value"),
    ({"webhook": "ftp://x"}, "webhook must be an http"),
    ({"run": "bad run"}, "invalid run id"),
])
def test_add_rule_rejects_bad_input_with_one_line(store, kw, msg):
    args = {"name": "r", "metric": "maxvio", "comparison": ">", "threshold": 1.0, **kw}
    with pytest.raises(ValueError, match=msg) as info:
        alerts.add_rule(store, **args)
    assert "\n" not in str(info.value)


def test_rule_crud(store):
    r = alerts.add_rule(store, "a", "cv", ">", 0.5)
    with pytest.raises(ValueError, match="already exists"):
        alerts.add_rule(store, "a", "cv", ">", 0.5)
    assert [x["name"] for x in alerts.list_rules(store)] == ["a"]
    assert alerts.get_rule(store, "a")["id"] == r["id"] and alerts.get_rule(store, r["id"])["name"] == "a"
    assert alerts.delete_rule(store, r["id"]) is True and alerts.delete_rule(store, "a") is False
    assert alerts.list_rules(store) == []


@pytest.mark.parametrize("text, key", [("7", 7), ("seven", "seven"), ("²", "²"), ("-1", "-1"), ("07", 7)])
def test_rule_references_are_ids_only_when_ascii_digits(text, key):
    assert alerts.rule_key(text) == key


@pytest.mark.parametrize("text", [str(2**31), "9" * 30])
def test_rule_ids_beyond_the_stored_range_are_refused(text):
    with pytest.raises(ValueError, match="out of range"):
        alerts.rule_key(text)


def test_a_rule_for_an_unknown_run_layer_or_expert_is_refused_with_the_reason(store):
    _write_step(store, 0, collapsed=False)
    with pytest.raises(ValueError, match="unknown run 'nope'.*live"):
        alerts.add_rule(store, "r", "maxvio", ">", 1.0, run="nope")
    with pytest.raises(ValueError, match=r"layer 5 is not a layer of run 'live' \(layers: 0, 1\)"):
        alerts.add_rule(store, "r", "maxvio", ">", 1.0, run="live", layer=5)
    with pytest.raises(ValueError, match=f"expert {E} does not exist in layer 1"):
        alerts.add_rule(store, "r", "maxvio", ">", 1.0, run="live", layer=1, expert=E)
    assert alerts.add_rule(store, "r", "maxvio", ">", 1.0, run="live", layer=1, expert=E - 1)["scope"] == "expert"
