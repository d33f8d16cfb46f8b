"""A small byte-level MoE language model built on the reference layer (trains on a laptop CPU).

Legend: B batch, S sequence, T = B*S tokens, D hidden, F ffn, E experts, K slots, V vocab.

Module paths: layers.{i}.attn, layers.{i}.mlp (MoEBlock for MoE layers), layers.{i}.mlp.router
(the Router the probe hooks; its forward returns the Routing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moescope.kernels.config import MoEConfig
from moescope.kernels.experts import experts_forward, swiglu
from moescope.kernels.layer import check_backend, triton_backend
from moescope.kernels.params import MoEParams, RouterParams
from moescope.kernels.routing import Routing, route


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int = 256
    max_seq_len: int = 128
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(num_experts=8, top_k=2, score="softmax"))
    moe_layers: tuple[int, ...] | None = None  # None: every block is MoE
    backend: str = "torch"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig, got {type(self.moe).__name__}")
        if self.moe_layers is not None:
            self.moe_layers = tuple(self.moe_layers)
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe_layers {bad} out of range 0..{self.num_layers - 1}")
        check_backend(self.backend)

    def is_moe(self, layer: int) -> bool:
        return self.moe_layers is None or layer in self.moe_layers


@dataclass
class ModelOutput:
    logits: Tensor             # (B, S, V)
    loss: Tensor | None        # LM loss on real tokens + aux + z; None without labels
    aux_loss: Tensor           # summed over MoE layers (already times the coefficient)
    z_loss: Tensor


class Router(nn.Module):
    """forward(x_TD, valid_T=None) -> Routing. Holds the router weight and the loss-free balancing bias."""

    def __init__(self, cfg: MoEConfig, weight_ED: Tensor, bias_E: Tensor, backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.backend = backend
        self.weight_ED = nn.Parameter(weight_ED)
        self.register_buffer("bias_E", bias_E.float().clone())  # persistent: part of a checkpoint
        # Load since the last bias update; bookkeeping, not state worth saving.
        self.register_buffer("load_E", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)
        # A planted fault, not model state: added to the router logits (torch backend) so tests and
        # benchmarks can start a collapse at a chosen step. Zeros leave every output bit-identical.
        self.register_buffer("logit_bias_E", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> Routing:
        params = RouterParams(router_weight_ED=self.weight_ED, router_bias_E=self.bias_E)
        if self.backend == "torch":
            routing = route(x_TD, params, self.cfg, valid_T=valid_T, logit_bias_E=self.logit_bias_E)
        else:
            routing = triton_backend()[0](x_TD, params, self.cfg, valid_T=valid_T)
        if self.training:
            with torch.no_grad():
                self.load_E += routing.tokens_per_expert_E
        return routing

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing (Wang et al. 2024): bias_E += rate * sign(mean_load - load_E), then reset."""
        load_E = self.load_E.float()
        self.bias_E += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_E.zero_()


