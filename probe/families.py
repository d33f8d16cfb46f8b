"""Every MoE family of the installed transformers, built tiny and checked against its experts.

    python -m moescope.probe.families            # rewrite docs/families.md and README's summary line
    python -m moescope.probe.families --check    # exit 1 when the committed table is stale

Families come from transformers' own registry (CONFIG_MAPPING): every config whose defaults
(or nested text / ffn config) carry an expert count. Each is built from its config with
shrunk sizes and random weights (torch.manual_seed), run once on a left-padded batch with
and without the probe's hooks, and verified when

- the outputs are bit-identical, and
- every router's recorded (ids, weights), on non-padding tokens, equal what the family's
  experts module received (its forward(hidden, ids, weights) arguments, read by a separate
  hook), slots ordered by weight.

A family whose experts take no (ids, weights) arguments cannot be checked this way; it is
listed with the adapter that records it and the dedicated test that verifies it. A family
that cannot be built tiny here is listed with the reason. tests/probe/test_families.py runs
`verify` per family and asserts the committed table says the same.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE_PATH = ROOT / "docs" / "families.md"
README_PATH = ROOT / "README.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"

_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOP_K = ("num_experts_per_tok", "top_k", "moe_topk", "moe_k", "num_experts_per_token", "router_topk")
# Shrinks applied to whichever of these the family's config has.
_SHRINK = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    shared_intermediate_size=32, expert_intermediate_size=32, ffn_hidden_size=64,
    num_hidden_layers=2, num_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
    vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    n_group=2, topk_group=1, first_k_dense_replace=0, moe_layer_start_index=0, decoder_sparse_step=1,
    mlp_only_layers=[], expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
    n_shared_experts=1, use_mamba_kernels=False, sliding_window=16, num_nextn_predict_layers=0,
)
# Config fixes a few families need to build tiny (the family list itself comes from the registry).
_FIXES = {
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=16, moe_normalize_expert_weights=1.0)),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["full_attention", "conv"]),
    "glm4v_moe_text": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 0]}),
    "longcat_flash": dict(zero_expert_num=4, expert_ffn_hidden_size=16),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
                             layer_types=["linear_attention", "full_attention"]),
    "doge": dict(is_moe=True),
    "deepseek_v2": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, num_experts_per_tok=2),
    "mimo_v2_flash": dict(num_key_value_heads=2),
    "gemma4_text": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
}
# Families whose dedicated tests verify what their adapter records (the experts take no ids/weights).
DEDICATED_TESTS = {
    "switch_transformers": "tests/probe/test_adapters_capacity.py",
    "nllb-moe": "tests/probe/test_adapters_capacity.py",
    "dbrx": "tests/probe/test_adapters_more.py",
    "llama4": "tests/probe/test_adapters_more.py",
    "llama4_text": "tests/probe/test_adapters_more.py",
    "jetmoe": "tests/probe/test_adapters_more.py",
    "longcat_flash": "tests/probe/test_adapters_more.py",
}


@dataclass(frozen=True)
class FamilyResult:
    model_type: str
    status: str         # "verified", "dedicated test", "covered by <type>", "not built", "failed"
    detail: str         # adapters and router count, or the reason

    def row(self) -> str:
        return f"| `{self.model_type}` | {self.status} | {self.detail} |"


def _get(obj, name):
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - some configs raise on ambiguous per-layer attributes
        return None


def _default_config(model_type: str):
    from transformers import CONFIG_MAPPING

    with contextlib.redirect_stderr(io.StringIO()):
        return CONFIG_MAPPING[model_type]()


def _has_experts(cfg) -> bool:
    if _get(cfg, "enable_moe_block") is not None:  # experts switched on by a flag (Gemma 4)
        return True
    subs = [cfg, _get(cfg, "text_config"), _get(cfg, "ffn_config")]
    for sub in subs:
        if isinstance(sub, dict) and any(isinstance(sub.get(a), int) for a in _EXPERT_COUNTS):
            return True
        if sub is not None and not isinstance(sub, dict) and any(
                isinstance(_get(sub, a), int) and not isinstance(_get(sub, a), bool) for a in _EXPERT_COUNTS):
            return True
    return False


def moe_families() -> list[str]:
    """Model types of the installed transformers whose config declares experts."""
    import transformers
    from transformers import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    out = []
    for model_type in CONFIG_MAPPING.keys():
        try:
            cfg = _default_config(model_type)
        except Exception:  # noqa: BLE001 - a config that cannot even default is not buildable here
            continue
        if _has_experts(cfg):
            out.append(model_type)
    return sorted(out)


def _shrunk(cfg):
    layers = _get(cfg, "num_hidden_layers")
    updates = {k: v for k, v in _SHRINK.items() if hasattr(cfg, k) and (_get(cfg, k) is not None or k == "head_dim")}
    grouped = isinstance(_get(cfg, "n_group"), int) and _get(cfg, "n_group") > 1
    for name in _EXPERT_COUNTS:
        if isinstance(_get(cfg, name), int):
            updates[name] = 8 if grouped else 4
    for name in _TOP_K:
        if isinstance(_get(cfg, name), int):
            updates[name] = 2
    # Per-layer lists sized by the layer count keep their first entries (MoE layers kept when mixed).
    for name, value in vars(cfg).items():
        if isinstance(value, list) and isinstance(layers, int) and len(value) == layers and layers > 2:
            sparse = [v for v in value if isinstance(v, str) and ("sparse" in v or "moe" in v)]
            updates[name] = [sparse[0]] * 2 if sparse else value[:2]  # e.g. mlp_layer_types: dense first
    # Nested sub-configs (dicts) were passed at construction; setting them afterwards would leave plain dicts.
    updates.update({k: v for k, v in _FIXES.get(cfg.model_type, {}).items() if not isinstance(v, dict)})
    for name, value in updates.items():
        try:
            setattr(cfg, name, value)
        except Exception:  # noqa: BLE001
            pass
    return cfg


def _construction_kwargs(model_type: str) -> dict:
    """A family with fixes is built shrunk from the start: its config validates sizes against each other."""
    fixes = _FIXES.get(model_type)
    if not fixes:
        return {}
    cfg = _default_config(model_type)
    shrink = {k: v for k, v in _SHRINK.items() if _get(cfg, k) is not None}
    return {**shrink, **fixes}


def _model_class(model_type: str, cfg=None):
    """The auto class for the family, else the family's own model class for this config (text sub-models)."""
    import importlib

    from transformers import PreTrainedModel
    from transformers.models.auto import modeling_auto as auto

    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return auto.AutoModelForCausalLM
    if model_type in auto.MODEL_MAPPING_NAMES:
        return auto.AutoModel
    if cfg is None:
        return None
    try:
        modeling = importlib.import_module(type(cfg).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    own = [c for c in vars(modeling).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
           and getattr(c, "config_class", None) is type(cfg) and not c.__name__.endswith("PreTrainedModel")]
    own.sort(key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), c.__name__))
    return own[0] if own else None


