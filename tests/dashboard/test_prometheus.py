"""/metrics through prometheus_client: routing health per layer, checked by promtool and scraped by a real Prometheus."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from moescope.analysis.store import AnalysisStore as Store
from moescope.dashboard import prometheus
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, TOKEN_STATS

from .conftest import RUN, STEPS, fill_store, make_frame

PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package `prometheus`)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus server (Debian package `prometheus`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parsed with prometheus_client's own parser: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _exposition(store: Store, **options) -> str:
    return prometheus.exposition(prometheus.registry_for(store, **options)).decode()


def test_layer_series_equal_the_analysis_library_over_the_latest_window(recorded_store):
    samples = _samples(_exposition(recorded_store, window_steps=2))
    window = (STEPS - 2, STEPS - 1)
    kw = dict(by="window", steps=window)
    expected = {
        "moescope_routing_maxvio_ratio": recorded_store.metric("maxvio", RUN, **kw).set_index("layer")["maxvio_global"],
        "moescope_routing_load_cv_ratio": recorded_store.metric("cv", RUN, **kw).set_index("layer")["cv"],
        "moescope_routing_dead_experts_ratio": recorded_store.metric("dead_experts", RUN, **kw).set_index("layer")["dead_fraction"],
        "moescope_routing_entropy_mean_nats": recorded_store.metric("entropy", RUN, **kw).set_index("layer")["mean"],
        "moescope_routing_drop_ratio": recorded_store.metric("drop_rate", RUN, **kw).set_index("layer")["drop_rate"],
    }
    for name, by_layer in expected.items():
        for layer, value in by_layer.items():
            assert samples[(name, frozenset({"run": RUN, "layer": str(layer)}.items()))] == pytest.approx(value), name
        across = {stat: samples[(name.replace("_ratio", "_across_layers_ratio").replace("_nats", "_across_layers_nats"),
                                 frozenset({"run": RUN, "stat": stat}.items()))] for stat in ("p50", "p90", "max")}
        assert across == pytest.approx({"p50": by_layer.quantile(0.5), "p90": by_layer.quantile(0.9), "max": by_layer.max()})
    assert samples[("moescope_routing_window_first_step", frozenset({"run": RUN}.items()))] == window[0]
    assert samples[("moescope_routing_window_last_step", frozenset({"run": RUN}.items()))] == window[1]
    # Layer 1 never routes to expert 3 (conftest): it is dead there and the least loaded.
    assert samples[("moescope_routing_dead_experts_ratio", frozenset({"run": RUN, "layer": "1"}.items()))] == 0.25
    bottom = {"run": RUN, "layer": "1", "end": "bottom", "rank": "1", "expert": "3"}
    assert samples[("moescope_routing_expert_load_share_ratio", frozenset(bottom.items()))] == 0.0


def test_top_and_bottom_experts_are_the_extremes_of_load_share(recorded_store):
    samples = _samples(_exposition(recorded_store, top_k=2))
    share = recorded_store.metric("load_share", RUN, by="window", steps=(0, STEPS - 1))
    for layer, group in share.groupby("layer"):
        got = {(dict(k)["end"], dict(k)["rank"]): (int(dict(k)["expert"]), v) for (name, k), v in samples.items()
               if name == "moescope_routing_expert_load_share_ratio" and dict(k)["layer"] == str(layer)}
        ranked = group.sort_values(["share", "expert"], ascending=[False, True])
        assert [got[("top", r)] for r in ("1", "2")] == pytest.approx(list(zip(ranked.expert[:2], ranked.share[:2])))
        ranked = group.sort_values(["share", "expert"])
        assert [got[("bottom", r)] for r in ("1", "2")] == pytest.approx(list(zip(ranked.expert[:2], ranked.share[:2])))


def test_routing_series_are_served_from_cache_until_it_expires(recorded_store):
    cached = prometheus.registry_for(recorded_store, cache_s=3600)
    fresh = prometheus.registry_for(recorded_store, cache_s=0)
    key = ("moescope_routing_window_last_step", frozenset({"run": RUN}.items()))
    assert _samples(prometheus.exposition(cached).decode())[key] == STEPS - 1
    recorded_store.write_frame(make_frame(STEPS, np.random.default_rng(7)))
    assert _samples(prometheus.exposition(cached).decode())[key] == STEPS - 1
    assert _samples(prometheus.exposition(fresh).decode())[key] == STEPS
    # Ingest counters are never cached.
    assert _samples(prometheus.exposition(cached).decode())[("moescope_ingest_frames_total", frozenset({"run": RUN}.items()))] == STEPS + 1


def test_each_app_has_its_own_registry(recorded_store, empty_store):
    from moescope.dashboard.app import create_app

    recorded, empty = create_app(recorded_store), create_app(empty_store)
    assert recorded.state.prometheus is not empty.state.prometheus
    assert "moescope_runs 0.0" in prometheus.exposition(empty.state.prometheus).decode()
    assert "moescope_runs 1.0" in prometheus.exposition(recorded.state.prometheus).decode()


def test_bad_collector_options_are_rejected(recorded_store):
    with pytest.raises(ValueError, match="top_k"):
        prometheus.registry_for(recorded_store, top_k=0)
    with pytest.raises(ValueError, match="window_steps"):
        prometheus.latest_window(recorded_store, RUN, 0)


@needs_promtool
def test_exposition_passes_promtool_check_metrics(recorded_store):
    text = _exposition(recorded_store)
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _wide_store(root, layers: int = 64, experts: int = 256, steps: int = 2, k: int = 8) -> Store:
    """A synthetic run of `layers` MoE layers × `experts` experts: aggregates and a few tokens' stats per step."""
    rng = np.random.default_rng(0)
    store = Store(root)
    tokens = 16
    for step in range(steps):
        load_LE = rng.multinomial(tokens * k, np.full(experts, 1 / experts), size=layers)
        agg = [dict(run="wide", checkpoint="ck", step=step, rank=0, layer=layer, expert=e, num_tokens=tokens,
                    tokens=int(load_LE[layer, e]), dropped=0, top1=0, prob_sum=0.0, weight_sum=0.0, phase="train")
               for layer in range(layers) for e in range(experts)]
        stats = [dict(run="wide", checkpoint="ck", step=step, rank=0, microbatch=0, seq=0, pos=t, token_id=t, layer=layer,
                      entropy=float(rng.uniform(0, np.log(experts))), logsumexp=0.0, margin=0.0, domain=None, phase="train")
                 for layer in range(layers) for t in range(tokens)]
        meta = {"layers": [{"layer": layer, "module_path": f"layers.{layer}.mlp.router", "num_experts": experts, "top_k": k,
                            "router_kind": "softmax-topk", "capacity_factor": None} for layer in range(layers)],
                "checkpoints": [{"checkpoint": "ck", "step": 0}]}
        tables = {"expert_step": pa.Table.from_pylist(agg, schema=EXPERT_STEP),
                  "token_stats": pa.Table.from_pylist(stats, schema=TOKEN_STATS)}
        assert store.write_frame(Frame(run="wide", producer="p0", seq=step, tables=tables, meta=meta, final=step == steps - 1))
    return store


