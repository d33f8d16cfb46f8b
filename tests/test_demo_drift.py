"""On a demo store, every drift metric equals an independent computation on the probe-set rows.

The demo's training rows carry checkpoint names too (the checkpoint training resumed
from); only the replays of the corpus probe set may take part.
"""
import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moescope.collector.store import UnknownProbeSet
from moescope.analysis.store import AnalysisStore as Store
from moescope.demo import demo_probe_set_name, run_demo
from moescope.kernels import MoETransformer
from moescope.probe.replay import load_reference_checkpoint

RUN = "demo-drift"
PS = demo_probe_set_name()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift") / "moescope-data"
    store = Store(root)
    run_demo(store, steps=6, run=RUN, checkpoints=3, batch_size=8, progress=False)
    yield store
    store.close()


@pytest.fixture(scope="module")
def rows(demo):
    """The probe-set routing rows, one row per token and layer with its slot-0 and slot-1 experts."""
    raw = demo.sql("SELECT checkpoint, step, seq, pos, layer, token_id, slot, expert FROM routing WHERE probe_set = ?",
                   [PS], run=RUN)
    wide = raw.pivot_table(index=["checkpoint", "step", "seq", "pos", "layer", "token_id"], columns="slot",
                           values="expert", aggfunc="first").reset_index()
    return wide.rename(columns={0: "e0", 1: "e1"})


def _order(rows):
    return rows[["checkpoint", "step"]].drop_duplicates().sort_values("step").checkpoint.tolist()


def _with_final(rows, final):
    key = ["seq", "pos", "layer", "token_id"]
    return rows.merge(rows[rows.checkpoint == final][key + ["e0", "e1"]], on=key, suffixes=("", "_f"))


def test_demo_replays_the_probe_set_through_every_checkpoint_beside_training_rows(demo, rows):
    ckpts = demo.checkpoints(RUN).checkpoint.tolist()
    assert _order(rows) == ckpts == ["step-0", "step-2", "step-4", "step-6"]
    probe_tokens = demo.probe_set(PS).tokens
    assert (rows.groupby(["checkpoint", "layer"]).size() == probe_tokens).all()
    trained = demo.sql("SELECT DISTINCT checkpoint FROM routing WHERE phase = 'train'", run=RUN).checkpoint
    assert set(trained) & set(ckpts)  # the trap: training rows under replayed checkpoint names


def test_saturation_equals_set_overlap_with_the_final_checkpoint(demo, rows):
    sat = demo.metric("saturation", run=RUN)
    j = _with_final(rows, _order(rows)[-1])
    j["overlap"] = ((j.e0 == j.e0_f).astype(int) + (j.e0 == j.e1_f) + (j.e1 == j.e0_f) + (j.e1 == j.e1_f)) / 2
    expected = j.groupby(["checkpoint", "layer"]).agg(tokens=("overlap", "size"), saturation=("overlap", "mean"))
    got = sat.set_index(["checkpoint", "layer"]).loc[expected.index]
    assert len(sat) == len(expected) == 16
    assert (got.tokens.to_numpy() == expected.tokens.to_numpy()).all()
    assert np.allclose(got.saturation, expected.saturation) and np.allclose(sat.baseline, 2 / 8)


def test_fluctuation_equals_the_last_checkpoint_whose_top1_differed(demo, rows):
    order = _order(rows)
    fl = demo.metric("fluctuation", run=RUN)
    j = _with_final(rows, order[-1])
    j["idx"] = j.checkpoint.map({c: i for i, c in enumerate(order)})
    j["last"] = np.where(j.e0 != j.e0_f, j.idx, -1)
    last = j.groupby(["seq", "pos", "layer"])["last"].max().reset_index()
    for layer, g in last.groupby("layer"):
        got = fl[fl.layer == layer]
        assert got.last_fluctuations.tolist() == [(g["last"] == i).sum() for i in range(len(order))]
        assert np.allclose(got.cdf, [(g["last"] <= i).mean() for i in range(len(order))])
        assert (got.never == (g["last"] == -1).sum()).all() and (got.tokens == len(g)).all()


