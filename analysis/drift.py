"""Drift across checkpoints and model versions, on the tokens of a probe set (METRICS.md §15–18).

A probe set (moescope.probe_sets) is replayed through each checkpoint or model version
(moescope.probe.replay). Its rows carry `probe_set` and `seq` = the sequence's index in
the set, so a token is (seq, pos): a checkpoint's routing of a token is matched with
another's on (seq, pos, layer) where the token ids are equal. Training rows never take
part, and two checkpoints that share no probe-set token are an error, never a number.
Every metric takes probe_set= (default: the run's only replayed probe set).
Legend: E experts, k chosen per token, S^(t) the experts chosen at checkpoint t,
T the reference (final) checkpoint.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from moescope.analysis.query import Scope, check_options, meta_cte

# One token of a probe set at one layer, in two replays (a, b) of it.
_SAME_TOKEN = "a.seq = b.seq AND a.pos = b.pos AND a.layer = b.layer AND a.token_id = b.token_id"


def replayed_probe_sets(store, run: str) -> list[str]:
    """Names of the probe sets replayed in `run`."""
    df = store.sql("SELECT DISTINCT probe_set FROM routing WHERE probe_set IS NOT NULL ORDER BY 1", run=run)
    return [str(p) for p in df.probe_set]


def resolve_probe_set(store, run: str, probe_set: str | None = None) -> str:
    """The probe set to compare `run`'s checkpoints on: `probe_set`, or the only one replayed; ValueError otherwise."""
    replayed = replayed_probe_sets(store, run)
    if probe_set is None:
        if len(replayed) == 1:
            return replayed[0]
        if not replayed:
            raise ValueError(f"run {run!r} has no probe-set replays to compare: register a probe set "
                             f"(store.register_probe_set) and replay checkpoints through it "
                             f"(moescope replay --run {run} --probe-set NAME --checkpoint PATH)")
        raise ValueError(f"run {run!r} has replays of several probe sets ({', '.join(replayed)}); choose one with probe_set=")
    if not isinstance(probe_set, str) or not probe_set:
        raise ValueError(f"probe_set must be a probe set name, got {probe_set!r}")
    if probe_set not in replayed:
        from moescope.collector.store import UnknownProbeSet

        known = [str(n) for n in store.probe_sets().name]
        if probe_set not in known:
            raise UnknownProbeSet(f"unknown probe set {probe_set!r}; registered probe sets: {', '.join(known) or 'none'}")
        raise ValueError(f"probe set {probe_set!r} was never replayed in run {run!r}; "
                         f"replayed there: {', '.join(replayed) or 'none'}")
    return probe_set


def replayed_checkpoints(store, run: str, probe_set: str) -> pd.DataFrame:
    """Checkpoints of `run` replayed through `probe_set`, in training order: columns checkpoint, step."""
    df = store.sql("SELECT checkpoint, min(step) AS step FROM routing WHERE probe_set = ? GROUP BY checkpoint",
                   [probe_set], run=run)
    return df.sort_values(["step", "checkpoint"], kind="stable").reset_index(drop=True)


def checkpoint_order(store, run: str) -> pd.DataFrame:
    """Checkpoints of a run in training order: columns checkpoint, step (registered ones and any in the data)."""
    reg = store.checkpoints(run)[["checkpoint", "step"]]
    seen = store.sql("SELECT checkpoint, min(step) AS step FROM expert_step GROUP BY checkpoint", run=run)
    both = pd.concat([reg, seen[~seen.checkpoint.isin(reg.checkpoint)]], ignore_index=True)
    both["step"] = pd.to_numeric(both["step"], errors="coerce")
    return both.sort_values(["step", "checkpoint"], na_position="last", kind="stable").reset_index(drop=True)


def _pick(order: pd.DataFrame, name: str | None, run: str, what: str, probe_set: str | None = None) -> str:
    """A checkpoint of `order` by name; the last one when None."""
    if name is None:
        if order.empty:
            raise ValueError(f"run {run!r} has no checkpoints to compare")
        return str(order.checkpoint.iloc[-1])
    if not isinstance(name, str) or name not in set(order.checkpoint):
        known = list(order.checkpoint)
        if probe_set is not None:
            raise ValueError(f"{what} {name!r} of run {run!r} has no replay of probe set {probe_set!r}; replayed: {known}")
        raise ValueError(f"unknown {what} {name!r} for run {run!r}; known: {known}")
    return name


