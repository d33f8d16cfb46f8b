"""The FastAPI app: JSON API, health and Prometheus endpoints, and the Dash page mounted at /dash/."""
from __future__ import annotations

import warnings

import moescope
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, RedirectResponse

from moescope.collector.store import Store
from moescope.dashboard import docs, prometheus
from moescope.dashboard.api import alerts, devices, metrics, runs, whatif
from moescope.dashboard.dash_app import create_dash
from moescope.dashboard.deps import StoreDep
from moescope.settings import Settings, get_settings

with warnings.catch_warnings():
    # Starlette marks its WSGI bridge deprecated in favour of a2wsgi; it still works, and
    # Dash's Flask server needs some bridge. Swap in a2wsgi.WSGIMiddleware once it is a dependency.
    warnings.simplefilter("ignore")
    from fastapi.middleware.wsgi import WSGIMiddleware

DASH_PREFIX = "/dash/"


def create_app(store: Store, settings: Settings | None = None, *, refresh_ms: int = 5000) -> FastAPI:
    """The whole service for one store: /api/..., /healthz, /metrics, and the dashboard at /dash/."""
    app = FastAPI(title="moescope", summary="Mixture-of-Experts router observability: runs, routing metrics, alerts.",
                  version=moescope.__version__, docs_url=None, redoc_url=None)
    docs.mount_docs(app)  # Swagger UI and ReDoc from local files, not a CDN
    app.state.store = store
    app.state.settings = settings if settings is not None else get_settings()
    for module in (runs, metrics, alerts, whatif, devices):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def redirect_to_dashboard() -> RedirectResponse:
        return RedirectResponse(DASH_PREFIX, status_code=307)

    @app.get("/healthz", tags=["service"])
    def get_health(store: StoreDep) -> dict:
        """Liveness and store reachability: the number of recorded runs."""
        return {"status": "ok", "store": str(store.root), "runs": len(store.runs())}

    app.state.prometheus = prometheus.registry_for(store)  # this app's own registry, no process-global state

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def get_prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition: ingest counters, alerts firing now, routing health of each run's latest window."""
        return PlainTextResponse(prometheus.exposition(app.state.prometheus), media_type=prometheus.CONTENT_TYPE)

    dash_app = create_dash(store, requests_prefix=DASH_PREFIX, refresh_ms=refresh_ms, settings=app.state.settings)
    app.state.dash = dash_app
    app.mount(DASH_PREFIX.rstrip("/"), WSGIMiddleware(dash_app.server))
    return app


def serve(store: Store, host: str = "127.0.0.1", port: int = 8050, *, settings: Settings | None = None,
          evaluate_alerts: bool = False) -> None:
    """Run the API and dashboard with uvicorn until interrupted; with evaluate_alerts, also evaluate the alert rules
    every settings.alert_interval_s (alert_loop), as beat does where workers run."""
    import sys

    import uvicorn

    from moescope.dashboard.alert_loop import AlertLoop
    from moescope.dashboard.deps import is_loopback

    settings = (settings or get_settings()).model_copy(update={"host": host, "port": port})
    if not settings.api_token and not is_loopback(host):
        print(f"moescope: warning: listening on {host} with no MOESCOPE_API_TOKEN: reads are open to whoever reaches "
              "the port, and writes (alert rules) are refused until a token is set", file=sys.stderr, flush=True)
    loop = AlertLoop(store, settings.alert_interval_s, settings).start() if evaluate_alerts else None
    try:
        uvicorn.run(create_app(store, settings), host=host, port=port, log_level="info")
    finally:
        if loop is not None:
            loop.stop()
