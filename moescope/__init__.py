"""moescope: Mixture-of-Experts observability and router analysis."""
from __future__ import annotations

__version__ = "0.1.0"


def open_store(root=None, database_url=None, *, create: bool = True):
    """Open (or create) a store directory; see moescope.collector.store.Store."""
    from moescope.collector.store import open_store as _open

    return _open(root, database_url, create=create)


__all__ = ["open_store", "__version__"]
