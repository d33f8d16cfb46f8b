"""The store: immutable Parquet segments queried by DuckDB, plus the metadata DB.

One class owns reading and writing. Any number of processes may write (each frame
becomes its own atomically renamed segment files, recorded in one metadata
transaction together with the ledger row) and any number may read (each query opens a
private in-memory DuckDB over the live segment list), so nobody ever holds a DuckDB
file lock.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from moescope.collector import metadata as md
from moescope.frame import Frame
from moescope.schema import TABLES, check_run_id

# Fresh per-frame segments are written fast (ingest is bound by this write); compaction
# rewrites them at a higher level once they are cold.
_INGEST_PARQUET_KW = {"compression": "zstd", "compression_level": 1}
_COMPACT_PARQUET_KW = {"compression": "zstd", "compression_level": 3}
# Compacted files are written in row groups of about this many rows (small frames merged).
ROW_GROUP_ROWS = 256_000
# Retired segment files stay on disk this long so queries that listed them still finish.
RETIRE_GRACE_S = 120.0


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says why."""


class UnknownRun(StoreError):
    pass


class Store:
    def __init__(self, root: str | os.PathLike, database_url: str | None = None, *, create: bool = True):
        self.root = Path(root).expanduser().absolute()
        if create:
            try:
                (self.root / "segments").mkdir(parents=True, exist_ok=True)
                probe = self.root / f".write-test-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise StoreError(f"store directory {str(self.root)!r} is not writable: {exc.strerror or exc}") from None
        elif not self.root.is_dir():
            raise StoreError(f"no store at {str(self.root)!r}")
        self.database_url = database_url or os.environ.get("MOESCOPE_DATABASE_URL") or f"sqlite:///{self.root / 'meta.sqlite'}"
        self.engine = _engine_with_retry(self.database_url)

    # ---------------------------------------------------------------- writing
    def write_frame(self, frame: Frame) -> bool:
        """Store a frame exactly once. Returns False when it was already stored."""
        check_run_id(frame.run)
        if self.has_frame(frame.frame_id):
            return False
        run_dir = f"run={frame.run}"
        written = []
        for name, table in frame.tables.items():
            if table.num_rows == 0:
                continue
            rel = f"segments/{name}/{run_dir}/{frame.frame_id}.parquet"
            _atomic_write_parquet(table, self.root / rel)
            written.append({"path": rel, "run": frame.run, "table_name": name, "rows": table.num_rows, "created_at": time.time()})
        try:
            with self.engine.begin() as conn:
                self._register_meta(conn, frame)
                conn.execute(insert(md.ingest_ledger).values(
                    frame_id=frame.frame_id, run=frame.run, producer=frame.producer, seq=frame.seq,
                    rows=frame.rows, final=frame.final, stored_at=time.time()))
                if written:
                    conn.execute(insert(md.segments), written)
                for seq in frame.dropped_seqs:
                    if not conn.execute(select(md.dropped_frames.c.seq).where(
                            md.dropped_frames.c.producer == frame.producer, md.dropped_frames.c.seq == seq)).first():
                        conn.execute(insert(md.dropped_frames).values(producer=frame.producer, seq=seq, run=frame.run))
        except IntegrityError:
            # Another writer stored the same frame first (same uuid, or same producer+seq).
            return False
        return True

    def _register_meta(self, conn, frame: Frame) -> None:
        if not conn.execute(select(md.runs.c.run).where(md.runs.c.run == frame.run)).first():
            try:
                with conn.begin_nested():
                    conn.execute(insert(md.runs).values(run=frame.run, created_at=time.time(), config=frame.meta.get("run_config")))
            except IntegrityError:
                pass
        for layer in frame.meta.get("layers", []):
            key = (md.layers.c.run == frame.run) & (md.layers.c.layer == int(layer["layer"]))
            if not conn.execute(select(md.layers.c.layer).where(key)).first():
                try:
                    with conn.begin_nested():
                        conn.execute(insert(md.layers).values(run=frame.run, **{k: layer.get(k) for k in (
                            "layer", "module_path", "num_experts", "top_k", "router_kind", "capacity_factor")}))
                except IntegrityError:
                    pass
        for ckpt in frame.meta.get("checkpoints", []):
            self._upsert_checkpoint(conn, frame.run, ckpt["checkpoint"], ckpt.get("step"), ckpt.get("path"))

    def _upsert_checkpoint(self, conn, run, checkpoint, step, path) -> None:
        key = (md.checkpoints.c.run == run) & (md.checkpoints.c.checkpoint == checkpoint)
        if conn.execute(select(md.checkpoints.c.run).where(key)).first():
            values = {k: v for k, v in (("step", step), ("path", path)) if v is not None}
            if values:
                conn.execute(update(md.checkpoints).where(key).values(**values))
            return
        try:
            with conn.begin_nested():
                conn.execute(insert(md.checkpoints).values(run=run, checkpoint=checkpoint, step=step, path=path, created_at=time.time()))
        except IntegrityError:
            pass

    def add_checkpoint(self, run: str, checkpoint: str, step: int | None = None, path: str | None = None) -> None:
        check_run_id(run)
        with self.engine.begin() as conn:
            if not conn.execute(select(md.runs.c.run).where(md.runs.c.run == run)).first():
                conn.execute(insert(md.runs).values(run=run, created_at=time.time()))
            self._upsert_checkpoint(conn, run, checkpoint, step, path)

    def record_dead_letter(self, reason: str, *, message_id: str | None = None, run=None, producer=None, seq=None) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(md.dead_letters).values(
                    message_id=message_id, run=run, producer=producer, seq=seq, reason=reason[:2000], received_at=time.time()))
        except IntegrityError:
            pass  # already recorded (redelivered message)

    # ---------------------------------------------------------------- reading
    def has_frame(self, frame_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(md.ingest_ledger.c.frame_id).where(md.ingest_ledger.c.frame_id == frame_id)).first() is not None

    def runs(self) -> pd.DataFrame:
        """One row per run: checkpoints, layers, frames, routing rows, last write."""
        with self.engine.connect() as conn:
            base = pd.DataFrame(conn.execute(select(md.runs.c.run, md.runs.c.created_at).order_by(md.runs.c.created_at)).all(),
                                columns=["run", "created_at"])
            ck = dict(conn.execute(select(md.checkpoints.c.run, func.count()).group_by(md.checkpoints.c.run)).all())
            ly = dict(conn.execute(select(md.layers.c.run, func.count()).group_by(md.layers.c.run)).all())
            fr = {r: (n, last) for r, n, last in conn.execute(select(
                md.ingest_ledger.c.run, func.count(), func.max(md.ingest_ledger.c.stored_at)).group_by(md.ingest_ledger.c.run)).all()}
            rows = dict(conn.execute(select(md.segments.c.run, func.sum(md.segments.c.rows)).where(
                md.segments.c.table_name == "routing", md.segments.c.retired_at.is_(None)).group_by(md.segments.c.run)).all())
        base["checkpoints"] = [ck.get(r, 0) for r in base.run]
        base["layers"] = [ly.get(r, 0) for r in base.run]
        base["frames"] = [fr.get(r, (0, None))[0] for r in base.run]
        base["routing_rows"] = [int(rows.get(r) or 0) for r in base.run]
        base["last_write"] = [fr.get(r, (0, None))[1] for r in base.run]
        return base

    def require_run(self, run: str) -> str:
        with self.engine.connect() as conn:
            if conn.execute(select(md.runs.c.run).where(md.runs.c.run == run)).first() is None:
                known = [r for (r,) in conn.execute(select(md.runs.c.run).order_by(md.runs.c.created_at.desc()).limit(5))]
                hint = f"; recorded runs include {', '.join(known)}" if known else "; the store has no runs yet"
                raise UnknownRun(f"unknown run {run!r} in store {str(self.root)!r}{hint}")
        return run

    def checkpoints(self, run: str) -> pd.DataFrame:
        self.require_run(run)
        with self.engine.connect() as conn:
            rows = conn.execute(select(md.checkpoints.c.checkpoint, md.checkpoints.c.step, md.checkpoints.c.path,
                                       md.checkpoints.c.created_at).where(md.checkpoints.c.run == run)
                                .order_by(md.checkpoints.c.step, md.checkpoints.c.created_at)).all()
        return pd.DataFrame(rows, columns=["checkpoint", "step", "path", "created_at"])

    def layers(self, run: str) -> pd.DataFrame:
        self.require_run(run)
        with self.engine.connect() as conn:
            rows = conn.execute(select(md.layers).where(md.layers.c.run == run).order_by(md.layers.c.layer)).all()
        return pd.DataFrame(rows, columns=[c.name for c in md.layers.columns])

    def segment_paths(self, table: str, run: str | None = None) -> list[str]:
        q = select(md.segments.c.path).where(md.segments.c.table_name == table, md.segments.c.retired_at.is_(None))
        if run is not None:
            q = q.where(md.segments.c.run == run)
        with self.engine.connect() as conn:
            return [str(self.root / p) for (p,) in conn.execute(q.order_by(md.segments.c.path))]

    def connect(self, run: str | None = None) -> duckdb.DuckDBPyConnection:
        """A private in-memory DuckDB with views routing / token_stats / expert_step.

        Scoped to one run when given (only that run's segments are opened).
        """
        con = duckdb.connect(":memory:")
        for name, schema in TABLES.items():
            paths = self.segment_paths(name, run)
            if paths:
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_list(paths)}, union_by_name=true)")
            else:
                con.register(f"_empty_{name}", schema.empty_table())
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM _empty_{name}")
        return con

    def sql(self, query: str, params: Sequence[Any] | dict | None = None, *, run: str | None = None) -> pd.DataFrame:
        con = self.connect(run)
        try:
            return con.execute(query, params or []).df()
        finally:
            con.close()

    def arrow(self, query: str, params: Sequence[Any] | dict | None = None, *, run: str | None = None) -> pa.Table:
        con = self.connect(run)
        try:
            return con.execute(query, params or []).fetch_arrow_table()
        finally:
            con.close()

    def metric(self, name: str, run: str, **kwargs) -> pd.DataFrame:
        """A routing metric of METRICS.md by name, e.g. store.metric("maxvio", run="r", layers=[3])."""
        from moescope.analysis import compute_metric

        self.require_run(run)
        return compute_metric(self, name, run=run, **kwargs)

    # ---------------------------------------------------------------- ledger
    def ledger(self, run: str) -> pd.DataFrame:
        """Per producer: frames sent, stored, dead-lettered, dropped, and missing sequence numbers."""
        self.require_run(run)
        with self.engine.connect() as conn:
            stored = conn.execute(select(md.ingest_ledger.c.producer, md.ingest_ledger.c.seq, md.ingest_ledger.c.final)
                                  .where(md.ingest_ledger.c.run == run)).all()
            dropped = conn.execute(select(md.dropped_frames.c.producer, md.dropped_frames.c.seq).where(md.dropped_frames.c.run == run)).all()
            dead = conn.execute(select(md.dead_letters.c.producer, md.dead_letters.c.seq)
                                .where(md.dead_letters.c.run == run, md.dead_letters.c.producer.is_not(None))).all()
        producers: dict[str, dict[str, Any]] = {}
        for producer, seq, final in stored:
            p = producers.setdefault(producer, {"stored": set(), "dropped": set(), "dead": set(), "sent": None})
            p["stored"].add(seq)
            if final:  # a close trailer may follow the final frame: the largest one counts
                p["sent"] = max(p["sent"] or 0, seq + 1)
        for producer, seq in dropped:
            producers.setdefault(producer, {"stored": set(), "dropped": set(), "dead": set(), "sent": None})["dropped"].add(seq)
        for producer, seq in dead:
            if seq is not None:
                producers.setdefault(producer, {"stored": set(), "dropped": set(), "dead": set(), "sent": None})["dead"].add(seq)
        out = []
        for producer, p in sorted(producers.items()):
            accounted = p["stored"] | p["dropped"] | p["dead"]
            sent = p["sent"] if p["sent"] is not None else (max(accounted) + 1 if accounted else 0)
            missing = sorted(set(range(sent)) - accounted)
            out.append({"producer": producer, "sent": sent, "stored": len(p["stored"]), "dead_lettered": len(p["dead"] - p["stored"]),
                        "dropped": len(p["dropped"] - p["stored"]), "missing": len(missing), "missing_seqs": missing[:20],
                        "closed": p["sent"] is not None})
        return pd.DataFrame(out, columns=["producer", "sent", "stored", "dead_lettered", "dropped", "missing", "missing_seqs", "closed"])

    # ---------------------------------------------------------------- maintenance
    def compact(self, run: str | None = None, *, min_files: int = 8, target_rows: int = 4_000_000) -> int:
        """Merge small live segments of each (table, run) into larger ones. Returns files retired."""
        retired = 0
        with self.engine.connect() as conn:
            groups = conn.execute(select(md.segments.c.table_name, md.segments.c.run, func.count())
                                  .where(md.segments.c.retired_at.is_(None), *( [md.segments.c.run == run] if run else []))
                                  .group_by(md.segments.c.table_name, md.segments.c.run)).all()
        for table_name, grun, count in groups:
            if count < min_files:
                continue
            with self.engine.connect() as conn:
                rows = conn.execute(select(md.segments.c.path, md.segments.c.rows).where(
                    md.segments.c.table_name == table_name, md.segments.c.run == grun, md.segments.c.retired_at.is_(None),
                    md.segments.c.rows < target_rows).order_by(md.segments.c.created_at)).all()
            batch, total = [], 0
            for path, n in rows:
                batch.append(path)
                total += n
                if total >= target_rows:
                    break
            if len(batch) < 2:
                continue
            try:
                retired += self._merge(table_name, grun, batch)
            except _Abort:
                pass
        self.sweep()
        return retired

    def _merge(self, table_name: str, run: str, paths: list[str]) -> int:
        rel = f"segments/{table_name}/run={run}/c-{uuid.uuid4().hex}.parquet"
        # One input segment in memory at a time: compaction must not grow the worker.
        rows = _atomic_write_parquet_parts((pq.read_table(self.root / p).cast(TABLES[table_name]) for p in paths),
                                           TABLES[table_name], self.root / rel, _COMPACT_PARQUET_KW)
        now = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(update(md.segments).where(md.segments.c.path.in_(paths), md.segments.c.retired_at.is_(None))
                               .values(retired_at=now))
            if res.rowcount != len(paths):  # someone else compacted these concurrently
                conn.rollback()
                (self.root / rel).unlink(missing_ok=True)
                raise _Abort()
            conn.execute(insert(md.segments).values(path=rel, run=run, table_name=table_name, rows=rows, created_at=now))
        return len(paths)

    def sweep(self, grace_s: float = RETIRE_GRACE_S) -> int:
        """Delete files of segments retired more than `grace_s` ago."""
        cutoff = time.time() - grace_s
        with self.engine.connect() as conn:
            old = [p for (p,) in conn.execute(select(md.segments.c.path).where(md.segments.c.retired_at < cutoff))]
        for p in old:
            try:
                (self.root / p).unlink()
            except FileNotFoundError:
                pass
        if old:
            with self.engine.begin() as conn:
                conn.execute(delete(md.segments).where(md.segments.c.path.in_(old)))
        return len(old)

    def delete_run(self, run: str) -> None:
        """Remove a run: its metadata in one transaction, then its segment and checkpoint files."""
        self.require_run(run)
        with self.engine.begin() as conn:
            paths = [p for (p,) in conn.execute(select(md.segments.c.path).where(md.segments.c.run == run))]
            for table in (md.segments, md.ingest_ledger, md.dropped_frames, md.dead_letters, md.checkpoints, md.layers,
                          md.alert_events, md.runs):
                conn.execute(delete(table).where(table.c.run == run))
        # Files go after the commit: a reader holding the old list may fail once, never double count.
        for p in paths:
            (self.root / p).unlink(missing_ok=True)
        for folder in [self.root / "segments" / name / f"run={run}" for name in TABLES] + [self.root / "checkpoints" / run]:
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def delete_runs_before(self, cutoff: float) -> int:
        """Delete every run whose last write (or creation, if it never wrote) is older than `cutoff` (epoch s)."""
        with self.engine.connect() as conn:
            last = dict(conn.execute(select(md.ingest_ledger.c.run, func.max(md.ingest_ledger.c.stored_at))
                                     .group_by(md.ingest_ledger.c.run)).all())
            created = conn.execute(select(md.runs.c.run, md.runs.c.created_at)).all()
        old = [run for run, created_at in created if (last.get(run) or created_at) < cutoff]
        for run in old:
            self.delete_run(run)
        return len(old)

    def export(self, run: str, out: str | os.PathLike) -> Path:
        """Write a self-contained DuckDB database holding one run, for offline incident work."""
        self.require_run(run)
        out = Path(out).expanduser().absolute()
        if out.exists():
            raise StoreError(f"refusing to overwrite existing file {str(out)!r}")
        if not out.parent.is_dir():
            raise StoreError(f"output directory {str(out.parent)!r} does not exist")
        tmp = out.with_name(out.name + f".tmp-{uuid.uuid4().hex}")
        con = duckdb.connect(str(tmp))
        try:
            for name, schema in TABLES.items():
                paths = self.segment_paths(name, run)
                if paths:
                    con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet({_sql_list(paths)}, union_by_name=true)")
                else:
                    con.register("_empty", schema.empty_table())
                    con.execute(f"CREATE TABLE {name} AS SELECT * FROM _empty")
                    con.unregister("_empty")
            for frame_name, df in (("runs", self.runs().query("run == @run")), ("checkpoints", self.checkpoints(run)),
                                   ("layers", self.layers(run))):
                con.register("_df", df)
                con.execute(f"CREATE TABLE {frame_name} AS SELECT * FROM _df")
                con.unregister("_df")
        finally:
            con.close()
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        self.engine.dispose()


