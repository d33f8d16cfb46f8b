"""Configuration of one reference MoE layer: which routing variant, how many experts, which losses.

Legend: T tokens, D hidden, F ffn, E experts, K slots per token.
"""
from __future__ import annotations

from dataclasses import dataclass

SCORES = ("softmax", "sigmoid")
ROUTINGS = ("token_choice", "expert_choice")


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """Routing variant and loss coefficients of one MoE layer.

    score: "softmax", or "sigmoid" (DeepSeek-V3: selection on sigmoid scores + correction
        bias_E, gate weights from the un-biased scores).
    routing: "token_choice" (each token picks top_k experts) or "expert_choice" (each expert
        picks its top-C tokens; Zhou et al. 2022).
    capacity_factor: None = no drops; else C = ceil(T*k/E * c) slots per expert, overflow dropped.
    normalize_topk: renormalise the k chosen gate weights to sum to 1 (token choice only).
    num_shared_experts: always-on shared experts (Qwen-MoE / DeepSeek).
    bias_update_rate: loss-free balancing, bias_E += rate * sign(mean_load - load_E) per step.
    aux_loss_coef: alpha of the Switch balance loss alpha * E * sum_i f_i * P_i.
    z_loss_coef: ST-MoE router z-loss coefficient.
    """

    num_experts: int = 8
    top_k: int = 2
    score: str = "softmax"
    routing: str = "token_choice"
    capacity_factor: float | None = None
    normalize_topk: bool = True
    num_shared_experts: int = 0
    bias_update_rate: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self):
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.capacity_factor is not None and not (isinstance(self.capacity_factor, (int, float))
                                                     and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be None or > 0, got {self.capacity_factor!r}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        for name in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    @classmethod
    def switch(cls, num_experts: int = 8, capacity_factor: float | None = 1.25, **overrides) -> "MoEConfig":
        """Switch Transformer: top-1, raw softmax probability as gate, capacity with drops."""
        return cls(**{"num_experts": num_experts, "top_k": 1, "score": "softmax", "capacity_factor": capacity_factor,
                      "normalize_topk": False, **overrides})

    @classmethod
    def mixtral(cls, num_experts: int = 8, **overrides) -> "MoEConfig":
        """Mixtral / GShard style: top-2 softmax, the two weights renormalised, no drops."""
        return cls(**{"num_experts": num_experts, "top_k": 2, "score": "softmax", "normalize_topk": True,
                      **overrides})

    @classmethod
    def deepseek(cls, num_experts: int = 16, top_k: int = 4, shared: int = 1, **overrides) -> "MoEConfig":
        """DeepSeek-V3 style: fine-grained sigmoid top-k, shared expert, loss-free bias balancing."""
        return cls(**{"num_experts": num_experts, "top_k": top_k, "score": "sigmoid", "normalize_topk": True,
                      "num_shared_experts": shared, "bias_update_rate": 1e-3, "aux_loss_coef": 0.0, **overrides})

    @classmethod
    def expert_choice(cls, num_experts: int = 8, capacity_factor: float | None = 1.0, top_k: int = 2,
                      **overrides) -> "MoEConfig":
        """Expert choice: each expert takes its top C = ceil(T*k/E * c) tokens; balanced by construction."""
        return cls(**{"num_experts": num_experts, "top_k": top_k, "score": "softmax", "routing": "expert_choice",
                      "capacity_factor": capacity_factor, "normalize_topk": False, "aux_loss_coef": 0.0,
                      **overrides})
