"""The store as users hold it: storage (moescope.collector.store.Store) plus the analysis library's metrics.

Analysis sits above storage, so the metric entry point lives here rather than in the
collector; `moescope.open_store` returns this class.
"""
from __future__ import annotations

import pandas as pd

from moescope.analysis import compute_metric
from moescope.collector.store import Store


class AnalysisStore(Store):
    def metric(self, name: str, run: str, **kwargs) -> pd.DataFrame:
        """A routing metric of docs/METRICS.md by name, e.g. store.metric("maxvio", run="r", layers=[3]).

        Options as in moescope.analysis.compute_metric; docs/reference.md lists every metric.
        """
        return compute_metric(self, name, run=run, **kwargs)
