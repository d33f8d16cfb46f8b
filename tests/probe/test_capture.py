"""What the probe records for each router call: rows, exact aggregates, statistics."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_moe import FakeAdapter, FakeLM, batch, fake_sites  # noqa: E402

from moescope.probe import attach  # noqa: E402
from moescope.probe.adapters.base import RouterCapture  # noqa: E402
from moescope.schema import TABLES  # noqa: E402


def record(model, ids, mask, **kw):
    kw.setdefault("sites", fake_sites(model))
    with attach(model, sink="memory", run="cap-test", **kw) as probe:
        model(ids, attention_mask=mask)
    return probe.tables(), probe


def decisions(model):
    """What each layer's MoE block really ran in the last forward: (logits, ids, weights, dropped)."""
    return [blk.moe.last for blk in model.layers]


def test_routing_rows_are_non_pad_tokens_times_layers_times_k():
    model = FakeLM(e=4, k=2, layers=3)
    ids, mask = batch(b=3, s=7, pad_right=(0, 2, 4))
    tables, _ = record(model, ids, mask)
    real = int(mask.sum())
    assert tables["routing"].num_rows == real * 3 * 2
    assert tables["token_stats"].num_rows == real * 3
    for name, table in tables.items():
        assert table.schema.equals(TABLES[name]), name


def test_padding_is_never_recorded():
    model = FakeLM()
    ids, mask = batch(b=3, s=7, pad_right=(0, 2, 4))
    tables, _ = record(model, ids, mask)
    expected = {(b, p) for b in range(3) for p in range(7) if mask[b, p]}
    for name in ("routing", "token_stats"):
        df = tables[name].to_pandas()
        assert set(zip(df.seq, df.pos)) == expected
        assert (df.token_id.to_numpy() == ids.numpy()[df.seq.to_numpy(), df.pos.to_numpy()]).all()


def test_routing_rows_match_what_the_model_ran():
    model = FakeLM(e=4, k=2, layers=2, capacity_factor=0.75)
    ids, mask = batch(b=2, s=6, pad_right=(0, 0))
    tables, _ = record(model, ids, mask)
    df = tables["routing"].to_pandas()
    for layer, (_, ids_TK, weights_TK, dropped_TK) in enumerate(decisions(model)):
        sub = df[df.layer == layer].sort_values(["seq", "pos", "slot"])
        t = sub.seq.to_numpy() * 6 + sub.pos.to_numpy()
        slot = sub.slot.to_numpy()
        assert (sub.expert.to_numpy() == ids_TK.numpy()[t, slot]).all()
        np.testing.assert_array_equal(sub.weight.to_numpy(), weights_TK.detach().numpy()[t, slot])
        assert (sub.dropped.to_numpy() == dropped_TK.numpy()[t, slot]).all()
    assert df.dropped.any(), "capacity 0.75 must drop some slots"


def test_expert_step_sums_equal_routing_counts_and_recomputed_probabilities():
    model = FakeLM(e=4, k=2, layers=2, capacity_factor=1.0)
    ids, mask = batch(b=3, s=7, pad_right=(0, 2, 4))
    tables, _ = record(model, ids, mask)
    routing = tables["routing"].to_pandas()
    es = tables["expert_step"].to_pandas().groupby(["layer", "expert"]).sum(numeric_only=True)
    valid_T = mask.reshape(-1).bool()
    for layer, (logits_TE, _, _, _) in enumerate(decisions(model)):
        sub = routing[routing.layer == layer]
        for expert in range(4):
            row = es.loc[(layer, expert)]
            mine = sub[sub.expert == expert]
            assert row.tokens == len(mine)
            assert row.dropped == int(mine.dropped.sum())
            assert row.top1 == int(((mine.slot == 0)).sum())
            assert row.weight_sum == pytest.approx(float(mine.weight.astype("float64").sum()), rel=1e-6)
            assert row.num_tokens == int(mask.sum())
        probs_TE = logits_TE.detach().double().softmax(-1)[valid_T]
        got = np.array([es.loc[(layer, e)].prob_sum for e in range(4)])
        np.testing.assert_allclose(got, probs_TE.sum(0).numpy(), rtol=1e-5)


