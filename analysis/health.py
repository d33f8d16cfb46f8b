"""Router health (METRICS.md §8–10) from token_stats: entropy, z, top-1/top-2 margin.

Each metric is a per-token value; reported as mean and quantiles per layer (per step
with by="step"), or as a histogram with histogram=B bins.

By default they read the rollups counted at ingest (token_step, token_hist), over every
token even when per-token rows are sampled: the mean is exact; quantiles are exact where
one rollup row holds the (step, layer) (one rank, one frame), and otherwise come from a
mergeable sketch within a relative 2% of the true value (moescope.sketch).
exact=True sorts the recorded per-token rows instead; so do runs stored before rollups.
"""
from __future__ import annotations

import math

import pandas as pd

from moescope.analysis.query import Scope, check_options
from moescope.sketch import bin_value_sql

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# stat in token_hist -> (tokens column, sum column) in token_step
_ROLLUP = {"entropy": ("tokens", "entropy_sum"), "margin": ("tokens", "margin_sum"), "z": ("z_tokens", "z_sum")}


def has_rollups(store, scope: Scope, table: str = "token_step") -> bool:
    """Whether the run's data was rolled up at ingest (stores written before rollups were not)."""
    return bool(store.segment_paths(table, scope.run))


def _check_exact(exact) -> None:
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be True or False, got {exact!r}")


def _from_rollups(store, scope: Scope, stat: str, quantiles: bool) -> pd.DataFrame:
    where, params = scope.where()
    sk = scope.step_key
    order = ("step, " if sk else "") + "layer"
    n_col, sum_col = _ROLLUP[stat]
    names = [f"p{int(round(q * 100)):02d}" for q in QUANTILES]
    exact = "".join(f", any_value({stat}_{n}) AS {n}" for n in names)
    means = f"""SELECT {sk} layer, sum({n_col})::BIGINT AS tokens, sum({sum_col}) / sum({n_col}) AS mean,
                       count(*) AS parts{exact if quantiles else ""}
                FROM token_step WHERE {where} GROUP BY ALL HAVING sum({n_col}) > 0"""
    if not quantiles:
        return store.sql(f"{means} ORDER BY {order}", params, run=scope.run).drop(columns="parts")
    # A (step, layer) in one row (one rank, one frame) has its exact quantiles there. Merged
    # ones read the sketch: the q-quantile is the bin holding rank q·(N − 1), the first whose
    # cumulative count exceeds it.
    picks = ", ".join(f"min(bin) FILTER (WHERE cum > {q} * (total - 1)) AS b{i}" for i, q in enumerate(QUANTILES))
    values = ", ".join(f"CASE WHEN m.parts = 1 THEN m.{n} ELSE {bin_value_sql(f'b{i}')} END AS {n}"
                       for i, n in enumerate(names))
    return store.sql(f"""
        WITH m AS ({means}),
        multi AS (SELECT {sk} layer FROM m WHERE parts > 1),
        h AS (SELECT {sk} layer, bin, sum(tokens) AS n FROM token_hist SEMI JOIN multi USING ({sk} layer)
              WHERE stat = ? AND {where} GROUP BY ALL),
        c AS (SELECT *, sum(n) OVER (PARTITION BY {sk} layer ORDER BY bin) AS cum,
                        sum(n) OVER (PARTITION BY {sk} layer) AS total FROM h),
        b AS (SELECT {sk} layer, {picks} FROM c GROUP BY ALL)
        SELECT {"m.step, " if sk else ""} m.layer, m.tokens, m.mean, {values}
        FROM m LEFT JOIN b USING ({sk} layer) ORDER BY {order}""", params + [stat] + params, run=scope.run)


