"""The record contract (schema v1): one place, imported by every part.

Tables:
- routing      one row per (token, MoE layer, chosen slot)
- token_stats  one row per (token, MoE layer)
- expert_step  exact aggregates per (run, checkpoint, step, rank, layer, expert) for ALL
               tokens, even when per-token rows are sampled. Several rows may share a key
               (one per frame); readers always SUM.

Rollups (ROLLUPS) sum what the dashboard reads per token, so a page reads aggregates
instead of every token: the probe counts them over every token of a frame (meta
"rollups": true), and the store derives them from the per-token tables of frames that
arrive without. Several rows may share a key (one per frame); readers always SUM.
- token_step   per (run, checkpoint, step, rank, layer, phase): token count and the sums
               behind mean entropy, margin and z
- token_hist   the same key plus stat and bin: a log-bucketed histogram (a mergeable
               quantile sketch with relative accuracy SKETCH_ALPHA) of entropy, margin, z
- domain_step  per (…, layer, phase, domain, expert): routed assignments and top-1 tokens
- coact_step   per (…, layer, phase, expert_i, expert_j): tokens with both among their
               chosen experts (i = j counts the tokens with i)
- repeat_step  per (…, layer, phase): adjacent-position pairs and how many repeat
"""
from __future__ import annotations

import re

import pyarrow as pa

SCHEMA_VERSION = 1
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}")
# Frame ids name segment files: exactly a uuid4 in hex, nothing a path could be built from.
FRAME_ID = re.compile(r"[0-9a-f]{32}")

