"""Drift across checkpoints and models (METRICS.md §15–18).

The same probe tokens are replayed through each checkpoint, so a token is matched
across checkpoints (or runs) on (microbatch, seq, pos, layer), and only where the
token ids agree (or one is unknown); a checkpoint recorded at several steps counts
with its latest step. Legend: E experts, k chosen per token,
S^(t) the experts chosen at checkpoint t, T the reference (final) checkpoint.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from moescope.analysis.query import Scope, check_options, meta_cte

_MATCH = "USING (microbatch, seq, pos, layer)"
# A checkpoint recorded at several steps is represented by its latest one (the replay).
_LATEST = "step = max(step) OVER (PARTITION BY checkpoint)"
_SAME_TOKEN = "(a.token_id = b.token_id OR a.token_id < 0 OR b.token_id < 0)"


def checkpoint_order(store, run: str) -> pd.DataFrame:
    """Checkpoints of a run in training order: columns checkpoint, step (registered ones and any in the data)."""
    reg = store.checkpoints(run)[["checkpoint", "step"]]
    seen = store.sql("SELECT checkpoint, min(step) AS step FROM expert_step GROUP BY checkpoint", run=run)
    both = pd.concat([reg, seen[~seen.checkpoint.isin(reg.checkpoint)]], ignore_index=True)
    both["step"] = pd.to_numeric(both["step"], errors="coerce")
    return both.sort_values(["step", "checkpoint"], na_position="last", kind="stable").reset_index(drop=True)


def _pick(order: pd.DataFrame, name: str | None, run: str, what: str) -> str:
    if name is None:
        if order.empty:
            raise ValueError(f"run {run!r} has no checkpoints to compare")
        return str(order.checkpoint.iloc[-1])
    if not isinstance(name, str) or name not in set(order.checkpoint):
        raise ValueError(f"unknown {what} {name!r} for run {run!r}; known: {list(order.checkpoint)}")
    return name


def saturation(store, scope: Scope, meta: pd.DataFrame, reference: str | None = None, **options) -> pd.DataFrame:
    """Router saturation(t) = (1/N) Σ_tokens |S^(t) ∩ S^(T)| / k (OLMoE, Muennighoff et al. 2024, Eq. 5).

    Against the final checkpoint, or `reference`. Random baseline k/E.
    Columns: checkpoint, step, layer, tokens, saturation, baseline.
    """
    check_options("saturation", options, set())
    order = checkpoint_order(store, scope.run)
    ref = _pick(order, reference, scope.run, "reference checkpoint")
    where, params = scope.where(checkpoint=False)
    df = store.sql(f"""
        WITH meta AS ({meta_cte(meta, scope)}),
        tok AS (SELECT checkpoint, step, microbatch, seq, pos, layer, any_value(token_id) AS token_id, list(expert) AS s
                FROM routing WHERE {where} GROUP BY checkpoint, step, microbatch, seq, pos, layer
                QUALIFY {_LATEST}),
        b AS (SELECT * FROM tok WHERE checkpoint = ?)
        SELECT a.checkpoint, layer, count(*) AS tokens, avg(len(list_intersect(a.s, b.s)) / m.k) AS saturation,
               any_value(m.k / m.E) AS baseline
        FROM tok a JOIN b {_MATCH} JOIN meta m USING (layer) WHERE {_SAME_TOKEN} GROUP BY ALL""",
                   params + [ref], run=scope.run)
    return _in_order(df, order)


def _in_order(df: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    df = df.merge(order, on="checkpoint", how="left")
    df["_i"] = df.checkpoint.map({c: i for i, c in enumerate(order.checkpoint)})
    cols = ["checkpoint", "step"] + [c for c in df.columns if c not in ("checkpoint", "step", "_i")]
    return df.sort_values(["_i", "layer"]).reset_index(drop=True)[cols]


def fluctuation(store, scope: Scope, meta: pd.DataFrame, reference: str | None = None, **options) -> pd.DataFrame:
    """Last-fluctuation CDF (StableMoE, Dai et al. 2022, §2): per token, the last checkpoint whose top-1 differed from the final.

    Checkpoints are taken in training order up to the reference (default: the final
    one). Columns: checkpoint, step, layer, tokens, last_fluctuations (tokens whose last
    change was at this checkpoint), never (tokens that always agreed with the reference),
    cdf (share of tokens settled at or before this checkpoint; never-changing ones count
    as settled from the start, so the reference row is 1).
    """
    check_options("fluctuation", options, set())
    order = checkpoint_order(store, scope.run)
    ref = _pick(order, reference, scope.run, "reference checkpoint")
    order = order.iloc[: int(np.flatnonzero(order.checkpoint.to_numpy() == ref)[0]) + 1].reset_index(drop=True)
    names = [str(c) for c in order.checkpoint]
    where, params = scope.where(checkpoint=False)
    df = store.sql(f"""
        WITH ord AS (SELECT unnest(?::VARCHAR[]) AS checkpoint, unnest(range(?)) AS idx),
        top AS (SELECT checkpoint, microbatch, seq, pos, layer, token_id, expert FROM routing WHERE {where} AND slot = 0
                QUALIFY {_LATEST}),
        b AS (SELECT * FROM top WHERE checkpoint = ?),
        j AS (SELECT microbatch, seq, pos, layer, o.idx, a.expert <> b.expert AS differs
              FROM top a JOIN ord o USING (checkpoint) JOIN b {_MATCH} WHERE {_SAME_TOKEN}),
        per_tok AS (SELECT layer, coalesce(max(idx) FILTER (WHERE differs), -1) AS last_idx FROM j
                    GROUP BY microbatch, seq, pos, layer)
        SELECT layer, last_idx, count(*) AS n FROM per_tok GROUP BY ALL""",
                   [names, len(names)] + params + [ref], run=scope.run)
    rows = []
    for layer, g in df.groupby("layer"):
        counts = dict(zip(g.last_idx.astype(int), g.n.astype(int)))
        total, never = int(g.n.sum()), counts.get(-1, 0)
        settled = never
        for i, name in enumerate(names):
            settled += counts.get(i, 0)
            rows.append({"checkpoint": name, "step": order.step.iloc[i], "layer": int(layer), "tokens": total,
                         "last_fluctuations": counts.get(i, 0), "never": never, "cdf": settled / total if total else np.nan})
    return pd.DataFrame(rows, columns=["checkpoint", "step", "layer", "tokens", "last_fluctuations", "never", "cdf"])


def _load(store, run: str, checkpoint: str, scope: Scope) -> pd.DataFrame:
    sc = Scope(run=run, layers=scope.layers, steps=scope.steps, checkpoint=checkpoint, phase=scope.phase, by="window")
    where, params = sc.where()
    return store.sql(f"SELECT layer, expert, sum(tokens)::DOUBLE AS load FROM expert_step WHERE {where} GROUP BY ALL",
                     params, run=run)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in nats (Lin 1991): ½ KL(p‖m) + ½ KL(q‖m), m = ½(p + q); 0 … ln 2."""
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def load_js(store, scope: Scope, meta: pd.DataFrame, checkpoint_a: str | None = None, checkpoint_b: str | None = None,
            run_b: str | None = None, **options) -> pd.DataFrame:
    """Load drift: Jensen–Shannon divergence between two checkpoints' load distributions, per layer (METRICS.md §17).

    Loads come from expert_step (exact). Defaults: checkpoint_a = the run's first
    checkpoint (or `checkpoint`), checkpoint_b = the final one of run_b (default the same run).
    Columns: layer, checkpoint_a, checkpoint_b, js (nats, at most ln 2).
    """
    check_options("load_js", options, set())
    run_b = run_b or scope.run
    store.require_run(run_b)
    order_a, order_b = checkpoint_order(store, scope.run), checkpoint_order(store, run_b)
    if checkpoint_a is None:
        checkpoint_a = scope.checkpoint or (str(order_a.checkpoint.iloc[0]) if not order_a.empty else None)
    ca = _pick(order_a, checkpoint_a, scope.run, "checkpoint_a")
    cb = _pick(order_b, checkpoint_b, run_b, "checkpoint_b")
    la, lb = _load(store, scope.run, ca, scope), _load(store, run_b, cb, scope)
    sizes = dict(zip(meta.layer, meta.E))
    rows = []
    for layer in sorted(set(la.layer) & set(lb.layer)):
        e = int(max(sizes.get(int(layer), 0), la[la.layer == layer].expert.max() + 1, lb[lb.layer == layer].expert.max() + 1))
        p, q = np.zeros(e), np.zeros(e)
        np.add.at(p, la[la.layer == layer].expert.to_numpy(int), la[la.layer == layer].load.to_numpy())
        np.add.at(q, lb[lb.layer == layer].expert.to_numpy(int), lb[lb.layer == layer].load.to_numpy())
        if p.sum() > 0 and q.sum() > 0:
            rows.append({"layer": int(layer), "checkpoint_a": ca, "checkpoint_b": cb, "js": js_divergence(p, q)})
    return pd.DataFrame(rows, columns=["layer", "checkpoint_a", "checkpoint_b", "js"])