def _experts_modules(model):
    from moescope.probe.adapters.structural import _experts_signature

    return [(p, m, _experts_signature(m)) for p, m in model.named_modules()
            if p and not type(m).__module__.startswith("torch.") and _experts_signature(m) is not None]


def _sorted(ids_TK, w_TK):
    order = torch.argsort(w_TK.float(), dim=-1, descending=True, stable=True)
    return ids_TK.gather(-1, order), w_TK.float().gather(-1, order)


def verify(model_type: str) -> FamilyResult:
    """Build `model_type` tiny and check the probe against it (see the module docstring)."""
    import transformers
    from transformers import AutoConfig

    from moescope.probe.adapters import NoRouterFound, discover
    from moescope.probe.adapters.structural import register_helper_hooks

    transformers.logging.set_verbosity_error()
    try:
        cfg = _default_config(model_type)
    except Exception as exc:  # noqa: BLE001
        return FamilyResult(model_type, "not built", _reason(exc))
    text = _get(cfg, "text_config")
    text_type = _get(text, "model_type") if text is not None else None
    if text_type and text_type != model_type and text_type in moe_families_cached():
        return FamilyResult(model_type, f"covered by `{text_type}`", "composite model; its MoE is the text model")
    cls = _model_class(model_type, cfg)
    if cls is None:
        return FamilyResult(model_type, "not built", "no model class for this config in transformers")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cfg = _shrunk(AutoConfig.for_model(model_type, **_construction_kwargs(model_type)))
            torch.manual_seed(0)
            model = (cls.from_config(cfg) if hasattr(cls, "from_config") else cls._from_config(cfg)).eval()
    except Exception as exc:  # noqa: BLE001
        return FamilyResult(model_type, "not built", _reason(exc))
    vocab = int(_get(cfg, "vocab_size") or _get(_get(cfg, "text_config"), "vocab_size") or 128)
    g = torch.Generator().manual_seed(1)
    ids_BS = torch.randint(3, min(vocab, 128), (2, 6), generator=g)
    mask_BS = torch.ones(2, 6, dtype=torch.long)
    mask_BS[1, :2] = 0  # left padding on the second sequence
    inputs = dict(input_ids=ids_BS, attention_mask=mask_BS, use_cache=False)
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids_BS
    try:
        with torch.no_grad():
            plain = _logits(model(**inputs))
    except Exception as exc:  # noqa: BLE001
        return FamilyResult(model_type, "not built", "tiny forward failed: " + _reason(exc))
    try:
        pairs = discover(model)
    except NoRouterFound:
        if not any("expert" in (p + type(m).__name__).lower() for p, m in model.named_modules()):
            return FamilyResult(model_type, "not built", "the tiny config has no MoE layer")
        return FamilyResult(model_type, "failed", "no router found")
    adapters = sorted({getattr(a, "name", type(a).__name__) for a, _ in pairs})
    captures: dict[str, list] = {}
    truth: dict[str, list] = {}
    handles = []
    for adapter, site in pairs:
        handles += register_helper_hooks(model, adapter, site)
        module = model.get_submodule(site.hook_module_path or site.module_path)

        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures.setdefault(site.module_path, []).append(adapter.capture(site, mod, args, kwargs, output))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    experts = _experts_modules(model)
    for path, module, (ids_at, w_at) in experts:
        def truth_hook(mod, args, kwargs, output, path=path, ids_at=ids_at, w_at=w_at):
            values = list(inspect.signature(mod.forward).bind(*args, **kwargs).arguments.values())
            truth.setdefault(path, []).append((values[ids_at].detach().clone(), values[w_at].detach().clone()))

        handles.append(module.register_forward_hook(truth_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            probed = _logits(model(**inputs))
    finally:
        for h in handles:
            h.remove()
    if not torch.equal(plain, probed):
        return FamilyResult(model_type, "failed", "outputs differ with the probe attached")
    detail = f"{', '.join(adapters)}; {len(pairs)} routers"
    dedicated = DEDICATED_TESTS.get(model_type)
    if dedicated is not None:  # capacity drops, zero-computation experts, re-derived rules
        return FamilyResult(model_type, "dedicated test", f"{detail}; checked in {dedicated}")
    if not experts:
        return FamilyResult(model_type, "failed", f"{detail}; experts take no (ids, weights) to check against")
    try:
        problem = _compare(pairs, captures, truth, mask_BS.reshape(-1).bool())
    except Exception as exc:  # noqa: BLE001 - a shape the comparison did not expect is a failure, reported
        problem = "comparison failed: " + _reason(exc)
    if problem:
        return FamilyResult(model_type, "failed", f"{detail}; {problem}")
    return FamilyResult(model_type, "verified", detail)


def _compare(pairs, captures, truth, valid_T) -> str | None:
    by_experts = {}
    for adapter, site in pairs:
        calls = captures.get(site.module_path, [])
        if len(calls) != 1 or calls[0] is None:
            return f"{site.module_path}: {len(calls)} captures"
        by_experts[site] = calls[0]
    unmatched = set(truth)
    for site, cap in by_experts.items():
        path = site.hook_module_path if site.hook_module_path in truth else next(
            (p for p in truth if p.rsplit(".", 1)[0] == site.module_path.rsplit(".", 1)[0]), None)
        if path is None:
            return f"{site.module_path}: no experts module beside it"
        unmatched.discard(path)
        ((ids, weights),) = truth[path]
        tokens = cap.expert_ids_TK.shape[0]
        ids_TK = ids.reshape(tokens, -1)
        w = weights.reshape(tokens, -1)
        if w.shape != ids_TK.shape:
            w = w.gather(1, ids_TK.clamp_min(0).long())
        exp_ids, exp_w = _sorted(ids_TK, w)
        keep = valid_T if valid_T.numel() == tokens else torch.ones(tokens, dtype=torch.bool)
        if not torch.equal(cap.expert_ids_TK[keep].long(), exp_ids[keep].long()):
            return f"{site.module_path}: ids differ from the experts' input"
        if not torch.equal(cap.weights_TK[keep].float(), exp_w[keep]):
            return f"{site.module_path}: weights differ from the experts' input"
    if unmatched:
        return f"experts without a recorded router: {', '.join(sorted(unmatched))}"
    return None


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def _reason(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip().replace("|", "/")
    return f"{type(exc).__name__}: {text[:140]}"


_FAMILIES: list[str] | None = None


def moe_families_cached() -> list[str]:
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = moe_families()
    return _FAMILIES


def render(results: list[FamilyResult]) -> str:
    import transformers

    verified = sum(r.status == "verified" for r in results)
    dedicated = sum(r.status == "dedicated test" for r in results)
    covered = sum(r.status.startswith("covered by") for r in results)
    lines = [
        f"MoE families of transformers {transformers.__version__}: {len(results)} configs declare experts; "
        f"**{verified}** verified against their experts' inputs, {dedicated} verified by a dedicated test, "
        f"{covered} composite models covered by their text model, "
        f"{len(results) - verified - dedicated - covered} not verified (reason given).",
        "",
        "Generated by `python -m moescope.probe.families`; `tests/probe/test_families.py` re-runs each row.",
        "",
        "| family (model_type) | status | adapters, routers / reason |",
        "|---|---|---|",
        *(r.row() for r in results),
    ]
    return "\n".join(lines) + "\n"


def parse(table: str) -> dict[str, tuple[str, str]]:
    """model_type -> (status, detail) from a rendered table."""
    out = {}
    for line in table.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*?) \| (.*) \|$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def readme_section(table: str) -> str:
    """README carries the summary line; the per-family table lives in docs/families.md."""
    summary = table.splitlines()[0]
    return f"{BEGIN}\n{summary} Per family: [docs/families.md](docs/families.md).\n{END}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/families.md or README is stale")
    args = ap.parse_args(argv)
    table = render([verify(t) for t in moe_families_cached()])
    readme = README_PATH.read_text()
    start, end = readme.find(BEGIN), readme.find(END)
    new_readme = readme[:start] + readme_section(table) + readme[end + len(END):] if start >= 0 <= end else readme
    if args.check:
        stale = TABLE_PATH.read_text() != table if TABLE_PATH.exists() else True
        stale |= new_readme != readme
        print("stale" if stale else "up to date")
        return int(stale)
    TABLE_PATH.write_text(table)
    README_PATH.write_text(new_readme)
    print(table.splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