_CONTEXT = [
    pa.field("run", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
]
_TOKEN = [
    pa.field("microbatch", pa.int32(), nullable=False),
    pa.field("seq", pa.int32(), nullable=False),      # sequence index within the microbatch
    pa.field("pos", pa.int32(), nullable=False),      # position within the sequence
    pa.field("token_id", pa.int32(), nullable=False),  # -1 when unknown
    pa.field("layer", pa.int16(), nullable=False),
]
_DOMAIN = pa.field("domain", pa.string(), nullable=True)
# "prefill" / "decode" in serving, "train" / "eval" otherwise.
_PHASE = pa.field("phase", pa.string(), nullable=True)
# Rows of a probe-set replay name the probe set, and their `seq` is the sequence's index
# in it, so (probe_set, seq, pos) is one token in every checkpoint; null for other rows.
_PROBE_SET = pa.field("probe_set", pa.string(), nullable=True)

ROUTING = pa.schema(
    _CONTEXT
    + _TOKEN
    + [
        pa.field("slot", pa.int8(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("dropped", pa.bool_(), nullable=False),
        _DOMAIN,
        _PHASE,
        _PROBE_SET,
    ]
)

TOKEN_STATS = pa.schema(
    _CONTEXT
    + _TOKEN
    + [
        pa.field("entropy", pa.float32(), nullable=False),
        pa.field("logsumexp", pa.float32(), nullable=True),
        pa.field("margin", pa.float32(), nullable=False),
        _DOMAIN,
        _PHASE,
        _PROBE_SET,
    ]
)

EXPERT_STEP = pa.schema(
    _CONTEXT
    + [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("num_tokens", pa.int64(), nullable=False),  # T of the layer in this frame
        pa.field("tokens", pa.int64(), nullable=False),      # (token, slot) assignments, dropped included
        pa.field("dropped", pa.int64(), nullable=False),
        pa.field("top1", pa.int64(), nullable=False),        # tokens whose slot-0 expert this is
        pa.field("prob_sum", pa.float64(), nullable=False),  # Switch P_i numerator
        pa.field("weight_sum", pa.float64(), nullable=False),
        _PHASE,
    ]
)

TABLES: dict[str, pa.Schema] = {"routing": ROUTING, "token_stats": TOKEN_STATS, "expert_step": EXPERT_STEP}

# Rollup key: a frame's context, layer and phase (probe-set rows are rolled up with the rest).
_ROLLUP_KEY = _CONTEXT + [pa.field("layer", pa.int16(), nullable=False), _PHASE]
# Quantile sketch (DDSketch, Masson et al. 2019): value x > SKETCH_MIN falls in bin
# ceil(log_gamma x), gamma = (1 + a) / (1 - a); the bin's estimate 2 gamma^b / (gamma + 1)
# is within a relative a of every value in it. Values <= SKETCH_MIN share SKETCH_ZERO_BIN.
SKETCH_ALPHA = 0.02
SKETCH_GAMMA = (1 + SKETCH_ALPHA) / (1 - SKETCH_ALPHA)
SKETCH_MIN = 1e-6
SKETCH_ZERO_BIN = -32768
SKETCH_STATS = ("entropy", "margin", "z")
# token_step also holds each stat's exact quantiles over its rows, so a (step, layer) held
# in one row (one rank, one frame: the usual case) needs no sketch.
ROLLUP_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

ROLLUPS: dict[str, pa.Schema] = {
    "token_step": pa.schema(_ROLLUP_KEY + [
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("entropy_sum", pa.float64(), nullable=True),
        pa.field("margin_sum", pa.float64(), nullable=True),
        pa.field("z_tokens", pa.int64(), nullable=False),    # tokens with finite logsumexp
        pa.field("z_sum", pa.float64(), nullable=True),      # sum of logsumexp² over those
    ] + [pa.field(f"{stat}_p{round(q * 100):02d}", pa.float64(), nullable=True)
         for stat in SKETCH_STATS for q in ROLLUP_QUANTILES]),
    "token_hist": pa.schema(_ROLLUP_KEY + [
        pa.field("stat", pa.string(), nullable=False),       # one of SKETCH_STATS
        pa.field("bin", pa.int16(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
    ]),
    "domain_step": pa.schema(_ROLLUP_KEY + [
        pa.field("domain", pa.string(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("routed", pa.int64(), nullable=False),      # (token, slot) rows with this expert
        pa.field("top1", pa.int64(), nullable=False),        # of those, slot 0
    ]),
    "coact_step": pa.schema(_ROLLUP_KEY + [
        pa.field("expert_i", pa.int16(), nullable=False),
        pa.field("expert_j", pa.int16(), nullable=False),
        pa.field("together", pa.int64(), nullable=False),  # tokens with both among their chosen
    ]),
    "repeat_step": pa.schema(_ROLLUP_KEY + [
        pa.field("pairs", pa.int64(), nullable=False),       # adjacent positions both recorded
        pa.field("top1_repeat", pa.int64(), nullable=False),
        pa.field("topk_overlap", pa.int64(), nullable=False),
    ]),
}

# Everything the store keeps as segments: what frames carry, then what it derives.
STORED: dict[str, pa.Schema] = {**TABLES, **ROLLUPS}


# What a frame's meta["layers"] entry holds about one MoE layer (the store's `layers` table).
LAYER_FIELDS = ("layer", "module_path", "num_experts", "top_k", "router_kind", "capacity_factor")


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast `table` to the contract of `name`; raises SchemaError naming what is wrong.

    A missing nullable column (one added to the contract after the table was written)
    is filled with nulls, so older frames and segments still load.
    """
    schema = STORED.get(name)
    if schema is None:
        raise SchemaError(f"unknown table {name!r}; expected one of {sorted(STORED)}")
    for field in schema:
        if field.nullable and field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"table {name!r} is missing column(s) {missing}")
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        raise SchemaError(f"table {name!r} has unknown column(s) {extra}")
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"table {name!r} column {field.name!r} has nulls")
    # A dictionary of strings (a one-value column as a worker keeps it) stays one: same values, and
    # Parquet stores both alike; casting it would build the strings row by row.
    target = pa.schema([f.with_type(table.schema.field(f.name).type) if is_string_dictionary(table.schema.field(f.name).type)
                        and pa.types.is_string(f.type) else f for f in schema], metadata=schema.metadata)
    try:
        return table.select(schema.names).cast(target)
    except (pa.ArrowException, ValueError) as exc:
        raise SchemaError(f"table {name!r} does not match schema v{SCHEMA_VERSION}: {exc}") from None


def is_string_dictionary(t: pa.DataType) -> bool:
    return pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)


def plain_strings(table: pa.Table) -> pa.Table:
    """`table` with every dictionary-of-strings column as plain strings."""
    for i, f in enumerate(table.schema):
        if is_string_dictionary(f.type):
            table = table.set_column(i, f.with_type(pa.string()), table.column(i).cast(pa.string()))
    return table


class SchemaError(ValueError):
    """A frame or table that does not follow the record contract."""


def check_frame_id(frame_id: str) -> str:
    if not isinstance(frame_id, str) or not FRAME_ID.fullmatch(frame_id):
        raise SchemaError(f"invalid frame id {str(frame_id)[:80]!r}: must be 32 lowercase hex digits (a uuid4)")
    return frame_id


def check_run_id(run: str) -> str:
    """Run ids name directories and URL paths, so they are kept to a safe alphabet."""
    if not isinstance(run, str) or not RUN_ID.fullmatch(run):
        raise SchemaError(f"invalid run id {run!r}: use letters, digits and . _ : + - (at most 200, not starting with a symbol)")
    return run