def test_series_for_64_layers_by_256_experts_stay_within_the_documented_bound(tmp_path):
    store = _wide_store(tmp_path / "wide")
    try:
        samples = _samples(_exposition(store))
    finally:
        store.close()
    bound = prometheus.series_bound(runs=1, layers=64)
    assert len(samples) <= bound == 726
    shares = [k for name, k in samples if name == "moescope_routing_expert_load_share_ratio"]
    assert len(shares) == 2 * prometheus.TOP_K * 64  # never one series per expert
    assert {dict(k)["layer"] for name, k in samples if name == "moescope_routing_entropy_mean_nats"} == {str(i) for i in range(64)}


@pytest.fixture
def served_store(tmp_path):
    """The service `moescope serve` runs (uvicorn over create_app) on a loopback port; yields (store, base URL)."""
    import threading

    import uvicorn

    from moescope.dashboard.app import create_app

    store = fill_store(Store(tmp_path / "store"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        yield store, base
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        store.close()


def _wait(ready, proc, what: str, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if ready():
                return
        except (httpx.TransportError, ValueError):  # not listening yet, or a plain-text "not ready" answer
            pass
        assert proc.poll() is None, f"{what} exited: {proc.stdout.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"{what} did not become ready"
        time.sleep(0.3)


@needs_prometheus
def test_real_prometheus_scrapes_serve_and_promql_returns_the_layer_values(served_store, tmp_path):
    store, base = served_store
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: moescope
    static_configs:
      - targets: ["{base.removeprefix('http://')}"]
""")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    query = f'max by (layer) (moescope_routing_maxvio_ratio{{run="{RUN}"}})'
    got: dict[str, float] = {}

    def answered() -> bool:
        body = httpx.get(api, params={"query": query}, timeout=5).json()
        got.update({r["metric"]["layer"]: float(r["value"][1]) for r in body.get("data", {}).get("result", [])})
        return len(got) == 2

    try:
        _wait(answered, proc, "prometheus")
        up = httpx.get(api, params={"query": 'up{job="moescope"}'}, timeout=5).json()["data"]["result"]
        p90 = httpx.get(api, params={"query": f'moescope_routing_entropy_mean_across_layers_nats{{run="{RUN}",stat="p90"}}'},
                        timeout=5).json()["data"]["result"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    expected = store.metric("maxvio", RUN, by="window", steps=(0, STEPS - 1)).set_index("layer")["maxvio_global"]
    assert got == pytest.approx({str(layer): value for layer, value in expected.items()})
    assert [float(r["value"][1]) for r in up] == [1.0]
    entropy = store.metric("entropy", RUN, by="window", steps=(0, STEPS - 1))["mean"]
    assert float(p90[0]["value"][1]) == pytest.approx(entropy.quantile(0.9))


def test_readme_prometheus_example_runs(recorded_store):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Prometheus and Grafana\n", 1)[1].split("\n## ", 1)[0]
    [block] = section.split("```python\n")[1:]
    exec(compile(block.split("```")[0], "README.md#prometheus", "exec"), {"store": recorded_store})