class MoEBlock(nn.Module):
    """The MoE feed-forward: router + SwiGLU experts (+ shared experts). Stores its last aux/z losses."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, ffn_size: int, backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        p = MoEParams.init(cfg, hidden_size, ffn_size)
        self.router = Router(cfg, p.router_weight_ED, p.router_bias_E, backend)
        self.w_gate_EDF = nn.Parameter(p.w_gate_EDF)
        self.w_up_EDF = nn.Parameter(p.w_up_EDF)
        self.w_down_EFD = nn.Parameter(p.w_down_EFD)
        shared = p.shared_w_gate_DF is not None
        self.shared_w_gate_DF = nn.Parameter(p.shared_w_gate_DF) if shared else None
        self.shared_w_up_DF = nn.Parameter(p.shared_w_up_DF) if shared else None
        self.shared_w_down_FD = nn.Parameter(p.shared_w_down_FD) if shared else None
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())

    def params(self) -> MoEParams:
        return MoEParams(router_weight_ED=self.router.weight_ED, router_bias_E=self.router.bias_E,
                         w_gate_EDF=self.w_gate_EDF, w_up_EDF=self.w_up_EDF, w_down_EFD=self.w_down_EFD,
                         shared_w_gate_DF=self.shared_w_gate_DF, shared_w_up_DF=self.shared_w_up_DF,
                         shared_w_down_FD=self.shared_w_down_FD)

    def forward(self, x_BSD: Tensor, valid_BS: Tensor | None = None) -> Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD, valid_T=None if valid_BS is None else valid_BS.reshape(B * S))
        experts = experts_forward if self.backend == "torch" else triton_backend()[1]
        y_TD = experts(x_TD, routing, self.params(), self.cfg)
        self.aux_loss, self.z_loss = routing.aux_loss, routing.z_loss
        return y_TD.reshape(B, S, D)


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        p = MoEParams.init(MoEConfig(num_experts=1, top_k=1), hidden_size, ffn_size)
        self.w_gate_DF = nn.Parameter(p.w_gate_EDF[0])
        self.w_up_DF = nn.Parameter(p.w_up_EDF[0])
        self.w_down_FD = nn.Parameter(p.w_down_EFD[0])

    def forward(self, x_BSD: Tensor, valid_BS: Tensor | None = None) -> Tensor:
        return swiglu(x_BSD, self.w_gate_DF, self.w_up_DF, self.w_down_FD)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x_BSD: Tensor, mask_BSS: Tensor | None) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if mask_BSS is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BSS[:, None])
        return self.out(o.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size)
        self.mlp = (MoEBlock(cfg.moe, cfg.hidden_size, cfg.ffn_size, cfg.backend) if cfg.is_moe(layer)
                    else DenseMLP(cfg.hidden_size, cfg.ffn_size))

    def forward(self, x_BSD: Tensor, mask_BSS: Tensor | None, valid_BS: Tensor | None) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), mask_BSS)
        return x_BSD + self.mlp(self.mlp_norm(x_BSD), valid_BS)


class MoETransformer(nn.Module):
    """Causal byte-level decoder; every block (or those in cfg.moe_layers) has an MoE feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int = 0) -> "MoETransformer":
        """Same seed, same weights, without disturbing the caller's global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cfg)

    def moe_blocks(self) -> list[MoEBlock]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoEBlock)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        ids_BS, valid_BS = self._check(input_ids, attention_mask, labels)
        B, S = ids_BS.shape
        mask_BSS = None
        if valid_BS is not None:
            # Causal and real keys only; a padding query may still see itself so its row is never all -inf (NaN).
            eye_SS = torch.eye(S, dtype=torch.bool, device=ids_BS.device)
            causal_SS = torch.ones(S, S, dtype=torch.bool, device=ids_BS.device).tril()
            mask_BSS = causal_SS & (valid_BS[:, None, :] | eye_SS)
        x_BSD = self.embed(ids_BS) + self.pos(torch.arange(S, device=ids_BS.device))
        for block in self.layers:
            x_BSD = block(x_BSD, mask_BSS, valid_BS)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        blocks = self.moe_blocks()
        aux_loss = sum((m.aux_loss for m in blocks), torch.zeros((), device=logits_BSV.device))
        z_loss = sum((m.z_loss for m in blocks), torch.zeros((), device=logits_BSV.device))
        loss = None
        if labels is not None:
            target_BS = labels[:, 1:].clone()
            if valid_BS is not None:
                target_BS[~valid_BS[:, 1:]] = -100
            lm_loss = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]), target_BS.reshape(-1),
                                      ignore_index=-100)
            loss = lm_loss + aux_loss + z_loss
        return ModelOutput(logits=logits_BSV, loss=loss, aux_loss=aux_loss, z_loss=z_loss)

    def update_router_biases(self) -> None:
        """One loss-free balancing step per router from the load counted since the last call."""
        for block in self.moe_blocks():
            block.router.update_bias()

    def _check(self, input_ids, attention_mask, labels):
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an int64 tensor of shape (batch, seq)")
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"input_ids length {input_ids.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        valid_BS = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
            valid_BS = attention_mask != 0
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != input_ids.shape):
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}")
        return input_ids.long(), valid_BS
