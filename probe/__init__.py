"""The probe: attach to a MoE model, record every routing decision, ship frames to a sink.

    from moescope.probe import attach
    with attach(model, sink="memory", run="my-run") as probe:
        model(input_ids, attention_mask=mask)
    tables = probe.tables()
"""
from __future__ import annotations

from moescope.probe.attach import Probe, attach
from moescope.probe.sinks import LocalSink, MemorySink, NullSink, Sink, make_sink

__all__ = ["attach", "Probe", "Sink", "MemorySink", "LocalSink", "NullSink", "make_sink"]
