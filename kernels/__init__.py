"""The bundled reference MoE: pure-torch oracle of every routing variant, and a small MoE LM."""
from moescope.kernels.config import MoEConfig
from moescope.kernels.experts import experts_forward
from moescope.kernels.layer import moe_layer
from moescope.kernels.model import ModelConfig, ModelOutput, MoETransformer
from moescope.kernels.params import MoEParams, RouterParams
from moescope.kernels.routing import Routing, route

__all__ = ["MoEConfig", "MoEParams", "RouterParams", "Routing", "route", "experts_forward", "moe_layer",
           "ModelConfig", "ModelOutput", "MoETransformer"]
