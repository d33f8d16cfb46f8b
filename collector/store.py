"""The store: immutable Parquet segments queried by DuckDB, plus the metadata DB.

One class owns reading and writing. Any number of processes may write (each frame
becomes its own segment files, each appearing whole or not at all, in a directory or on
object storage: see collector/segment_fs.py; recorded in one metadata
transaction together with the ledger row) and any number may read (each query opens a
private in-memory DuckDB over the live segment list), so nobody ever holds a DuckDB
file lock. A file's rows are in row groups by layer (collector/row_groups.py), so a
one-layer query skips the other layers' row groups.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
from sqlalchemy import Text, cast, delete, func, insert, select, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

from moescope.collector import metadata as md
from moescope.collector.alert_records import AlertRecords
from moescope.collector.segment_fs import COMPACT_PARQUET_KW, StoreError, open_files
from moescope.frame import Frame
from moescope.collector.rollups import rollups
from moescope.schema import LAYER_FIELDS, STORED, SchemaError, check_frame_id, check_run_id, plain_strings

log = logging.getLogger(__name__)

# Retired segment files stay on disk this long so queries that listed them still finish.
RETIRE_GRACE_S = 120.0
# Footer reads that fail with a transient I/O error are tried this often, waiting 0.2 s, 0.4 s, ... between.
FOOTER_TRIES = 3
FOOTER_RETRY_S = 0.2


class UnknownRun(StoreError):
    pass


class UnknownProbeSet(StoreError):
    pass


class ProbeSetConflict(StoreError):
    """Other content under a probe-set name that is already registered."""


class MetadataUnusable(StoreError):
    """The metadata DB can never be used as configured (not a database, read-only, bad credentials)."""


class FrameConflict(StoreError):
    """A frame whose (producer, seq) is already stored under another frame id: never stored, never merged."""


class Store(AlertRecords):
    def __init__(self, root: str | os.PathLike, database_url: str | None = None, *, create: bool = True):
        # A directory, or object storage under an fsspec URL (s3://bucket/prefix); root is its Path or URL.
        self.files = open_files(root)
        self.remote = self.files.remote
        self.root: Path | str = self.files.location if self.remote else self.files.root
        if database_url is None:
            from moescope.settings import get_settings

            database_url = get_settings().database_url
        if self.remote and not database_url:
            raise StoreError(f"store {self.root!r} is on object storage: its metadata needs a database every process "
                             "reaches (--database-url or MOESCOPE_DATABASE_URL, e.g. postgresql+psycopg://host/db)")
        self.files.prepare(create)
        self.database_url = database_url or f"sqlite:///{self.root / 'meta.sqlite'}"
        if not create:
            _require_sqlite_file(self.database_url)
        self.engine = _engine_with_retry(self.database_url)
        self._local = threading.local()
        self._config_differs: set[str] = set()  # runs whose differing run_config was logged

    # ---------------------------------------------------------------- writing
    def write_frame(self, frame: Frame) -> bool:
        """Store a frame exactly once. Returns False when it was already stored.

        FrameConflict when another frame already holds its (producer, seq): the two are
        different data under one sequence number, so neither silently replaces the other.
        """
        try:
            check_run_id(frame.run)
            check_frame_id(frame.frame_id)
        except SchemaError as exc:
            raise StoreError(str(exc)) from None
        if self.has_frame(frame.frame_id):
            return False
        self._check_seq_free(frame)
        written = []
        # Each attempt writes files of its own: a losing concurrent writer of the same
        # frame removes only what it wrote, never the winner's segments.
        attempt = uuid.uuid4().hex[:8]
        tables = (frame.tables if frame.meta.get("rollups") else
                  {**frame.tables, **rollups({n: plain_strings(t) for n, t in frame.tables.items()})})
        try:
            for name, table in tables.items():
                if table.num_rows:  # listed before writing, so a failure half-way removes what got written
                    written.append({"path": f"segments/{name}/run={frame.run}/{frame.frame_id}-{attempt}.parquet",
                                    "run": frame.run, "table_name": name, "rows": table.num_rows,
                                    "created_at": time.time()})
            self.files.write_parquets([(tables[w["table_name"]], w["path"]) for w in written])
            with self.engine.begin() as conn:
                self._register_meta(conn, frame)
                conn.execute(insert(md.ingest_ledger).values(
                    frame_id=frame.frame_id, run=frame.run, producer=frame.producer, seq=frame.seq,
                    rows=frame.rows, final=frame.final, stored_at=time.time()))
                if written:
                    conn.execute(insert(md.segments), written)
                self._record_dropped(conn, frame)
        except IntegrityError:
            self._unlink(written)
            if self.has_frame(frame.frame_id):
                return False  # another writer stored the same frame first
            self._check_seq_free(frame)
            raise
        except BaseException:
            self._unlink(written)
            raise
        return True

    def _check_seq_free(self, frame: Frame) -> None:
        with self.engine.connect() as conn:
            other = conn.execute(select(md.ingest_ledger.c.frame_id).where(
                md.ingest_ledger.c.producer == frame.producer, md.ingest_ledger.c.seq == frame.seq)).first()
        if other is not None and other[0] != frame.frame_id:
            raise FrameConflict(f"producer {frame.producer!r} seq {frame.seq} is already stored as frame {other[0]}; "
                                f"frame {frame.frame_id} reuses it (two producers share a name?)")

    def _record_dropped(self, conn, frame: Frame) -> None:
        if not frame.dropped_seqs:
            return
        seqs = sorted(set(frame.dropped_seqs))
        known: set[int] = set()
        for i in range(0, len(seqs), 1000):  # bounded IN lists
            known.update(s for (s,) in conn.execute(select(md.dropped_frames.c.seq).where(
                md.dropped_frames.c.producer == frame.producer, md.dropped_frames.c.seq.in_(seqs[i:i + 1000]))))
        new = [{"producer": frame.producer, "seq": s, "run": frame.run} for s in seqs if s not in known]
        if new:
            conn.execute(insert(md.dropped_frames), new)

    def _unlink(self, written: list[dict]) -> None:
        # Every file method refuses paths outside the store root (self.files.path): metadata never
        # makes the store write or delete elsewhere.
        for w in written:
            try:
                self.files.remove(w["path"])
            except Exception:  # noqa: BLE001 - best effort while another error is on its way up
                pass

    def _register_meta(self, conn, frame: Frame) -> None:
        runs, config = md.runs, frame.meta.get("run_config")
        stored = conn.execute(select(runs.c.config).where(runs.c.run == frame.run)).first()
        if stored is None:
            try:
                with conn.begin_nested():
                    conn.execute(insert(runs).values(run=frame.run, created_at=time.time(), config=config))
            except IntegrityError:  # another writer created it meanwhile
                stored = conn.execute(select(runs.c.config).where(runs.c.run == frame.run)).first()
        if stored is not None and config is not None:
            # A run created without a config (add_checkpoint, a frame without one) takes the first one sent; the
            # compare-and-set keeps the first when writers race. Configs are stored as SQL NULL or JSON null.
            first = stored[0]
            if first is None:
                unset = runs.c.config.is_(None) | (cast(runs.c.config, Text) == "null")
                if conn.execute(update(runs).where((runs.c.run == frame.run) & unset).values(config=config)).rowcount:
                    first = config
                else:
                    first = conn.execute(select(runs.c.config).where(runs.c.run == frame.run)).scalar_one()
            if first != config and frame.run not in self._config_differs:
                # Ranks' configs differ at least in their producer name, so this is routine, not a warning.
                self._config_differs.add(frame.run)
                log.info("store: run %r keeps its first run_config; producer %r sent a different one",
                         frame.run, frame.producer)
        for layer in frame.meta.get("layers", []):
            key = (md.layers.c.run == frame.run) & (md.layers.c.layer == int(layer["layer"]))
            if not conn.execute(select(md.layers.c.layer).where(key)).first():
                try:
                    with conn.begin_nested():
                        conn.execute(insert(md.layers).values(run=frame.run, **{k: layer.get(k) for k in LAYER_FIELDS}))
                except IntegrityError:
                    pass
        for ckpt in frame.meta.get("checkpoints", []):
            self._upsert_checkpoint(conn, frame.run, ckpt["checkpoint"], ckpt.get("step"), ckpt.get("path"))
        texts = {int(i): text for i, text in frame.meta.get("token_texts", [])}
        if texts:  # the first text of an id wins; at most MAX_TEXTS_PER_RUN per run, whatever producers send
            from sqlalchemy.dialects import postgresql, sqlite

            from moescope.token_texts import MAX_TEXTS_PER_RUN

            t = md.token_texts
            stored = conn.execute(select(func.count()).select_from(t).where(t.c.run == frame.run)).scalar_one()
            rows = [{"run": frame.run, "token_id": i, "text": text} for i, text in texts.items()]
            rows = rows[:max(0, MAX_TEXTS_PER_RUN - stored)]
            if rows:  # another worker may store the same ids of the run at the same time: theirs stand
                dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
                conn.execute(dialect.insert(t).on_conflict_do_nothing(), rows)

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

    def checkpoint_dir(self, run: str) -> Path:
        """Where model checkpoint files of `run` go (torch loads them by path): in the store directory, or under
        ./moescope-checkpoints when the store is on object storage."""
        check_run_id(run)
        return (Path("moescope-checkpoints").absolute() if self.remote else self.root / "checkpoints") / run

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

    def run_config(self, run: str) -> dict:
        """What the run registered about itself (probe settings, an import's engine), {} when nothing."""
        self.require_run(run)
        with self.engine.connect() as conn:
            return conn.execute(select(md.runs.c.config).where(md.runs.c.run == run)).scalar_one() or {}

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

    def token_texts(self, run: str, token_ids: Iterable[int] | None = None) -> dict[int, str]:
        """The text of the run's token ids (those given, else every one) as its tokenizer gave them at attach
        time; ids it recorded no text for are absent."""
        self.require_run(run)
        t = md.token_texts
        query = select(t.c.token_id, t.c.text).where(t.c.run == run)
        with self.engine.connect() as conn:
            if token_ids is None:
                return dict(conn.execute(query).all())
            ids = sorted({int(i) for i in token_ids})
            out: dict[int, str] = {}
            for i in range(0, len(ids), 1000):  # bounded IN lists
                out.update(conn.execute(query.where(t.c.token_id.in_(ids[i:i + 1000]))).all())
            return out

    # ---------------------------------------------------------------- probe sets
    def register_probe_set(self, name: str, probe_set) -> dict:
        """Store a named probe set (moescope.probe_sets.ProbeSet) once per store; returns its listing row.

        Registering the same content again under the same name does nothing; other
        content under a registered name is a ProbeSetConflict.
        """
        from moescope.probe_sets import ProbeSet, check_probe_set_name

        check_probe_set_name(name)
        if not isinstance(probe_set, ProbeSet):
            raise StoreError(f"register_probe_set() takes a moescope.probe_sets.ProbeSet, got {type(probe_set).__name__}")
        digest = probe_set.content_hash()
        if self._same_probe_set(name, digest):
            return self._probe_set_row(name)
        # Content-addressed file: a concurrent registration of other content never overwrites it.
        rel = f"probe_sets/{name}-{digest[:16]}.parquet"
        self.files.write_parquet(probe_set.to_table(), rel, COMPACT_PARQUET_KW)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(md.probe_sets).values(
                    name=name, created_at=time.time(), sequences=len(probe_set), tokens=probe_set.tokens,
                    source=probe_set.source, content_hash=digest, path=rel))
        except IntegrityError:  # registered meanwhile: the same content is fine
            try:
                self._same_probe_set(name, digest)
            except ProbeSetConflict:
                self.files.remove(rel)  # ours only: other content has another file name
                raise
        return self._probe_set_row(name)

    def _same_probe_set(self, name: str, digest: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(select(md.probe_sets.c.content_hash).where(md.probe_sets.c.name == name)).first()
        if row is not None and row[0] != digest:
            raise ProbeSetConflict(f"probe set {name!r} is already registered with other content; "
                                   "register this one under another name")
        return row is not None

    def _probe_set_row(self, name: str) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(select(md.probe_sets).where(md.probe_sets.c.name == name)).mappings().first()
        if row is None:
            known = self.probe_sets().name.tolist()
            hint = (f"registered probe sets: {', '.join(known)}" if known
                    else "the store has none; register one with store.register_probe_set()")
            raise UnknownProbeSet(f"unknown probe set {name!r}; {hint}")
        return dict(row)

    def probe_set(self, name: str):
        """The registered probe set `name` (a ProbeSet; .to_tensors() gives input_ids, attention_mask, domains)."""
        from moescope.probe_sets import ProbeSet

        row = self._probe_set_row(name)
        return ProbeSet.from_table(self.files.read_table(row["path"]), source=row["source"], name=name)

    def probe_sets(self) -> pd.DataFrame:
        """One row per registered probe set: name, created_at, sequences, tokens, source, content_hash."""
        cols = ["name", "created_at", "sequences", "tokens", "source", "content_hash"]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*(md.probe_sets.c[c] for c in cols)).order_by(md.probe_sets.c.name)).all()
        return pd.DataFrame(rows, columns=cols)

    def segment_paths(self, table: str, run: str | None = None) -> list[str]:
        session = getattr(self._local, "session", None)
        if session is not None and session.run == run:  # the listing the open session reads from
            return list(session.live.get(table, []))
        return self._live_segments(run).get(table, [])

    def _live_segments(self, run: str | None) -> dict[str, list[str]]:
        """Absolute paths of live segments per table, from one metadata query."""
        q = select(md.segments.c.table_name, md.segments.c.path).where(md.segments.c.retired_at.is_(None))
        if run is not None:
            q = q.where(md.segments.c.run == run)
        out: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for table, path in conn.execute(q.order_by(md.segments.c.path)):
                out.setdefault(table, []).append(self.files.url(path))
        return out

    def connect(self, run: str | None = None, *, fill_missing: bool = False,
                tables: Iterable[str] | None = None) -> duckdb.DuckDBPyConnection:
        """A private in-memory DuckDB with a view per stored table (routing, token_stats, expert_step, rollups).

        Scoped to one run when given (only that run's segments are opened). tables: only
        these views (default all): binding a view reads its segments' footers, so a query
        opens only what it names. fill_missing: contract columns that none of the segments
        has (they were written before the column existed) appear as nulls; it costs a read
        of every footer, so queries ask for it only when they did not bind without it.
        """
        con = _cursor()
        try:
            self.files.attach(con)
            _create_views(con, self._live_segments(run), STORED if tables is None else tables, fill_missing)
        except BaseException:
            con.close()
            raise
        return con

    @contextlib.contextmanager
    def reading(self, run: str | None = None):
        """Queries of `run` inside the block share one DuckDB connection over one read of the segment list.

        A metric runs several queries (layer sizes, then its own); each would otherwise
        list the segments and open a connection again. Views are made as queries first
        name them. Per thread, so sessions never mix.
        """
        outer = getattr(self._local, "session", None)
        if outer is not None and outer.run == run:
            yield self
            return
        session = _Session(self, run)
        self._local.session = session
        try:
            yield self
        finally:
            self._local.session = outer
            session.close()

    def _query(self, fn, run: str | None, tables: Iterable[str] | None = None):
        """fn(connection) over the live segments of `tables` (default all); an unreadable segment is
        quarantined and the query retried."""
        session = getattr(self._local, "session", None)
        if session is not None and session.run == run:
            try:
                return fn(session.connection(tables))
            except duckdb.Error as exc:
                rel = self._segment_named_in(str(exc), run)
                if rel is None or not self.verify_segments(run, paths=[rel]):
                    raise
                session.reopen()  # a segment went bad under the session: again without it, once
                return fn(session.connection(tables))
        tried: set[str] = set()
        fill = False
        while True:
            con = None
            try:
                con = self.connect(run, fill_missing=fill, tables=tables)
                return fn(con)
            except duckdb.Error as exc:
                if isinstance(exc, duckdb.BinderException) and not fill:
                    fill = True  # it may name a column that older segments lack: once more, with it as nulls
                    continue
                rel = self._segment_named_in(str(exc), run)
                if rel is None or rel in tried:
                    raise
                tried.add(rel)
                self.verify_segments(run, paths=[rel])
            finally:
                if con is not None:
                    con.close()

    def _segment_named_in(self, message: str, run: str | None) -> str | None:
        q = select(md.segments.c.path)
        if run is not None:
            q = q.where(md.segments.c.run == run)
        with self.engine.connect() as conn:
            for (rel,) in conn.execute(q):
                if self.files.url(rel) in message:
                    return rel
        return None

    def sql(self, query: str, params: Sequence[Any] | dict | None = None, *, run: str | None = None) -> pd.DataFrame:
        return self._query(lambda con: con.execute(query, params or []).df(), run, _named_tables(query))

    def arrow(self, query: str, params: Sequence[Any] | dict | None = None, *, run: str | None = None) -> pa.Table:
        return self._query(lambda con: con.sql(query, params=params or None).to_arrow_table(), run, _named_tables(query))

    # ---------------------------------------------------------------- integrity
    def verify_segments(self, run: str | None = None, *, paths: list[str] | None = None) -> list[dict]:
        """Read the footer of each live segment (of `run`, or the given relative paths); quarantine unreadable ones.

        Returns the segments quarantined now. A quarantined segment leaves every query
        (its rows are reported lost by `check`), so one bad file never breaks a run.
        """
        q = select(md.segments.c.path, md.segments.c.run, md.segments.c.table_name, md.segments.c.rows).where(
            md.segments.c.retired_at.is_(None))
        if run is not None:
            q = q.where(md.segments.c.run == run)
        if paths is not None:
            q = q.where(md.segments.c.path.in_(paths))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        bad = []
        for rel, srun, table, nrows in rows:
            try:
                meta = self._footer(rel)
                if meta.num_rows != nrows:
                    raise ValueError(f"holds {meta.num_rows} rows, the store recorded {nrows}")
            except (OSError, ValueError, pa.ArrowException, StoreError) as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
                if self._quarantine(rel, srun, table, nrows, reason):
                    bad.append({"path": rel, "run": srun, "table_name": table, "rows": nrows, "reason": reason})
        return bad

    def _footer(self, rel: str):
        # A missing or corrupt file stays so; any other I/O error (a reset connection to object
        # storage) may pass, so it is tried again before a good segment leaves every query.
        for attempt in range(FOOTER_TRIES):
            try:
                return self.files.read_metadata(rel)
            except FileNotFoundError:
                raise
            except OSError:
                if attempt == FOOTER_TRIES - 1:
                    raise
                time.sleep(FOOTER_RETRY_S * 2 ** attempt)

    def _quarantine(self, rel: str, run: str, table: str, rows: int, reason: str) -> bool:
        with self.engine.begin() as conn:
            gone = conn.execute(delete(md.segments).where(md.segments.c.path == rel, md.segments.c.retired_at.is_(None)))
            if gone.rowcount != 1:
                return False  # retired or quarantined meanwhile
            conn.execute(insert(md.quarantined_segments).values(path=rel, run=run, table_name=table, rows=rows,
                                                                reason=reason, quarantined_at=time.time()))
        try:  # kept for inspection, out of the segment tree
            self.files.move(rel, f"quarantine/{rel}")
        except (OSError, StoreError):
            pass
        log.error("store: quarantined unreadable segment %s (%s)", rel, reason)
        return True

    def quarantined(self, run: str) -> pd.DataFrame:
        """Segments of `run` taken out of queries because they could not be read."""
        cols = [md.quarantined_segments.c[c] for c in ("path", "table_name", "rows", "reason", "quarantined_at")]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*cols).where(md.quarantined_segments.c.run == run)).all()
        return pd.DataFrame(rows, columns=["path", "table_name", "rows", "reason", "quarantined_at"])

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
        conflicts: dict[str, int] = {}
        with self.engine.connect() as conn:
            for producer, in conn.execute(select(md.dead_letters.c.producer).where(
                    md.dead_letters.c.run == run, md.dead_letters.c.reason.like(f"{CONFLICT_REASON}%"))):
                conflicts[producer] = conflicts.get(producer, 0) + 1
        out = []
        for producer, p in sorted(producers.items()):
            accounted = p["stored"] | p["dropped"] | p["dead"]
            sent = p["sent"] if p["sent"] is not None else (max(accounted) + 1 if accounted else 0)
            missing, first = _gaps(accounted, sent, keep=20)
            out.append({"producer": producer, "sent": sent, "stored": len(p["stored"]), "dead_lettered": len(p["dead"] - p["stored"]),
                        "conflicts": conflicts.get(producer, 0), "dropped": len(p["dropped"] - p["stored"]),
                        "missing": missing, "missing_seqs": first, "closed": p["sent"] is not None})
        return pd.DataFrame(out, columns=["producer", "sent", "stored", "dead_lettered", "conflicts", "dropped", "missing",
                                          "missing_seqs", "closed"])

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
            except (OSError, ValueError, pa.ArrowException) as exc:
                # An unreadable input: quarantine it and go on with the other tables and runs.
                bad = self.verify_segments(grun, paths=batch)
                log.warning("compaction of %s/%s skipped (%s); quarantined %d segment(s)", table_name, grun, exc, len(bad))
        self.sweep()
        return retired

    def _merge(self, table_name: str, run: str, paths: list[str]) -> int:
        rel = f"segments/{table_name}/run={run}/c-{uuid.uuid4().hex}.parquet"
        # One input segment in memory at a time: compaction must not grow the worker.
        rows = self.files.write_parquet_parts((_read_segment(self.files.read_table(p), STORED[table_name]) for p in paths),
                                              STORED[table_name], rel, COMPACT_PARQUET_KW)
        now = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(update(md.segments).where(md.segments.c.path.in_(paths), md.segments.c.retired_at.is_(None))
                               .values(retired_at=now))
            if res.rowcount != len(paths):  # someone else compacted these concurrently
                conn.rollback()
                self.files.remove(rel)
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
                self.files.remove(p)
            except StoreError:
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
            for table in (md.segments, md.quarantined_segments, md.ingest_ledger, md.dropped_frames, md.dead_letters,
                          md.checkpoints, md.layers, md.token_texts, md.alert_events, md.alert_state, md.runs):
                conn.execute(delete(table).where(table.c.run == run))
        # Files go after the commit: a reader holding the old list may fail once, never double count.
        # Every path is checked to lie under the root: metadata never makes us delete elsewhere.
        for p in paths:
            try:
                self.files.remove(p)
            except StoreError:
                log.error("store: not deleting %r of run %r: outside the store", p, run)
        check_run_id(run)
        for folder in [f"{top}segments/{name}/run={run}" for top in ("", "quarantine/") for name in STORED] + [f"checkpoints/{run}"]:
            self.files.remove_tree(folder)

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
        self.verify_segments(run)  # an unreadable segment is quarantined, not exported, not fatal
        live = self._live_segments(run)
        con = duckdb.connect(str(tmp))
        try:
            self.files.attach(con)
            for name, schema in STORED.items():
                paths = live.get(name)
                if paths:
                    con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet({sql_list(paths)}, union_by_name=true)")
                else:
                    con.register("_empty", schema.empty_table())
                    con.execute(f"CREATE TABLE {name} AS SELECT * FROM _empty")
                    con.unregister("_empty")
            for frame_name, df in (("runs", self.runs().query("run == @run")), ("checkpoints", self.checkpoints(run)),
                                   ("layers", self.layers(run))):
                con.register("_df", df)
                con.execute(f"CREATE TABLE {frame_name} AS SELECT * FROM _df")
                con.unregister("_df")
            con.close()
            os.replace(tmp, out)
        except BaseException as exc:
            con.close()
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
            if isinstance(exc, (duckdb.Error, OSError)):
                raise StoreError(f"export of run {run!r} failed: {str(exc).splitlines()[0]}") from None
            raise
        return out

    def close(self) -> None:
        self.engine.dispose()


