"""Capacity-limited transformers routers: dropped tokens are recorded dropped, never as expert 0."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    NllbMoeConfig,
    NllbMoeForConditionalGeneration,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from moescope.probe.adapters import discover  # noqa: E402


def switch_model(capacity: int = 2):
    cfg = SwitchTransformersConfig(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2, num_experts=4, expert_capacity=capacity, vocab_size=128,
    )
    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(cfg).eval()


def nllb_model(capacity: int = 3):
    cfg = NllbMoeConfig(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, expert_capacity=capacity,
        encoder_sparse_step=1, decoder_sparse_step=1, vocab_size=128, max_position_embeddings=64,
        moe_eval_capacity_token_fraction=0.0,  # use the absolute capacity in eval too, so tokens drop
    )
    torch.manual_seed(0)
    return NllbMoeForConditionalGeneration(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 128, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask, ids[:, :5]


def run(model, pairs):
    ids, mask, dec = batch()
    captures, truth, handles = {}, {}, []
    for adapter, site in pairs:
        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures[site.module_path] = adapter.capture(site, mod, args, kwargs, output)

        handles.append(model.get_submodule(site.module_path).register_forward_hook(hook, with_kwargs=True))
        experts = model.get_submodule(site.module_path.rsplit(".", 1)[0] + ".experts")

        def truth_hook(mod, args, output, path=site.module_path):
            truth[path] = (args[1], args[2])

        handles.append(experts.register_forward_hook(truth_hook))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(plain, out)
    return captures, truth


def test_switch_dropped_tokens_are_marked_dropped_not_expert_zero():
    model = switch_model(capacity=2)
    pairs = discover(model)
    assert [s.layer for _, s in pairs] == [0, 1, 2, 3]  # decoder layers numbered after the encoder's
    captures, truth = run(model, pairs)
    total_dropped = 0
    for _, site in pairs:
        cap = captures[site.module_path]
        dispatch_TE = truth[site.module_path][0].reshape(-1, 4)
        applied_T = truth[site.module_path][1].reshape(-1)
        kept_T = dispatch_TE.sum(-1) > 0
        assert torch.equal(cap.dropped_TK[:, 0], ~kept_T)
        assert torch.equal(cap.expert_ids_TK[kept_T, 0], dispatch_TE[kept_T].argmax(-1))
        # A dropped token keeps the expert it chose (argmax of the router), which is often not 0.
        assert torch.equal(cap.expert_ids_TK[:, 0], cap.probs_TE.argmax(-1))
        torch.testing.assert_close(cap.weights_TK[:, 0], applied_T * kept_T, rtol=0, atol=0)
        total_dropped += int((~kept_T).sum())
    assert total_dropped > 0


def test_switch_never_drops_with_ample_capacity():
    model = switch_model(capacity=64)
    captures, _ = run(model, discover(model))
    assert not any(bool(c.dropped_TK.any()) for c in captures.values())


def test_nllb_moe_top2_capture_reproduces_the_combine_weights_and_drops():
    model = nllb_model(capacity=3)
    pairs = discover(model)
    assert [s.layer for _, s in pairs] == [0, 1, 2, 3]
    captures, truth = run(model, pairs)
    any_drop = False
    for _, site in pairs:
        cap = captures[site.module_path]
        top1_TE, combine_TE = (t.reshape(-1, 4) for t in truth[site.module_path])
        rebuilt_TE = torch.zeros_like(combine_TE).scatter_add(1, cap.expert_ids_TK, cap.weights_TK.to(combine_TE.dtype))
        torch.testing.assert_close(rebuilt_TE, combine_TE, rtol=0, atol=0)
        assert torch.equal(cap.weights_TK[cap.dropped_TK], torch.zeros(int(cap.dropped_TK.sum())))
        assert not torch.equal(cap.expert_ids_TK[:, 0], cap.expert_ids_TK[:, 1])
        # Where the first choice survived capacity, the capture names it as a kept slot.
        kept1_T = top1_TE.sum(-1) > 0
        named_T = ((cap.expert_ids_TK == top1_TE.argmax(-1, keepdim=True)) & ~cap.dropped_TK).any(-1)
        assert bool(named_T[kept1_T].all())
        any_drop |= bool(cap.dropped_TK.any())
    assert any_drop
