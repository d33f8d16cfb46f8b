"""The multi-page Dash app (Dash pages): a menu, one page per question, the page state in the URL.

Each page module in moescope.dashboard.pages builds its layout from the URL query string
(so a shared link reopens the same view) and registers its callbacks on this app with
the store; every number comes from moescope.analysis or the store's own methods, nothing
here opens a database. A page layout never touches the store, so the page registry,
which Dash keeps process-wide, is the same for every app built here.
"""
from __future__ import annotations

import dash
from dash import dcc, html
from flask import Flask

from moescope.collector.store import Store
from moescope.dashboard.pages import PAGES, common
from moescope.settings import Settings, get_settings


CHART_REFRESH_FACTOR = 6


def create_dash(store: Store, *, requests_prefix: str = "/dash/", refresh_ms: int = 5000,
                settings: Settings | None = None) -> dash.Dash:
    """A Dash app on its own Flask server, to be mounted at `requests_prefix` of the FastAPI app."""
    app = dash.Dash(__name__, server=Flask(__name__), requests_pathname_prefix=requests_prefix,
                    routes_pathname_prefix="/", title="moescope", update_title=None, use_pages=True, pages_folder="",
                    suppress_callback_exceptions=True)  # page components exist only while their page is shown
    for order, module in enumerate(PAGES):
        dash.register_page(module.__name__, path=module.PATH, name=module.NAME, title=f"moescope · {module.NAME}",
                           order=order, layout=module.layout)
    app.layout = _shell(requests_prefix, refresh_ms)
    ctx = common.Context(store=store, settings=settings if settings is not None else get_settings())
    for module in PAGES:
        module.register(app, ctx)
    return app


def _shell(prefix: str, refresh_ms: int) -> html.Div:
    # Plain links: each page is built from its URL, so a full load is the same as navigating.
    nav = [html.A(m.NAME, href=prefix.rstrip("/") + m.PATH if m.PATH != "/" else prefix, className="nav-link",
                  id=f"nav-{m.PREFIX}") for m in PAGES]
    return html.Div(className="page", children=[
        html.Header(className="topbar", children=[
            html.H1("moescope"), html.Nav(nav, className="nav"),
            html.Span("Mixture-of-Experts router observability", className="tagline")]),
        dcc.Interval(id="refresh", interval=refresh_ms, n_intervals=0),
        # Charts over steps refresh less often: a refresh that comes before the previous answer
        # makes Dash drop that answer, so a slow query on a busy machine would never draw.
        dcc.Interval(id="refresh-charts", interval=refresh_ms * CHART_REFRESH_FACTOR, n_intervals=0),
        dash.page_container,
    ])
