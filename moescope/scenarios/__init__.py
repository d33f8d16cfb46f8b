"""Validated training scenarios: the reference MoE trained into situations the papers describe.

    from moescope.scenarios import run_scenario
    report = run_scenario("capacity", store, steps=60)
    print(report.render())

Each scenario trains on the bundled corpus, records through the probe into the store
(or a Redis broker feeding workers), reads its figures back through the analysis
library, and checks the facts the paper reports. Scenario modules are imported when
run, so listing them costs no torch import.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

from moescope.scenarios.report import Context, Report, ScenarioError
from moescope.schema import check_run_id


@dataclass(frozen=True)
class Scenario:
    name: str
    entry: str           # "module[:function]" in moescope.scenarios, called as function(ctx) -> Report (default run)
    default_steps: int
    summary: str

    def load(self):
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(f"moescope.scenarios.{module}"), function or "run")


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("capacity", "capacity", 60, "tokens dropped vs capacity factor, top-2 and top-1, with and without the aux loss"),
    Scenario("mismatch", "mismatch", 30, "the same tokens routed twice: fp32 vs bf16, torch vs Triton"),
    Scenario("collapse", "collapse", 40, "no balancing, and a planted router fault: collapse detection and alerts"),
    Scenario("balanced", "collapse:run_balanced", 40, "the healthy twin of collapse: Switch loss, nothing planted"),
    Scenario("loss-free", "loss_free", 60, "loss-free bias balancing vs the aux loss: MaxVio and validation loss"),
    Scenario("drift", "drift", 40, "checkpoints replayed on a probe set: router saturation and last-fluctuation CDF"),
    Scenario("specialisation", "specialisation", 40, "domain specialisation of the trained experts against k/E"),
]}


def run_scenario(name: str, store, *, steps: int | None = None, seed: int = 0, broker: str | None = None,
                 run: str | None = None, progress: bool = False) -> Report:
    """Run scenario `name` into `store`; run ids start with `run` (default <name>-<timestamp>)."""
    scenario = SCENARIOS.get(name) if isinstance(name, str) else None
    if scenario is None:
        raise ScenarioError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    steps = scenario.default_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ScenarioError(f"--steps must be a positive int, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScenarioError(f"--seed must be an int, got {seed!r}")
    prefix = check_run_id(run or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    ctx = Context(recorder=_recorder(store, broker), steps=steps, seed=seed, prefix=prefix, progress=progress)
    return scenario.load()(ctx)


def _recorder(store, broker):
    from moescope.scenarios.training import Recorder

    return Recorder(store, broker)


__all__ = ["SCENARIOS", "Scenario", "Report", "Context", "ScenarioError", "run_scenario"]