def _window(scope: Scope) -> str:
    parts = [f"run {scope.run!r}"]
    if scope.steps is not None:
        parts.append(f"steps {scope.steps[0]}..{scope.steps[1]}")
    if scope.layers is not None:
        parts.append(f"layers {list(scope.layers)}")
    if scope.checkpoint is not None:
        parts.append(f"checkpoint {scope.checkpoint!r}")
    if scope.phase is not None:
        parts.append(f"phase {scope.phase!r}")
    return ", ".join(parts)


def _require_shared(tokens: dict[str, int], names: list[str], other: str, probe_set: str) -> None:
    alone = [c for c in names if not tokens.get(c)]
    if alone:
        raise ValueError(f"checkpoint(s) {alone} share no tokens of probe set {probe_set!r} with {other!r}: "
                         "nothing to compare (different probe-set tokens, or no rows in this window)")


def _layers_phase(scope: Scope) -> tuple[str, list]:
    """The scope's layer and phase filter only (the reference checkpoint is not bound to the step window)."""
    return Scope(run=scope.run, layers=scope.layers, phase=scope.phase, ranks=scope.ranks).where()


def saturation(store, scope: Scope, meta: pd.DataFrame, reference: str | None = None, probe_set: str | None = None,
               **options) -> pd.DataFrame:
    """Router saturation(t) = (1/N) Σ_tokens |S^(t) ∩ S^(T)| / k (OLMoE, Muennighoff et al. 2024, Eq. 5).

    Over the N tokens of the probe set, against the final replayed checkpoint or
    `reference`. Random baseline k/E. Columns: checkpoint, step, layer, tokens,
    saturation, baseline.
    """
    check_options("saturation", options, set())
    ps = resolve_probe_set(store, scope.run, probe_set)
    order = replayed_checkpoints(store, scope.run, ps)
    ref = _pick(order, reference, scope.run, "reference checkpoint", ps)
    where, params = scope.where()
    ref_where, ref_params = _layers_phase(scope)
    df = store.sql(f"""
        WITH meta AS ({meta_cte(meta, scope)}),
        a AS (SELECT checkpoint, seq, pos, layer, any_value(token_id) AS token_id, list(expert) AS s
              FROM routing WHERE probe_set = ? AND {where} GROUP BY checkpoint, seq, pos, layer),
        b AS (SELECT seq, pos, layer, any_value(token_id) AS token_id, list(expert) AS s
              FROM routing WHERE probe_set = ? AND checkpoint = ? AND {ref_where} GROUP BY seq, pos, layer)
        SELECT a.checkpoint, a.layer, count(b.seq) AS tokens,
               avg(len(list_intersect(a.s, b.s)) / m.k) FILTER (WHERE b.seq IS NOT NULL) AS saturation,
               any_value(m.k / m.E) AS baseline
        FROM a LEFT JOIN b ON {_SAME_TOKEN} JOIN meta m ON m.layer = a.layer GROUP BY ALL""",
                   [ps] + params + [ps, ref] + ref_params, run=scope.run)
    if df.empty:
        raise ValueError(f"no replay rows of probe set {ps!r} in {_window(scope)}")
    _require_shared(df.groupby("checkpoint").tokens.sum().to_dict(), sorted(set(df.checkpoint)), ref, ps)
    return _in_order(df, order)


def _in_order(df: pd.DataFrame, order: pd.DataFrame) -> pd.DataFrame:
    df = df.merge(order, on="checkpoint", how="left")
    df["_i"] = df.checkpoint.map({c: i for i, c in enumerate(order.checkpoint)})
    cols = ["checkpoint", "step"] + [c for c in df.columns if c not in ("checkpoint", "step", "_i")]
    return df.sort_values(["_i", "layer"]).reset_index(drop=True)[cols]


