"""Capacity what-if (METRICS.md §7): the drops any capacity factor would have caused.

Legend: E experts, k chosen per token, T tokens of one forward batch (one step on one
rank), c the capacity factor. Capacity C = ceil(T·k/E · c); replaying the recorded
assignments, expert i would have dropped max(0, load_i − C) of its slots (GShard,
Lepikhin et al. 2020, §2.2; Switch Transformer, Fedus et al. 2021, Eq. 3).
"""
from __future__ import annotations

import math

import pandas as pd

from moescope.analysis.query import Scope, check_options, meta_cte

DEFAULT_FACTORS = (1.0, 1.25, 1.5, 2.0)


def predicted_drops(store, scope: Scope, meta: pd.DataFrame, capacity_factors=DEFAULT_FACTORS, **options) -> pd.DataFrame:
    """Predicted drop rate per capacity factor (METRICS.md §7; capacity as in Switch Transformer Eq. 3).

    Replays expert_step loads per (step, rank, layer): C = ceil(T·k/E · c), drops max(0, load_i − C).

    Columns: capacity_factor, [step,] layer, slots, predicted_dropped, predicted_drop_rate,
    recorded_dropped (what the run really dropped, for comparison).
    """
    check_options("predicted_drops", options, set())
    if isinstance(capacity_factors, (int, float)) and not isinstance(capacity_factors, bool):
        capacity_factors = [capacity_factors]
    try:
        factors = [float(c) for c in capacity_factors]
    except (TypeError, ValueError):
        raise ValueError(f"capacity_factors must be positive numbers, got {capacity_factors!r}") from None
    if not factors or any(not math.isfinite(c) or c <= 0 for c in factors):
        raise ValueError(f"capacity_factors must be positive numbers, got {capacity_factors!r}")
    where, params = scope.where()
    sk = scope.step_key
    factor_list = ", ".join(repr(c) for c in factors)
    return store.sql(f"""
        WITH meta AS ({meta_cte(meta, scope)}),
        agg AS (SELECT step, rank, layer, expert, sum(tokens) AS load, sum(dropped) AS dropped, sum(num_tokens) AS nt
                FROM expert_step WHERE {where} GROUP BY ALL),
        batch AS (SELECT *, max(nt) OVER (PARTITION BY step, rank, layer) AS T FROM agg),
        f AS (SELECT unnest([{factor_list}]) AS capacity_factor),
        cap AS (SELECT f.capacity_factor, b.*, ceil(b.T * m.k / m.E * f.capacity_factor) AS C
                FROM batch b JOIN meta m USING (layer), f)
        SELECT capacity_factor, {sk} layer, sum(load)::BIGINT AS slots,
               sum(greatest(load - C, 0))::BIGINT AS predicted_dropped,
               sum(greatest(load - C, 0)) / nullif(sum(load), 0) AS predicted_drop_rate,
               sum(dropped)::BIGINT AS recorded_dropped
        FROM cap GROUP BY ALL ORDER BY capacity_factor, {sk} layer""", params, run=scope.run)