class _Session:
    """One run's shared DuckDB connection (Store.reading): one segment listing, views made on first use.

    A shared connection serves any query, so its views bind the columns older segments
    lack as nulls up front."""

    def __init__(self, store: Store, run: str | None):
        self.store, self.run = store, run
        self.con: duckdb.DuckDBPyConnection | None = None
        self.reopen()

    def reopen(self) -> None:
        self.close()
        self.live = self.store._live_segments(self.run)
        self.made: set[str] = set()
        self.con = _cursor()
        self.store.files.attach(self.con)

    def connection(self, tables: Iterable[str] | None) -> duckdb.DuckDBPyConnection:
        missing = [t for t in (STORED if tables is None else tables) if t not in self.made]
        if missing:
            _create_views(self.con, self.live, missing, fill_missing=True)
            self.made.update(missing)
        return self.con

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None


_DB: tuple[int, duckdb.DuckDBPyConnection] | None = None
_DB_LOCK = threading.Lock()


def _cursor() -> duckdb.DuckDBPyConnection:
    """A connection of its own to the process's in-memory DuckDB; its views are TEMP, so private to it.

    Opening a database costs 30–60 ms, a cursor nothing, and one database shares its
    buffer pool and Parquet footer cache across queries (segment files never change
    under a name). A forked child (Celery prefork) opens its own.
    """
    global _DB
    with _DB_LOCK:
        if _DB is None or _DB[0] != os.getpid():
            db = duckdb.connect(":memory:")
            db.execute("SET parquet_metadata_cache = true")
            _DB = (os.getpid(), db)
        return _DB[1].cursor()


