"""More transformers MoE families: captured routing equals what the experts computed.

Same ground truth as test_adapters_hf.py: a tiny model from its config (text model only
for multimodal families) with random weights, a left-padded batch, the (top_k_index,
top_k_weights) the `*Experts` module received read by a separate hook, and outputs
bit-identical with and without the probe hooks. DBRX, Llama4 and JetMoE do not hand the
experts those two tensors; their tests read what the experts really got another way.
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel  # noqa: E402

from moescope.probe.adapters import discover  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GROUPED = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
               first_k_dense_replace=0, n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)

# model_type -> (config overrides, model class or None for AutoModel). Routers return (logits, weights, ids).
FAMILIES = {
    "qwen3_vl_moe_text": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16), None),
    "qwen3_omni_moe_text": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16),
                            "qwen3_omni_moe.Qwen3OmniMoeThinkerTextModel"),
    "exaone_moe": (GROUPED, None),
    "mimo_v2_flash": (GROUPED, None),
    "nemotron_h": (GROUPED, None),
    "solar_open": (GROUPED, None),
    "hy_v3": (GROUPED, None),
    "hy_v4": (GROUPED, None),
    "minimax_m2": (dict(num_local_experts=8, num_experts_per_tok=2), None),
    "laguna": (GROUPED, None),
    "aria_text": (dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1), None),
    "granitemoe_swa": (dict(num_local_experts=8, num_experts_per_tok=2), None),
    "cohere2_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16), None),
    "kimi_linear": (GROUPED, None),
    "bailing_hybrid": (GROUPED, None),
    "lfm2_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=0,
                      layer_types=["full_attention", "conv"]), None),
    "glm4v_moe_text": ({**GROUPED, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 0]}}, None),
    "longcat_flash": ({**GROUPED, **MLA, "zero_expert_num": 4, "expert_ffn_hidden_size": 16}, None),
    "mistral_large4_text": ({**GROUPED, **MLA}, None),
    "granitemoehybrid": (dict(num_local_experts=8, num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=8,
                              mamba_d_state=8, mamba_n_groups=1, layer_types=["mamba", "attention"]), None),
    "gemma4_text": (dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16), None),
}


def build(model_type: str, overrides: dict, model_class: str | None = None):
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(0)
    if model_class is None:
        return AutoModel.from_config(cfg).eval()
    module, name = model_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    return cls._from_config(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding on the second sequence
    return ids, mask


def forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False)[0]


def is_experts(module) -> bool:
    """The fused experts module: forward(hidden_states, top-k index, top-k weights)."""
    names = list(inspect.signature(module.forward).parameters)
    return len(names) >= 3 and ("index" in names[1] or "indices" in names[1])


def hook_all(model, pairs, captures, truth, truth_filter=is_experts):
    handles = []
    for adapter, site in pairs:
        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures.setdefault(site.module_path, []).append(adapter.capture(site, mod, args, kwargs, output))

        handles.append(model.get_submodule(site.hook_module_path or site.module_path)
                       .register_forward_hook(hook, with_kwargs=True))
    for path, module in model.named_modules():
        if path.endswith("experts") and truth_filter(module):
            def truth_hook(mod, args, kwargs, output, path=path):
                bound = list(inspect.signature(mod.forward).bind(*args, **kwargs).arguments.values())
                truth.setdefault(path.rsplit(".", 1)[0], []).append(bound)

            handles.append(module.register_forward_hook(truth_hook, with_kwargs=True))
    return handles


def run_probed(model, pairs):
    ids, mask = batch()
    plain = forward(model, ids, mask)
    captures, truth = {}, {}
    handles = hook_all(model, pairs, captures, truth)
    try:
        out = forward(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, out)
    return captures, truth, ids.numel()


def sort_pair(ids_TK, weights_TK):
    order = torch.argsort(weights_TK.float(), dim=-1, descending=True, stable=True)
    return ids_TK.gather(-1, order), weights_TK.float().gather(-1, order)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_capture_matches_expert_inputs_and_keeps_output_identical(model_type):
    overrides, model_class = FAMILIES[model_type]
    model = build(model_type, overrides, model_class)
    pairs = discover(model)
    captures, truth, tokens = run_probed(model, pairs)
    assert sorted(truth) == sorted(site.module_path.rsplit(".", 1)[0] for _, site in pairs)
    for _, site in pairs:
        (cap,) = captures[site.module_path]
        ((_, true_ids, true_w, *_),) = truth[site.module_path.rsplit(".", 1)[0]]
        exp_ids, exp_w = sort_pair(true_ids.reshape(tokens, -1), true_w.reshape(tokens, -1))
        assert cap.expert_ids_TK.shape == (tokens, site.top_k)
        assert torch.equal(cap.expert_ids_TK, exp_ids)
        torch.testing.assert_close(cap.weights_TK, exp_w, rtol=0, atol=0)
        assert cap.probs_TE.shape == (tokens, site.num_experts)
        torch.testing.assert_close(cap.probs_TE.sum(-1), torch.ones(tokens))
        assert cap.dropped_TK is None


def test_longcat_zero_computation_experts_are_recorded_with_their_own_ids():
    overrides, _ = FAMILIES["longcat_flash"]
    model = build("longcat_flash", overrides)
    for _, site in discover(model):
        router = model.get_submodule(site.module_path)
        router.e_score_correction_bias.copy_(torch.tensor([0.0] * 8 + [1.0] * 4))  # force zero experts into play
    pairs = discover(model)
    captures, truth, tokens = run_probed(model, pairs)
    for _, site in pairs:
        assert site.num_experts == 12 and site.router_kind == "softmax-topk-zero-experts"
        (cap,) = captures[site.module_path]
        ((_, true_ids, true_w, *_),) = truth[site.module_path.rsplit(".", 1)[0]]
        assert (cap.expert_ids_TK >= 8).any()  # identity experts chosen, and recorded, not dropped
        exp_ids, exp_w = sort_pair(true_ids.reshape(tokens, -1), true_w.reshape(tokens, -1))
        assert torch.equal(cap.expert_ids_TK, exp_ids) and torch.equal(cap.weights_TK, exp_w)
        assert cap.dropped_TK is None and cap.logits_TE.shape == (tokens, 12)


def test_gemma4_records_router_probabilities_and_no_logits():
    overrides, _ = FAMILIES["gemma4_text"]
    model = build("gemma4_text", overrides)
    captures, _, tokens = run_probed(model, discover(model))
    for (cap,) in captures.values():
        assert cap.logits_TE is None
        # The router's probabilities are recorded as they are: the applied top-k weights are them, renormalised.
        top_TK = cap.probs_TE.gather(1, cap.expert_ids_TK)
        torch.testing.assert_close(cap.weights_TK, top_TK / top_TK.sum(-1, keepdim=True))


def test_dbrx_rederived_routing_matches_expert_inputs():
    model = build("dbrx", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                               attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                               ffn_config=dict(moe_num_experts=8, moe_top_k=2, ffn_hidden_size=16,
                                               moe_normalize_expert_weights=1.0)))
    pairs = discover(model)
    assert [site.router_kind for _, site in pairs] == ["softmax-topk-pnorm"] * 2
    captures, truth, tokens = run_probed(model, pairs)
    for _, site in pairs:
        (cap,) = captures[site.module_path]
        ((_, true_ids, true_w),) = truth[site.module_path.rsplit(".", 1)[0]]
        exp_ids, exp_w = sort_pair(true_ids.reshape(tokens, -1), true_w.reshape(tokens, -1))
        assert torch.equal(cap.expert_ids_TK, exp_ids)
        torch.testing.assert_close(cap.weights_TK, exp_w, rtol=0, atol=0)


def test_llama4_top1_sigmoid_gate_is_what_scaled_the_expert_inputs():
    model = build("llama4_text", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=16,
                                      intermediate_size_mlp=64, interleave_moe_layer_step=1))
    pairs = discover(model)
    moe_inputs, expert_inputs, handles = {}, {}, []
    for _, site in pairs:
        block = model.get_submodule(site.module_path.rsplit(".", 1)[0])
        handles.append(block.register_forward_pre_hook(lambda m, a, p=site.module_path: moe_inputs.__setitem__(p, a[0])))
        handles.append(block.experts.register_forward_pre_hook(
            lambda m, a, p=site.module_path: expert_inputs.__setitem__(p, a[0])))
    try:
        captures, _, tokens = run_probed(model, pairs)
    finally:
        for h in handles:
            h.remove()
    for _, site in pairs:
        assert (site.top_k, site.router_kind) == (1, "sigmoid-topk-unnormalised")
        (cap,) = captures[site.module_path]
        x_TD = moe_inputs[site.module_path].reshape(tokens, -1)
        gates_TE = torch.zeros(tokens, 4).scatter(1, cap.expert_ids_TK, cap.weights_TK)
        # Every expert ran on every token, its input scaled by the gate (0 for unchosen experts).
        expected_ETD = x_TD.unsqueeze(0) * gates_TE.T.unsqueeze(-1)
        assert torch.equal(expert_inputs[site.module_path].reshape(4, tokens, -1), expected_ETD)
        torch.testing.assert_close(cap.weights_TK, torch.sigmoid(cap.logits_TE.gather(1, cap.expert_ids_TK)))


def test_jetmoe_feed_forward_router_matches_expert_dispatch():
    model = build("jetmoe", dict(num_local_experts=8, num_experts_per_tok=2, kv_channels=8, num_key_value_heads=4))
    pairs = discover(model)
    assert [site.module_path.split(".")[-2] for _, site in pairs] == ["mlp", "mlp"]  # attention-head routers left out
    moe_inputs, dispatch, handles = {}, {}, []
    for _, site in pairs:
        block = model.get_submodule(site.module_path.rsplit(".", 1)[0])
        handles.append(block.register_forward_pre_hook(lambda m, a, p=site.module_path: moe_inputs.__setitem__(p, a[0])))
        handles.append(block.input_linear.register_forward_pre_hook(
            lambda m, a, p=site.module_path: dispatch.__setitem__(p, (a[0], list(a[1])))))
    try:
        captures, _, tokens = run_probed(model, pairs)
    finally:
        for h in handles:
            h.remove()
    for _, site in pairs:
        (cap,) = captures[site.module_path]
        x_TD = moe_inputs[site.module_path].reshape(tokens, -1)
        rows, sizes = dispatch[site.module_path]
        assert sizes == torch.bincount(cap.expert_ids_TK.flatten(), minlength=8).tolist()
        start = 0
        for expert, size in enumerate(sizes):  # each expert got exactly the tokens recorded for it
            got = rows[start:start + size]
            want = x_TD[(cap.expert_ids_TK == expert).any(-1)]
            assert torch.equal(got.sort(0).values, want.sort(0).values)
            start += size
        top_TK = cap.logits_TE.gather(1, cap.expert_ids_TK)
        torch.testing.assert_close(cap.weights_TK, torch.softmax(top_TK, -1), rtol=0, atol=0)
