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


@pytest.fixture
def hook():
    """A tiny webhook receiver on 127.0.0.1 collecting JSON bodies."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


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


def test_rule_fires_after_consecutive_breaches_then_resolves_and_posts_json(store, hook):
    url, received = hook
    _write_step(store, 0, collapsed=False)
    rule = alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, for_evaluations=2, webhook=url)
    assert rule["scope"] == "run"
    assert alerts.evaluate_alerts(store, now=1.0) == []          # healthy
    _write_step(store, 1, collapsed=True)
    assert alerts.evaluate_alerts(store, now=2.0) == []          # first breach: pending
    seen = []
    fired = alerts.evaluate_alerts(store, now=3.0, notify=seen.append)  # second consecutive breach: fires
    assert [e["state"] for e in fired] == ["firing"] and fired[0]["value"] == E - 1
    assert fired[0]["evidence"]["per_layer"] == {"0": 0.0, "1": float(E - 1)}
    assert alerts.evaluate_alerts(store, now=4.0) == []          # still firing: no new event
    _write_step(store, 2, collapsed=False)
    resolved = alerts.evaluate_alerts(store, now=5.0)
    assert [e["state"] for e in resolved] == ["resolved"]
    assert [b["state"] for b in received] == ["firing", "resolved"]
    body = received[0]
    assert body["rule"] == "dead" and body["run"] == "live" and body["step"] == 1 and body["value"] == E - 1
    assert body["evidence"]["per_layer"]["1"] == E - 1 and seen[0]["state"] == "firing"
    events = alerts.list_events(store, rule_id=rule["id"])
    assert [e["state"] for e in events] == ["resolved", "firing"] and all(e["notified"] for e in events)


def test_breach_streak_is_reset_by_a_healthy_evaluation(store):
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "mv", "maxvio", ">=", 1.0, layer=1, window_steps=1, for_evaluations=2)
    assert alerts.evaluate_alerts(store) == []
    _write_step(store, 1, collapsed=False)
    assert alerts.evaluate_alerts(store) == []
    _write_step(store, 2, collapsed=True)
    assert alerts.evaluate_alerts(store) == []  # streak restarted at 1
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
    ({"for_evaluations": 1.5}, "for_evaluations must be a positive int"),
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
    assert alerts.delete_rule(store, r["id"]) is True and alerts.delete_rule(store, "a") is False
    assert alerts.list_rules(store) == []
