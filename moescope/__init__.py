"""moescope: Mixture-of-Experts observability and router analysis."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:  # pyproject.toml holds the one version string
    __version__ = version("moescope")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"


def open_store(root=None, database_url=None, *, create: bool = True):
    """Open (or create) a store directory; see moescope.collector.store.Store."""
    from moescope.collector.store import open_store as _open

    return _open(root, database_url, create=create)


__all__ = ["open_store", "__version__"]
