"""Specialisation (METRICS.md §11–14) from routing rows: domain, vocabulary, co-activation, repetition.

Legend: E experts, k chosen per token, S_t the experts chosen for token t (slot 0 is
the top-1). A token is one (checkpoint, step, rank, microbatch, seq, pos) per layer;
since a token's experts are distinct, counting its rows with expert i counts the
tokens that have i in S_t, and counting its slot-0 rows counts the tokens.

Domain, co-activation and repetition read the rollups counted at ingest (domain_step,
coact_step, repeat_step: exact, over every token even when rows are sampled);
exact=True, and runs stored before rollups, count the recorded routing rows instead.
"""
from __future__ import annotations

from math import comb

import pandas as pd

from moescope.analysis import vocab_counts
from moescope.analysis.health import has_rollups
from moescope.analysis.query import Scope, check_options, meta_cte, token_key


def _use_rollup(store, scope: Scope, table: str, exact) -> bool:
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be True or False, got {exact!r}")
    return not exact and has_rollups(store, scope, table)


def _order(scope: Scope, *extra: str) -> str:
    return ", ".join((["step"] if scope.by == "step" else []) + ["layer", *extra])


def domain_specialisation(store, scope: Scope, meta: pd.DataFrame, exact: bool = False, **options) -> pd.DataFrame:
    """Domain specialisation(i, D) = N_k(i, D) / N_D (OLMoE, Muennighoff et al. 2024, Eq. 7).

    The share of domain-D tokens that have expert i among their top-k; uniform = k/E.
    Rows without a domain label are left out. Every expert appears (share 0 if unused).
    Columns: [step,] layer, domain, expert, tokens (N_D), routed (N_k(i, D)), share, uniform.
    """
    check_options("domain_specialisation", options, set())
    where, params = scope.where()
    sk = scope.step_key
    if _use_rollup(store, scope, "domain_step", exact):
        counts = f"""
        ni AS (SELECT {sk} layer, domain, expert, sum(routed) AS routed, sum(top1) AS top1
               FROM domain_step WHERE {where} GROUP BY ALL),
        nd AS (SELECT {sk} layer, domain, sum(top1) AS tokens FROM ni GROUP BY ALL),"""
    else:
        counts = f"""
        r AS (SELECT {sk} layer, domain, expert, slot FROM routing WHERE {where} AND domain IS NOT NULL),
        nd AS (SELECT {sk} layer, domain, count(*) FILTER (WHERE slot = 0) AS tokens FROM r GROUP BY ALL),
        ni AS (SELECT {sk} layer, domain, expert, count(*) AS routed FROM r GROUP BY ALL),"""
    return store.sql(f"""
        WITH meta AS ({meta_cte(meta, scope)}),{counts}
        grid AS (SELECT n.*, unnest(range(m.E)) AS expert, m.k::DOUBLE / m.E AS uniform FROM nd n JOIN meta m USING (layer))
        SELECT {"g.step, " if sk else ""} g.layer, g.domain, g.expert, g.tokens::BIGINT AS tokens,
               coalesce(ni.routed, 0)::BIGINT AS routed,
               coalesce(ni.routed, 0) / nullif(g.tokens, 0) AS share, g.uniform
        FROM grid g LEFT JOIN ni ON ni.layer = g.layer AND ni.domain = g.domain AND ni.expert = g.expert
             {"AND ni.step = g.step" if sk else ""}
        ORDER BY {_order(scope, 'domain', 'expert')}""", params, run=scope.run)


def vocab_specialisation(store, scope: Scope, meta: pd.DataFrame, *, next_token: bool = False, min_count: int = 10,
                         top: int | None = None, **options) -> pd.DataFrame:
    """Vocabulary specialisation(i, x) = N(x routed to i) / N_x (OLMoE, Muennighoff et al. 2024, Eq. 8).

    By input token id, or with next_token=True by the id of the following token in the
    same sequence. Ids seen fewer than min_count times (default 10) and unknown ids (-1)
    are left out. top=N keeps each expert's N ids of highest share (ties: the more frequent,
    then the lower id). Columns: [step,] layer, token_id (or next_token_id), expert, tokens
    (N_x), routed, share.
    """
    check_options("vocab_specialisation", options, set())
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive int, got {top!r}")
    where, params = scope.where()
    sk = scope.step_key
    if not next_token and not sk and scope.steps is None:
        # The whole run as one window: counts kept per segment read, so a refresh reads only new segments.
        answer = vocab_counts.whole_run_shares(store, scope.run, where, params, min_count, top)
        if answer is not None:
            return answer
    if next_token:
        # Next id within the same sequence, only where the next position was recorded.
        source = f"""
        r0 AS (SELECT {token_key()}, layer, slot, expert, token_id FROM routing WHERE {where}),
        tok AS (SELECT DISTINCT {token_key()}, token_id FROM r0),
        nxt AS (SELECT {token_key()}, lead(token_id) OVER w AS next_id, lead(pos) OVER w AS next_pos FROM tok
                WINDOW w AS (PARTITION BY checkpoint, step, rank, microbatch, seq ORDER BY pos)),
        r AS (SELECT {sk} layer, next_id AS x, slot, expert FROM r0 JOIN nxt USING ({token_key()})
              WHERE next_pos = pos + 1 AND next_id >= 0)"""
        col = "next_token_id"
    else:
        source = f"r AS (SELECT {sk} layer, token_id AS x, slot, expert FROM routing WHERE {where} AND token_id >= 0)"
        col = "token_id"
    # One pass over the rows (per id and expert); N_x is summed from that small result.
    return store.sql(f"""
        WITH {source},
        v0 AS (SELECT {sk} layer, x, expert, count(*) AS routed, count(*) FILTER (WHERE slot = 0) AS top1
               FROM r GROUP BY ALL),
        nx AS (SELECT {sk} layer, x, sum(top1)::BIGINT AS tokens FROM v0 GROUP BY ALL HAVING tokens >= ?),
        v AS (SELECT {sk} layer, x AS {col}, expert, nx.tokens, routed, routed / nx.tokens AS share
              FROM v0 JOIN nx USING ({sk} layer, x))
        SELECT * FROM v
        {f"QUALIFY row_number() OVER (PARTITION BY {sk} layer, expert ORDER BY share DESC, tokens DESC, {col}) <= {top}"
         if top else ""}
        ORDER BY {_order(scope, col, 'expert')}""", params + [min_count], run=scope.run)