_TABLE_WORD = re.compile(r"\b(" + "|".join(STORED) + r")\b")


def _named_tables(query: str) -> set[str]:
    """The stored tables a query names (a superset is harmless: an unused view is never read)."""
    return set(_TABLE_WORD.findall(query))


def _create_views(con, live: dict[str, list[str]], names: Iterable[str], fill_missing: bool) -> None:
    for name in names:
        schema = STORED[name]
        paths = live.get(name)
        if paths:
            src = f"read_parquet({sql_list(paths)}, union_by_name=true)"
            nulls = _null_columns(con, src, schema) if fill_missing else ""
            con.execute(f"CREATE TEMP VIEW {name} AS SELECT *{nulls} FROM {src}")
        else:
            con.register(f"_empty_{name}", schema.empty_table())
            con.execute(f"CREATE TEMP VIEW {name} AS SELECT * FROM _empty_{name}")


class _Abort(Exception):
    pass


# Dead letters whose reason starts so are frames that reused a stored (producer, seq): data not stored.
CONFLICT_REASON = "conflict:"


def _gaps(accounted: set[int], sent: int, keep: int) -> tuple[int, list[int]]:
    """How many of 0..sent-1 are not in `accounted`, and the first `keep` of them (cost: len(accounted), not sent)."""
    seen = sorted(s for s in accounted if 0 <= s < sent)
    first, prev = [], -1
    for s in [*seen, sent]:
        if s > prev + 1 and len(first) < keep:
            first.extend(range(prev + 1, min(s, prev + 1 + keep - len(first))))
        prev = s
    return sent - len(seen), first