def fluctuation(store, scope: Scope, meta: pd.DataFrame, reference: str | None = None, probe_set: str | None = None,
                **options) -> pd.DataFrame:
    """Last-fluctuation CDF (StableMoE, Dai et al. 2022, §2): per token, the last checkpoint whose top-1 differed from the final.

    Over the probe set's tokens, with the replayed checkpoints in training order up to
    the reference (default: the final one) and within the step window. Columns:
    checkpoint, step, layer, tokens, last_fluctuations (tokens whose last change was at
    this checkpoint), never (tokens that always agreed with the reference), cdf (share
    of tokens settled at or before this checkpoint; never-changing ones count as settled
    from the start, so the reference row is 1).
    """
    check_options("fluctuation", options, set())
    ps = resolve_probe_set(store, scope.run, probe_set)
    order = replayed_checkpoints(store, scope.run, ps)
    ref = _pick(order, reference, scope.run, "reference checkpoint", ps)
    order = order.iloc[: int(np.flatnonzero(order.checkpoint.to_numpy() == ref)[0]) + 1]
    keep = np.ones(len(order), bool)
    if scope.steps is not None:
        keep &= order.step.between(*scope.steps).to_numpy()
    if scope.checkpoint is not None:
        keep &= (order.checkpoint == scope.checkpoint).to_numpy()
    keep[-1] = True  # the reference always takes part
    order = order[keep].reset_index(drop=True)
    names = [str(c) for c in order.checkpoint]
    where, params = _layers_phase(scope)
    joined = f"""
        WITH ord AS (SELECT unnest(?::VARCHAR[]) AS checkpoint, unnest(range(?)) AS idx),
        top AS (SELECT checkpoint, seq, pos, layer, token_id, expert FROM routing
                WHERE probe_set = ? AND slot = 0 AND {where}),
        b AS (SELECT * FROM top WHERE checkpoint = ?),
        j AS (SELECT a.seq, a.pos, a.layer, o.idx, a.expert <> b.expert AS differs
              FROM top a JOIN ord o USING (checkpoint) JOIN b ON {_SAME_TOKEN})"""
    args = [names, len(names), ps] + params + [ref]
    matched = store.sql(joined + " SELECT idx, count(*) AS n FROM j GROUP BY idx", args, run=scope.run)
    if matched.empty:
        raise ValueError(f"no replay rows of probe set {ps!r} in {_window(scope)}")
    _require_shared({names[int(i)]: int(n) for i, n in zip(matched.idx, matched.n)}, names, ref, ps)
    df = store.sql(joined + """,
        per_tok AS (SELECT layer, coalesce(max(idx) FILTER (WHERE differs), -1) AS last_idx FROM j GROUP BY seq, pos, layer)
        SELECT layer, last_idx, count(*) AS n FROM per_tok GROUP BY ALL""", args, run=scope.run)
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
    sc = Scope(run=run, layers=scope.layers, steps=scope.steps, checkpoint=checkpoint, phase=scope.phase, by="window",
               ranks=scope.ranks)
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


def _pair(store, scope: Scope, run_b: str, checkpoint_a, checkpoint_b, probe_set) -> tuple[str, str, str]:
    """(probe set, checkpoint a of scope.run, checkpoint b of run_b), both replayed through the probe set."""
    ps = resolve_probe_set(store, scope.run, probe_set)
    if run_b != scope.run and ps not in replayed_probe_sets(store, run_b):
        raise ValueError(f"probe set {ps!r} was never replayed in run {run_b!r}; "
                         f"replayed there: {', '.join(replayed_probe_sets(store, run_b)) or 'none'}")
    ca = _pick(replayed_checkpoints(store, scope.run, ps), checkpoint_a, scope.run, "checkpoint_a", ps)
    cb = _pick(replayed_checkpoints(store, run_b, ps), checkpoint_b, run_b, "checkpoint_b", ps)
    return ps, ca, cb


def _pair_rows_sql(scope: Scope, top1: bool) -> tuple[str, list]:
    """CTEs a and b: the probe-set routing rows of (run ?, checkpoint ?) each, within the scope's layers and phase."""
    where, params = _layers_phase(scope)
    slot = "AND slot = 0" if top1 else ""
    rows = (f"SELECT seq, pos, layer, token_id, expert FROM routing "
            f"WHERE probe_set = ? AND run = ? AND checkpoint = ? {slot} AND {where}")
    return f"a AS ({rows}), b AS ({rows})", params


