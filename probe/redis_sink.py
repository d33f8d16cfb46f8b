"""Stream frames to Redis without ever making the training step wait on the network.

`send` encodes the frame, puts the bytes on a bounded in-memory queue and returns. A
background thread moves each frame into the on-disk spool (probe/spool.py) and XADDs
it to the frame stream. The frame stays in the spool until the store has acknowledged
it end to end: after its durable write, an ingest worker adds the frame id to the Redis
set named in the message's `ack` field (`<stream>:acks:<producer>`); this thread polls
that set (SMISMEMBER) and deletes acknowledged frames from the spool.

Redis may restart empty (no persistence), losing both queued stream entries and acks,
so a frame not acknowledged within `resend_after_s` is sent again, and everything
unacknowledged is re-sent at once when the Redis server's run_id changes. The store is
idempotent by frame id, so a re-send never duplicates rows. Past the spill budget a
frame is dropped and its sequence number rides in the next frame's `dropped_seqs` (or
in a trailer frame at close), so the ledger can report it. A frame the collector refused
(malformed, or a (producer, seq) already stored under another uuid) comes back in the
producer's `rejected` hash: it leaves the spool, is counted in stats["rejected"] and
logged with the reason, never counted as acknowledged.

Each producer's spool directory is locked (flock) while its sink lives. A sink started
on a spool directory adopts the frames of producers whose lock is free (a process that
exited before the store acknowledged them) and delivers them too; `moescope resend DIR`
does the same without a model.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path

import redis

from moescope.frame import MAX_DROPPED_SEQS, Frame, FrameError, encode, read_header
from moescope.probe.spool import Spool

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclasses.dataclass
class _Pending:
    producer: str
    seq: int
    frame_id: str
    sent_at: float | None = None  # None: not (or no longer known to be) in Redis


class RedisSink:
    """Sink for "redis://host:port/db": bounded queue -> spool -> XADD, end-to-end acks.

    Options: stream (default settings.stream), maxlen (approximate stream bound, entries),
    queue_bytes (in-memory bound), spool_dir (default: a shared folder under the system
    temp dir, so a later probe delivers what an exited one left), spill_budget_bytes
    (on-disk bound), resend_after_s, ack_poll_s, close_timeout_s (the longest leaving
    `attach` waits for the store's acknowledgements; what is left stays in the spool),
    adopt (deliver frames left in the spool by exited producers; default True).
    """

    def __init__(self, url: str, *, stream: str | None = None, maxlen: int = 512, queue_bytes: int = 64 << 20,
                 spool_dir: str | os.PathLike | None = None, spill_budget_bytes: int = 1 << 30,
                 resend_after_s: float = 60.0, ack_poll_s: float = 0.5, close_timeout_s: float = 10.0,
                 adopt: bool = True):
        if stream is None:
            from moescope.settings import get_settings

            stream = get_settings().stream
        for name, value in (("maxlen", maxlen), ("queue_bytes", queue_bytes), ("spill_budget_bytes", spill_budget_bytes)):
            if value <= 0:
                raise ValueError(f"RedisSink {name} must be positive, got {value}")
        if close_timeout_s < 0:
            raise ValueError(f"RedisSink close_timeout_s must be >= 0, got {close_timeout_s}")
        self.url, self.stream, self.maxlen = url, stream, int(maxlen)
        self.queue_bytes, self.spill_budget_bytes = int(queue_bytes), int(spill_budget_bytes)
        self.resend_after_s, self.ack_poll_s, self.close_timeout_s = resend_after_s, ack_poll_s, close_timeout_s
        self.spool_root = Path(spool_dir) if spool_dir else default_spool_root(url, stream)
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        except ValueError as exc:
            raise ValueError(f"invalid Redis sink URL {url!r}: {exc}") from None
        self.stats = {"frames": 0, "sent": 0, "resent": 0, "acked": 0, "dropped": 0, "send_errors": 0, "rejected": 0,
                      "adopted": 0}
        self.unacked: list[tuple[str, int]] = []  # filled by close()
        self.rejected: list[tuple[str, int, str]] = []  # (producer, seq, reason) the collector refused
        self._queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._lock = threading.Condition()
        self._spools: dict[str, Spool] = {}
        self._locks: dict[str, int] = {}  # producer -> fd holding its spool directory's flock
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._dropped: dict[str, list[int]] = {}  # seqs not yet reported in a frame
        self._last: dict[str, tuple[str, int, bool]] = {}  # producer -> (run, seq, final)
        self._run_id: str | None = None
        self._closing = False
        self._wake = threading.Event()
        self._closed = False
        if adopt:
            self.adopt_orphans()
        self._thread = threading.Thread(target=self._loop, name="moescope-redis-sink", daemon=True)
        self._thread.start()

    def adopt_orphans(self) -> int:
        """Take over the spooled frames of producers whose process is gone (their spool lock is free)."""
        if not self.spool_root.is_dir():
            return 0
        adopted = 0
        for directory in sorted(p for p in self.spool_root.iterdir() if p.is_dir()):
            if directory.name in {_SAFE.sub("_", p) for p in self._spools}:
                continue
            frames = sorted(directory.glob("*.frame"))
            if not frames:
                continue
            headers = []
            for path in frames:
                try:
                    header = read_header(path.read_bytes()[:1 << 24])[0]
                    headers.append((header["producer"], int(header["seq"]), str(header["frame_id"])))
                except (FrameError, OSError, KeyError, TypeError, ValueError):
                    log.warning("moescope: unreadable spooled frame %s left as it is", path)
            if not headers:
                continue
            producer = headers[0][0]
            if _SAFE.sub("_", producer) != directory.name or not self._lock_spool(producer, directory):
                continue  # a live sink still owns it, or the folder is not a producer's spool
            spool = Spool(directory, max(self.spill_budget_bytes, sum(p.stat().st_size for p in frames)))
            with self._lock:
                self._spools[producer] = spool
                for prod, seq, frame_id in headers:
                    if prod == producer:
                        self._pending[(prod, seq)] = _Pending(prod, seq, frame_id)
                        adopted += 1
                self._lock.notify_all()
        self.stats["adopted"] += adopted
        if adopted:
            log.warning("moescope: delivering %d frame(s) an exited producer left in spool %s", adopted, self.spool_root)
        return adopted

    def _lock_spool(self, producer: str, directory: Path) -> bool:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._locks[producer] = fd
        return True

    # ------------------------------------------------------------ probe side
    def send(self, frame: Frame) -> None:
        """Queue one frame; never waits on Redis (spills to disk, then drops and reports)."""
        if self._closing:
            raise RuntimeError("RedisSink.send called after close()")
        with self._lock:
            carried = self._dropped.pop(frame.producer, [])
            if len(carried) + len(frame.dropped_seqs) > MAX_DROPPED_SEQS:  # the rest ride in later frames
                keep = max(0, MAX_DROPPED_SEQS - len(frame.dropped_seqs))
                carried, self._dropped[frame.producer] = carried[:keep], carried[keep:]
            prev = self._last.get(frame.producer)
            if prev is None or frame.seq >= prev[1]:
                self._last[frame.producer] = (frame.run, frame.seq, frame.final)
        if carried:
            frame = dataclasses.replace(frame, dropped_seqs=sorted(set(frame.dropped_seqs) | set(carried)))
        data = encode(frame)
        self.stats["frames"] += 1
        with self._lock:
            fits = self._queued_bytes + len(data) <= self.queue_bytes
            if fits:
                self._queued_bytes += len(data)
        if fits:
            self._queue.put((frame, data))
            self._wake.set()
        elif not self._spool_frame(frame, data):
            self._drop(frame)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued frame is in the spool (durable; delivery goes on in the background)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queued_bytes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.05 if left is None else min(left, 0.05))
        return True

    def wait_acked(self, timeout: float | None = None) -> bool:
        """Wait until the store has acknowledged every frame sent so far."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queued_bytes or self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.05 if left is None else min(left, 0.05))
        return True

    def backlog(self) -> tuple[int, int]:
        """(frames queued in memory, frames spooled and not yet acknowledged by the store)."""
        with self._lock:
            return self._queue.qsize(), len(self._pending)

    def close(self) -> None:
        """Send what is left (plus a trailer reporting late drops), wait up to close_timeout_s for acks."""
        if self._closed:
            return
        self._closing = True
        deadline = time.monotonic() + self.close_timeout_s
        with self._lock:  # let the sender decide the fate (spooled or dropped) of every queued frame
            while self._queued_bytes and time.monotonic() < deadline:
                self._lock.wait(0.05)
            trailers = [(p, self._last[p], seqs) for p, seqs in self._dropped.items() if seqs and p in self._last]
            self._dropped = {}
        for producer, (run, seq, final), seqs in trailers:
            # The frame that would have carried these drop reports never came: send one that does.
            trailer = Frame(run=run, producer=producer, seq=seq + 1, dropped_seqs=sorted(seqs), final=final)
            with self._lock:
                self._last[producer] = (run, seq + 1, final)
            if not self._spool_frame(trailer, encode(trailer), force=True):
                log.error("moescope: could not report dropped frames %s of producer %s", seqs, producer)
        self.wait_acked(max(0.0, deadline - time.monotonic()))
        self._closed = True
        self._thread.join(timeout=5)
        with self._lock:
            self.unacked = sorted(self._pending)
        if self.unacked:
            log.warning("moescope: %d frame(s) not acknowledged by the store within %.0fs; they stay in spool %s: "
                        "the next probe using that spool directory delivers them, or run `moescope resend %s`",
                        len(self.unacked), self.close_timeout_s, self.spool_root, self.spool_root)
        for fd in self._locks.values():
            os.close(fd)  # releases the flock: a later sink may adopt what is left
        self._locks.clear()
        self.client.close()

    # ------------------------------------------------------------ internals
    def _spool(self, producer: str) -> Spool:
        with self._lock:  # send() and the sender thread may both ask first
            spool = self._spools.get(producer)
            if spool is None:
                directory = self.spool_root / _SAFE.sub("_", producer)
                spool = self._spools[producer] = Spool(directory, self.spill_budget_bytes)
                self._lock_spool(producer, directory)
            return spool

    def _spool_frame(self, frame: Frame, data: bytes, *, force: bool = False) -> bool:
        spool = self._spool(frame.producer)
        if force:
            spool.budget_bytes = max(spool.budget_bytes, spool.bytes_used + len(data))
        if not spool.put(frame.seq, data):
            return False
        with self._lock:
            self._pending[(frame.producer, frame.seq)] = _Pending(frame.producer, frame.seq, frame.frame_id)
            self._lock.notify_all()
        return True

    def _drop(self, frame: Frame) -> None:
        self.stats["dropped"] += 1
        log.warning("moescope: spill budget exceeded, dropping frame %s/%d (reported in the next frame)", frame.producer, frame.seq)
        with self._lock:
            self._dropped.setdefault(frame.producer, []).extend([frame.seq, *frame.dropped_seqs])

    def _ack_key(self, producer: str) -> str:
        return f"{self.stream}:acks:{producer}"

    def _loop(self) -> None:
        backoff, next_poll = 0.0, 0.0
        while not self._closed:
            fresh = self._drain_queue()
            try:
                self._send(fresh)
                if time.monotonic() >= next_poll:
                    self._poll_acks()
                    next_poll = time.monotonic() + self.ack_poll_s
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as exc:
                self.stats["send_errors"] += 1
                backoff = min(2.0, max(0.1, backoff * 2))
                log.debug("moescope: Redis unavailable (%s); frames stay in the spool", exc)
                self._sleep(backoff)
                continue
            if fresh is None:
                self._sleep(0.05)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(max(seconds, 0.02))  # new work wakes the sender early
        self._wake.clear()

    def _drain_queue(self) -> list[tuple[str, int, bytes]] | None:
        """Move queued frames into the spool; returns those still held in memory for a first send."""
        fresh = []
        while True:
            try:
                frame, data = self._queue.get_nowait()
            except queue.Empty:
                break
            if self._spool_frame(frame, data):
                fresh.append((frame.producer, frame.seq, data))
            else:
                self._drop(frame)
            with self._lock:
                self._queued_bytes -= len(data)
                self._lock.notify_all()
        return fresh or None

    def _send(self, fresh) -> None:
        now = time.monotonic()
        in_memory = {(p, s): d for p, s, d in fresh or []}
        with self._lock:
            due = [p for p in self._pending.values()
                   if p.sent_at is None or now - p.sent_at >= self.resend_after_s]
        batch, batch_bytes = [], 0
        for p in sorted(due, key=lambda p: (p.producer, p.seq)):
            data = in_memory.get((p.producer, p.seq))
            if data is None:
                try:
                    data = self._spool(p.producer).get(p.seq)
                except FileNotFoundError:  # acked and removed meanwhile
                    continue
            batch.append((p, data))
            batch_bytes += len(data)
            if batch_bytes >= 32 << 20:
                self._xadd(batch)
                batch, batch_bytes = [], 0
        if batch:
            self._xadd(batch)

    def _xadd(self, batch) -> None:
        pipe = self.client.pipeline(transaction=False)
        for p, data in batch:
            pipe.xadd(self.stream, {"frame": data, "ack": self._ack_key(p.producer)}, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        now = time.monotonic()
        with self._lock:
            for p, _ in batch:
                self.stats["resent" if p.sent_at is not None else "sent"] += 1
                p.sent_at = now
            self._lock.notify_all()

    def _poll_acks(self) -> None:
        run_id = self.client.info("server").get("run_id")
        with self._lock:
            if self._run_id is not None and run_id != self._run_id:
                # Redis restarted: whatever was in the stream (and any ack not yet seen) is gone.
                for p in self._pending.values():
                    p.sent_at = None
            self._run_id = run_id
            by_producer: dict[str, list[_Pending]] = {}
            for p in self._pending.values():
                if p.sent_at is not None:
                    by_producer.setdefault(p.producer, []).append(p)
        for producer, items in by_producer.items():
            key = self._ack_key(producer)
            for i in range(0, len(items), 1000):
                chunk = items[i : i + 1000]
                self._take_rejected(producer, chunk)
                if not chunk:  # every one of them was refused
                    continue
                flags = self.client.smismember(key, [p.frame_id for p in chunk])
                acked = [p for p, ok in zip(chunk, flags) if ok]
                if not acked:
                    continue
                for p in acked:
                    self._spool(producer).remove(p.seq)
                with self._lock:
                    for p in acked:
                        self._pending.pop((p.producer, p.seq), None)
                    self.stats["acked"] += len(acked)
                    self._lock.notify_all()
                self.client.srem(key, *[p.frame_id for p in acked])

    def _take_rejected(self, producer: str, chunk: list[_Pending]) -> None:
        key = f"{self.stream}:rejected:{producer}"
        reasons = self.client.hmget(key, [p.frame_id for p in chunk])
        refused = [(p, r.decode(errors="replace") if isinstance(r, bytes) else str(r)) for p, r in zip(chunk, reasons) if r]
        if not refused:
            return
        for p, reason in refused:
            log.error("moescope: the collector refused frame %s/%d: %s", producer, p.seq, reason)
            self._spool(producer).remove(p.seq)
        with self._lock:
            for p, reason in refused:
                self._pending.pop((p.producer, p.seq), None)
                self.rejected.append((p.producer, p.seq, reason))
            self.stats["rejected"] += len(refused)
            self._lock.notify_all()
        self.client.hdel(key, *[p.frame_id for p, _ in refused])
        chunk[:] = [p for p in chunk if (p.producer, p.seq) in self._pending]


def default_spool_root(url: str, stream: str) -> Path:
    """One spool folder per user and destination: a later probe to the same Redis stream delivers what an
    exited one left, and never sends it to another broker."""
    dest = hashlib.sha1(f"{url}|{stream}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"moescope-spool-{os.getuid()}" / dest