def coactivation(store, scope: Scope, meta: pd.DataFrame, exact: bool = False, **options) -> pd.DataFrame:
    """Co-activation(i, j) = N(i and j both in S_t) / N(i in S_t) (OLMoE, Muennighoff et al. 2024, Eq. 6).

    Asymmetric: normalised by expert i's tokens. Only pairs seen together are listed.
    Columns: [step,] layer, expert_i, expert_j, both, tokens_i, coactivation.
    """
    check_options("coactivation", options, set())
    where, params = scope.where()
    sk = scope.step_key
    if _use_rollup(store, scope, "coact_step", exact):
        counts = f"""c AS (SELECT {sk} layer, expert_i AS i, expert_j AS j, sum(together)::BIGINT AS n
                          FROM coact_step WHERE {where} GROUP BY ALL)"""
    else:
        counts = f"""tok AS (SELECT {sk} layer, list(expert) AS ex FROM routing WHERE {where}
                     GROUP BY {token_key()}, layer),
        pairs AS (SELECT {sk} layer, i, unnest(ex) AS j FROM (SELECT {sk} layer, unnest(ex) AS i, ex FROM tok)),
        c AS (SELECT {sk} layer, i, j, count(*) AS n FROM pairs GROUP BY ALL)"""
    return store.sql(f"""
        WITH {counts}
        SELECT {"a.step, " if sk else ""} a.layer, a.i AS expert_i, a.j AS expert_j, a.n AS both, d.n AS tokens_i,
               a.n / d.n AS coactivation
        FROM c a JOIN c d ON d.layer = a.layer AND d.i = a.i AND d.j = a.i {"AND d.step = a.step" if sk else ""}
        WHERE a.i <> a.j ORDER BY {_order(scope, 'expert_i', 'expert_j')}""", params, run=scope.run)


def repetition_baselines(num_experts: int, top_k: int) -> tuple[float, float]:
    """Random-routing chance that adjacent tokens share the top-1 (1/E) or any top-k expert (1 − C(E−k,k)/C(E,k))."""
    return 1.0 / num_experts, 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)


def repetition(store, scope: Scope, meta: pd.DataFrame, exact: bool = False, **options) -> pd.DataFrame:
    """Consecutive-token repetition (Mixtral, Jiang et al. 2024, §5), with its random baselines.

    Over adjacent positions (pos, pos + 1) of the same sequence: the share whose top-1
    experts agree and the share whose top-k sets overlap, beside the random baselines
    1/E and 1 − C(E−k, k)/C(E, k) (8 experts top-2: 12.5% and 46.4%).
    Columns: [step,] layer, pairs, top1_repeat, topk_overlap, top1_baseline, topk_baseline.
    """
    check_options("repetition", options, set())
    where, params = scope.where()
    sk = scope.step_key
    if _use_rollup(store, scope, "repeat_step", exact):
        df = store.sql(f"""
        SELECT {sk} layer, sum(pairs)::BIGINT AS pairs, sum(top1_repeat) / sum(pairs) AS top1_repeat,
               sum(topk_overlap) / sum(pairs) AS topk_overlap
        FROM repeat_step WHERE {where} GROUP BY ALL ORDER BY {_order(scope)}""", params, run=scope.run)
        return _with_baselines(df, meta)
    df = store.sql(f"""
        WITH tok AS (SELECT {token_key()}, layer, list(expert ORDER BY slot) AS ex FROM routing WHERE {where}
                     GROUP BY {token_key()}, layer),
        adj AS (SELECT step, layer, pos, ex, lag(ex) OVER w AS prev, lag(pos) OVER w AS prev_pos FROM tok
                WINDOW w AS (PARTITION BY checkpoint, step, rank, microbatch, seq, layer ORDER BY pos))
        SELECT {sk} layer, count(*) AS pairs, avg((ex[1] = prev[1])::INT) AS top1_repeat,
               avg((len(list_intersect(ex, prev)) > 0)::INT) AS topk_overlap
        FROM adj WHERE prev_pos = pos - 1 GROUP BY ALL ORDER BY {_order(scope)}""", params, run=scope.run)
    return _with_baselines(df, meta)


def _with_baselines(df: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    sizes = {int(r.layer): (int(r.E), int(r.k)) for r in meta.itertuples()}
    base = [repetition_baselines(*sizes[int(x)]) if int(x) in sizes else (float("nan"),) * 2 for x in df["layer"]]
    df["top1_baseline"] = [b[0] for b in base]
    df["topk_baseline"] = [b[1] for b in base]
    return df