def load_js(store, scope: Scope, meta: pd.DataFrame, checkpoint_a: str | None = None, checkpoint_b: str | None = None,
            run_b: str | None = None, probe_set: str | None = None, **options) -> pd.DataFrame:
    """Load drift: Jensen–Shannon divergence between two checkpoints' load distributions, per layer (METRICS.md §17).

    Without probe_set, loads come from expert_step (exact, every token the checkpoint
    saw, training included): checkpoint_a defaults to the run's first checkpoint (or
    `checkpoint`), checkpoint_b to the final one of run_b (default the same run). With
    probe_set, loads count the assignments of the probe-set tokens both replays share,
    and the defaults are the first and final replayed checkpoints.
    Columns: layer, checkpoint_a, checkpoint_b, js (nats, at most ln 2).
    """
    check_options("load_js", options, set())
    run_b = run_b or scope.run
    store.require_run(run_b)
    if probe_set is None:
        order_a, order_b = checkpoint_order(store, scope.run), checkpoint_order(store, run_b)
        if checkpoint_a is None:
            checkpoint_a = scope.checkpoint or (str(order_a.checkpoint.iloc[0]) if not order_a.empty else None)
        ca = _pick(order_a, checkpoint_a, scope.run, "checkpoint_a")
        cb = _pick(order_b, checkpoint_b, run_b, "checkpoint_b")
        la, lb = _load(store, scope.run, ca, scope), _load(store, run_b, cb, scope)
    else:
        if checkpoint_a is None:
            order_a = replayed_checkpoints(store, scope.run, resolve_probe_set(store, scope.run, probe_set))
            checkpoint_a = scope.checkpoint or (str(order_a.checkpoint.iloc[0]) if not order_a.empty else None)
        ps, ca, cb = _pair(store, scope, run_b, checkpoint_a, checkpoint_b, probe_set)
        pair, params = _pair_rows_sql(scope, top1=False)
        loads = store.sql(f"""
            WITH {pair},
            shared AS (SELECT DISTINCT a.seq, a.pos, a.layer, a.token_id FROM a JOIN b ON {_SAME_TOKEN})
            SELECT 'a' AS side, layer, expert, count(*)::DOUBLE AS load FROM a SEMI JOIN shared USING (seq, pos, layer, token_id)
            GROUP BY ALL
            UNION ALL
            SELECT 'b' AS side, layer, expert, count(*)::DOUBLE AS load FROM b SEMI JOIN shared USING (seq, pos, layer, token_id)
            GROUP BY ALL""", [ps, scope.run, ca] + params + [ps, run_b, cb] + params,
                          run=None if run_b != scope.run else scope.run)
        if loads.empty:
            raise ValueError(f"{scope.run}/{ca} and {run_b}/{cb} share no tokens of probe set {ps!r} in {_window(scope)}")
        la, lb = loads[loads.side == "a"], loads[loads.side == "b"]
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
              checkpoint_b: str | None = None, probe_set: str | None = None, **options) -> pd.DataFrame:
    """Expert alignment by Hungarian matching on the expert×expert co-assignment matrix (METRICS.md §18).

    C[i, j] counts probe-set tokens whose top-1 is i in model A (checkpoint_a of the
    run, default its final replay) and j in model B (checkpoint_b of run_b, default
    run_b's final replay); the assignment maximising Σ C[i, π(i)] (Kuhn 1955, via scipy
    linear_sum_assignment) aligns experts that do not share ids. agreement = matched
    tokens / shared tokens, against the random baseline 1/E. Columns: layer, expert_a,
    expert_b, co_assigned, tokens_a, tokens (shared per layer), agreement, baseline.
    """
    from scipy.optimize import linear_sum_assignment

    check_options("alignment", options, set())
    run_b = run_b or scope.run
    store.require_run(run_b)
    ps, ca, cb = _pair(store, scope, run_b, checkpoint_a or scope.checkpoint, checkpoint_b, probe_set)
    if run_b == scope.run and ca == cb:
        raise ValueError(f"alignment needs two different models: give run_b or checkpoint_b (both are {scope.run!r}/{ca!r})")
    pair, params = _pair_rows_sql(scope, top1=True)
    counts = store.sql(f"""
        WITH {pair}
        SELECT a.layer, a.expert AS ea, b.expert AS eb, count(*) AS n FROM a JOIN b ON {_SAME_TOKEN} GROUP BY ALL""",
                       [ps, scope.run, ca] + params + [ps, run_b, cb] + params,
                       run=None if run_b != scope.run else scope.run)  # only then open every run's segments
    if counts.empty:
        raise ValueError(f"{scope.run}/{ca} and {run_b}/{cb} share no tokens of probe set {ps!r} in {_window(scope)}")
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
