"""transformers MoE families: the captured routing equals what the experts computed.

Each family is built tiny from its config with random weights (fixed seed). Ground truth
is the (top_k_index, top_k_weights) the model's own `*Experts` module received, read by
a separate hook; the probe's hooks must also leave the model's output bit-identical.
"""
from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moescope.probe.adapters import discover  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
DEEPSEEK = dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)

# model_type -> config overrides. Each has a router returning (logits, weights, ids).
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8, norm_topk_prob=False),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": DEEPSEEK,
    "deepseek_v2": {**DEEPSEEK, "topk_method": "group_limited_greedy"},
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                     first_k_dense_replace=0, head_dim=8, routed_scaling_factor=1.5),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=16,
                  first_k_dense_replace=0, head_dim=8, n_shared_experts=1),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=8),
    "jamba": dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=1, attn_layer_offset=0, use_mamba_kernels=False),
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       head_dim=8, layer_types=["full_attention"] * 2),
}


def build(model_type: str):
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding on the second sequence
    return ids, mask


def is_experts(path: str, module) -> bool:
    """The fused experts module: forward(hidden_states, top-k index, top-k weights)."""
    if not path.endswith(".experts"):
        return False
    names = list(inspect.signature(module.forward).parameters)
    return len(names) >= 3 and ("index" in names[1] or "indices" in names[1])


def sort_pair(ids_TK, weights_TK):
    order = torch.argsort(weights_TK.float(), dim=-1, descending=True, stable=True)
    return ids_TK.gather(-1, order), weights_TK.float().gather(-1, order)


def run_probed(model, pairs, ids, mask):
    captures, truth, handles = {}, {}, []
    for adapter, site in pairs:
        module = model.get_submodule(site.hook_module_path or site.module_path)

        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures.setdefault(site.module_path, []).append(adapter.capture(site, mod, args, kwargs, output))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    for path, module in model.named_modules():
        if is_experts(path, module):
            def truth_hook(mod, args, kwargs, output, path=path):
                bound = list(inspect.signature(mod.forward).bind(*args, **kwargs).arguments.values())
                truth.setdefault(path.rsplit(".", 1)[0], []).append((bound[1], bound[2]))

            handles.append(module.register_forward_hook(truth_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    return out, captures, truth


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_hf_capture_matches_expert_inputs_and_keeps_output_identical(model_type):
    model = build(model_type)
    ids, mask = batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    pairs = discover(model)
    assert pairs, model_type
    out, captures, truth = run_probed(model, pairs, ids, mask)
    assert torch.equal(plain, out)
    assert sorted(truth) == sorted(site.module_path.rsplit(".", 1)[0] for _, site in pairs)
    for adapter, site in pairs:
        (cap,) = captures[site.module_path]
        ((true_ids, true_w),) = truth[site.module_path.rsplit(".", 1)[0]]
        exp_ids, exp_w = sort_pair(true_ids.reshape(cap.expert_ids_TK.shape), true_w.reshape(cap.weights_TK.shape))
        assert cap.expert_ids_TK.shape == (ids.numel(), site.top_k)
        assert torch.equal(cap.expert_ids_TK, exp_ids)
        torch.testing.assert_close(cap.weights_TK, exp_w, rtol=0, atol=0)
        assert cap.probs_TE.shape == (ids.numel(), site.num_experts)
        torch.testing.assert_close(cap.probs_TE.sum(-1), torch.ones(ids.numel()))
        assert cap.dropped_TK is None


def test_deepseek_v3_records_scaled_weights_and_group_limited_experts():
    model = build("deepseek_v3")
    gate = model.model.layers[0].mlp.gate
    gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 8))  # bias changes choice, not weights
    ids, mask = batch()
    pairs = discover(model)
    _, captures, truth = run_probed(model, pairs, ids, mask)
    cap = captures["model.layers.0.mlp.gate"][0]
    # Normalised top-k weights times routed_scaling_factor: each row sums to 2.5.
    torch.testing.assert_close(cap.weights_TK.sum(-1), torch.full((12,), 2.5))
    # Group limit: with n_group=2, topk_group=1 both chosen experts sit in the same half.
    assert torch.equal(cap.expert_ids_TK[:, 0] // 4, cap.expert_ids_TK[:, 1] // 4)
    # Weights come from the raw sigmoid scores, not the biased selection scores.
    scores_TE = torch.sigmoid(cap.logits_TE)
    chosen = scores_TE.gather(1, cap.expert_ids_TK)
    torch.testing.assert_close(cap.weights_TK, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    assert pairs[0][1].router_kind == "sigmoid-group-topk"


def test_qwen2_moe_shared_expert_gate_is_not_a_router():
    model = build("qwen2_moe")
    paths = [site.module_path for _, site in discover(model)]
    assert paths == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_gpt_oss_weights_are_softmax_over_the_top_k_logits():
    model = build("gpt_oss")
    ids, mask = batch()
    _, captures, _ = run_probed(model, discover(model), ids, mask)
    cap = captures["model.layers.1.mlp.router"][0]
    top_TK = cap.logits_TE.gather(1, cap.expert_ids_TK)
    torch.testing.assert_close(cap.weights_TK, torch.softmax(top_TK, -1))
