"""Serving engines' own routing captures into the store, as routing rows of a run.

Engines that run MoE layers inside CUDA graphs (where forward hooks do not fire) can
return the experts they routed to themselves. The formats are those of the engines'
main-branch sources (no release pinned): vLLM's `CompletionOutput.routed_experts`
(vllm/outputs.py), SGLang's `meta_info["routed_experts"]` (its routed-experts capturer's
`extract_routed_experts_from_meta_info`) and its expert-distribution recorder
(python/sglang/srt/eplb/expert_distribution.py at 02295fe):

- vLLM, `enable_return_routed_experts=True`: each `CompletionOutput.routed_experts` is an
  int array (positions, MoE layers, top-k) over the request's prompt and generated tokens
  (the last generated token was never fed back, so positions = prompt + output - 1).
  `vllm_captures(request_outputs)` reads RequestOutput objects; `read_vllm_npz` reads the
  arrays saved with np.savez as `routed_experts_<i>` (and optionally
  `prompt_token_ids_<i>`, `token_ids_<i>`) for request i.
- SGLang, `--enable-return-routed-experts` and `return_routed_experts=True`: the
  /generate response carries `meta_info["routed_experts"]`, base64 of the flat array in
  (position, layer, slot) order, int32 unless `meta_info["routed_experts_dtype"]` says
  otherwise. `read_sglang_jsonl` reads responses saved one JSON object per line.
- SGLang's expert-distribution recorder (`/dump_expert_distribution_record`): in "stat"
  mode a torch file holding `logical_count`, counts per (forward pass, layer, logical
  expert), with no per-token rows (`import_expert_distribution` stores per-step aggregates);
  in "per_token" mode per-pass records of token ids, positions and physical top-k ids
  (`read_sglang_per_token`, one step per forward pass).

Routing weights are not part of any of these: routing rows get weight NaN, the per-step
aggregates NaN router-probability and weight sums, and the run's config records
`{"import": {"engine": ..., "weights_known": false}}`. Slot 0 is the expert the engine
listed first (its top-1 after the engine's top-k sort). Expert ids below 0 (placeholders
for layers or slots without a routed expert) are skipped. One request is one step, numbered
on from the run's last step, so windows, the dashboard and alerts treat serving traffic
like training steps.
"""
from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from moescope.collector.store import Store, check_run_id
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING

ENGINES = ("vllm", "sglang")
_SGLANG_DTYPES = {"int32": np.int32, "int16": np.int16, "uint8": np.uint8, "uint16": np.uint16, "int64": np.int64}


class ImportFormatError(ValueError):
    """A capture file or object that is not what the named engine writes."""


@dataclass
class Capture:
    """One request's routed experts: ids (positions, MoE layers, top-k), with its token ids when known."""
    expert_ids_TLK: np.ndarray
    token_ids: list[int] | None = None   # the token at each routed position
    prompt_len: int | None = None        # positions before it are prefill, the rest decode
    seq_T: np.ndarray | None = None      # sequence of each position in a batch capture (default 0)
    pos_T: np.ndarray | None = None      # position within its sequence (default 0..T-1)
    phase: str | None = None             # one phase for every position, when prompt_len does not say


def _capture(expert_ids, token_ids=None, prompt_len=None, where: str = "capture") -> Capture:
    ids = np.asarray(expert_ids)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise ImportFormatError(f"{where}: routed experts must be an integer array (positions, layers, top_k), "
                                f"got shape {ids.shape} of {ids.dtype}")
    ids = ids.astype(np.int64)
    # Top-k experts of one token in one layer are distinct; a repeat means the array was split wrongly.
    sorted_TLK = np.sort(ids, axis=2)
    if ((sorted_TLK[..., 1:] == sorted_TLK[..., :-1]) & (sorted_TLK[..., 1:] >= 0)).any():
        raise ImportFormatError(f"{where}: an expert repeats within one token's top-k of a layer; "
                                f"the (positions, layers={ids.shape[1]}, top_k={ids.shape[2]}) split does not fit the capture")
    tokens = None if token_ids is None else [int(t) for t in token_ids][: ids.shape[0]]
    return Capture(ids, tokens, None if prompt_len is None else int(prompt_len))


