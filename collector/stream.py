"""Consumer-group reader of the frame stream: decode, validate, store, then acknowledge.

Delivery is at-least-once from Redis to the store: a message is XACKed only after
`store.write_frame` returned, and `write_frame` is idempotent by frame uuid, so the
store holds every frame exactly once. A consumer that dies (kill -9) leaves its
messages pending in the group; any live consumer takes them over with XAUTOCLAIM once
they have been idle `claim_idle_ms`.

After the durable write the frame id is added to the set named in the message's `ack`
field; the producing RedisSink polls that set and only then forgets its spooled copy.

Malformed messages go to the dead-letter stream with the reason, are recorded in the
store's dead_letters table, and are acknowledged so ingestion continues.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time

import redis
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from moescope.collector.store import Store
from moescope.frame import MAGIC, FrameError, decode
from moescope.schema import SchemaError, check_run_id

log = logging.getLogger(__name__)

GROUP = "moescope-ingest"
ACK_TTL_S = 7 * 86400
_DEAD_BYTES_KEPT = 1 << 20
# Failures of the environment (database or disk away): keep the message pending and retry.
TRANSIENT = (OperationalError, InterfaceError, PoolTimeout, OSError, redis.ConnectionError, redis.TimeoutError,
             redis.BusyLoadingError)


def consumer_name(index: int = 0) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


def peek_header(data: bytes) -> dict | None:
    """The frame header as a dict, or None when the bytes do not even carry one (cheap: no Arrow)."""
    try:
        if not data.startswith(MAGIC):
            return None
        (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
        header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen])
        return header if isinstance(header, dict) else None
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


class StreamIngestor:
    """One consumer of the frame stream. `run(stop)` loops until the event is set."""

    def __init__(self, store: Store, client: redis.Redis, stream: str, dead_letter_stream: str, consumer: str, *,
                 claim_idle_ms: int = 30_000, block_ms: int = 1000, dead_maxlen: int = 100_000):
        self.store, self.client = store, client
        self.stream, self.dead_letter_stream, self.consumer = stream, dead_letter_stream, consumer
        self.claim_idle_ms, self.block_ms, self.dead_maxlen = claim_idle_ms, block_ms, dead_maxlen
        self.counts = {"stored": 0, "duplicate": 0, "dead": 0, "claimed": 0, "retries": 0, "rows": 0}
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
            except TRANSIENT as exc:
                self.counts["retries"] += 1
                backoff = min(5.0, max(0.2, backoff * 2))
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
            frame = decode(data)
            check_run_id(frame.run)
        except (FrameError, SchemaError) as exc:
            return self._dead(msg_id, mid, str(exc), header, data, ack_key)
        except Exception as exc:  # noqa: BLE001 - decoding is pure: any error means the bytes are bad
            return self._dead(msg_id, mid, f"undecodable frame: {type(exc).__name__}: {exc}", header, data, ack_key)
        try:
            stored = self.store.write_frame(frame)
        except TRANSIENT:
            raise
        except Exception as exc:  # noqa: BLE001 - a frame the store rejects must not stop ingestion
            return self._dead(msg_id, mid, f"store rejected frame: {type(exc).__name__}: {exc}", header, data, ack_key)
        self.counts["stored" if stored else "duplicate"] += 1
        if stored:
            self.counts["rows"] += frame.tables["routing"].num_rows if "routing" in frame.tables else 0
        self._ack(msg_id, ack_key, frame.frame_id)
        return "stored" if stored else "duplicate"

    def _ack(self, msg_id, ack_key: str, frame_id: str | None) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(self.stream, GROUP, msg_id)
        # Only sets under this stream's ack prefix: a message cannot make us write elsewhere.
        if frame_id and ack_key.startswith(f"{self.stream}:acks:"):
            pipe.sadd(ack_key, frame_id)
            pipe.expire(ack_key, ACK_TTL_S)
        pipe.execute()

    def _dead(self, msg_id, mid: str, reason: str, header: dict | None, data: bytes, ack_key: str) -> str:
        run, producer, seq, frame_id = _ledger_keys(header)
        self.client.xadd(self.dead_letter_stream, {
            "reason": reason, "message_id": mid, "run": run or "", "producer": producer or "",
            "seq": "" if seq is None else str(seq), "frame": data[:_DEAD_BYTES_KEPT],
            "truncated": int(len(data) > _DEAD_BYTES_KEPT)}, maxlen=self.dead_maxlen, approximate=True)
        self.store.record_dead_letter(reason, message_id=mid, run=run, producer=producer, seq=seq)
        self.counts["dead"] += 1
        log.warning("ingest: dead-lettered message %s: %s", mid, reason)
        self._ack(msg_id, ack_key, frame_id)  # accounted for: the producer must not re-send it forever
        return "dead"


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