def sql_list(paths: Iterable[str]) -> str:
    """A DuckDB list literal of file paths: read_parquet's argument, inlined as quoted literals
    because views cannot take bound parameters."""
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.float32(): "FLOAT", pa.float64(): "DOUBLE"}


def _null_columns(con, src: str, schema: pa.Schema) -> str:
    """`, NULL::T AS c` for each nullable contract column that none of the files in `src` has."""
    have = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    return "".join(f", NULL::{_DUCKDB_TYPES[f.type]} AS {f.name}" for f in schema
                   if f.name not in have and f.nullable and f.type in _DUCKDB_TYPES)


def _read_segment(table: pa.Table, schema: pa.Schema) -> pa.Table:
    # Older segments may lack a nullable column added since; fill it with nulls.
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def _engine_with_retry(url: str, attempts: int = 20):
    # Several processes may create the schema at once (PostgreSQL races on CREATE TABLE),
    # and a database may still be starting: those are retried. A file that is not a
    # database, or one we may not write, fails at once with one line.
    last = None
    for i in range(attempts):
        try:
            return md.make_engine(url)
        except (IntegrityError, OperationalError) as exc:
            msg = str(exc.orig if getattr(exc, "orig", None) is not None else exc)
            if any(p in msg for p in _PERMANENT_DB_ERRORS):
                raise MetadataUnusable(f"cannot open metadata database {_safe_url(url)}: {msg.splitlines()[0]}") from None
            last = exc
            time.sleep(0.1 * (i + 1))
        except DatabaseError as exc:
            msg = str(exc.orig if getattr(exc, "orig", None) is not None else exc).splitlines()[0]
            raise MetadataUnusable(f"cannot open metadata database {_safe_url(url)}: {msg}") from None
        except Exception as exc:  # ProgrammingError "already exists" under races
            if "already exists" not in str(exc):
                raise
            last = exc
            time.sleep(0.1 * (i + 1))
    raise StoreError(f"cannot open metadata database {_safe_url(url)}: {str(last).splitlines()[0]}")


_PERMANENT_DB_ERRORS = ("readonly database", "read-only", "not a database", "unable to open database file",
                        "database disk image is malformed", "password authentication failed", "does not exist")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - only for the message
        return "(unparsable URL)"


def _require_sqlite_file(url: str) -> None:
    """A read-only command never creates (or silently recreates) a SQLite metadata DB."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - the engine reports a bad URL itself
        return
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:":
        return
    path = Path(u.database)
    if not path.is_file():
        raise StoreError(f"no store metadata at {str(path)!r}: is --store right? (`moescope demo` creates one)")
    if path.stat().st_size == 0:
        raise StoreError(f"store metadata {str(path)!r} is empty (0 bytes): the store is damaged; restore it from a backup")
