"""FastAPI service with the Dash dashboard mounted in it.

    from moescope.dashboard import create_app, serve
    app = create_app(store)            # ASGI app: /api/..., /healthz, /metrics, /dash/
    serve(store, "127.0.0.1", 8050)    # uvicorn, until interrupted
"""
from moescope.dashboard.app import create_app, serve

__all__ = ["create_app", "serve"]