def test_entropy_margin_logsumexp_equal_recomputation():
    model = FakeLM(e=6, k=2, layers=2)
    ids, mask = batch(b=2, s=5, pad_right=(0, 1))
    tables, _ = record(model, ids, mask)
    ts = tables["token_stats"].to_pandas()
    for layer, (logits_TE, *_rest) in enumerate(decisions(model)):
        sub = ts[ts.layer == layer]
        t = sub.seq.to_numpy() * 5 + sub.pos.to_numpy()
        logits = logits_TE.detach().double()[t]
        p = logits.softmax(-1)
        top2 = p.topk(2, dim=-1).values
        np.testing.assert_allclose(sub.entropy, -(p * p.log()).sum(-1).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sub.logsumexp, logits.logsumexp(-1).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sub.margin, (top2[:, 0] - top2[:, 1]).numpy(), rtol=1e-4, atol=1e-6)


def test_sampling_keeps_whole_sequences_and_expert_step_stays_exact():
    model = FakeLM(layers=2)
    ids, mask = batch(b=16, s=6, pad_right=(0,) * 16, seed=3)
    full, _ = record(model, ids, mask)
    sampled, _ = record(model, ids, mask, sample_rate=0.4)
    again, _ = record(model, ids, mask, sample_rate=0.4)
    seqs = set(sampled["routing"].column("seq").to_pylist())
    assert 0 < len(seqs) < 16
    assert sampled["routing"].num_rows == len(seqs) * 6 * 2 * 2  # every token of a kept sequence
    assert seqs == set(again["routing"].column("seq").to_pylist()), "sampling must be deterministic"
    key = ["layer", "expert"]
    cols = ["num_tokens", "tokens", "dropped", "top1", "prob_sum", "weight_sum"]
    a = full["expert_step"].to_pandas().groupby(key)[cols].sum()
    b = sampled["expert_step"].to_pandas().groupby(key)[cols].sum()
    np.testing.assert_allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float))


def test_domains_are_recorded_per_sequence_of_the_next_forward():
    model = FakeLM()
    ids, mask = batch(b=3, s=4, pad_right=(0, 0, 0))
    with attach(model, sink="memory", run="dom", sites=fake_sites(model)) as probe:
        probe.set_domains(["code", None, "prose"])
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)  # domains apply to one forward only
    df = probe.tables()["routing"].to_pandas()
    first, second = df[df.microbatch == 0], df[df.microbatch == 1]
    assert dict(first.dropna(subset=["domain"]).groupby("seq").domain.unique().items()) == {0: ["code"], 2: ["prose"]}
    assert first[first.seq == 1].domain.isna().all()
    assert second.domain.isna().all()


def test_inputs_embeds_gives_unknown_token_ids():
    model = FakeLM()
    ids, mask = batch(b=2, s=4, pad_right=(0, 0))
    with attach(model, sink="memory", run="emb", sites=fake_sites(model)) as probe:
        model(inputs_embeds=model.embed(ids).detach())
    ts = probe.tables()["token_stats"]
    assert ts.num_rows == 2 * 4 * 2
    assert set(ts.column("token_id").to_pylist()) == {-1}


class EmptySlotAdapter(FakeAdapter):
    """Expert-choice style: some tokens get no expert in a slot (-1)."""

    def capture(self, site, module, args, kwargs, output):
        cap = super().capture(site, module, args, kwargs, output)
        ids_TK = cap.expert_ids_TK.clone()
        ids_TK[::2, 1] = -1
        weights_TK = cap.weights_TK.masked_fill(ids_TK < 0, 0.0)
        return RouterCapture(cap.probs_TE, ids_TK, weights_TK, cap.logits_TE)


def test_empty_slots_are_neither_rows_nor_counted():
    model = FakeLM(layers=1)
    ids, mask = batch(b=2, s=4, pad_right=(0, 0))
    tables, _ = record(model, ids, mask, sites=fake_sites(model, EmptySlotAdapter()))
    assert tables["routing"].num_rows == 8 * 2 - 4
    assert tables["expert_step"].column("tokens").to_numpy().sum() == 8 * 2 - 4
    assert tables["routing"].column("expert").to_numpy().min() >= 0
