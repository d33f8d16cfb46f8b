"""The transformers adapters, in the order discover tries them."""
from __future__ import annotations

from moescope.probe.adapters.hf_capacity import NllbMoeAdapter, SwitchAdapter
from moescope.probe.adapters.hf_derived import DbrxAdapter, JetMoeAdapter, Llama4Adapter
from moescope.probe.adapters.hf_topk import HFTopKRouterAdapter

HF_ADAPTERS = [HFTopKRouterAdapter(), SwitchAdapter(), NllbMoeAdapter(), DbrxAdapter(), Llama4Adapter(), JetMoeAdapter()]
