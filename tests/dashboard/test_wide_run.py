"""Every page's data callback on a run of 64 MoE layers × 256 experts, top-8 (the scale the dashboard must stay
usable at), answered by the Dash server through Flask's test client: no error, every layer and expert in the
heatmaps, and the values of the analysis library."""
from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from moescope.analysis import compute_metric
from moescope.analysis.store import AnalysisStore as Store
from moescope.dashboard import figures
from moescope.dashboard.dash_app import create_dash
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING, TOKEN_STATS
from moescope.settings import Settings

RUN = "wide"
LAYERS, E, K, STEPS, TOKENS, POSITIONS = 64, 256, 8, 3, 32, 16
PROBE_SET = "probe"
DEVICES = {"source": "given", "num_devices": 16,  # contiguous: 16 experts a device
           "layers": {str(layer): [e // 16 for e in range(E)] for layer in range(LAYERS)}}
META = {"checkpoints": [{"checkpoint": "c0", "step": 0}, {"checkpoint": "c1", "step": 2}], "layers": [{"layer": layer, "module_path": f"layers.{layer}.mlp.router", "num_experts": E, "top_k": K,
                    "router_kind": "softmax-topk", "capacity_factor": 1.25} for layer in range(LAYERS)]}


def checkpoint_of(step: int) -> str:
    return "c0" if step < 2 else "c1"


def frame_tables(rng: np.random.Generator, step: int, probe_set: str | None = None) -> dict[str, pa.Table]:
    """One step: TOKENS tokens per layer, K distinct experts each, favouring low ids (shifted from checkpoint c1);
    expert_step counted from them. With probe_set: a replay of the probe set (the same tokens each time, phase eval)."""
    n = LAYERS * TOKENS
    layer_T = np.repeat(np.arange(LAYERS, dtype=np.int16), TOKENS)
    t_T = np.tile(np.arange(TOKENS), LAYERS)
    favour = np.roll(np.linspace(0, 0.5, E), 0 if checkpoint_of(step) == "c0" else E // 8)
    experts_TK = np.argsort(rng.random((n, E)) - favour, axis=1)[:, :K]
    token_id = (np.random.default_rng(7) if probe_set else rng).integers(0, 256, n).astype(np.int32)
    phase = "eval" if probe_set else "train"
    ctx = {"run": [RUN] * n, "checkpoint": [checkpoint_of(step)] * n, "step": np.full(n, step, np.int64),
           "rank": np.zeros(n, np.int32), "microbatch": np.zeros(n, np.int32), "seq": (t_T // POSITIONS).astype(np.int32),
           "pos": (t_T % POSITIONS).astype(np.int32), "token_id": token_id, "layer": layer_T}
    domain = np.where(t_T // POSITIONS == 0, "code", "text")
    rep = lambda a: np.repeat(np.asarray(a), K)  # noqa: E731 - one routing row per (token, slot)
    routing = pa.table({**{c: rep(v) for c, v in ctx.items()}, "slot": np.tile(np.arange(K, dtype=np.int8), n),
                        "expert": experts_TK.ravel().astype(np.int16), "weight": np.full(n * K, 1 / K, np.float32),
                        "dropped": np.zeros(n * K, bool), "domain": rep(domain), "phase": [phase] * (n * K),
                        "probe_set": [probe_set] * (n * K)}, schema=ROUTING)
    stats = pa.table({**ctx, "entropy": rng.random(n).astype(np.float32) * 3, "logsumexp": rng.random(n).astype(np.float32),
                      "margin": rng.random(n).astype(np.float32), "domain": domain, "phase": [phase] * n,
                      "probe_set": [probe_set] * n}, schema=TOKEN_STATS)
    load_LE = np.zeros((LAYERS, E), np.int64)
    np.add.at(load_LE, (np.repeat(layer_T, K), experts_TK.ravel()), 1)
    top1_LE = np.zeros((LAYERS, E), np.int64)
    np.add.at(top1_LE, (layer_T, experts_TK[:, 0]), 1)
    m = LAYERS * E
    expert_step = pa.table({"run": [RUN] * m, "checkpoint": [checkpoint_of(step)] * m, "step": np.full(m, step, np.int64),
                            "rank": np.zeros(m, np.int32), "layer": np.repeat(np.arange(LAYERS, dtype=np.int16), E),
                            "expert": np.tile(np.arange(E, dtype=np.int16), LAYERS), "num_tokens": np.full(m, TOKENS),
                            "tokens": load_LE.ravel(), "dropped": np.zeros(m, np.int64), "top1": top1_LE.ravel(),
                            "prob_sum": load_LE.ravel() / K, "weight_sum": load_LE.ravel() / K, "phase": [phase] * m},
                           schema=EXPERT_STEP)
    return {"routing": routing, "token_stats": stats, "expert_step": expert_step}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("wide"))
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        meta = {**META, "run_config": {"expert_devices": DEVICES}} if step == 0 else META  # the first frame's config
        assert store.write_frame(Frame(run=RUN, producer="p0", seq=step, tables=frame_tables(rng, step), meta=meta,
                                       final=step == STEPS - 1))
    for seq, step in enumerate((0, STEPS - 1)):  # the probe set through both checkpoints, at their steps
        assert store.write_frame(Frame(run=RUN, producer="replay", seq=seq, tables=frame_tables(rng, step, PROBE_SET),
                                       meta=META))
    app = create_dash(store, settings=Settings(api_token=None))
    client = app.server.test_client()
    client.get("/")  # Dash sets up the page routes on the first request
    deps = json.loads(client.get("/_dash-dependencies").data)

    def answer(output: str, values: dict) -> dict:
        """The outputs ("id.property" -> value) of the callback that writes `output`, given its inputs' values."""
        dep = next(d for d in deps if output in d["output"].strip(".").split("..."))
        outputs = [dict(zip(("id", "property"), o.rsplit(".", 1))) for o in dep["output"].strip(".").split("...")]
        fill = lambda items: [{**i, "value": values.get(f"{i['id']}.{i['property']}",  # noqa: E731
                                                        0 if i["property"] == "n_intervals" else None)} for i in items]
        inputs = fill(dep["inputs"])
        body = {"output": dep["output"], "outputs": outputs if len(outputs) > 1 else outputs[0], "inputs": inputs,
                "state": fill(dep["state"]), "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
        resp = client.post("/_dash-update-component", json=body)
        assert resp.status_code == 200, resp.data[:300]
        got = json.loads(resp.data)["response"]
        return {f"{i}.{p}": v for i, props in got.items() for p, v in props.items()}

    yield store, answer
    store.close()


PAGES = {  # an output of each page's data callback -> the values of its inputs (unset ones are None)
    "runs-table-holder.children": {"runs-problems.data": [], "runs-select.value": []},
    "balance-maxvio.figure": {"balance-runs.value": [RUN], "balance-layer.value": 0, "balance-fixed.value": ["1"]},
    "health-entropy.figure": {"health-runs.value": RUN, "health-layer.value": 0},
    "spec-domain.figure": {"spec-runs.value": RUN, "spec-layer.value": 0, "spec-min-count.value": 1},
    "spec-coactivation.figure": {"spec-runs.value": RUN, "spec-layer.value": 0},
    "spec-repetition.figure": {"spec-runs.value": RUN, "spec-layer.value": 0},
    "cap-curve.figure": {"cap-runs.value": RUN},
    "wi-balancedness.figure": {"wi-runs.value": RUN, "wi-layer.value": 0, "wi-dtype.value": "bfloat16",
                               "wi-hidden.value": 4096, "wi-policies.value": ["contiguous", "eplb"]},
    "wi-cache-curve.figure": {"wi-runs.value": RUN, "wi-layer.value": 0},
    "drift-saturation.figure": {"drift-runs.value": RUN, "drift-probe-set.value": PROBE_SET, "drift-layer.value": 0,
                                "drift-checkpoint.value": "c0", "drift-checkpoint-b.value": "c1"},
    "cmp-agreement.figure": {"cmp-runs.value": RUN, "cmp-checkpoint.value": "c0", "cmp-run-b.value": RUN,
                             "cmp-checkpoint-b.value": "c1", "cmp-probe-set.value": PROBE_SET, "cmp-layer.value": 0},
    "balance-device-tokens.figure": {"balance-runs.value": [RUN], "balance-layer.value": 0},
    "alerts-rules.children": {"alerts-runs.value": RUN, "alerts-changed.data": 0},
}


def array(v) -> np.ndarray:
    """A figure's array as plotly sends it: a list, or typed bytes {dtype, bdata, shape}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(x) for x in str(v.get("shape", len(a))).split(",")])
    return np.asarray(v)


@pytest.mark.parametrize("output", list(PAGES))
def test_every_page_answers_without_a_message_and_draws_data(wide, output):
    _, answer = wide
    out = answer(output, PAGES[output])
    for key, value in out.items():
        if key.endswith("message.children"):
            assert not value, f"{key}: {value}"
        if key.endswith(".figure") and not key.startswith("alerts-"):  # no rule yet: the alert charts ask for one
            notes = [a.get("text") for a in value["layout"].get("annotations", [])]
            assert value["data"] and figures.NO_DATA not in notes, key


def test_balance_heatmaps_hold_every_layer_and_expert_with_the_library_values(wide):
    store, answer = wide
    out = answer("balance-maxvio.figure", PAGES["balance-maxvio.figure"])
    layers = array(out["balance-layer-heatmap.figure"]["data"][0]["z"])
    experts = array(out["balance-expert-heatmap.figure"]["data"][0]["z"])
    assert layers.shape == (LAYERS, STEPS) and experts.shape == (E, STEPS)
    util = compute_metric(store, "utilisation", RUN, layers=[0], by="step", phase="train").pivot(index="expert", columns="step",
                                                                              values="utilisation")
    assert np.allclose(experts, util.to_numpy())
    maxvio = compute_metric(store, "maxvio", RUN, by="step", phase="train").pivot(index="layer", columns="step", values="maxvio")
    assert np.allclose(layers, maxvio.to_numpy())
    assert np.allclose(array(out["balance-maxvio.figure"]["data"][0]["y"]), maxvio.loc[0].to_numpy())


def test_coactivation_is_one_expert_by_expert_matrix(wide):
    _, answer = wide
    z = array(answer("spec-coactivation.figure", PAGES["spec-coactivation.figure"])["spec-coactivation.figure"]["data"][0]["z"])
    assert z.shape == (E, E)


def _find(tree, component_id: str):
    """The component with this id in a Dash layout as JSON (dicts with type and props)."""
    if isinstance(tree, list):
        return next((c for c in (_find(t, component_id) for t in tree) if c is not None), None)
    if not isinstance(tree, dict):
        return None
    props = tree.get("props", {})
    return tree if props.get("id") == component_id else _find(props.get("children"), component_id)


def _rows(table) -> list[list[dict]]:
    """Each body row's cells (their props) of an html.Table as JSON."""
    body = next(c for c in table["props"]["children"] if c["type"] == "Tbody")
    return [[td["props"] for td in tr["props"]["children"]] for tr in body["props"]["children"]]


def test_router_health_shows_every_layers_verdict_shortened_and_the_picked_layers_evidence(wide):
    store, answer = wide
    evidence = compute_metric(store, "collapse", RUN, detail="evidence")
    layer = int(evidence.layer.iloc[-1])
    out = answer("health-entropy.figure", {"health-runs.value": RUN, "health-layer.value": layer})
    assert not out["health-message.children"]
    verdicts = compute_metric(store, "collapse", RUN)
    rows = _rows(_find(out["health-collapse.children"], "health-collapse-table"))
    assert [int(r[0]["children"]) for r in rows] == list(range(LAYERS))
    for cells, want in zip(rows, verdicts.itertuples()):
        assert cells[1]["children"] == want.verdict
        assert cells[2]["children"] == ("—" if pd.isna(want.onset_step) else str(int(want.onset_step)))
        experts = [str(e) for e in want.evidence_experts]
        assert cells[3].get("title", cells[3]["children"]) == (", ".join(experts) or "—")  # whole in the tooltip
        if len(experts) > 16:
            assert cells[3]["children"].endswith(f"(+{len(experts) - 16} more)")
        assert len(cells[5]["children"]) <= 302 and cells[5].get("title", cells[5]["children"]) == want.summary
    shown = _rows(_find(out["health-collapse.children"], "health-evidence-table"))
    assert {int(r[0]["children"]) for r in shown} == {layer}
    assert [int(r[1]["children"]) for r in shown] == evidence[evidence.layer == layer].expert.tolist()
    assert [r[6]["children"] for r in shown] == [f"{v:.3f}" for v in evidence[evidence.layer == layer].share_after]


def test_top_tokens_list_experts_with_tokens_and_gather_the_rest_in_one_row(wide):
    store, answer = wide
    out = answer("spec-domain.figure", {"spec-runs.value": RUN, "spec-layer.value": 3, "spec-min-count.value": 2})
    rows = _rows(_find(out["spec-top-tokens.children"], "spec-top-tokens-table"))
    vocab = compute_metric(store, "vocab_specialisation", RUN, layers=[3], min_count=2, top=5)
    with_tokens = sorted(set(vocab.expert))
    assert [int(r[0]["children"]) for r in rows[:-1]] == with_tokens
    last_expert, last_tokens = rows[-1][0]["children"], rows[-1][1]["children"]
    assert last_tokens.startswith("— (no token")
    listed = [int(x) for part in last_expert.split(", ") for x in
              (range(int(part.split("–")[0]), int(part.split("–")[1]) + 1) if "–" in part else [part])]
    assert sorted(listed + with_tokens) == list(range(E))


def test_drift_and_compare_draw_both_checkpoints_domains_on_one_colour_range(wide):
    _, answer = wide
    drift = answer("drift-saturation.figure", PAGES["drift-saturation.figure"])
    compare = answer("cmp-agreement.figure", PAGES["cmp-agreement.figure"])
    for a, b in ((drift["drift-domain-a.figure"], drift["drift-domain-b.figure"]),
                 (compare["cmp-domain-a.figure"], compare["cmp-domain-b.figure"])):
        ta, tb = a["data"][0], b["data"][0]
        assert (ta["zmin"], ta["zmax"]) == (tb["zmin"], tb["zmax"]) and ta["zmin"] == 0
        top = max(np.nanmax(array(ta["z"]).astype(float)), np.nanmax(array(tb["z"]).astype(float)))
        assert ta["zmax"] == pytest.approx(max(2.0, top))
        assert ta["colorscale"][1] == [pytest.approx(1 / ta["zmax"]), "#f7f7f7"]  # white at the uniform share


def test_compare_of_one_run_opens_on_its_first_replayed_checkpoint_against_its_last(wide):
    store, answer = wide
    out = answer("cmp-agreement.figure", {"cmp-runs.value": RUN})
    assert not out["cmp-message.children"]
    assert "c0 vs" in out["cmp-agreement.figure"]["layout"]["title"]["text"]
    assert f"{RUN}@c1" in out["cmp-agreement.figure"]["layout"]["title"]["text"]


def test_runs_table_names_the_collapsed_layers_as_ranges_and_opens_the_first(wide):
    store, answer = wide
    verdicts = compute_metric(store, "collapse", RUN)
    worst = verdicts[verdicts.verdict == "collapsed"].layer
    out = json.dumps(answer("runs-table-holder.children", PAGES["runs-table-holder.children"]))
    assert f"collapsed ({len(worst)} of {LAYERS} layers: " in out
    # The verdict links to Router health at the first collapsed layer, where its onset and evidence are shown.
    assert f'"href": "/dash/health?runs={RUN}&layer={worst.min()}"' in out