# ------------------------------------------------------------------ vLLM
def vllm_captures(request_outputs) -> list[Capture]:
    """Captures from vLLM RequestOutput objects (each completion of each request is one capture)."""
    out = []
    for r, request in enumerate(request_outputs):
        prompt = list(getattr(request, "prompt_token_ids", None) or [])
        for c, completion in enumerate(getattr(request, "outputs", [])):
            ids = getattr(completion, "routed_experts", None)
            if ids is None:
                raise ImportFormatError(f"request {r} output {c} has no routed_experts: start vLLM with "
                                        "enable_return_routed_experts=True")
            tokens = prompt + list(getattr(completion, "token_ids", []) or []) if prompt else None
            out.append(_capture(ids, tokens, len(prompt) if prompt else None, f"request {r} output {c}"))
    return out


def read_vllm_npz(path: str | Path) -> list[Capture]:
    """Arrays saved with np.savez: routed_experts_<i> and optionally prompt_token_ids_<i>, token_ids_<i>."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImportFormatError(f"{path}: not a NumPy .npz archive ({exc})") from None
    with data:
        keys = sorted((int(k.rsplit("_", 1)[1]), k) for k in data.files if k.startswith("routed_experts_")
                      and k.rsplit("_", 1)[1].isdigit())
        if not keys:
            raise ImportFormatError(f"{path}: no routed_experts_<i> arrays")
        out = []
        for i, key in keys:
            prompt = data[f"prompt_token_ids_{i}"].tolist() if f"prompt_token_ids_{i}" in data.files else None
            generated = data[f"token_ids_{i}"].tolist() if f"token_ids_{i}" in data.files else []
            out.append(_capture(data[key], prompt + generated if prompt is not None else None,
                                len(prompt) if prompt is not None else None, f"{path}: {key}"))
    return out


# ------------------------------------------------------------------ SGLang
def sglang_capture(response: dict, *, top_k: int, num_layers: int | None = None, where: str = "response") -> Capture:
    """One /generate response (with return_routed_experts=True) as a Capture."""
    meta = response.get("meta_info") if isinstance(response, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("routed_experts"), str):
        raise ImportFormatError(f"{where}: no meta_info.routed_experts (base64): start SGLang with "
                                "--enable-return-routed-experts and send return_routed_experts=true")
    dtype = _SGLANG_DTYPES.get(meta.get("routed_experts_dtype") or "int32")
    if dtype is None:
        raise ImportFormatError(f"{where}: unknown routed_experts_dtype {meta.get('routed_experts_dtype')!r}")
    try:
        flat = np.frombuffer(base64.b64decode(meta["routed_experts"], validate=True), dtype=dtype)
    except ValueError as exc:
        raise ImportFormatError(f"{where}: routed_experts is not base64 of {np.dtype(dtype).name} ({exc})") from None
    prompt_len = meta.get("prompt_tokens")
    positions = None
    if num_layers is None:
        if not isinstance(prompt_len, int) or not isinstance(meta.get("completion_tokens"), int):
            raise ImportFormatError(f"{where}: pass num_layers, or keep meta_info prompt_tokens and completion_tokens")
        positions = max(prompt_len + meta["completion_tokens"] - 1, 1)
        num_layers = flat.size // (positions * top_k) if flat.size % (positions * top_k) == 0 else 0
    if num_layers <= 0 or flat.size % (num_layers * top_k):
        raise ImportFormatError(f"{where}: {flat.size} expert ids do not split into positions x {num_layers or '?'} "
                                f"layers x top_k {top_k}")
    tokens = response.get("output_ids")
    prompt_ids = response.get("input_ids") or meta.get("input_ids")
    token_ids = list(prompt_ids) + list(tokens or []) if prompt_ids else None
    return _capture(flat.reshape(-1, num_layers, top_k), token_ids, prompt_len if isinstance(prompt_len, int) else None,
                    where)


def read_sglang_jsonl(path: str | Path, *, top_k: int, num_layers: int | None = None) -> list[Capture]:
    """/generate responses saved one JSON object per line (a JSON list of them works too)."""
    text = Path(path).read_text()
    try:
        stripped = text.lstrip()
        responses = json.loads(stripped) if stripped.startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ImportFormatError(f"{path}: not JSON lines of SGLang responses ({exc})") from None
    if not responses:
        raise ImportFormatError(f"{path}: no responses")
    return [sglang_capture(r, top_k=top_k, num_layers=num_layers, where=f"{path}: response {i}")
            for i, r in enumerate(responses)]


def _load_dump(path: str | Path):
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code from a file
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ImportFormatError(f"{path}: not a torch file of SGLang's expert-distribution recorder ({exc})") from None


def read_sglang_per_token(path: str | Path) -> list[Capture]:
    """A "per_token"-mode recorder dump: one Capture per forward pass, physical expert ids mapped to logical ones.

    Each record holds the pass's input_ids, positions, extend_seq_lens (the sequences of a
    prefill pass; None in decode, where each token is its own sequence) and
    topk_ids_of_layer (layers, tokens, slots) padded with -1.
    """
    dump = _load_dump(path)
    if not isinstance(dump, dict) or not isinstance(dump.get("records"), list):
        raise ImportFormatError(f"{path}: no records (a 'per_token'-mode dump holds them)")
    to_logical_LP = np.asarray(dump["last_physical_to_logical_map"]) if dump.get("last_physical_to_logical_map") is not None else None
    out = []
    for i, rec in enumerate(sorted(dump["records"], key=lambda r: r.get("forward_pass_id", 0))):
        try:
            phys_LTK = np.asarray(rec["topk_ids_of_layer"]).astype(np.int64)
            input_ids, positions = list(rec["input_ids"]), np.asarray(rec["positions"], np.int64)
        except (KeyError, TypeError) as exc:
            raise ImportFormatError(f"{path}: record {i} lacks {exc}") from None
        ids_LTK = phys_LTK.copy()
        if to_logical_LP is not None:
            valid = phys_LTK >= 0
            layer_idx = np.broadcast_to(np.arange(phys_LTK.shape[0])[:, None, None], phys_LTK.shape)
            ids_LTK[valid] = to_logical_LP[layer_idx[valid], phys_LTK[valid]]
        width = int((ids_LTK >= 0).any(axis=(0, 1)).sum()) or 1  # the recorder pads slots past top_k with -1
        lens = rec.get("extend_seq_lens")
        seq_T = np.repeat(np.arange(len(lens)), lens) if lens else np.arange(len(input_ids))
        out.append(Capture(np.ascontiguousarray(ids_LTK[..., :width].transpose(1, 0, 2)), input_ids, None,
                           seq_T, positions, "prefill" if lens else "decode"))
    return out


def read_sglang_distribution(path: str | Path) -> np.ndarray:
    """logical_count (forward passes, layers, logical experts) of a "stat"-mode recorder dump."""
    dump = _load_dump(path)
    if not isinstance(dump, dict) or "logical_count" not in dump:
        found = sorted(dump) if isinstance(dump, dict) else type(dump).__name__
        raise ImportFormatError(f"{path}: no logical_count (a 'stat'-mode dump holds it; found {found})")
    count = dump["logical_count"].cpu().numpy()
    if count.ndim == 2:  # (layers, experts): one pass
        count = count[None]
    if count.ndim != 3:
        raise ImportFormatError(f"{path}: logical_count has shape {count.shape}, expected (passes, layers, experts)")
    return count.astype(np.int64)


# ------------------------------------------------------------------ into the store
def _next_step(store: Store, run: str) -> int:
    if run not in set(store.runs().run):
        return 0
    last = store.sql("SELECT max(step) AS last FROM expert_step WHERE run = ?", [run], run=run)["last"].iloc[0]
    return 0 if last is None or np.isnan(last) else int(last) + 1


def _meta(num_layers: int, num_experts: int, top_k: int, engine: str, checkpoint: str, step: int) -> dict:
    return {"layers": [{"layer": layer, "module_path": f"{engine}:moe_layer_{layer}", "num_experts": num_experts,
                        "top_k": top_k, "router_kind": f"imported-{engine}", "capacity_factor": None}
                       for layer in range(num_layers)],
            "checkpoints": [{"checkpoint": checkpoint, "step": step}],
            "run_config": {"import": {"engine": engine, "weights_known": False}}}


def _check(run: str, engine: str, num_experts: int, checkpoint: str) -> None:
    check_run_id(run)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 0 < num_experts < 2**15:
        raise ValueError(f"num_experts must be an int in 1..32767, got {num_experts!r}")
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError(f"checkpoint must be a non-empty string, got {checkpoint!r}")


def import_captures(store: Store, run: str, captures: list[Capture], *, num_experts: int, engine: str,
                    checkpoint: str = "serving", first_step: int | None = None, requests_per_frame: int = 256) -> int:
    """Store captures as routing rows (one step per request) and exact per-step aggregates; returns rows stored."""
    _check(run, engine, num_experts, checkpoint)
    if not captures:
        raise ValueError("no captures to import")
    shapes = {c.expert_ids_TLK.shape[1:] for c in captures}
    if len(shapes) != 1:
        raise ImportFormatError(f"captures disagree on (layers, top_k): {sorted(shapes)}")
    [(num_layers, top_k)] = shapes
    if not 0 < top_k <= num_experts:
        raise ImportFormatError(f"top_k {top_k} does not fit {num_experts} experts")
    for i, c in enumerate(captures):
        if c.expert_ids_TLK.size and c.expert_ids_TLK.max() >= num_experts:
            raise ImportFormatError(f"request {i} routes to expert {int(c.expert_ids_TLK.max())}, "
                                    f"but the model has {num_experts} experts (pass num_experts)")
    step0 = _next_step(store, run) if first_step is None else int(first_step)
    producer, stored = f"import-{engine}-{uuid.uuid4().hex[:12]}", 0
    chunks = [captures[i:i + requests_per_frame] for i in range(0, len(captures), requests_per_frame)]
    for seq, chunk in enumerate(chunks):
        base = step0 + seq * requests_per_frame
        routing, agg = [], []
        for j, cap in enumerate(chunk):
            r, a = _request_tables(run, checkpoint, base + j, cap, num_experts)
            routing.append(r)
            agg.append(a)
        tables = {"routing": pa.concat_tables(routing), "expert_step": pa.concat_tables(agg)}
        meta = _meta(num_layers, num_experts, top_k, engine, checkpoint, step0) if seq == 0 else {}
        frame = Frame(run=run, producer=producer, seq=seq, tables=tables, meta=meta, final=seq == len(chunks) - 1)
        store.write_frame(frame)
        stored += tables["routing"].num_rows
    return stored


def _request_tables(run: str, checkpoint: str, step: int, cap: Capture, num_experts: int) -> tuple[pa.Table, pa.Table]:
    ids_TLK = cap.expert_ids_TLK
    T, L, K = ids_TLK.shape
    pos_T = np.arange(T) if cap.pos_T is None else np.asarray(cap.pos_T)
    seq_T = np.zeros(T, np.int32) if cap.seq_T is None else np.asarray(cap.seq_T)
    phase_T = np.where(pos_T < cap.prompt_len, "prefill", "decode") if cap.prompt_len is not None else np.full(T, cap.phase)
    tokens_T = np.full(T, -1, dtype=np.int64)
    if cap.token_ids:
        n = min(T, len(cap.token_ids))
        tokens_T[:n] = cap.token_ids[:n]
    t_idx, l_idx, k_idx = np.nonzero(ids_TLK >= 0)
    n = len(t_idx)
    routing = pa.table({
        "run": pa.array([run] * n, pa.string()), "checkpoint": pa.array([checkpoint] * n, pa.string()),
        "step": pa.array(np.full(n, step), pa.int64()), "rank": pa.array(np.zeros(n, np.int32)),
        "microbatch": pa.array(np.zeros(n, np.int32)), "seq": pa.array(seq_T[t_idx].astype(np.int32)),
        "pos": pa.array(pos_T[t_idx].astype(np.int32)), "token_id": pa.array(tokens_T[t_idx].astype(np.int32)),
        "layer": pa.array(l_idx.astype(np.int16)), "slot": pa.array(k_idx.astype(np.int8)),
        "expert": pa.array(ids_TLK[t_idx, l_idx, k_idx].astype(np.int16)),
        "weight": pa.array(np.full(n, np.nan, np.float32)),  # engines do not return gate weights
        "dropped": pa.array(np.zeros(n, bool)), "domain": pa.nulls(n, pa.string()),
        "phase": pa.array(phase_T[t_idx], pa.string()), "probe_set": pa.nulls(n, pa.string()),
    }, schema=ROUTING)
    rows = []
    for phase in sorted({p for p in phase_T.tolist()}, key=str):
        in_phase_T = phase_T == phase if phase is not None else np.ones(T, bool)
        for layer in range(L):
            ids_TK = ids_TLK[in_phase_T, layer]
            valid_T = (ids_TK >= 0).any(1)
            load_E = np.bincount(ids_TK[ids_TK >= 0], minlength=num_experts)
            top1_E = np.bincount(ids_TK[:, 0][ids_TK[:, 0] >= 0], minlength=num_experts)
            for e in range(num_experts):  # every expert, so each (step, layer) group sums num_tokens to T
                rows.append((layer, e, int(valid_T.sum()), int(load_E[e]), int(top1_E[e]), phase))
    layer_R, expert_R, nt_R, load_R, top1_R, phase_R = zip(*rows)
    m = len(rows)
    agg = pa.table({
        "run": pa.array([run] * m, pa.string()), "checkpoint": pa.array([checkpoint] * m, pa.string()),
        "step": pa.array(np.full(m, step), pa.int64()), "rank": pa.array(np.zeros(m, np.int32)),
        "layer": pa.array(layer_R, pa.int16()), "expert": pa.array(expert_R, pa.int16()),
        "num_tokens": pa.array(nt_R, pa.int64()), "tokens": pa.array(load_R, pa.int64()),
        "dropped": pa.array(np.zeros(m, np.int64)), "top1": pa.array(top1_R, pa.int64()),
        "prob_sum": pa.array(np.full(m, np.nan)), "weight_sum": pa.array(np.full(m, np.nan)),
        "phase": pa.array(phase_R, pa.string()),
    }, schema=EXPERT_STEP)
    return routing, agg


def import_expert_distribution(store: Store, run: str, logical_count_PLE: np.ndarray, *, top_k: int,
                               checkpoint: str = "serving", first_step: int | None = None) -> int:
    """A "stat"-mode recorder dump as per-step aggregates (one step per non-empty forward pass); returns steps."""
    count_PLE = np.asarray(logical_count_PLE, dtype=np.int64)
    _check(run, "sglang", int(count_PLE.shape[-1]) if count_PLE.ndim == 3 else 0, checkpoint)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= count_PLE.shape[2]:
        raise ValueError(f"top_k must be an int in 1..{count_PLE.shape[2]}, got {top_k!r}")
    passes = np.nonzero(count_PLE.sum((1, 2)) > 0)[0]  # the circular buffer leaves unused passes at zero
    if not len(passes):
        raise ImportFormatError("the dump counts no routed tokens")
    _, L, E = count_PLE.shape
    step0 = _next_step(store, run) if first_step is None else int(first_step)
    steps_S = step0 + np.arange(len(passes))
    count_SLE = count_PLE[passes]
    s_idx, l_idx, e_idx = np.meshgrid(np.arange(len(passes)), np.arange(L), np.arange(E), indexing="ij")
    m = s_idx.size
    tokens_SL = count_SLE.sum(2) // top_k  # each token fills top_k slots of a layer
    agg = pa.table({
        "run": pa.array([run] * m, pa.string()), "checkpoint": pa.array([checkpoint] * m, pa.string()),
        "step": pa.array(steps_S[s_idx.ravel()], pa.int64()), "rank": pa.array(np.zeros(m, np.int32)),
        "layer": pa.array(l_idx.ravel().astype(np.int16)), "expert": pa.array(e_idx.ravel().astype(np.int16)),
        "num_tokens": pa.array(tokens_SL[s_idx.ravel(), l_idx.ravel()], pa.int64()),
        "tokens": pa.array(count_SLE.ravel(), pa.int64()), "dropped": pa.array(np.zeros(m, np.int64)),
        "top1": pa.array(np.zeros(m, np.int64)),  # the dump does not say which slot
        "prob_sum": pa.array(np.full(m, np.nan)), "weight_sum": pa.array(np.full(m, np.nan)),
        "phase": pa.nulls(m, pa.string()),
    }, schema=EXPERT_STEP)
    frame = Frame(run=run, producer=f"import-sglang-dist-{uuid.uuid4().hex[:12]}", seq=0,
                  tables={"expert_step": agg}, meta=_meta(L, E, top_k, "sglang", checkpoint, step0), final=True)
    store.write_frame(frame)
    return len(passes)