class _Abort(Exception):
    pass


def _sql_list(paths: Iterable[str]) -> str:
    # Views cannot take bound parameters, so the file list is inlined as quoted literals.
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _atomic_write_parquet_parts(parts: Iterable[pa.Table], schema: pa.Schema, path: Path, options: dict) -> int:
    """Stream tables into one Parquet file (a row group each), atomically; returns rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    rows = 0
    with open(tmp, "wb") as fh:
        with pq.ParquetWriter(fh, schema, use_dictionary=strings, **options) as writer:
            pending: list[pa.Table] = []
            for part in parts:
                pending.append(part)
                rows += part.num_rows
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending))
                    pending = []
            if pending:
                writer.write_table(pa.concat_tables(pending))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return rows


def _atomic_write_parquet(table: pa.Table, path: Path, options: dict = _INGEST_PARQUET_KW) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
    # Dictionary-encode only the string columns (run, checkpoint, domain, phase): on the
    # numeric columns it halves write speed and saves nothing after zstd.
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, use_dictionary=strings, **options)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _engine_with_retry(url: str, attempts: int = 20):
    # Several processes may create the schema at once (PostgreSQL races on CREATE TABLE).
    last = None
    for i in range(attempts):
        try:
            return md.make_engine(url)
        except (IntegrityError, OperationalError) as exc:
            last = exc
            time.sleep(0.1 * (i + 1))
        except Exception as exc:  # ProgrammingError "already exists" under races
            if "already exists" not in str(exc):
                raise
            last = exc
            time.sleep(0.1 * (i + 1))
    raise StoreError(f"cannot open metadata database {url!r}: {last}")


def open_store(root: str | os.PathLike | None = None, database_url: str | None = None, *, create: bool = True) -> Store:
    from moescope.settings import get_settings

    settings = get_settings()
    return Store(root if root is not None else settings.store, database_url or settings.database_url, create=create)
