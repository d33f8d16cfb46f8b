"""Serving engines' routing captures imported and analysed end to end, checked against numpy on the arrays."""
from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sqlalchemy import select

from moescope.collector import importers
from moescope.collector import metadata as md
from moescope.analysis.store import AnalysisStore as Store
from moescope.cli import main

LAYERS, EXPERTS, K = 3, 8, 2


def _routed(rng, positions: int, favourite: int) -> np.ndarray:
    """(positions, layers, top_k) distinct expert ids per token, skewed towards `favourite`, int32 as engines hold them."""
    logits_TLE = rng.gumbel(size=(positions, LAYERS, EXPERTS))
    logits_TLE[..., favourite] += 1.5
    return np.argsort(-logits_TLE, axis=-1)[..., :K].astype(np.int32)


def _vllm_outputs(rng, requests: int, favourite: int):
    """RequestOutput-shaped objects as vLLM returns them with enable_return_routed_experts=True."""
    outs = []
    for _ in range(requests):
        prompt, generated = rng.integers(0, 1000, size=int(rng.integers(5, 12))), rng.integers(0, 1000, size=6)
        completion = SimpleNamespace(index=0, token_ids=generated.tolist(), finish_reason="length",
                                     routed_experts=_routed(rng, len(prompt) + len(generated) - 1, favourite))
        outs.append(SimpleNamespace(request_id=str(len(outs)), prompt_token_ids=prompt.tolist(), outputs=[completion]))
    return outs


def _share(ids_list) -> np.ndarray:
    """Independent load share per (layer, expert) over all captured positions."""
    counts_LE = np.zeros((LAYERS, EXPERTS))
    for ids_TLK in ids_list:
        for layer in range(LAYERS):
            counts_LE[layer] += np.bincount(ids_TLK[:, layer].ravel(), minlength=EXPERTS)
    return counts_LE / counts_LE.sum(1, keepdims=True)


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0.0)))  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _run_config(store: Store, run: str) -> dict:
    with store.engine.connect() as conn:
        return conn.execute(select(md.runs.c.config).where(md.runs.c.run == run)).scalar_one()


def test_vllm_capture_load_share_and_drift_equal_numpy_on_the_arrays(tmp_path):
    rng = np.random.default_rng(0)
    store = Store(tmp_path / "store")
    v1, v2 = _vllm_outputs(rng, 5, favourite=0), _vllm_outputs(rng, 4, favourite=5)
    rows = importers.import_captures(store, "serve", importers.vllm_captures(v1), num_experts=EXPERTS, engine="vllm",
                                     checkpoint="v1")
    importers.import_captures(store, "serve", importers.vllm_captures(v2), num_experts=EXPERTS, engine="vllm",
                              checkpoint="v2")
    ids_v1 = [o.outputs[0].routed_experts for o in v1]
    ids_v2 = [o.outputs[0].routed_experts for o in v2]
    assert rows == sum(a.size for a in ids_v1)
    for checkpoint, ids in (("v1", ids_v1), ("v2", ids_v2)):
        got = store.metric("load_share", "serve", by="window", checkpoint=checkpoint)
        assert got.pivot(index="layer", columns="expert", values="share").to_numpy() == pytest.approx(_share(ids))
    drift = store.metric("load_js", "serve", checkpoint_a="v1", checkpoint_b="v2").set_index("layer")["js"]
    p, q = _share(ids_v1), _share(ids_v2)
    assert drift.to_numpy() == pytest.approx([_js(p[layer], q[layer]) for layer in range(LAYERS)])
    # One step per request, numbered on across imports; prefill and decode told apart by the prompt length.
    steps = store.sql("SELECT DISTINCT step FROM routing ORDER BY step", run="serve").step.tolist()
    assert steps == list(range(len(v1) + len(v2)))
    phases = store.sql("SELECT phase, count(*) AS n FROM routing WHERE step = 0 GROUP BY phase", run="serve")
    prompt = len(v1[0].prompt_token_ids)
    assert dict(zip(phases.phase, phases.n)) == {"prefill": prompt * LAYERS * K,
                                                  "decode": (len(ids_v1[0]) - prompt) * LAYERS * K}
    first = store.sql("SELECT token_id FROM routing WHERE step = 0 AND layer = 0 AND slot = 0 ORDER BY pos", run="serve")
    assert first.token_id.tolist() == (v1[0].prompt_token_ids + v1[0].outputs[0].token_ids)[:len(ids_v1[0])]
    assert store.sql("SELECT count(*) AS n FROM routing WHERE NOT isnan(weight)", run="serve").n.iloc[0] == 0
    assert _run_config(store, "serve") == {"import": {"engine": "vllm", "weights_known": False}}
    # Serving traffic reaches /metrics like training steps.
    from moescope.dashboard import prometheus

    text = prometheus.exposition(prometheus.registry_for(store)).decode()
    assert 'moescope_routing_maxvio_ratio{layer="0",run="serve"}' in text
    store.close()


