"""Alert evaluation inside `moescope serve --evaluate-alerts`, for a deployment without `moescope beat`.

Beat schedules evaluation where workers run. A single server (the demo, an incident
investigated on a laptop) has no beat, and its rules would never fire. The loop here
calls the same `evaluate_alerts` every `alert_interval_s`; evaluation saves each rule's
progress with a compare-and-set on the last step, and deliveries are claimed one by one,
so a server and a beat that both evaluate take turns rather than doubling events.
"""
from __future__ import annotations

import logging
import threading

from moescope.analysis import alerts

log = logging.getLogger(__name__)


class AlertLoop:
    """A daemon thread evaluating every enabled rule every `interval` seconds until `stop()`."""

    def __init__(self, store, interval: float, settings=None):
        if not interval > 0:
            raise ValueError(f"alert_interval_s must be positive, got {interval!r}")
        self.store, self.interval, self.settings = store, float(interval), settings
        self.rounds = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moescope-alerts", daemon=True)

    def start(self) -> AlertLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alerts.evaluate_alerts(self.store, settings=self.settings)
            except Exception as exc:  # a broken store must not end the loop: the next round tries again
                self.failures += 1
                log.warning("alert evaluation failed: %s", exc)
            self.rounds += 1
            self._stop.wait(self.interval)
