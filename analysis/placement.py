"""Expert-placement what-if: the recorded traffic replayed on a placement of experts over EP devices.

Legend: E logical experts of a layer, G = ep_size devices (GPUs), N nodes of
gpus_per_node devices each, R redundant expert slots, P = E + R physical slots,
S = P / G slots per device, L layers, K top-k, n routing rows of a batch.

The model, stated once (docstring of `placement` repeats it for users):
- Load (exact, from expert_step): load_e is expert e's (token, slot) assignments at a step,
  summed over ranks. An expert with r_e replicas has its load split evenly over them, as
  EPLB assumes and as vLLM's uniformly random choice of replica gives on average.
  tokens_d = Σ_{slots on d} load_e / r_e; balancedness = mean_d tokens_d / max_d tokens_d (what
  vLLM and SGLang log); overload = max_d tokens_d / mean_d tokens_d (max over the balanced share).
- Where a token lives: tokens are spread evenly over the EP ranks by position, the token at
  position pos lives on device pos mod G (its home); it is dispatched from there and combined back there.
- All-to-all: dispatch sends a token's hidden vector once to every device other than its
  home that holds one of its chosen experts (one copy per destination device, as DeepEP
  sends); combine returns the same copies, so it mirrors dispatch (combine's sent = dispatch's
  received). bytes = copies × hidden_size × dtype bytes. Internode copies count the distinct
  remote nodes a token reaches. With replicas, copies are expectations under the uniform
  choice of replica. Routing rows give each token's chosen set (co-activation); when per-token
  rows are sampled, a step's copies are scaled by its exact token count over the sampled count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from moescope.analysis import placement_replay as pr
from moescope.analysis.health import has_rollups
from moescope.analysis.memo import BoundedMemo, segments_key
from moescope.analysis.query import Scope, check_options, make_scope
from moescope.device_map import DeviceMap, recorded

POLICIES = ("contiguous", "round_robin", "eplb", "eplb_global", "coactivation", "map", "recorded")
LOAD_AWARE = ("eplb", "eplb_global", "coactivation")
# Suffix of a load-aware policy fitted on the evaluated window itself (hindsight), beside the one fitted on the past.
HINDSIGHT = "@hindsight"
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}
# coactivation: a device may be this share of the balanced load above the lightest one and still be chosen.
DEFAULT_TOLERANCE = 0.05

Devices = list[list[int]]  # device d -> logical experts in its slots, slot order


# ----------------------------------------------------------------------------- policies
def _balanced_packing(weight_n: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's packing: n items into packs of exactly n / num_packs items each, heaviest first into the lightest open pack.

    Returns (pack of each item, its rank inside the pack). Ties: lower item index first, lower pack first.
    """
    n = len(weight_n)
    per = n // num_packs
    pack_n, rank_n = np.full(n, -1), np.full(n, -1)
    loads, counts = [0.0] * num_packs, [0] * num_packs
    for i in sorted(range(n), key=lambda j: (-float(weight_n[j]), j)):
        p = min((q for q in range(num_packs) if counts[q] < per), key=lambda q: (loads[q], q))
        pack_n[i], rank_n[i] = p, counts[p]
        loads[p] += float(weight_n[i])
        counts[p] += 1
    return pack_n, rank_n