def alignment(store, scope: Scope, meta: pd.DataFrame, run_b: str | None = None, checkpoint_a: str | None = None,
              checkpoint_b: str | None = None, **options) -> pd.DataFrame:
    """Expert alignment by Hungarian matching on the expert×expert co-assignment matrix (METRICS.md §18).

    C[i, j] counts shared tokens whose top-1 is i in model A and j in model B; the
    assignment maximising Σ C[i, π(i)] (Kuhn 1955, via scipy linear_sum_assignment)
    aligns experts that do not share ids. agreement = matched tokens / shared tokens,
    against the random baseline 1/E. Columns: layer, expert_a, expert_b, co_assigned,
    tokens_a, tokens (shared per layer), agreement, baseline.
    """
    from scipy.optimize import linear_sum_assignment

    check_options("alignment", options, set())
    run_b = run_b or scope.run
    store.require_run(run_b)
    ca = _pick(checkpoint_order(store, scope.run), checkpoint_a or scope.checkpoint, scope.run, "checkpoint_a")
    cb = _pick(checkpoint_order(store, run_b), checkpoint_b, run_b, "checkpoint_b")
    if run_b == scope.run and ca == cb:
        raise ValueError(f"alignment needs two different models: give run_b or checkpoint_b (both are {scope.run!r}/{ca!r})")
    where, params = scope.where(checkpoint=False)
    cross = run_b != scope.run  # only then open every run's segments
    counts = store.sql(f"""
        WITH a AS (SELECT microbatch, seq, pos, layer, token_id, expert FROM routing
                   WHERE {where} AND slot = 0 AND run = ? AND checkpoint = ? QUALIFY {_LATEST}),
        b AS (SELECT microbatch, seq, pos, layer, token_id, expert FROM routing
              WHERE {where} AND slot = 0 AND run = ? AND checkpoint = ? QUALIFY {_LATEST})
        SELECT layer, a.expert AS ea, b.expert AS eb, count(*) AS n FROM a JOIN b {_MATCH}
        WHERE {_SAME_TOKEN} GROUP BY ALL""", params + [scope.run, ca] + params + [run_b, cb],
                       run=None if cross else scope.run)
    sizes = dict(zip(meta.layer, meta.E))
    rows = []
    for layer, g in counts.groupby("layer"):
        e = int(max(sizes.get(int(layer), 0), g.ea.max() + 1, g.eb.max() + 1))
        c_EE = np.zeros((e, e))
        c_EE[g.ea.to_numpy(int), g.eb.to_numpy(int)] = g.n.to_numpy(float)
        ia, ib = linear_sum_assignment(c_EE, maximize=True)
        total = c_EE.sum()
        agreement = c_EE[ia, ib].sum() / total if total else np.nan
        for i, j in zip(ia, ib):
            rows.append({"layer": int(layer), "expert_a": int(i), "expert_b": int(j), "co_assigned": int(c_EE[i, j]),
                         "tokens_a": int(c_EE[i].sum()), "tokens": int(total), "agreement": agreement, "baseline": 1.0 / e})
    return pd.DataFrame(rows, columns=["layer", "expert_a", "expert_b", "co_assigned", "tokens_a", "tokens", "agreement",
                                       "baseline"])
