"""Host side of the probe: captured forwards -> Arrow tables -> frames.

Legend: B sequences, S positions, M mask length, T tokens of one router call, K slots,
E experts, N selected rows.

Runs on the probe's background thread, vectorised with numpy (no Python loop over
tokens). Per-token rows are sampled per sequence; expert_step aggregates are summed
for every token and are exact whatever the sampling or dropping of per-token rows.
"""
from __future__ import annotations

import logging
import socket
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moescope.frame import Frame, repeated_strings
from moescope.probe.capture import (AGG_DROPPED, AGG_NUM_TOKENS, AGG_PROB, AGG_TOKENS, AGG_TOP1, AGG_WEIGHT,
                                    CallTensors)
from moescope.probe.adapters.base import RouterSite
from moescope.probe.rollups import RollupAccumulator
from moescope.schema import EXPERT_STEP, LAYER_FIELDS, ROUTING, TOKEN_STATS, conform
from moescope.token_texts import TextRecorder

log = logging.getLogger("moescope.probe")


@dataclass
class SiteRecord:
    site: RouterSite
    agg_6E: torch.Tensor                 # host copy of the exact counts of this forward
    calls: list[CallTensors] | None      # host copies, None when per-token rows were dropped


@dataclass
class ForwardRecord:
    """One top-level forward, as handed from the hooks to the background thread."""

    checkpoint: str
    step: int
    rank: int
    microbatch: int
    phase: str
    domains: list | None
    batch: int
    length: int
    pos_offset: int
    input_ids_BS: torch.Tensor | None
    mask_BM: torch.Tensor | None
    cache_position_S: torch.Tensor | None
    sites: list[SiteRecord] = field(default_factory=list)
    events: list = field(default_factory=list)
    reserved_bytes: int = 0
    probe_set: str | None = None  # probe-set rows: seq becomes probe_first + the index in the batch
    probe_first: int = 0


def default_producer(rank: int) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-r{rank}-{uuid.uuid4().hex[:8]}"


def layer_meta(site: RouterSite) -> dict[str, Any]:
    return {name: getattr(site, name) for name in LAYER_FIELDS}


def keep_sequences(seed: int, step: int, rank: int, microbatch: int, batch: int, rate: float) -> np.ndarray:
    """Deterministic per-sequence sampling: a splitmix64 hash of (seed, step, rank, microbatch, seq)."""
    if rate >= 1.0:
        return np.ones(batch, dtype=bool)
    if rate <= 0.0:
        return np.zeros(batch, dtype=bool)
    with np.errstate(over="ignore"):
        x = (np.arange(batch, dtype=np.uint64)
             + np.uint64((seed * 1_000_003 + step * 8191 + rank * 131 + microbatch) & 0xFFFFFFFFFFFF) * np.uint64(0x100000001B3))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < rate


def _strings(values: list, index: np.ndarray) -> pa.Array:
    """A string column from a small dictionary and per-row indices (-1 = null), without Python loops.

    The columns holding one value (run, checkpoint, phase) or none (probe_set) skip pyarrow's
    dictionary cast, which cost the probe's thread ~0.5 ms per column of 16k rows.
    """
    valid = index >= 0
    if not valid.any():
        return pa.nulls(index.size, pa.string())
    if len(values) == 1 and valid.all():
        column = repeated_strings(str(values[0]), index.size)
        if column is not None:
            return column
    return pa.array(values, pa.string()).take(pa.array(index.astype(np.int32), mask=~valid))