def _replicate(weight_m: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's replication: each extra slot goes to the expert with the largest load per replica.

    Returns (logical expert of each physical slot, replica count of each expert).
    """
    m = len(weight_m)
    phy = list(range(m))
    count_m = np.ones(m, dtype=np.int64)
    for _ in range(num_phy - m):
        e = int(np.argmax(np.asarray(weight_m, float) / count_m))
        phy.append(e)
        count_m[e] += 1
    return np.asarray(phy), count_m


def eplb_hierarchical(weight_E: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> Devices:
    """DeepSeek's EPLB, hierarchical (DeepSeek-V3 §3.4; github.com/deepseek-ai/EPLB).

    1. pack the expert groups onto nodes, balanced, each node the same number of groups;
    2. inside each node, replicate its heaviest experts into the node's redundant slots;
    3. pack each node's physical experts onto its GPUs, balanced, each GPU S slots.
    The global policy is this with one group and one node.
    """
    e = len(weight_E)
    group_size, groups_per_node, gpus_per_node = e // num_groups, num_groups // num_nodes, num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus
    group_w = np.asarray(weight_E, float).reshape(num_groups, group_size).sum(1)
    node_of_group, rank_of_group = _balanced_packing(group_w, num_nodes)
    devices: Devices = [[] for _ in range(num_gpus)]
    for node in range(num_nodes):
        groups = sorted((g for g in range(num_groups) if node_of_group[g] == node), key=lambda g: rank_of_group[g])
        assert len(groups) == groups_per_node
        experts = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in groups])
        w = np.asarray(weight_E, float)[experts]
        phy, count = _replicate(w, num_physical // num_nodes)
        gpu_of_phy, rank_of_phy = _balanced_packing(w[phy] / count[phy], gpus_per_node)
        for local in range(gpus_per_node):
            mine = sorted((p for p in range(len(phy)) if gpu_of_phy[p] == local), key=lambda p: rank_of_phy[p])
            assert len(mine) == slots_per_gpu
            devices[node * gpus_per_node + local] = [int(experts[phy[p]]) for p in mine]
    return devices


def contiguous(e: int, num_physical: int, num_gpus: int) -> Devices:
    """Slot p holds expert p mod E; device d holds slots [d·S, (d+1)·S) (vLLM's default expert map)."""
    s = num_physical // num_gpus
    return [[p % e for p in range(d * s, (d + 1) * s)] for d in range(num_gpus)]


def round_robin(e: int, num_physical: int, num_gpus: int) -> Devices:
    """Slot p holds expert p mod E and sits on device p mod G."""
    return [[p % e for p in range(d, num_physical, num_gpus)] for d in range(num_gpus)]


def coactivation_aware(weight_E: np.ndarray, coact_EE: np.ndarray, num_physical: int, num_gpus: int,
                       tolerance: float = DEFAULT_TOLERANCE) -> Devices:
    """Balanced packing that keeps experts which fire together on one device (fewer all-to-all copies).

    Replicas as EPLB (heaviest expert per replica first). Then, heaviest physical expert first,
    the candidate devices are the open ones whose load is within tolerance × (total / G) of the
    lightest open device (and, when possible, that do not already hold the expert); among them
    the device whose experts the expert was chosen together with most often (co-activation
    counts of the fit window) wins, then the lighter one, then the lower index. tolerance=0
    is EPLB's global packing with co-activation breaking ties.
    """
    w = np.asarray(weight_E, float)
    phy, count = _replicate(w, num_physical)
    w_phy = w[phy] / count[phy]
    per = num_physical // num_gpus
    slack = tolerance * w_phy.sum() / num_gpus
    loads, devices = [0.0] * num_gpus, [[] for _ in range(num_gpus)]
    for p in sorted(range(len(phy)), key=lambda j: (-w_phy[j], j)):
        e = int(phy[p])
        open_ = [d for d in range(num_gpus) if len(devices[d]) < per]
        lightest = min(loads[d] for d in open_)
        cands = [d for d in open_ if loads[d] <= lightest + slack]
        fresh = [d for d in cands if e not in devices[d]]
        cands = fresh or cands
        d = max(cands, key=lambda q: (sum(float(coact_EE[e, j]) for j in devices[q] if j != e), -loads[q], -q))
        devices[d].append(e)
        loads[d] += w_phy[p]
    return devices


def map_devices(expert_map, e: int, num_gpus: int) -> Devices:
    """An explicit map: a sequence (expert -> device, or list of devices for replicas) or a dict of the same."""
    if isinstance(expert_map, Mapping):
        items = list(expert_map.items())
    elif isinstance(expert_map, Sequence) and not isinstance(expert_map, (str, bytes)):
        items = list(enumerate(expert_map))
    else:
        raise ValueError(f"expert_map must map each expert to a device (a list or dict), got {expert_map!r}")
    devices: Devices = [[] for _ in range(num_gpus)]
    seen = set()
    for expert, where in items:
        if not _is_int(expert) or not 0 <= int(expert) < e:
            raise ValueError(f"expert_map names expert {expert!r}; the layer has experts 0..{e - 1}")
        where = list(where) if isinstance(where, (list, tuple, np.ndarray)) else [where]
        if not where or not all(_is_int(d) and 0 <= int(d) < num_gpus for d in where):
            raise ValueError(f"expert_map puts expert {expert} on {where!r}; devices are 0..{num_gpus - 1}")
        for d in where:
            devices[int(d)].append(int(expert))
        seen.add(int(expert))
    missing = sorted(set(range(e)) - seen)
    if missing:
        raise ValueError(f"expert_map places no device for expert(s) {missing[:10]} of {e}")
    return devices


def _is_int(x) -> bool:
    return not isinstance(x, bool) and hasattr(x, "__index__")


# ----------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class Layout:
    """The EP layout every policy is built for."""

    ep_size: int
    gpus_per_node: int
    redundant_slots: int
    expert_groups: int
    tolerance: float

    @property
    def nodes(self) -> int:
        return self.ep_size // self.gpus_per_node


def make_layout(ep_size, gpus_per_node, redundant_slots, expert_groups, tolerance) -> Layout:
    for name, v, lo in (("ep_size", ep_size, 1), ("redundant_slots", redundant_slots, 0), ("expert_groups", expert_groups, 1)):
        if not _is_int(v) or int(v) < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    gpus_per_node = ep_size if gpus_per_node is None else gpus_per_node
    if not _is_int(gpus_per_node) or int(gpus_per_node) < 1 or int(ep_size) % int(gpus_per_node):
        raise ValueError(f"gpus_per_node must be a positive int dividing ep_size {ep_size}, got {gpus_per_node!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    return Layout(int(ep_size), int(gpus_per_node), int(redundant_slots), int(expert_groups), float(tolerance))


def parse_policies(policy, expert_map, has_recorded: bool = False) -> list[str]:
    if policy is None:
        policy = "map" if expert_map is not None else "recorded" if has_recorded else "contiguous"
    if policy == "all" or isinstance(policy, (list, tuple)) and "all" in policy:
        policies = [p for p in POLICIES if (p != "map" or expert_map is not None) and (p != "recorded" or has_recorded)]
    else:
        policies = [policy] if isinstance(policy, str) else list(policy) if isinstance(policy, (list, tuple)) else None
        if not policies or any(p not in POLICIES for p in policies):
            raise ValueError(f"policy must be one of {list(POLICIES)} (or a list of them, or 'all'), got {policy!r}")
    if "map" in policies and expert_map is None:
        raise ValueError("policy 'map' needs expert_map (expert -> device)")
    if "recorded" in policies and not has_recorded:
        raise ValueError("policy 'recorded' needs the expert -> device map the run recorded for these layers "
                         "(attach(..., expert_devices= or ep_size=)), spanning ep_size devices")
    return list(dict.fromkeys(policies))


def build_placement(policy: str, layout: Layout, e: int, weight_E=None, coact_EE=None, expert_map=None) -> Devices:
    """Device -> experts of one layer under `policy` (weight_E / coact_EE from the fit window)."""
    g = layout.ep_size
    if policy == "map":
        if layout.redundant_slots:
            raise ValueError("redundant_slots does not apply to an expert_map: its replicas are the ones it lists")
        return map_devices(expert_map, e, g)
    num_physical = e + layout.redundant_slots
    if layout.redundant_slots > 8 * e:
        raise ValueError(f"redundant_slots {layout.redundant_slots} is more than 8 replicas per expert of the layer's {e}")
    if num_physical % g:
        raise ValueError(f"{e} experts + {layout.redundant_slots} redundant slots = {num_physical} physical slots "
                         f"do not divide over ep_size {g}")
    if policy == "contiguous":
        return contiguous(e, num_physical, g)
    if policy == "round_robin":
        return round_robin(e, num_physical, g)
    if policy == "coactivation":
        return coactivation_aware(weight_E, coact_EE, num_physical, g, layout.tolerance)
    groups, nodes = layout.expert_groups, layout.nodes
    if policy == "eplb" and groups % nodes == 0:  # the published dispatch: hierarchical when groups split over nodes
        if e % groups:
            raise ValueError(f"expert_groups {groups} does not divide the layer's {e} experts")
        return eplb_hierarchical(weight_E, num_physical, groups, nodes, g)
    return eplb_hierarchical(weight_E, num_physical, 1, 1, g)  # the global policy


def fraction_EG(devices: Devices, e: int, g: int) -> np.ndarray:
    """f[e, d] = replicas of e on d / replicas of e: the share of e's tokens device d computes."""
    count_EG = np.zeros((e, g))
    for d, experts in enumerate(devices):
        for x in experts:
            count_EG[x, d] += 1
    return count_EG / np.maximum(count_EG.sum(1, keepdims=True), 1)


# ----------------------------------------------------------------------------- replay
@dataclasses.dataclass
class Window:
    """Exact per-step loads of one step window: load_SLE[s, l, e] for steps[s], layers[l]."""

    steps: np.ndarray
    layers: np.ndarray
    load_SLE: np.ndarray
    tokens_SL: np.ndarray  # exact tokens each layer saw at each step


# Loads and co-activation read from the rollups, per (store, run, segments read, query): the window and
# per-step views of one what-if, and device_load, read them once. Bounded in float64 values.
ROLLUP_READS = BoundedMemo(1 << 24)


def _kept(store, run: str, table: str, query: tuple, read):
    """read(), or what it gave for the same query over the same live segments of `table`."""
    key = (*segments_key(store, table, run), query)
    found = ROLLUP_READS.get(key)
    if found is None:
        found = read()
        ROLLUP_READS.put(key, found, found.load_SLE.size + found.tokens_SL.size if isinstance(found, Window) else found.size)
    return found


def load_window(store, scope: Scope, layers: list[int], e_max: int, steps) -> Window:
    """Exact loads of the window from expert_step (shared: do not modify the arrays)."""
    where, params = dataclasses.replace(scope, steps=steps).where()
    return _kept(store, scope.run, "expert_step", ("window", where, tuple(params), tuple(layers), e_max),
                 lambda: _read_window(store, scope, layers, e_max, steps, where, params))


def _read_window(store, scope: Scope, layers: list[int], e_max: int, steps, where: str, params: list) -> Window:
    df = store.sql(f"""
        SELECT step, layer, expert, sum(tokens)::DOUBLE AS load, sum(num_tokens)::DOUBLE AS nt
        FROM expert_step WHERE {where} GROUP BY ALL ORDER BY step, layer, expert""", params, run=scope.run)
    df = df[df.layer.isin(layers) & (df.expert < e_max)]
    if df.empty:
        where_txt = "the whole run" if steps is None else f"steps {steps[0]}..{steps[1]}"
        raise ValueError(f"no expert_step rows for layers {layers} in {where_txt} of run {scope.run!r}")
    steps_s = np.unique(df.step.to_numpy())
    layers_l = np.asarray(sorted(layers))
    s = np.searchsorted(steps_s, df.step.to_numpy())
    li = np.searchsorted(layers_l, df.layer.to_numpy())
    load = np.zeros((len(steps_s), len(layers_l), e_max))
    load[s, li, df.expert.to_numpy()] = df.load.to_numpy()
    nt = np.zeros_like(load)
    nt[s, li, df.expert.to_numpy()] = df.nt.to_numpy()
    return Window(steps_s, layers_l, load, nt.max(2))


class TokenRows:
    """The routing rows behind the all-to-all copies (and co-activation where no rollup holds it) of one what-if.

    With one K and a small E^K (the probe's layout), tokens are counted by (step, layer,
    home, signature) once per routing segment and kept (placement_replay.histogram): every
    policy, window and view of the run is then priced from those counts without reading a
    row again. Otherwise each use streams the rows: row by row (tokens with varying K), or
    sorted by token when they were written in another order.
    """

    def __init__(self, store, scope: Scope, layers: np.ndarray, layout: Layout, e_max: int, ks: set[int],
                 windows: list[np.ndarray]):
        self.store, self.scope, self.layers, self.layout, self.e_max = store, scope, layers, layout, e_max
        self.k, self.one_k = max(ks), len(ks) == 1
        self.space = pr.Space(tuple(int(x) for x in layers), layout.ep_size, e_max, self.k)
        self.counts: pr.Counts | None = None
        if self.one_k and self.space.fits():
            filters, params = dataclasses.replace(scope, steps=None, layers=self.space.layers).where()
            try:
                self.counts = pr.histogram(store, scope.run, self.space, filters, params,
                                           [(int(w[0]), int(w[-1])) for w in windows if len(w)])
            except pr.NotAdjacent:
                self.counts = None

    def coactivation(self, steps: np.ndarray) -> np.ndarray:
        """C[l, i, j]: tokens at `steps` that chose both i and j (i ≠ j)."""
        if self.counts is not None:
            return pr.coactivation(self.counts, self.space, steps)
        return self._stream(steps, {}, coactivation=True)

    def copies(self, steps: np.ndarray, tables: dict[str, np.ndarray]):
        """Every placement's copies per (step, layer, device) at `steps` (.traffic), and tokens seen per (step, layer) (.seen).

        From kept counts, a placement priced before at the same steps (the window and the
        per-step view of one what-if) is not priced again.
        """
        if self.counts is None:
            # Streamed: kept per live routing segments and scope, so a refresh of the page does not read the rows again.
            source = (*segments_key(self.store, "routing", self.scope.run), self.scope.checkpoint, self.scope.phase,
                      self.scope.ranks, tuple(int(x) for x in self.layers), self.layout.ep_size, self.e_max)
        else:
            source = self.counts.source
        base = (source, _digest(steps), self.layout.gpus_per_node, self.k)
        known = {p: PRICED.get((*base, _digest(t))) for p, t in tables.items()} if source else {}
        seen = PRICED.get((*base, "seen")) if source else None
        todo = {p: t for p, t in tables.items() if known.get(p) is None}
        if self.counts is None:
            r = self._stream(steps, todo) if todo or seen is None else pr.SignatureReplay(self._grid(steps), {}, self.k)
        else:
            r = pr.SignatureReplay(self._grid(steps), todo, self.k)
            if todo or seen is None:
                r.add(self.counts)
        if source:
            PRICED.put((*base, "seen"), r.seen if seen is None else seen, len(r.seen))
            for p, t in todo.items():
                PRICED.put((*base, _digest(t)), r.traffic[p], 3 * r.grid.size)
        r.seen = r.seen if seen is None else seen
        r.traffic.update({p: v for p, v in known.items() if v is not None})
        return r

    def _grid(self, steps: np.ndarray) -> pr.Grid:
        return pr.Grid(steps, self.layers, self.layout.ep_size, self.layout.gpus_per_node, self.e_max)

    def _stream(self, steps: np.ndarray, tables: dict[str, np.ndarray], coactivation: bool = False):
        """One pass over the rows at `steps`: in write order row by row, else sorted by token (signatures, then rows)."""
        grid = self._grid(steps)
        where, params = dataclasses.replace(self.scope, steps=(int(steps[0]), int(steps[-1])),
                                            layers=self.space.layers).where()
        where = f"{where} AND {grid.step_filter()}"
        width = pr.key_width(int(steps[0]), int(steps[-1]), self.space.cells)
        signature = self.one_k and self.space.fits() and width is not None
        attempts = [("rows", False)] + ([("signatures", True)] if signature else []) + [("rows", True)]
        for how, ordered in attempts:
            try:
                if how == "signatures":
                    counter = pr.SignatureCounter(self.space, int(steps[0]), int(steps[-1]))
                    for batch in pr.stream(self.store, self.scope.run, self.space.select_sql(int(steps[0]), width), where,
                                           params, ordered=True):
                        counter.add(batch)
                    counts = counter.finish()
                    if coactivation:
                        return pr.coactivation(counts, self.space, steps)
                    r = pr.SignatureReplay(grid, tables, self.k)
                    r.add(counts)
                    return r
                r = pr.Replay(grid, tables, self.k, coactivation)
                for batch in pr.stream(self.store, self.scope.run, grid.select_sql(), where, params, ordered=ordered):
                    r.add(batch)
                r.finish()
                return r.coact.reshape(len(self.layers), self.e_max, self.e_max) if coactivation else r
            except pr.NotAdjacent:
                continue
        raise ValueError(f"routing rows of run {self.scope.run!r} repeat or skip a slot of a token")


# Copies of placements priced from kept counts, per (counts, steps, placement): bounded in float64 values.
PRICED = BoundedMemo(1 << 24)


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest() + str(a.shape)


def coactivation_rollup(store, scope: Scope, steps, layers: np.ndarray, e_max: int) -> np.ndarray:
    """C[l, i, j] from the coact_step rollup (exact over every token, even when routing rows are sampled)."""
    where, params = dataclasses.replace(scope, steps=steps, layers=tuple(int(x) for x in layers)).where()

    def read() -> np.ndarray:
        df = store.sql(f"""SELECT layer, expert_i, expert_j, sum(together)::DOUBLE AS n FROM coact_step
                           WHERE {where} AND expert_i <> expert_j AND expert_i < {e_max} AND expert_j < {e_max}
                           GROUP BY ALL""", params, run=scope.run)
        out = np.zeros((len(layers), e_max, e_max))
        out[np.searchsorted(layers, df.layer.to_numpy()), df.expert_i.to_numpy(), df.expert_j.to_numpy()] = df.n.to_numpy()
        return out
    return _kept(store, scope.run, "coact_step", ("coact", where, tuple(params), tuple(layers.tolist()), e_max), read)


# ----------------------------------------------------------------------------- the metric
def placement(store, scope: Scope, meta: pd.DataFrame, ep_size=None, gpus_per_node=None, redundant_slots=0, policy=None,
              expert_map=None, hidden_size=None, dtype="bfloat16", fit_steps=None, expert_groups=1,
              tolerance=DEFAULT_TOLERANCE, recorded_map=True, **options) -> pd.DataFrame:
    """Expert placement what-if: the window's recorded traffic replayed on a placement over EP devices.

    Definition: METRICS.md §19. Redundant experts and their packing follow DeepSeek-V3
    (DeepSeek-AI 2024, §3.4; the EPLB algorithm); balancedness is the figure vLLM's and
    SGLang's EPLB log.

    Options: ep_size (G devices; default the largest of 1..8 dividing every layer's E); gpus_per_node (default G: one node); redundant_slots
    (R extra expert slots, E + R divisible by G); policy: "contiguous" (default; slot p holds
    expert p mod E, device d slots d·S..), "round_robin" (slot p on device p mod G), "eplb"
    (DeepSeek's EPLB as published: hierarchical when expert_groups is a multiple of the node
    count, else global), "eplb_global", "coactivation" (balanced packing keeping co-chosen
    experts together, within tolerance of the lightest device), "map" (expert_map: expert ->
    device, or list of devices for replicas), "recorded" (the expert -> device map the run recorded
    at attach time, its replicas included; METRICS.md §21), a list of these, or "all"; expert_groups (EPLB's
    groups, default 1); hidden_size and dtype (default bfloat16) turn copies into bytes;
    fit_steps (lo, hi): the window load-aware policies are fitted on (default: the evaluated
    window `steps` itself), so a placement chosen from past traffic is judged on later traffic.
    recorded_map (default True): when the run recorded its expert -> device map for every layer asked
    about, that map is the current placement, the default policy, and ep_size defaults to its device
    count; False (or an ep_size of another device count) compares against contiguous instead.

    Model: loads are exact from expert_step, split evenly over an expert's replicas (EPLB's
    assumption). The token at position pos lives on device pos mod G and is sent once to each
    other device holding one of its chosen experts (DeepEP-style dispatch; combine mirrors it),
    from routing rows, scaled up when they are sampled; expectations over replicas. The
    coactivation policy is fitted on the coact_step rollup (exact), else on routing rows.
    balancedness = mean_d tokens_d / max_d tokens_d, overload = max_d / mean_d. Rows are
    counted once per routing segment and kept (placement_replay.CACHE): further policies,
    windows and views of the run read none again.

    by="step": a row per (policy, step, layer, device): node, tokens, balancedness, overload,
    copies_sent, copies_recv, copies_sent_internode, bytes_sent, bytes_recv, bytes_sent_internode
    (bytes null without hidden_size). by="window": a row per (policy, layer): balancedness
    (mean over steps), balancedness_min, overload, overload_max, copies_per_step,
    bytes_per_step, bytes_sent_max (mean over steps of the busiest sender), the same on the fit
    window (balancedness_fit, copies_per_step_fit, fit_eval_gap = balancedness_fit −
    balancedness), balancedness_hindsight (the policy fitted on the evaluated window itself)
    and staleness = balancedness_hindsight − balancedness (what choosing from past traffic
    costs; 0 for static policies or when fit_steps is the window), the current placement (expert_map if given, else
    the recorded map, else contiguous) and this
    one's improvement (balancedness / current's) and traffic_ratio (copies / current's),
    suggested (the load-aware policy with the best fit-window balancedness, fewer fit-window
    copies among those within 1%; none when it does not beat the current placement on the fit
    window: 1% better balanced, or as balanced with 1% fewer copies), and placement (device -> experts).
    """
    check_options("placement", options, set())
    rows = meta[[scope.layers is None or int(x) in scope.layers for x in meta.layer]]
    if rows.empty:
        raise ValueError(f"run {scope.run!r} has none of layers {list(scope.layers or [])}")
    if not isinstance(recorded_map, bool):
        raise ValueError(f"recorded_map must be true or false, got {recorded_map!r}")
    ran = _recorded(store, scope.run, rows, ep_size) if recorded_map else None
    if ep_size is None:  # the recorded map's devices, else one node of up to 8 GPUs every layer's experts divide over
        ep_size = ran.num_devices if ran is not None else max(g for g in range(1, 9) if all(int(e) % g == 0 for e in rows.E))
    layout = make_layout(ep_size, gpus_per_node, redundant_slots, expert_groups, tolerance)
    policies = parse_policies(policy, expert_map, ran is not None)
    dtype_bytes = _dtype_bytes(dtype)
    if hidden_size is not None and (not _is_int(hidden_size) or int(hidden_size) < 1):
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if fit_steps is not None:
        fit_steps = make_scope(scope.run, steps=fit_steps).steps
    layers, e_by_layer = rows.layer.astype(int).tolist(), dict(zip(rows.layer.astype(int), rows.E.astype(int)))
    e_max, ks = int(rows.E.max()), set(rows.k.astype(int))
    eval_w = load_window(store, scope, layers, e_max, scope.steps)
    same_window = fit_steps is None or fit_steps == scope.steps
    fit_w = eval_w if same_window else load_window(store, scope, layers, e_max, fit_steps)
    current = "map" if expert_map is not None else "recorded" if ran is not None else "contiguous"
    hindsight = [p for p in policies if p in LOAD_AWARE] if scope.by == "window" and not same_window else []
    # Co-activation for the coactivation policy: the coact_step rollup, else counted from routing rows.
    coact_rows = "coactivation" in policies and not has_rollups(store, scope, "coact_step")
    windows = [eval_w.steps] + ([fit_w.steps] if not same_window and (scope.by == "window" or coact_rows) else [])
    tokens = TokenRows(store, scope, eval_w.layers, layout, e_max, ks, windows)

    def coactivation(window: Window, steps) -> np.ndarray:
        if coact_rows:
            return tokens.coactivation(window.steps)
        return coactivation_rollup(store, scope, steps, window.layers, e_max)

    def build(policy: str, window: Window, coact_LEE) -> list[Devices]:
        per_layer = []
        for li, layer in enumerate(window.layers.tolist()):
            e = e_by_layer[layer]
            try:
                if policy == "recorded":  # what ran: its own replicas, whatever redundant_slots says
                    per_layer.append(map_devices(ran.layers[layer], e, layout.ep_size))
                    continue
                per_layer.append(build_placement(policy, layout, e, window.load_SLE[:, li, :e].sum(0),
                                                 None if coact_LEE is None else coact_LEE[li, :e, :e], expert_map))
            except ValueError as exc:
                raise ValueError(f"layer {layer}: {exc}") from None
        return per_layer

    coact = coactivation(fit_w, _fit_steps(fit_steps, scope)) if "coactivation" in policies else None
    wanted = list(dict.fromkeys(policies + ([current] if scope.by == "window" else [])))
    placements = {p: build(p, fit_w, coact) for p in wanted}
    if hindsight:  # the same policies fitted on the evaluated window itself: what choosing from the past costs
        coact_eval = coactivation(eval_w, scope.steps) if "coactivation" in hindsight else None
        placements.update({p + HINDSIGHT: build(p, eval_w, coact_eval) for p in hindsight})
    tables = {p: _table(devs, e_max, layout.ep_size) for p, devs in placements.items()}
    steps_all = windows[0] if len(windows) == 1 else np.union1d(*windows)
    copies = tokens.copies(steps_all, tables)  # every window's copies from one pass (or none, when counted before)
    per_copy = float("nan") if hidden_size is None else float(hidden_size) * dtype_bytes
    per_step = _evaluate(eval_w, steps_all, copies, tables, layout)
    if scope.by == "step":
        return _frame(eval_w, {p: per_step[p] for p in policies}, layout, per_copy)
    fit_tables = {p: t for p, t in tables.items() if not p.endswith(HINDSIGHT)}
    fit_step = per_step if same_window else _evaluate(fit_w, steps_all, copies, fit_tables, layout)
    return _summary(_per_layer(eval_w, per_step, per_copy), _per_layer(fit_w, fit_step, per_copy), policies, current,
                    placements, eval_w.layers.tolist(), layout)


def _recorded(store, run: str, rows: pd.DataFrame, ep_size) -> DeviceMap | None:
    """The run's recorded map when it covers every layer asked about (each fully) on ep_size devices."""
    found = recorded(store.run_config(run), run)
    if found is None or (ep_size is not None and ep_size != found.num_devices):
        return None
    if any(int(layer) not in found.layers or len(found.layers[int(layer)]) != int(e) for layer, e in zip(rows.layer, rows.E)):
        return None
    return found


def _fit_steps(fit_steps, scope: Scope):
    return scope.steps if fit_steps is None else fit_steps


def _dtype_bytes(dtype) -> int:
    if _is_int(dtype) and int(dtype) > 0:
        return int(dtype)
    if not isinstance(dtype, str) or dtype.lower().removeprefix("torch.") not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)} (or a byte count), got {dtype!r}")
    return DTYPE_BYTES[dtype.lower().removeprefix("torch.")]


def _table(devices_by_layer: list[Devices], e_max: int, g: int) -> np.ndarray:
    f = np.zeros((len(devices_by_layer), e_max, g))
    for li, devices in enumerate(devices_by_layer):
        e = max((x for d in devices for x in d), default=-1) + 1
        f[li, :e] = fraction_EG(devices, e, g)
    return f


@dataclasses.dataclass
class Evaluated:
    """One placement on one window: per (step, layer[, device]) arrays."""

    tokens_SLG: np.ndarray
    bal_SL: np.ndarray
    over_SL: np.ndarray
    sent_SLG: np.ndarray
    recv_SLG: np.ndarray
    inter_SLG: np.ndarray


def _evaluate(window: Window, steps_all: np.ndarray, copies, tables, layout: Layout) -> dict[str, Evaluated]:
    """Each placement on one window; copies were counted over steps_all (a superset of the window's steps)."""
    n_all, n_l, g = len(steps_all), len(window.layers), layout.ep_size
    pick = np.searchsorted(steps_all, window.steps)
    seen_SL = copies.seen.reshape(n_all, n_l)[pick]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale_SL1 = np.where(seen_SL > 0, window.tokens_SL / seen_SL, np.nan)[:, :, None]
    out = {}
    for policy, f_LEG in tables.items():
        tokens_SLG = np.einsum("sle,leg->slg", window.load_SLE, f_LEG)
        mean_SL, max_SL = tokens_SLG.mean(2), tokens_SLG.max(2)
        with np.errstate(divide="ignore", invalid="ignore"):
            bal_SL = np.where(max_SL > 0, mean_SL / max_SL, np.nan)
            over_SL = np.where(mean_SL > 0, max_SL / mean_SL, np.nan)
        t = copies.traffic[policy]
        sent, recv, inter = (getattr(t, name).reshape(n_all, n_l, g)[pick] * scale_SL1
                             for name in ("sent", "recv", "sent_internode"))
        out[policy] = Evaluated(tokens_SLG, bal_SL, over_SL, sent, recv, inter)
    return out


def _frame(window: Window, evaluated: dict[str, Evaluated], layout: Layout, per_copy: float) -> pd.DataFrame:
    """A row per (policy, step, layer, device)."""
    g = layout.ep_size
    step_i, layer_i, dev_i = (a.ravel() for a in np.meshgrid(window.steps, window.layers, np.arange(g), indexing="ij"))
    frames = []
    for policy, ev in evaluated.items():
        sent, recv, inter = ev.sent_SLG.ravel(), ev.recv_SLG.ravel(), ev.inter_SLG.ravel()
        frames.append(pd.DataFrame({
            "policy": policy, "step": step_i, "layer": layer_i, "device": dev_i, "node": dev_i // layout.gpus_per_node,
            "tokens": ev.tokens_SLG.ravel(), "balancedness": np.repeat(ev.bal_SL.ravel(), g),
            "overload": np.repeat(ev.over_SL.ravel(), g), "copies_sent": sent, "copies_recv": recv,
            "copies_sent_internode": inter, "bytes_sent": sent * per_copy,
            "bytes_recv": recv * per_copy, "bytes_sent_internode": inter * per_copy}))
    return pd.concat(frames, ignore_index=True)


def _per_layer(window: Window, evaluated: dict[str, Evaluated], per_copy: float) -> pd.DataFrame:
    """A row per (policy, layer): means over the window's steps (NaN steps left out), sums over devices."""
    rows = []
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer with no finite value gives NaN, as intended
        for policy, ev in evaluated.items():
            copies_SL = np.nansum(ev.sent_SLG, 2)
            sent_max_SL = np.nanmax(ev.sent_SLG, 2)
            inter_SL = np.nansum(ev.inter_SLG, 2)
            for li, layer in enumerate(window.layers.tolist()):
                rows.append((policy, layer, len(window.steps), np.nanmean(ev.bal_SL[:, li]), np.nanmin(ev.bal_SL[:, li]),
                             np.nanmean(ev.over_SL[:, li]), np.nanmax(ev.over_SL[:, li]), np.nanmean(copies_SL[:, li]),
                             np.nanmean(sent_max_SL[:, li]), np.nanmean(inter_SL[:, li])))
    out = pd.DataFrame(rows, columns=["policy", "layer", "steps", "balancedness", "balancedness_min", "overload",
                                      "overload_max", "copies_per_step", "sent_max", "internode"])
    out["bytes_per_step"] = out.copies_per_step * per_copy
    out["bytes_sent_max"] = out.pop("sent_max") * per_copy
    out["bytes_internode_per_step"] = out.pop("internode") * per_copy
    return out


# A placement is worth moving experts for when it balances the fit window this much better than the current one, or
# balances it as well (within this much) with this much less all-to-all traffic.
SUGGEST_GAIN = 0.01


def _beats(row, cur) -> bool:
    """Whether `row`'s placement gains on the current one's over the fit window (SUGGEST_GAIN)."""
    if row.policy == cur.policy:
        return False
    if row.balancedness_fit >= cur.balancedness_fit * (1 + SUGGEST_GAIN):
        return True
    fewer = row.copies_per_step_fit <= cur.copies_per_step_fit * (1 - SUGGEST_GAIN)
    return bool(row.balancedness_fit >= cur.balancedness_fit * (1 - SUGGEST_GAIN) and fewer)


def _summary(ev: pd.DataFrame, fit: pd.DataFrame, policies, current, placements, layers, layout: Layout) -> pd.DataFrame:
    fit = fit[["policy", "layer", "balancedness", "copies_per_step"]].rename(
        columns={"balancedness": "balancedness_fit", "copies_per_step": "copies_per_step_fit"})
    df = ev.merge(fit, on=["policy", "layer"], how="left")
    df["fit_eval_gap"] = df.balancedness_fit - df.balancedness
    hind = ev[ev.policy.str.endswith(HINDSIGHT)].assign(policy=lambda d: d.policy.str.removesuffix(HINDSIGHT))
    df = df.merge(hind[["policy", "layer", "balancedness"]].rename(columns={"balancedness": "balancedness_hindsight"}),
                  on=["policy", "layer"], how="left")
    df["balancedness_hindsight"] = df.balancedness_hindsight.fillna(df.balancedness)
    df["staleness"] = df.balancedness_hindsight - df.balancedness
    cur = df[df.policy == current].set_index("layer")
    df["current"] = current
    df["improvement"] = df.balancedness / df.layer.map(cur.balancedness)
    df["traffic_ratio"] = df.copies_per_step / df.layer.map(cur.copies_per_step)
    df["suggested"] = False
    for layer, grp in df[df.policy.isin([p for p in policies if p in LOAD_AWARE])].groupby("layer"):
        best = grp.balancedness_fit.max()
        near = grp[grp.balancedness_fit >= best * (1 - SUGGEST_GAIN) - 1e-12]
        pick = near.copies_per_step_fit.idxmin() if near.copies_per_step_fit.notna().any() else near.index[0]
        if layer not in cur.index or _beats(df.loc[pick], cur.loc[layer]):
            df.loc[pick, "suggested"] = True
    index = {layer: i for i, layer in enumerate(layers)}
    df["placement"] = [placements[p][index[layer]] for p, layer in zip(df.policy, df.layer)]
    df.insert(2, "ep_size", layout.ep_size)
    order = {p: i for i, p in enumerate(policies)}
    df = df[df.policy.isin(policies)]
    return df.sort_values(["layer", "policy"], key=lambda s: s.map(order) if s.name == "policy" else s).reset_index(drop=True)

