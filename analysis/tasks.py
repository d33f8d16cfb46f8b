"""The scheduled alert evaluation, run by the Celery app's beat schedule (collector/celery_app.py).

It lives here, above storage, so the collector never imports analysis; the Celery app
lists this module by name among its task modules.
"""
from __future__ import annotations

from moescope.analysis import alerts
from moescope.collector.celery_app import app, current_settings
from moescope.collector.store import Store


@app.task(name="moescope.evaluate_alerts", ignore_result=True)
def evaluate_alerts() -> int:
    """Evaluate the alert rules (moescope.analysis.alerts); returns the number of events written."""
    settings = current_settings()
    store = Store(settings.store, settings.database_url)
    try:
        return len(alerts.evaluate_alerts(store))
    finally:
        store.close()