def test_vllm_npz_and_sglang_jsonl_files_import_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    outs = _vllm_outputs(rng, 3, favourite=2)
    arrays = {}
    for i, o in enumerate(outs):
        arrays |= {f"routed_experts_{i}": o.outputs[0].routed_experts, f"prompt_token_ids_{i}": np.array(o.prompt_token_ids),
                   f"token_ids_{i}": np.array(o.outputs[0].token_ids)}
    np.savez(tmp_path / "vllm.npz", **arrays)
    root = str(tmp_path / "store")
    assert main(["import", "v", str(tmp_path / "vllm.npz"), "--format", "vllm-npz", "--num-experts", str(EXPERTS),
                 "--store", root]) == 0
    assert "imported 3 requests" in capsys.readouterr().out

    # SGLang /generate responses: the flat (position, layer, slot) ids as base64 int32 in meta_info.
    responses, ids = [], []
    for _ in range(3):
        prompt_tokens, completion_tokens = int(rng.integers(4, 9)), 5
        routed = _routed(rng, prompt_tokens + completion_tokens - 1, favourite=7)
        ids.append(routed)
        responses.append({"text": "…", "output_ids": rng.integers(0, 1000, completion_tokens).tolist(),
                          "meta_info": {"id": "x", "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                        "routed_experts": base64.b64encode(routed.tobytes()).decode()}})
    (tmp_path / "sglang.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    assert main(["import", "s", str(tmp_path / "sglang.jsonl"), "--format", "sglang-jsonl", "--num-experts", str(EXPERTS),
                 "--top-k", str(K), "--store", root]) == 0
    store = Store(root, create=False)
    for run, arrays_of_run in (("v", [o.outputs[0].routed_experts for o in outs]), ("s", ids)):
        got = store.metric("load_share", run, by="window")
        assert got.pivot(index="layer", columns="expert", values="share").to_numpy() == pytest.approx(_share(arrays_of_run))
    assert _run_config(store, "s")["import"] == {"engine": "sglang", "weights_known": False}
    store.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "s2", str(tmp_path / "sglang.jsonl"), "--format", "sglang-jsonl", "--num-experts", "4",
              "--top-k", str(K), "--store", root])
    assert exit_info.value.code == 2 and "but the model has 4 experts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "s3", str(tmp_path / "sglang.jsonl"), "--format", "sglang-jsonl", "--num-experts", str(EXPERTS),
              "--top-k", "3", "--store", root])
    assert exit_info.value.code == 2 and "repeats within one token's top-k" in capsys.readouterr().err


def test_sglang_stat_dump_imports_as_per_pass_aggregates(tmp_path):
    rng = np.random.default_rng(2)
    buffer, used, tokens = 6, 4, 10
    count_PLE = np.zeros((buffer, LAYERS, EXPERTS), dtype=np.int32)  # the recorder's circular buffer, tail unused
    for p in range(used):
        count_PLE[p] = np.stack([np.bincount(_routed(rng, tokens, favourite=1)[:, layer].ravel(), minlength=EXPERTS)
                                 for layer in range(LAYERS)])
    torch.save({"rank": 0, "logical_count": torch.from_numpy(count_PLE), "average_utilization_rate_over_window": None},
               tmp_path / "expert_distribution_recorder_1.pt")
    store = Store(tmp_path / "store")
    steps = importers.import_expert_distribution(
        store, "dist", importers.read_sglang_distribution(tmp_path / "expert_distribution_recorder_1.pt"), top_k=K)
    assert steps == used
    got = store.metric("load_share", "dist", by="window").pivot(index="layer", columns="expert", values="share")
    total_LE = count_PLE.sum(0)
    assert got.to_numpy() == pytest.approx(total_LE / total_LE.sum(1, keepdims=True))
    maxvio = store.metric("maxvio", "dist", by="step")
    expected = [(c.max() - c.mean()) / c.mean() for p in range(used) for c in count_PLE[p].astype(float)]
    assert maxvio.sort_values(["step", "layer"]).maxvio.to_numpy() == pytest.approx(expected)
    store.close()
    (tmp_path / "other.pt").write_bytes(b"not a torch file")
    with pytest.raises(importers.ImportFormatError, match="not a torch file"):
        importers.read_sglang_distribution(tmp_path / "other.pt")


