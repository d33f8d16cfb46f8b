"""The ingest service: consumer threads of the frame stream inside a Celery worker process.

A long-lived reader fits a stream better than one task per frame: frames are large
(100k-1M rows), so per-message work dominates and Celery's own queue would only add a
second copy of every frame. The Celery worker still owns the process (start, stop,
signals, beat tasks); `IngestStep` starts the threads when the worker starts and stops
them on shutdown. Decoding and Parquet writing release the GIL, so threads in one
process use several cores.
"""
from __future__ import annotations

import logging
import os
import threading

import redis
from celery import bootsteps

from moescope.collector.store import MetadataUnusable, Store, StoreError
from moescope.collector.stream import TRANSIENT, StreamIngestor, consumer_name, wait_for_redis
from moescope.settings import Settings

log = logging.getLogger(__name__)


class IngestService:
    def __init__(self, settings: Settings, threads: int | None = None):
        threads = settings.ingest_threads if threads is None else threads
        if threads < 1:
            raise ValueError(f"ingest threads must be >= 1, got {threads}")
        self.settings, self.threads = settings, threads
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the consumer threads; MetadataUnusable (the worker must not run) when the store can never open."""
        try:  # a store that can never work fails the worker now, not silently in its threads
            Store(self.settings.store, self.settings.database_url).close()
        except MetadataUnusable:
            raise
        except StoreError as exc:
            log.warning("ingest: store not ready yet (%s); consumer threads will retry", exc)
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name=f"moescope-ingest-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _open_store(self) -> Store | None:
        # The metadata DB may still be starting (compose, restarts): retry rather than die.
        while not self.stop_event.is_set():
            try:
                return Store(self.settings.store, self.settings.database_url)
            except MetadataUnusable:
                raise
            except StoreError as exc:
                log.warning("ingest: store not ready (%s); retrying", exc)
                self.stop_event.wait(2.0)
        return None

    def _run(self, index: int) -> None:
        try:
            self._consume(index)
        except BaseException:  # noqa: BLE001 - a dead consumer must not leave a worker that looks healthy
            log.critical("ingest: consumer thread %d died; stopping the worker so it is restarted", index, exc_info=True)
            logging.shutdown()
            os._exit(3)  # pending frames stay in the group; another worker claims them, as after kill -9

    def _consume(self, index: int) -> None:
        store = self._open_store()
        if store is None:
            return
        client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=30, socket_connect_timeout=5,
                                      health_check_interval=10)
        ingestor = StreamIngestor(store, client, self.settings.stream, self.settings.dead_letter_stream,
                                  consumer_name(index), claim_idle_ms=int(self.settings.claim_idle_s * 1000),
                                  ack_ttl_s=self.settings.ack_ttl_s)
        while not self.stop_event.is_set():
            if not wait_for_redis(client, self.stop_event):
                break
            try:
                ingestor.run(self.stop_event)
            except TRANSIENT as exc:
                log.warning("ingest: %s; reconnecting", exc)
                self.stop_event.wait(1.0)
            except Exception:  # noqa: BLE001 - keep consuming; the message stays pending for a retry
                log.exception("ingest: unexpected error; restarting the consumer loop")
                self.stop_event.wait(1.0)
        client.close()
        store.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout)


class IngestStep(bootsteps.StartStopStep):
    """Worker bootstep: runs the ingest service for the life of the worker process."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, ingest_threads: int | None = None, **kwargs):
        super().__init__(worker, **kwargs)
        self.threads = int(ingest_threads) if ingest_threads else None  # None: settings.ingest_threads
        self.service: IngestService | None = None

    def start(self, worker) -> None:
        from moescope.collector.celery_app import current_settings

        settings = current_settings()
        self.service = IngestService(settings, self.threads)
        self.service.start()
        log.info("ingest: %d consumer thread(s) on stream %r", self.service.threads, settings.stream)

    def stop(self, worker) -> None:
        if self.service is not None:
            self.service.stop()

    def shutdown(self, worker) -> None:
        self.stop(worker)
