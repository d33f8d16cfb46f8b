"""Consumer-group reader of the frame stream: decode, validate, store, then acknowledge.

Delivery is at-least-once from Redis to the store: a message is XACKed only after
`store.write_frame` returned, and `write_frame` is idempotent by frame uuid, so the
store holds every frame exactly once. Acknowledged messages are deleted too: the stream
is the ingest group's queue, and a stored frame (megabytes) would otherwise sit in Redis
memory until MAXLEN trims it. A consumer that dies (kill -9) leaves its
messages pending in the group; any live consumer takes them over with XAUTOCLAIM once
they have been idle `claim_idle_ms`.

After the durable write the frame id is added to the set named in the message's `ack`
field; the producing RedisSink polls that set and only then forgets its spooled copy.

Malformed messages, and frames that reuse a stored (producer, seq) under another uuid,
go to the dead-letter stream with the reason, are recorded in the store's dead_letters
table, and are acknowledged so ingestion continues; their ids go to the producer's
`rejected` hash (never its ack set), so the sink reports them instead of believing them
stored. An unexpected store error (a bug, not bad input) leaves the message pending and
is retried with back-off; after `max_attempts` the whole message is parked on
`<stream>:parked` and nothing is acknowledged to the producer, which re-sends it later.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from moescope.collector.store import CONFLICT_REASON, FrameConflict, Store, StoreError
from moescope.frame import FrameError, decode, read_header
from moescope.schema import SchemaError, check_run_id
from moescope.settings import get_settings

log = logging.getLogger(__name__)

GROUP = "moescope-ingest"
# Dead letters keep at most this much of each message, and the stream at most
# DEAD_LETTER_BUDGET bytes in all (trimmed oldest first).
_DEAD_BYTES_KEPT = 16 << 20
DEAD_LETTER_BUDGET = 256 << 20
# Failures of the environment (database or disk away): keep the message pending and retry.
TRANSIENT = (OperationalError, InterfaceError, PoolTimeout, OSError, redis.ConnectionError, redis.TimeoutError,
             redis.BusyLoadingError)


def consumer_name(index: int = 0) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


def peek_header(data: bytes) -> dict | None:
    """The frame header as a dict, or None when the bytes do not even carry one (cheap: no Arrow)."""
    try:
        return read_header(data)[0]
    except FrameError:
        return None


class _Deferred(Exception):
    """The store failed unexpectedly on this message; it stays pending and is retried after a back-off."""


class StreamIngestor:
    """One consumer of the frame stream. `run(stop)` loops until the event is set."""

    def __init__(self, store: Store, client: redis.Redis, stream: str, dead_letter_stream: str, consumer: str, *,
                 claim_idle_ms: int | None = None, block_ms: int = 1000, dead_budget_bytes: int = DEAD_LETTER_BUDGET,
                 max_attempts: int = 8, max_backoff_s: float = 30.0, ack_ttl_s: int | None = None):
        if claim_idle_ms is None or ack_ttl_s is None:
            settings = get_settings()
            claim_idle_ms = int(settings.claim_idle_s * 1000) if claim_idle_ms is None else claim_idle_ms
            ack_ttl_s = settings.ack_ttl_s if ack_ttl_s is None else ack_ttl_s
        self.store, self.client = store, client
        self.stream, self.dead_letter_stream, self.consumer = stream, dead_letter_stream, consumer
        self.parked_stream = f"{stream}:parked"
        self.claim_idle_ms, self.block_ms, self.dead_budget_bytes = claim_idle_ms, block_ms, dead_budget_bytes
        self.max_attempts, self.max_backoff_s, self.ack_ttl_s = max_attempts, max_backoff_s, ack_ttl_s
        self.counts = {"stored": 0, "duplicate": 0, "dead": 0, "claimed": 0, "retries": 0, "rows": 0, "store_errors": 0,
                       "parked": 0}
        self._failures: dict[str, int] = {}
        self._group_ready = False
        self._next_reap = 0.0

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # ------------------------------------------------------------ loop
    def run(self, stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            try:
                self.step()
                backoff = 0.0
            except (*TRANSIENT, _Deferred) as exc:
                self.counts["retries"] += 1
                backoff = min(self.max_backoff_s, max(0.2, backoff * 2))
                log.warning("ingest %s: %s: %s; retrying in %.1fs", self.consumer, type(exc).__name__, exc, backoff)
                stop.wait(backoff)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # Redis restarted empty: recreate the group
                stop.wait(0.2)

    def step(self) -> int:
        """Handle this consumer's own pending messages, else idle ones of dead consumers, else new ones."""
        if not self._group_ready:
            self.ensure_group()
        messages = self._read("0", block=False)  # own pending: retried after a transient failure
        if not messages:
            messages = self._autoclaim()
        if not messages:
            messages = self._read(">", block=True)
        for msg_id, fields in messages:
            self.handle(msg_id, fields)
        return len(messages)

    def _read(self, last_id: str, *, block: bool):
        reply = self.client.xreadgroup(GROUP, self.consumer, {self.stream: last_id}, count=1,
                                       block=self.block_ms if block else None)
        if not reply:
            return []
        return [(mid, fields) for mid, fields in reply[0][1]]

    def reap_consumers(self, idle_ms: int = 3_600_000) -> int:
        """Forget consumers (dead worker processes) idle this long with nothing pending; returns how many."""
        reaped = 0
        for info in self.client.xinfo_consumers(self.stream, GROUP):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.consumer and info["pending"] == 0 and info["idle"] >= idle_ms:
                reaped += self.client.xgroup_delconsumer(self.stream, GROUP, name) == 0
        return reaped

    def _autoclaim(self):
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + 300
            self.reap_consumers()
        reply = self.client.xautoclaim(self.stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms,
                                       start_id="0-0", count=1)
        claimed, deleted = reply[1], (reply[2] if len(reply) > 2 else [])
        if deleted:  # trimmed by MAXLEN before anyone stored them; the producer re-sends
            self.client.xack(self.stream, GROUP, *deleted)
        self.counts["claimed"] += len(claimed)
        return claimed

    # ------------------------------------------------------------ one message
    def handle(self, msg_id, fields) -> str:
        mid = msg_id.decode() if isinstance(msg_id, bytes) else str(msg_id)
        if not fields:  # entry trimmed away while pending
            self.client.xack(self.stream, GROUP, msg_id)
            return "trimmed"
        data = fields.get(b"frame")
        ack_key = (fields.get(b"ack") or b"").decode(errors="replace")
        if data is None:
            return self._dead(msg_id, mid, "message has no 'frame' field", None, b"", ack_key)
        header = peek_header(data)
        if header and isinstance(header.get("frame_id"), str) and self.store.has_frame(header["frame_id"]):
            self.counts["duplicate"] += 1  # re-sent frame already stored: only the acks are missing
            self._ack(msg_id, ack_key, header["frame_id"])
            return "duplicate"
        try:
            frame = decode(data, keep_dictionaries=True)  # one-value string columns stored as they came
            check_run_id(frame.run)
        except (FrameError, SchemaError) as exc:
            return self._dead(msg_id, mid, str(exc), header, data, ack_key)
        except Exception as exc:  # noqa: BLE001 - decoding is pure: any error means the bytes are bad
            return self._dead(msg_id, mid, f"undecodable frame: {type(exc).__name__}: {exc}", header, data, ack_key)
        try:
            stored = self.store.write_frame(frame)
        except TRANSIENT:
            raise
        except FrameConflict as exc:
            return self._dead(msg_id, mid, f"{CONFLICT_REASON} {exc}", header, data, ack_key)
        except StoreError as exc:  # the store refuses this frame's content: bad input, not a failure
            return self._dead(msg_id, mid, f"store refused frame: {exc}", header, data, ack_key)
        except Exception as exc:  # noqa: BLE001 - a store bug: keep the frame, never acknowledge it
            return self._defer(msg_id, mid, exc, fields)
        self._failures.pop(mid, None)
        self.counts["stored" if stored else "duplicate"] += 1
        if stored:
            self.counts["rows"] += frame.tables["routing"].num_rows if "routing" in frame.tables else 0
        self._ack(msg_id, ack_key, frame.frame_id)
        return "stored" if stored else "duplicate"

    def _ack(self, msg_id, ack_key: str, frame_id: str | None) -> None:
        pipe = self.client.pipeline(transaction=False)
        self._settle(pipe, msg_id)
        # Only sets under this stream's ack prefix: a message cannot make us write elsewhere.
        if frame_id and ack_key.startswith(f"{self.stream}:acks:"):
            pipe.sadd(ack_key, frame_id)
            pipe.expire(ack_key, self.ack_ttl_s)
        pipe.execute()

    def _settle(self, pipe, msg_id):
        """Queue the acknowledgement and deletion of a message this consumer is done with; returns the pipeline."""
        pipe.xack(self.stream, GROUP, msg_id)
        pipe.xdel(self.stream, msg_id)
        return pipe

    def _dead(self, msg_id, mid: str, reason: str, header: dict | None, data: bytes, ack_key: str) -> str:
        run, producer, seq, frame_id = _ledger_keys(header)
        self.client.xadd(self.dead_letter_stream, {
            "reason": reason, "message_id": mid, "run": run or "", "producer": producer or "",
            "seq": "" if seq is None else str(seq), "frame": data[:_DEAD_BYTES_KEPT],
            "truncated": int(len(data) > _DEAD_BYTES_KEPT)})
        self._trim_dead_letters()
        self.store.record_dead_letter(reason, message_id=mid, run=run, producer=producer, seq=seq)
        self.counts["dead"] += 1
        self._failures.pop(mid, None)
        log.warning("ingest: dead-lettered message %s: %s", mid, reason)
        # Accounted for, so the producer stops re-sending it; but as rejected, never as stored.
        pipe = self.client.pipeline(transaction=False)
        self._settle(pipe, msg_id)
        if frame_id and ack_key.startswith(f"{self.stream}:acks:"):
            rejected = rejected_key(ack_key)
            pipe.hset(rejected, frame_id, reason[:500])
            pipe.expire(rejected, self.ack_ttl_s)
        pipe.execute()
        return "dead"

    def _trim_dead_letters(self) -> None:
        """Keep the dead-letter stream under its byte budget, dropping the oldest entries."""
        used = self.client.memory_usage(self.dead_letter_stream, samples=0) or 0
        if used <= self.dead_budget_bytes:
            return
        length = self.client.xlen(self.dead_letter_stream)
        keep = max(1, int(length * self.dead_budget_bytes / used * 0.9))
        self.client.xtrim(self.dead_letter_stream, maxlen=keep, approximate=False)

    def _defer(self, msg_id, mid: str, exc: Exception, fields) -> str:
        self.counts["store_errors"] += 1
        failures = self._failures[mid] = self._failures.get(mid, 0) + 1
        if failures < self.max_attempts:
            log.error("ingest: store failed on message %s (attempt %d of %d): %s: %s", mid, failures, self.max_attempts,
                      type(exc).__name__, exc, exc_info=failures == 1)
            raise _Deferred(f"store error on message {mid}: {type(exc).__name__}: {exc}")
        # Out of the way of the frames behind it, whole; the producer is not told it was stored.
        self.client.xadd(self.parked_stream, {**{k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()},
                                              "reason": f"{type(exc).__name__}: {exc}"[:2000], "message_id": mid},
                         maxlen=10_000, approximate=True)
        self._settle(self.client.pipeline(transaction=False), msg_id).execute()
        self._failures.pop(mid, None)
        self.counts["parked"] += 1
        log.error("ingest: parked message %s after %d failed attempts; its producer will re-send it", mid, failures)
        return "parked"


def rejected_key(ack_key: str) -> str:
    """The producer's hash of rejected frame ids (and reasons), beside its ack set."""
    stream, _, producer = ack_key.partition(":acks:")
    return f"{stream}:rejected:{producer}"


def _ledger_keys(header: dict | None):
    """run / producer / seq / frame_id from a header when they are well-formed, else None each."""
    if not header:
        return None, None, None, None
    run = header.get("run")
    try:
        run = check_run_id(run)
    except SchemaError:
        run = None
    producer = header.get("producer")
    producer = producer if isinstance(producer, str) and 0 < len(producer) <= 200 else None
    seq = header.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**31 else None
    frame_id = header.get("frame_id")
    frame_id = frame_id if isinstance(frame_id, str) and len(frame_id) <= 64 else None
    return run, producer, seq, frame_id


def wait_for_redis(client: redis.Redis, stop: threading.Event, timeout: float | None = None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop.is_set():
        try:
            client.ping()
            return True
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if deadline is not None and time.monotonic() > deadline:
                return False
            stop.wait(0.5)
    return False
