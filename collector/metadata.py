"""Relational metadata (SQLAlchemy): runs, checkpoints, layers, token texts, segments, probe sets, ledger, alerts.

SQLite file by default, PostgreSQL in production; the same code serves both.
"""
from __future__ import annotations

import time

from sqlalchemy import (
    JSON, BigInteger, Boolean, Column, Float, Integer, MetaData, String, Table, Text, UniqueConstraint, create_engine, event,
    inspect,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from moescope.token_texts import MAX_TEXT_CHARS

metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("run", String(200), primary_key=True),
    Column("created_at", Float, nullable=False, default=time.time),
    Column("config", JSON, nullable=True),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("run", String(200), primary_key=True),
    Column("checkpoint", String(200), primary_key=True),
    Column("step", Integer, nullable=True),
    Column("path", Text, nullable=True),
    Column("created_at", Float, nullable=False, default=time.time),
)

layers = Table(
    "layers", metadata,
    Column("run", String(200), primary_key=True),
    Column("layer", Integer, primary_key=True),
    Column("module_path", Text, nullable=False),
    Column("num_experts", Integer, nullable=False),
    Column("top_k", Integer, nullable=False),
    Column("router_kind", String(100), nullable=False),
    Column("capacity_factor", Float, nullable=True),
)

# Live Parquet segments. Readers take their file list from here, so a compaction that
# swaps many files for one is a single transaction and never double counts.
segments = Table(
    "segments", metadata,
    Column("path", String(500), primary_key=True),
    Column("run", String(200), nullable=False, index=True),
    Column("table_name", String(50), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("created_at", Float, nullable=False, default=time.time),
    Column("retired_at", Float, nullable=True, index=True),
)

# Named token sequences replayed through checkpoints; tokens live in `path` (Parquet,
# relative to the store root), identified by a hash of their content.
probe_sets = Table(
    "probe_sets", metadata,
    Column("name", String(200), primary_key=True),
    Column("created_at", Float, nullable=False, default=time.time),
    Column("sequences", Integer, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("source", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("path", String(500), nullable=False),
)

# The text of each token id a run's tokenizer gave (the first text stored wins), to show top tokens as text.
token_texts = Table(
    "token_texts", metadata,
    Column("run", String(200), primary_key=True),
    Column("token_id", Integer, primary_key=True),
    Column("text", String(MAX_TEXT_CHARS), nullable=False),
)

# Segments found unreadable (corrupt or missing files): out of every query, reported by `check`.
quarantined_segments = Table(
    "quarantined_segments", metadata,
    Column("path", String(500), primary_key=True),
    Column("run", String(200), nullable=False, index=True),
    Column("table_name", String(50), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("quarantined_at", Float, nullable=False, default=time.time),
)

ingest_ledger = Table(
    "ingest_ledger", metadata,
    Column("frame_id", String(64), primary_key=True),
    Column("run", String(200), nullable=False, index=True),
    Column("producer", String(200), nullable=False, index=True),
    Column("seq", Integer, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("final", Boolean, nullable=False, default=False),
    Column("stored_at", Float, nullable=False, default=time.time),
    UniqueConstraint("producer", "seq", name="uq_ledger_producer_seq"),
)

# Sequence numbers a producer reported it had to drop (spill budget exceeded).
dropped_frames = Table(
    "dropped_frames", metadata,
    Column("producer", String(200), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("run", String(200), nullable=False, index=True),
)

dead_letters = Table(
    "dead_letters", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(100), nullable=True, unique=True),
    Column("run", String(200), nullable=True, index=True),
    Column("producer", String(200), nullable=True),
    Column("seq", Integer, nullable=True),
    Column("reason", Text, nullable=False),
    Column("received_at", Float, nullable=False, default=time.time),
)

alert_rules = Table(
    "alert_rules", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("metric", String(100), nullable=False),
    Column("run", String(200), nullable=True),       # None: every run
    Column("layer", Integer, nullable=True),
    Column("expert", Integer, nullable=True),
    Column("comparison", String(4), nullable=False),  # > >= < <=
    Column("threshold", Float, nullable=False),
    Column("window_steps", Integer, nullable=False, default=50),
    Column("for_evaluations", Integer, nullable=False, default=1),  # how long it must hold
    Column("webhook", Text, nullable=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", Float, nullable=False, default=time.time),
    Column("aggregation", String(10), nullable=True),  # step | window | ema (None: window, rules from before)
    Column("ema_alpha", Float, nullable=True),
)

alert_events = Table(
    "alert_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("rule_id", Integer, nullable=False, index=True),
    Column("run", String(200), nullable=False),
    Column("layer", Integer, nullable=True),
    Column("state", String(20), nullable=False),  # firing | resolved
    Column("value", Float, nullable=True),
    Column("step", Integer, nullable=True),
    Column("evidence", JSON, nullable=True),
    Column("notified", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False, default=time.time),
    Column("attempts", Integer, nullable=True),  # webhook deliveries tried
)

# Where evaluation of each (rule, run) stands, so any process carries on where the last stopped.
alert_state = Table(
    "alert_state", metadata,
    Column("rule_id", Integer, primary_key=True),
    Column("run", String(200), primary_key=True),
    Column("last_step", BigInteger, nullable=True),  # the last step evaluated
    Column("streak", Integer, nullable=False, default=0),  # consecutive breaching steps
    Column("firing", Boolean, nullable=False, default=False),
    Column("ema", Float, nullable=True),  # the moving average so far (aggregation "ema")
    Column("updated_at", Float, nullable=False, default=time.time),
)

# Nullable columns added after a table's first release: create_all never alters an
# existing table, so make_engine adds them to an older database.
_ADDED_COLUMNS = {"alert_rules": ("aggregation", "ema_alpha"), "alert_events": ("attempts",)}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL: readers never block the writers
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    _add_columns(engine)
    return engine


def _add_columns(engine: Engine) -> None:
    insp = inspect(engine)
    for name, columns in _ADDED_COLUMNS.items():
        have = {c["name"] for c in insp.get_columns(name)}
        for col in (metadata.tables[name].c[c] for c in columns if c not in have):
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}")
            except DBAPIError as exc:  # another process added it first
                if "duplicate" not in str(exc).lower() and "already exists" not in str(exc).lower():
                    raise
