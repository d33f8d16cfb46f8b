"""Balance metrics (METRICS.md §1–6), exact for all tokens: computed from expert_step.

Legend: E experts, k chosen per token, T tokens in the group, load_i the (token, slot)
assignments to expert i (dropped slots included: they were routed there). A group is
one (step, layer) when by="step", one layer over the whole step window when by="window".
Every expert of a layer is present in the output, with load 0 when it got nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from moescope.analysis.query import Scope, check_options, expert_load_sql


def _order(scope: Scope, *extra: str) -> str:
    cols = (["step"] if scope.by == "step" else []) + ["layer", *extra]
    return ", ".join(cols)


# Per (step?, layer) aggregates over the `load` CTE (expert_load_sql), shared by the metrics and `balance`.
_SWITCH = "any_value(E) * sum(top1 * prob) / nullif(sum(top1) * any_value(T), 0) AS switch_score, any_value(T)::BIGINT AS tokens"
_MAXVIO = "(max(load) - avg(load)) / nullif(avg(load), 0) AS maxvio"
_CV = "stddev_pop(load) / nullif(avg(load), 0) AS cv"
_DROPS = ("sum(load)::BIGINT AS slots, sum(dropped)::BIGINT AS dropped, "
          "sum(dropped) / nullif(sum(load), 0) AS drop_rate")


def load_share(store, scope: Scope, meta: pd.DataFrame, **options) -> pd.DataFrame:
    """Load share f_i = load_i / Σ_j load_j per expert; uniform = 1/E (METRICS.md §1).

    Columns: [step,] layer, expert, load, share, uniform.
    """
    check_options("load_share", options, set())
    cte, params = expert_load_sql(scope, meta)
    part = "step, layer" if scope.by == "step" else "layer"
    return store.sql(cte + f"""
        SELECT {scope.step_key} layer, expert, load,
               coalesce(load / nullif(sum(load) OVER (PARTITION BY {part}), 0), 0) AS share, 1.0 / E AS uniform
        FROM load ORDER BY {_order(scope, 'expert')}""", params, run=scope.run)


def load_arrays(store, scope: Scope, meta: pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer: the steps with any load, and load_share's `load` at those steps as a (steps × E) array.

    The same sums as load_share by step, gathered straight into arrays: a fit over every
    step of every layer (collapse) reads 64 × 256 experts per step without a table of them.
    """
    where, params = scope.where()
    tab = store.arrow(f"SELECT step, layer, expert, sum(tokens)::DOUBLE AS load FROM expert_step WHERE {where} "
                      "GROUP BY ALL", params, run=scope.run)
    step, layer, expert, load = (tab.column(c).to_numpy() for c in ("step", "layer", "expert", "load"))
    out = {}
    for lay, e in zip(meta.layer.astype(int), meta.E.astype(int)):
        if scope.layers is not None and lay not in scope.layers:
            continue
        keep = (layer == lay) & (expert >= 0) & (expert < e)
        steps, row = np.unique(step[keep], return_inverse=True)
        load_SE = np.zeros((len(steps), e))
        load_SE[row, expert[keep]] = load[keep]
        busy = load_SE.sum(1) > 0
        if busy.any():
            out[lay] = steps[busy].astype(np.int64), load_SE[busy]
    return out


def switch_score(store, scope: Scope, meta: pd.DataFrame, **options) -> pd.DataFrame:
    """Switch balance score E · Σ_i f_i · P_i (Switch Transformer, Fedus et al. 2021, Eq. 4–6).

    f_i is the share of tokens whose top-1 expert is i, P_i = (1/T) Σ_t p_t,i the mean
    router probability. Exactly 1 at uniform routing; training uses α times it as the
    auxiliary loss. Columns: [step,] layer, switch_score, tokens.
    """
    check_options("switch_score", options, set())
    cte, params = expert_load_sql(scope, meta)
    return store.sql(cte + f"""
        SELECT {scope.step_key} layer, {_SWITCH} FROM load GROUP BY ALL ORDER BY {_order(scope)}""", params, run=scope.run)