def test_malformed_captures_are_clear_errors():
    with pytest.raises(importers.ImportFormatError, match=r"\(positions, layers, top_k\)"):
        importers.vllm_captures([SimpleNamespace(prompt_token_ids=[1], outputs=[SimpleNamespace(
            token_ids=[2], routed_experts=np.zeros((3, 2)))])])
    with pytest.raises(importers.ImportFormatError, match="enable_return_routed_experts"):
        importers.vllm_captures([SimpleNamespace(prompt_token_ids=[1], outputs=[SimpleNamespace(token_ids=[2])])])
    with pytest.raises(importers.ImportFormatError, match="return_routed_experts"):
        importers.sglang_capture({"meta_info": {}}, top_k=2)


def test_sglang_per_token_dump_maps_physical_to_logical_experts(tmp_path):
    rng = np.random.default_rng(3)
    physical = EXPERTS + 2  # two redundant physical copies, of logical experts 1 and 6
    to_logical_LP = np.tile(np.concatenate([np.arange(EXPERTS), [1, 6]]), (LAYERS, 1))
    records, logical = [], []
    for pass_id, lens in enumerate(([5, 3], None, None)):  # a prefill pass of two sequences, then two decode passes
        tokens = sum(lens) if lens else 2
        ids_TLK = _routed(rng, tokens, favourite=6)
        logical.append(ids_TLK)
        phys_TLK = ids_TLK.copy()
        phys_TLK[(phys_TLK == 6) & (rng.random(phys_TLK.shape) < 0.5)] = EXPERTS + 1  # half of expert 6 on its copy
        topk_LT8 = np.full((LAYERS, tokens, 8), -1, dtype=np.int32)  # the recorder pads slots to 8 with -1
        topk_LT8[:, :, :K] = phys_TLK.transpose(1, 0, 2)
        records.append({"forward_pass_id": pass_id, "rank": 0, "gatherer_key": "primary",
                        "input_ids": rng.integers(0, 1000, tokens).tolist(),
                        "positions": (np.concatenate([np.arange(n) for n in lens]) if lens else np.array([9, 4])).tolist(),
                        "extend_seq_lens": lens, "forward_mode": 1 if lens else 2,
                        "topk_ids_of_layer": torch.from_numpy(topk_LT8), "misc_objects": [],
                        "global_physical_count": torch.zeros((LAYERS, physical), dtype=torch.int64)})
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(to_logical_LP)},
               tmp_path / "expert_distribution_recorder_1_0.pt")
    root = str(tmp_path / "store")
    assert main(["import", "pt", str(tmp_path / "expert_distribution_recorder_1_0.pt"), "--format", "sglang-per-token",
                 "--num-experts", str(EXPERTS), "--store", root]) == 0
    store = Store(root, create=False)
    got = store.metric("load_share", "pt", by="window").pivot(index="layer", columns="expert", values="share")
    assert got.to_numpy() == pytest.approx(_share(logical))
    seqs = store.sql("SELECT step, phase, count(DISTINCT seq) AS n FROM routing GROUP BY ALL ORDER BY step", run="pt")
    assert list(zip(seqs.step, seqs.phase, seqs.n)) == [(0, "prefill", 2), (1, "decode", 2), (2, "decode", 2)]
    store.close()


def test_validate_skips_the_weight_check_of_an_imported_capture(tmp_path):
    from moescope.analysis.validate import validate_run

    store = Store(tmp_path / "store")
    outs = _vllm_outputs(np.random.default_rng(1), 3, favourite=2)
    importers.import_captures(store, "served", importers.vllm_captures(outs), num_experts=EXPERTS, engine="vllm")
    report = validate_run(store, "served")
    weights = next(c for c in report.checks if c.name == "weights")
    assert weights.violations == 0 and "not checked" in " ".join(weights.notes)
