"""The dashboard's pages, in menu order; each module has PATH, NAME, PREFIX, layout(**query) and register(app, ctx)."""
from moescope.dashboard.pages import alerts, balance, capacity, compare, drift, health, runs, specialisation, whatif

PAGES = [runs, balance, health, specialisation, drift, compare, capacity, whatif, alerts]