def _maxvio_sql(scope: Scope, meta) -> tuple[str, list]:
    cte, params = expert_load_sql(scope, meta)
    return cte + f"""
        SELECT {scope.step_key} layer, {_MAXVIO} FROM load GROUP BY ALL ORDER BY {_order(scope)}""", params


def _with_mean_over_layers(df: pd.DataFrame) -> pd.DataFrame:
    """maxvio_mean_layers: the mean MaxVio over the selected layers at each step, as Wang et al. report it."""
    df["maxvio_mean_layers"] = df.groupby("step")["maxvio"].transform("mean")
    return df


def maxvio(store, scope: Scope, meta: pd.DataFrame, **options) -> pd.DataFrame:
    """MaxVio = (max_i load_i − mean_i load_i) / mean_i load_i (Loss-Free Balancing, Wang et al. 2024, Eq. 4).

    by="step": per batch (step): columns step, layer, maxvio, maxvio_mean_layers (the
    mean over the selected layers at that step, as the paper reports it).
    by="window": columns layer, maxvio_global (MaxVio of the window's summed load),
    maxvio_batch_mean (mean of per-step MaxVio), and both averaged over layers
    (maxvio_global_mean_layers, maxvio_batch_mean_layers).
    """
    check_options("maxvio", options, set())
    if scope.by == "step":
        sql, params = _maxvio_sql(scope, meta)
        return _with_mean_over_layers(store.sql(sql, params, run=scope.run))
    sql, params = _maxvio_sql(scope, meta)
    glob = store.sql(sql, params, run=scope.run).rename(columns={"maxvio": "maxvio_global"})
    per_step_sql, params = _maxvio_sql(Scope(**{**scope.__dict__, "by": "step"}), meta)
    per_step = store.sql(f"SELECT layer, avg(maxvio) AS maxvio_batch_mean FROM ({per_step_sql}) GROUP BY layer",
                         params, run=scope.run)
    df = glob.merge(per_step, on="layer", how="left")
    df["maxvio_global_mean_layers"] = df["maxvio_global"].mean()
    df["maxvio_batch_mean_layers"] = df["maxvio_batch_mean"].mean()
    return df


def cv(store, scope: Scope, meta: pd.DataFrame, **options) -> pd.DataFrame:
    """Coefficient of variation of load, std_i(load_i) / mean_i(load_i) (METRICS.md §4; population std).

    Columns: [step,] layer, cv.
    """
    check_options("cv", options, set())
    cte, params = expert_load_sql(scope, meta)
    return store.sql(cte + f"""
        SELECT {scope.step_key} layer, {_CV} FROM load GROUP BY ALL ORDER BY {_order(scope)}""", params, run=scope.run)


def balance(store, scope: Scope, meta: pd.DataFrame, **options) -> pd.DataFrame:
    """MaxVio (Wang et al. 2024, Eq. 4), CV (METRICS.md §4), the Switch score (Fedus et al. 2021, Eq. 4–6) and the
    drop rate (METRICS.md §6) together, each exactly as its own metric computes it, from one read.

    For a page that charts all four: each alone reads expert_step and joins every (step,
    layer, expert) again. Columns: [step,] layer, maxvio, cv, switch_score, tokens, slots,
    dropped, drop_rate; by="step" also maxvio_mean_layers, as maxvio gives it.
    """
    check_options("balance", options, set())
    cte, params = expert_load_sql(scope, meta)
    df = store.sql(cte + f"""
        SELECT {scope.step_key} layer, {_MAXVIO}, {_CV}, {_SWITCH}, {_DROPS}
        FROM load GROUP BY ALL ORDER BY {_order(scope)}""", params, run=scope.run)
    return _with_mean_over_layers(df) if scope.by == "step" else df


