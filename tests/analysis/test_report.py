"""Incident report: says what happened, where and from when, with evidence and alerts; opens offline."""
from __future__ import annotations

import shutil
import uuid

import numpy as np
import pyarrow as pa
import pytest

from moescope.analysis.report import write_report
from moescope.frame import Frame
from synth_runs import POSITIONS, SEQS, StepData, LayerStep, make_layer_tables, softmax

E, K, STEPS, ONSET, EXPERT = 8, 2, 40, 20, 3
T = SEQS * POSITIONS


def write_incident_run(store, run: str, *, onset: int | None = ONSET, seed: int = 0) -> None:
    """Two top-2 layers routing random tokens; from `onset` layer 1's router favours EXPERT (+4 on its logit)."""
    rng = np.random.default_rng(seed)
    layers = [{"layer": layer, "module_path": f"layers.{layer}.mlp.router", "num_experts": E, "top_k": K,
               "router_kind": "softmax-topk", "capacity_factor": None} for layer in (0, 1)]
    for step in range(STEPS):
        s = StepData(step=step, checkpoint="c0", token_ids_T=rng.integers(0, 100, T))
        for layer in (0, 1):
            logits_TE = rng.normal(size=(T, E))
            if layer == 1 and onset is not None and step >= onset:
                logits_TE[:, EXPERT] += 4.0
            probs_TE = softmax(logits_TE)
            s.layers.append(LayerStep(layer, np.argsort(-probs_TE, 1)[:, :K], probs_TE, np.zeros((T, K), bool), logits_TE))
        parts = [make_layer_tables(run, s, ls) for ls in s.layers]
        tables = {name: pa.concat_tables([p[name] for p in parts]) for name in ("routing", "token_stats", "expert_step")}
        store.write_frame(Frame(run=run, producer=f"{run}-p", seq=step, tables=tables, frame_id=uuid.uuid4().hex,
                                meta={"layers": layers} if step == 0 else {}))


@pytest.fixture
def incident(store):
    write_incident_run(store, "incident")
    return store


def test_report_names_the_layer_onset_and_evidence(incident, tmp_path):
    report = write_report(incident, "incident", out=tmp_path / "r.html")
    md = report.markdown
    assert report.html_path.exists() and report.markdown_path.read_text() == md
    assert "1 of 2 layers collapsing or collapsed, the first from step" in md
    row = next(line for line in md.splitlines() if line.startswith("| 1 | collaps"))
    onset = int(row.split("|")[3])
    assert abs(onset - ONSET) <= 2
    assert f"| 1 | {EXPERT} | took_over | {onset} |" in md
    assert "## What to check next" in md and "vocab_specialisation" in md  # starved experts: which tokens they took
    assert "All capture checks pass." in md


def test_report_lists_the_alert_events_of_the_run(incident, tmp_path):
    from moescope.analysis import alerts

    alerts.add_rule(incident, name="maxvio-l1", metric="maxvio", comparison=">", threshold=1.0, run="incident", layer=1,
                    window_steps=5)
    alerts.evaluate_alerts(incident)
    events = alerts.list_events(incident, run="incident")
    assert events
    md = write_report(incident, "incident", out=tmp_path / "r.html").markdown
    section = md.split("## Alerts that fired")[1].split("##")[0]
    assert f"| {events[0]['rule_id']} | 1 | firing |" in section


def test_healthy_run_report_says_no_collapse(store, tmp_path):
    write_incident_run(store, "calm", onset=None)
    md = write_report(store, "calm", out=tmp_path / "calm.html").markdown
    assert "No layer is collapsing or collapsed." in md and "No expert starved or took over." in md


def test_report_html_is_self_contained(incident, tmp_path):
    page = write_report(incident, "incident", out=tmp_path / "r.html", around=ONSET).html_path.read_text()
    assert "<script src=" not in page and "cdn.plot.ly" not in page.split("</head>")[0]
    assert page.count('class="plotly-graph-div"') >= 4 and "Plotly.newPlot" in page


def test_report_opens_in_a_browser_with_no_network(incident, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    path = write_report(incident, "incident", out=tmp_path / "r.html").html_path
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--user-data-dir={tmp_path / 'p'}"):
        options.add_argument(arg)  # every network request goes to a dead proxy
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(path.as_uri())
        drawn = WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return window.Plotly && document.querySelectorAll('.js-plotly-plot .main-svg').length"))
        assert drawn >= 4
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert not [u for u in fetched if not u.startswith(("file:", "data:", "blob:"))]
    finally:
        driver.quit()


def test_bad_report_input_is_a_one_line_value_error(incident, tmp_path):
    with pytest.raises(ValueError, match="step 99 is outside the recorded steps 0..39"):
        write_report(incident, "incident", around=99, out=tmp_path / "r.html")
    with pytest.raises(ValueError, match="output directory"):
        write_report(incident, "incident", out=tmp_path / "missing" / "r.html")
    with pytest.raises(ValueError, match="unknown run 'nope'"):
        write_report(incident, "nope", out=tmp_path / "r.html")
