"""The byte-level MoE transformer: trains, ignores padding, exposes its routers, validates input."""
import pytest
import torch

from moescope.corpus import batches, build_corpus
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer, Routing
from moescope.kernels.model import DenseMLP, MoEBlock, Router


def tiny(moe=None, **kw):
    return ModelConfig(**{"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_size": 48, "max_seq_len": 64,
                          "moe": moe or MoEConfig.mixtral(4), **kw})


def test_model_trains_loss_falls_on_corpus():
    torch.manual_seed(0)
    model = MoETransformer.from_config(tiny(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    corpus = build_corpus(seq_len=64, sequences_per_domain=8, seed=0)
    data = list(batches(corpus, batch_size=8, generator=torch.Generator().manual_seed(0)))
    losses = []
    for step in range(20):
        input_ids, mask, _ = data[step % len(data)]
        out = model(input_ids, attention_mask=mask, labels=input_ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert out.aux_loss > 0


CONFIGS = {
    "mixtral": MoEConfig.mixtral(4),
    "switch_capacity": MoEConfig.switch(4, capacity_factor=1.0),
    "deepseek": MoEConfig.deepseek(6, 2),
    "expert_choice": MoEConfig.expert_choice(4, 1.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_does_not_change_real_token_outputs(name):
    model = MoETransformer.from_config(tiny(CONFIGS[name]), seed=1).eval()
    g = torch.Generator().manual_seed(1)
    ids_BS = torch.randint(1, 256, (2, 20), generator=g)
    mask_BS = torch.ones(2, 20, dtype=torch.int64)
    mask_BS[1, 13:] = 0
    with torch.no_grad():
        out = model(ids_BS, attention_mask=mask_BS, labels=ids_BS)
        garbage_BS = ids_BS.clone()
        garbage_BS[1, 13:] = torch.randint(1, 256, (7,), generator=g)
        out2 = model(garbage_BS, attention_mask=mask_BS, labels=garbage_BS)
        # the short sequence alone, unpadded, with the long one beside it trimmed of nothing
        alone = model(ids_BS[1:, :13], labels=ids_BS[1:, :13])
    real = mask_BS.bool()
    torch.testing.assert_close(out.logits[real], out2.logits[real])
    torch.testing.assert_close(out.loss, out2.loss)
    assert torch.isfinite(out.logits).all()
    if name in ("mixtral", "deepseek"):  # no capacity coupling between sequences: per-sequence equality holds
        torch.testing.assert_close(out.logits[1, :13], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_router_hook_receives_routing_for_every_token():
    model = MoETransformer.from_config(tiny(moe_layers=(1,)), seed=0)
    assert isinstance(model.layers[0].mlp, DenseMLP) and isinstance(model.layers[1].mlp, MoEBlock)
    paths = [p for p, m in model.named_modules() if isinstance(m, Router)]
    assert paths == ["layers.1.mlp.router"]
    router = model.get_submodule("layers.1.mlp.router")
    assert (router.num_experts, router.top_k, router.cfg) == (4, 2, model.cfg.moe)
    seen = []
    router.register_forward_hook(lambda mod, args, out: seen.append(out))
    model(torch.randint(0, 256, (3, 10)))
    assert len(seen) == 1 and isinstance(seen[0], Routing)
    assert seen[0].expert_ids_TK.shape == (30, 2) and seen[0].probs_TE.shape == (30, 4)


def test_update_router_biases_moves_bias_against_load():
    cfg = MoEConfig.deepseek(6, 2, bias_update_rate=0.1)
    model = MoETransformer.from_config(tiny(cfg), seed=0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    model(ids)  # eval passes are not counted
    assert all(int(b.router.load_E.sum()) == 0 for b in model.moe_blocks())
    model.train()
    model(ids)
    router = model.layers[0].mlp.router
    load_E = router.load_E.clone().float()
    assert int(load_E.sum()) == 2 * 16 * 2
    model.update_router_biases()
    expected_E = 0.1 * torch.sign(load_E.mean() - load_E)
    torch.testing.assert_close(router.bias_E, expected_E)
    assert int(router.load_E.sum()) == 0
    assert "layers.0.mlp.router.bias_E" in model.state_dict()
    assert "layers.0.mlp.router.load_E" not in model.state_dict()


def test_from_config_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = MoETransformer.from_config(tiny(), seed=7)
    after = torch.rand(1)
    b = MoETransformer.from_config(tiny(), seed=7)
    assert torch.equal(before, after)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_loss_without_labels_is_none_and_losses_sum():
    model = MoETransformer.from_config(tiny(MoEConfig(num_experts=4, top_k=2, z_loss_coef=1e-3)), seed=0)
    ids = torch.randint(0, 256, (2, 8))
    assert model(ids).loss is None
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 8, 256) and out.z_loss > 0
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm + out.aux_loss + out.z_loss)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.rand(2, 8)), "input_ids"),
    (lambda m: m(torch.zeros(2, 65, dtype=torch.int64)), "max_seq_len"),
    (lambda m: m(torch.zeros(2, 8, dtype=torch.int64), attention_mask=torch.ones(2, 7)), "attention_mask"),
    (lambda m: m(torch.zeros(2, 8, dtype=torch.int64), labels=torch.zeros(2, 9, dtype=torch.int64)), "labels"),
])
def test_forward_rejects_bad_input(call, message):
    model = MoETransformer.from_config(tiny(), seed=0)
    with pytest.raises(ValueError, match=message):
        call(model)


@pytest.mark.parametrize("kw, message", [
    (dict(hidden_size=30, num_heads=4), "divisible"),
    (dict(moe_layers=(0, 5)), "moe_layers"),
    (dict(backend="cuda"), "backend"),
    (dict(num_layers=0), "num_layers"),
])
def test_model_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)