def _utilisation_sql(scope: Scope, meta) -> tuple[str, list]:
    cte, params = expert_load_sql(scope, meta)
    return cte + """, util AS (
        SELECT *, load / nullif(T * k / E, 0) AS utilisation FROM load)
    """, params


def utilisation(store, scope: Scope, meta: pd.DataFrame, **options) -> pd.DataFrame:
    """Utilisation u_i = load_i / (T·k / E): 1 means the fair share (METRICS.md §5).

    Columns: [step,] layer, expert, load, tokens (T), utilisation.
    """
    check_options("utilisation", options, set())
    cte, params = _utilisation_sql(scope, meta)
    return store.sql(cte + f"""
        SELECT {scope.step_key} layer, expert, load, T::BIGINT AS tokens, utilisation
        FROM util ORDER BY {_order(scope, 'expert')}""", params, run=scope.run)


def dead_experts(store, scope: Scope, meta: pd.DataFrame, threshold: float = 0.1, **options) -> pd.DataFrame:
    """Dead experts (u_i = 0) and starved experts (u_i < threshold, default 0.1) (METRICS.md §5).

    Starved includes dead. Columns: [step,] layer, num_experts, dead, dead_fraction,
    starved, starved_fraction, dead_ids, starved_ids.
    """
    check_options("dead_experts", options, set())
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    cte, params = _utilisation_sql(scope, meta)
    return store.sql(cte + f"""
        SELECT {scope.step_key} layer, any_value(E) AS num_experts,
               count(*) FILTER (WHERE load = 0) AS dead,
               count(*) FILTER (WHERE load = 0) / any_value(E) AS dead_fraction,
               count(*) FILTER (WHERE coalesce(utilisation, 0) < ?) AS starved,
               count(*) FILTER (WHERE coalesce(utilisation, 0) < ?) / any_value(E) AS starved_fraction,
               coalesce(list(expert ORDER BY expert) FILTER (WHERE load = 0), []) AS dead_ids,
               coalesce(list(expert ORDER BY expert) FILTER (WHERE coalesce(utilisation, 0) < ?), []) AS starved_ids
        FROM util GROUP BY ALL ORDER BY {_order(scope)}""", params + [float(threshold)] * 3, run=scope.run)


def drop_rate(store, scope: Scope, meta: pd.DataFrame, position_buckets: int | None = None, **options) -> pd.DataFrame:
    """Drop rate = dropped slots / all slots (METRICS.md §6).

    Default: exact from expert_step; columns [step,] layer, slots, dropped, drop_rate.
    With position_buckets=B: from routing rows (sampled ones if sampling is on), split
    into B equal position ranges, showing OpenMoE's "drop towards the end" (Xue et al.
    2024, §4); columns [step,] layer, bucket, pos_lo, pos_hi, slots, dropped, drop_rate.
    """
    check_options("drop_rate", options, set())
    if position_buckets is None:
        cte, params = expert_load_sql(scope, meta)
        return store.sql(cte + f"""
            SELECT {scope.step_key} layer, {_DROPS} FROM load GROUP BY ALL ORDER BY {_order(scope)}""", params, run=scope.run)
    if isinstance(position_buckets, bool) or not isinstance(position_buckets, int) or position_buckets < 1:
        raise ValueError(f"position_buckets must be a positive int, got {position_buckets!r}")
    where, params = scope.where()
    return store.sql(f"""
        WITH r AS (SELECT step, layer, pos, dropped FROM routing WHERE {where}),
        span AS (SELECT max(pos) + 1 AS n FROM r),
        b AS (SELECT r.*, least(floor(pos * {position_buckets} / span.n), {position_buckets - 1})::INT AS bucket
              FROM r, span)
        SELECT {scope.step_key} layer, bucket, min(pos) AS pos_lo, max(pos) AS pos_hi, count(*) AS slots,
               count(*) FILTER (WHERE dropped) AS dropped, count(*) FILTER (WHERE dropped) / count(*) AS drop_rate
        FROM b GROUP BY ALL ORDER BY {_order(scope, 'bucket')}""", params, run=scope.run)