def test_alignment_equals_the_best_of_every_expert_permutation(demo, rows):
    first, final = _order(rows)[0], _order(rows)[-1]
    al = demo.metric("alignment", run=RUN, checkpoint_a=first, checkpoint_b=final)
    j = rows[rows.checkpoint == first].merge(rows[rows.checkpoint == final], on=["seq", "pos", "layer", "token_id"])
    perms = np.array(list(itertools.permutations(range(8))))
    for layer, g in j.groupby("layer"):
        c_EE = pd.crosstab(g.e0_x, g.e0_y).reindex(index=range(8), columns=range(8), fill_value=0).to_numpy()
        best = c_EE[np.arange(8), perms].sum(1).max()
        got = al[al.layer == layer]
        assert got.agreement.iloc[0] == pytest.approx(best / len(g)) and (got.tokens == len(g)).all()
        assert c_EE[got.expert_a.to_numpy(), got.expert_b.to_numpy()].sum() == best


def test_load_js_on_the_probe_set_equals_numpy(demo, rows):
    first, final = _order(rows)[0], _order(rows)[-1]
    js = demo.metric("load_js", run=RUN, probe_set=PS)
    assert (js.checkpoint_a == first).all() and (js.checkpoint_b == final).all()
    for layer in range(4):
        p, q = (np.bincount(rows[(rows.checkpoint == c) & (rows.layer == layer)][["e0", "e1"]].to_numpy().ravel(),
                            minlength=8) / 1.0 for c in (first, final))
        p, q = p / p.sum(), q / q.sum()
        m = (p + q) / 2
        kl = lambda a: np.sum(a[a > 0] * np.log(a[a > 0] / m[a > 0]))  # noqa: E731
        assert js[js.layer == layer].js.iloc[0] == pytest.approx(0.5 * kl(p) + 0.5 * kl(q))


def test_bad_drift_requests_are_one_line_errors(demo):
    cases = [(UnknownProbeSet, {"probe_set": "nope"}, "unknown probe set 'nope'; registered probe sets: corpus-128"),
             (ValueError, {"steps": (100, 200)}, "no replay rows of probe set 'corpus-128' in run 'demo-drift', steps 100..200"),
             (ValueError, {"reference": "step-3"}, "reference checkpoint 'step-3' of run 'demo-drift' has no replay")]
    for kind, kw, msg in cases:
        with pytest.raises(kind, match=re.escape(msg)) as info:
            demo.metric("saturation", run=RUN, **kw)
        assert "\n" not in str(info.value)


def _python_blocks_under(heading: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_drift_example_prints_the_rising_saturation_curve(demo, monkeypatch, capsys):
    monkeypatch.chdir(demo.root.parent)  # the README opens ./moescope-data
    first, own = _python_blocks_under("Drift between checkpoints")
    namespace: dict = {}
    exec(first, namespace)
    printed = capsys.readouterr().out
    curve = [float(line.split()[3]) for line in printed.splitlines() if line.strip().startswith("step-")]
    assert len(curve) == 4 and curve[-1] == 1.0
    assert all(a < b for a, b in zip(curve, curve[1:])), printed  # rising towards the final checkpoint
    # The second block: your own model, texts and tokenizer.
    model, _ = load_reference_checkpoint(demo.checkpoints(RUN).path.iloc[-1])
    namespace.update(texts=["def f(x):\n    return x + 1\n", "The quick brown fox."], labels=["code", "prose"],
                     tokenizer=lambda t: list(t.encode()), checkpoints=[(0, MoETransformer.from_config(model.cfg)),
                                                                       (6, model)])
    exec(own, namespace)
    fl = capsys.readouterr().out
    assert "step-0" in fl and "step-6" in fl
