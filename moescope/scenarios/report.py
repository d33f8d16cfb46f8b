"""What a scenario returns: its runs, its tables, the checks it makes, and the verdict printed at the end."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI lists scenarios without importing torch or pandas
    import pandas as pd

    from moescope.scenarios.training import Recorder


class ScenarioError(ValueError):
    """A scenario that cannot run as asked (bad option, records missing from the store)."""


@dataclass
class Context:
    """Everything a scenario needs to run: where to record, how long, which seed, how runs are named."""

    recorder: Recorder
    steps: int
    seed: int
    prefix: str
    progress: bool = False

    @property
    def store(self):
        return self.recorder.store

    def run_id(self, *parts: str) -> str:
        return "-".join((self.prefix, *parts))

    def metric(self, name: str, run: str, **options) -> "pd.DataFrame":
        """A metric of the analysis library over the store, whichever Store class the caller holds."""
        from moescope.analysis import compute_metric

        return compute_metric(self.store, name, run=run, **options)


@dataclass
class Report:
    scenario: str
    runs: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)  # the scenario's expected facts, each held or not
    notes: list[str] = field(default_factory=list)

    def check(self, fact: str, holds: bool) -> bool:
        self.checks[fact] = bool(holds)
        return bool(holds)

    def render(self) -> str:
        lines = [f"scenario {self.scenario}: runs {', '.join(self.runs)}"]
        for caption, df in self.tables.items():
            lines += ["", f"{caption}:", df.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
        lines += ["", "verdict:"]
        lines += [f"  [{'yes' if held else 'no '}] {fact}" for fact, held in self.checks.items()]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)