class TokenMap:
    """seq / pos / token_id / validity of each of the T tokens a router saw in one forward."""

    def __init__(self, rec: ForwardRecord):
        b, s = rec.batch, rec.length
        self.batch = b
        self.seq_T = np.repeat(np.arange(b, dtype=np.int32), s)
        if rec.mask_BM is not None:
            mask_BM = rec.mask_BM.numpy() != 0
            m = mask_BM.shape[1]
            # Positions count real tokens, so left padding and decode steps (mask covers
            # the cache) both give the token's position in its own sequence.
            pos_BS = np.cumsum(mask_BM, axis=1)[:, m - s:] - 1
            self.valid_T = mask_BM[:, m - s:].reshape(-1)
        else:
            if rec.cache_position_S is not None:
                pos_S = rec.cache_position_S.numpy().astype(np.int64)
            else:
                pos_S = np.arange(s) + rec.pos_offset
            pos_BS = np.broadcast_to(pos_S, (b, s))
            self.valid_T = np.ones(b * s, dtype=bool)
        self.pos_T = np.ascontiguousarray(pos_BS, dtype=np.int32).reshape(-1)
        if rec.input_ids_BS is not None:
            self.tok_T = rec.input_ids_BS.numpy().astype(np.int32).reshape(-1)
        else:
            self.tok_T = np.full(b * s, -1, dtype=np.int32)

    def for_tokens(self, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if tokens == self.seq_T.size:
            return self.seq_T, self.pos_T, self.tok_T, self.valid_T
        real = np.flatnonzero(self.valid_T)
        if tokens == real.size:  # the model routed only the real (unpadded) tokens, in order
            return self.seq_T[real], self.pos_T[real], self.tok_T[real], np.ones(tokens, dtype=bool)
        return (np.zeros(tokens, np.int32), np.arange(tokens, dtype=np.int32), np.full(tokens, -1, np.int32),
                np.ones(tokens, dtype=bool))


class Framer:
    """Accumulates forwards into pending tables and cuts numbered frames."""

    def __init__(self, run: str, producer: str, sites: list[RouterSite], sample_rate: float, seed: int = 0,
                 run_config: dict | None = None, tokenizer: Any = None):
        self._texts = TextRecorder(tokenizer) if tokenizer is not None else None  # TypeError on a wrong object
        self.run, self.producer, self.sample_rate, self.seed = run, producer, float(sample_rate), seed
        self.next_seq = 0
        self._routing: list[pa.Table] = []
        self._token_stats: list[pa.Table] = []
        self._expert: dict[tuple, np.ndarray] = {}
        self._rollups = RollupAccumulator()
        self._experts_of: dict[int, int] = {}
        self._layers_to_send = [layer_meta(s) for s in sites]
        self._checkpoints: list[dict] = []
        self._run_config = run_config
        self._warned_domains = False
        self.pending_rows = 0
        self.pending_bytes = 0

    def add_checkpoint(self, checkpoint: str, step: int | None, path: str | None = None) -> None:
        self._checkpoints.append({"checkpoint": checkpoint, "step": step, "path": path})

    def add(self, rec: ForwardRecord) -> int:
        """Fold one forward in; returns the per-token rows it added."""
        for sr in rec.sites:
            agg_6E = sr.agg_6E.numpy()
            key = (rec.checkpoint, rec.step, rec.rank, rec.phase, sr.site.layer)
            acc = self._expert.get(key)
            self._expert[key] = agg_6E.copy() if acc is None else acc + agg_6E
            self._experts_of[sr.site.layer] = agg_6E.shape[1]
        if not any(sr.calls for sr in rec.sites):
            return 0
        tokens = TokenMap(rec)
        keep_B = keep_sequences(self.seed, rec.step, rec.rank, rec.microbatch, rec.batch, self.sample_rate)
        domain_values, domain_B = self._domains(rec)
        routing, stats = [], []
        for sr in rec.sites:
            key = (rec.checkpoint, rec.step, rec.rank, rec.phase, sr.site.layer)
            for call in sr.calls or ():
                self._roll_up(key, call, tokens, domain_values, domain_B)
                chunk = self._call_columns(call, sr.site.layer, tokens, keep_B, domain_B)
                if chunk is not None:
                    routing.append(chunk[0])
                    stats.append(chunk[1])
        if not routing:
            return 0
        if self._texts is not None:
            self._texts.add(np.concatenate([p["token_id"] for p in routing]))
        added = 0
        for parts, schema, sink in ((routing, ROUTING, self._routing), (stats, TOKEN_STATS, self._token_stats)):
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            n = cols["seq"].size
            dom = cols.pop("domain_idx")
            if rec.probe_set is not None:
                cols["seq"] = cols["seq"] + np.int32(rec.probe_first)
            table = pa.table({
                "run": _strings([self.run], np.zeros(n, np.int32)),
                "checkpoint": _strings([rec.checkpoint], np.zeros(n, np.int32)),
                "step": pa.array(np.full(n, rec.step, np.int64)),
                "rank": pa.array(np.full(n, rec.rank, np.int32)),
                "microbatch": pa.array(np.full(n, rec.microbatch, np.int32)),
                **{k: pa.array(v) for k, v in cols.items()},
                "domain": _strings(domain_values, dom),
                "phase": _strings([rec.phase], np.zeros(n, np.int32)),
                "probe_set": (_strings([rec.probe_set], np.zeros(n, np.int32)) if rec.probe_set is not None
                              else pa.nulls(n, pa.string())),
            })
            table = table.select(schema.names).cast(schema)
            sink.append(table)
            self.pending_bytes += table.nbytes
            added += n
        self.pending_rows += added
        return added

    def _domains(self, rec: ForwardRecord) -> tuple[list, np.ndarray]:
        if not rec.domains:
            return [], np.full(rec.batch, -1, np.int64)
        if len(rec.domains) != rec.batch and not self._warned_domains:
            self._warned_domains = True
            log.warning("moescope probe: set_domains got %d labels for a batch of %d sequences; unmatched sequences get no domain",
                        len(rec.domains), rec.batch)
        values = sorted({str(d) for d in rec.domains if d is not None})
        lookup = {v: i for i, v in enumerate(values)}
        domain_B = np.full(rec.batch, -1, np.int64)
        for i, d in enumerate(rec.domains[: rec.batch]):  # one entry per sequence, not per token
            if d is not None:
                domain_B[i] = lookup[str(d)]
        return values, domain_B

    def _roll_up(self, key, call: CallTensors, tokens: TokenMap, domain_values, domain_B) -> None:
        ids_TK = call.expert_ids_TK.numpy()
        seq_T, pos_T, _, valid_T = tokens.for_tokens(ids_TK.shape[0])
        self._rollups.add_call(key, ids_TK, call.stats_T3.numpy(), seq_T, pos_T, valid_T,
                               domain_B[np.minimum(seq_T, tokens.batch - 1)], domain_values,
                               self._experts_of.get(key[-1], 0))

    @staticmethod
    def _call_columns(call: CallTensors, layer: int, tokens: TokenMap, keep_B, domain_B):
        ids_TK = call.expert_ids_TK.numpy()
        t, k = ids_TK.shape
        seq_T, pos_T, tok_T, valid_T = tokens.for_tokens(t)
        seq_in_batch = np.minimum(seq_T, tokens.batch - 1)
        rows = np.flatnonzero(valid_T & keep_B[seq_in_batch])
        if rows.size == 0:
            return None
        stats = call.stats_T3.numpy()[rows]
        dom = domain_B[seq_in_batch[rows]]
        token_cols = {"seq": seq_T[rows], "pos": pos_T[rows], "token_id": tok_T[rows],
                      "layer": np.full(rows.size, layer, np.int16)}
        lse = stats[:, 1]
        token_stats = {**token_cols, "entropy": stats[:, 0], "logsumexp": pa.array(lse, mask=np.isnan(lse)),
                       "margin": stats[:, 2], "domain_idx": dom}
        ids_NK = ids_TK[rows]
        r, slot = np.nonzero(ids_NK >= 0)  # empty slots (expert-choice) are not routing decisions
        dropped = call.dropped_TK.numpy()[rows][r, slot] if call.dropped_TK is not None else np.zeros(r.size, bool)
        routing = {**{c: v[r] for c, v in token_cols.items()}, "slot": slot.astype(np.int8),
                   "expert": ids_NK[r, slot].astype(np.int16), "weight": call.weights_TK.numpy()[rows][r, slot],
                   "dropped": dropped, "domain_idx": dom[r]}
        return routing, token_stats

    def expert_table(self) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in EXPERT_STEP.names}
        for (checkpoint, step, rank, phase, layer), agg_6E in self._expert.items():
            e = agg_6E.shape[1]
            cols["run"] += [self.run] * e
            cols["checkpoint"] += [checkpoint] * e
            cols["step"] += [step] * e
            cols["rank"] += [rank] * e
            cols["layer"] += [layer] * e
            cols["expert"] += list(range(e))
            cols["num_tokens"] += np.rint(agg_6E[AGG_NUM_TOKENS]).astype(np.int64).tolist()
            cols["tokens"] += np.rint(agg_6E[AGG_TOKENS]).astype(np.int64).tolist()
            cols["dropped"] += np.rint(agg_6E[AGG_DROPPED]).astype(np.int64).tolist()
            cols["top1"] += np.rint(agg_6E[AGG_TOP1]).astype(np.int64).tolist()
            cols["prob_sum"] += agg_6E[AGG_PROB].tolist()
            cols["weight_sum"] += agg_6E[AGG_WEIGHT].tolist()
            cols["phase"] += [phase] * e
        return pa.table(cols, schema=EXPERT_STEP)

    def give_back_texts(self, frame: Frame) -> None:
        """The token texts of a frame the sink did not take go with the next frame."""
        if self._texts is not None:
            self._texts.give_back(frame.meta.get("token_texts", []))

    def emit(self, *, final: bool = False, dropped_seqs: list[int] | None = None, extra_meta: dict | None = None) -> Frame:
        """Cut the pending data into the next frame (its seq is this producer's next number)."""
        tables = {
            "routing": conform("routing", pa.concat_tables(self._routing)) if self._routing else ROUTING.empty_table(),
            "token_stats": conform("token_stats", pa.concat_tables(self._token_stats)) if self._token_stats else TOKEN_STATS.empty_table(),
            "expert_step": self.expert_table(),
            **self._rollups.tables(self.run),
        }
        # The store derives rollups for frames that do not say they carry them.
        meta: dict[str, Any] = {"rollups": True}
        if self._layers_to_send:
            meta["layers"] = self._layers_to_send
        if self._checkpoints:
            meta["checkpoints"] = self._checkpoints
        if self._run_config is not None and self.next_seq == 0:
            meta["run_config"] = self._run_config
        texts = self._texts.take() if self._texts is not None else []
        if texts:
            meta["token_texts"] = texts
        if extra_meta:
            meta.update(extra_meta)
        frame = Frame(run=self.run, producer=self.producer, seq=self.next_seq, tables=tables,
                      dropped_seqs=list(dropped_seqs or []), meta=meta, final=final)
        self.next_seq += 1
        self._routing, self._token_stats, self._expert = [], [], {}
        self._layers_to_send, self._checkpoints = [], []
        self.pending_rows = 0
        self.pending_bytes = 0
        return frame