def _distribution(store, scope: Scope, stat: str, value_sql: str, histogram: int | None, not_null: str | None = None,
                  quantiles: bool = True, exact: bool = False) -> pd.DataFrame:
    _check_exact(exact)
    if not isinstance(quantiles, bool):
        raise ValueError(f"quantiles must be True or False, got {quantiles!r}")
    if histogram is None and not exact and has_rollups(store, scope):
        return _from_rollups(store, scope, stat, quantiles)
    where, params = scope.where()
    if not_null:
        where += f" AND {not_null} IS NOT NULL AND isfinite({not_null})"
    sk = scope.step_key
    order = ("step, " if sk else "") + "layer"
    if histogram is not None:
        if isinstance(histogram, bool) or not isinstance(histogram, int) or histogram < 1:
            raise ValueError(f"histogram must be a positive int (number of bins), got {histogram!r}")
        return store.sql(f"""
            WITH v AS (SELECT {sk} layer, ({value_sql})::DOUBLE AS x FROM token_stats WHERE {where}),
            span AS (SELECT min(x) AS lo, greatest(max(x) - min(x), 1e-12) AS w FROM v)
            SELECT {sk} layer, least(floor((x - lo) / w * {histogram}), {histogram - 1})::INT AS bin,
                   any_value(lo + w * least(floor((x - lo) / w * {histogram}), {histogram - 1}) / {histogram}) AS lo,
                   any_value(lo + w * (least(floor((x - lo) / w * {histogram}), {histogram - 1}) + 1) / {histogram}) AS hi,
                   count(*) AS tokens
            FROM v, span GROUP BY ALL ORDER BY {order}, bin""", params, run=scope.run)
    if not quantiles:  # the mean alone needs no sort: what a time-series chart plots
        return store.sql(f"""
            SELECT {sk} layer, count(*) AS tokens, avg(({value_sql})::DOUBLE) AS mean
            FROM token_stats WHERE {where} GROUP BY ALL ORDER BY {order}""", params, run=scope.run)
    qs = ", ".join(str(q) for q in QUANTILES)
    df = store.sql(f"""
        SELECT {sk} layer, count(*) AS tokens, avg(x) AS mean, quantile_cont(x, [{qs}]) AS q
        FROM (SELECT {sk} layer, ({value_sql})::DOUBLE AS x FROM token_stats WHERE {where})
        GROUP BY ALL ORDER BY {order}""", params, run=scope.run)
    for i, q in enumerate(QUANTILES):
        df[f"p{int(round(q * 100)):02d}"] = [qq[i] if qq is not None else float("nan") for qq in df["q"]]
    return df.drop(columns="q")


def entropy(store, scope: Scope, meta: pd.DataFrame, histogram: int | None = None, quantiles: bool = True,
            exact: bool = False, **options) -> pd.DataFrame:
    """Per-token routing entropy H(p_t) = −Σ_i p_t,i ln p_t,i in nats (METRICS.md §8).

    ln E at uniform routing (column `uniform`); a collapsing router shows a falling mean.
    Columns: [step,] layer, tokens, mean, p05, p25, p50, p75, p95, uniform (quantiles=False: the
    mean only; what a time-series chart needs). exact=True: quantiles of the recorded rows.
    """
    check_options("entropy", options, set())
    df = _distribution(store, scope, "entropy", "entropy", histogram, quantiles=quantiles, exact=exact)
    if histogram is None:
        sizes = dict(zip(meta.layer, meta.E))
        df["uniform"] = [math.log(sizes[int(x)]) if int(x) in sizes else float("nan") for x in df["layer"]]
    return df


def z(store, scope: Scope, meta: pd.DataFrame, histogram: int | None = None, quantiles: bool = True,
      exact: bool = False, **options) -> pd.DataFrame:
    """Router z = mean_t (logsumexp_i z_t,i)² (ST-MoE, Zoph et al. 2022, Eq. 5: the z-loss).

    Tokens whose router gave no logits (logsumexp NULL) are left out.
    Columns: [step,] layer, tokens, mean (the z-loss), p05 … p95 of the per-token square.
    """
    check_options("z", options, set())
    return _distribution(store, scope, "z", "logsumexp * logsumexp", histogram, not_null="logsumexp",
                         quantiles=quantiles, exact=exact)


def margin(store, scope: Scope, meta: pd.DataFrame, histogram: int | None = None, quantiles: bool = True,
           exact: bool = False, **options) -> pd.DataFrame:
    """Top-1/top-2 margin p_t,(1) − p_t,(2) (METRICS.md §10): small margins mean an undecided router.

    Columns: [step,] layer, tokens, mean, p05, p25, p50, p75, p95.
    """
    check_options("margin", options, set())
    return _distribution(store, scope, "margin", "margin", histogram, quantiles=quantiles, exact=exact)

