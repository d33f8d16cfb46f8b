"""moescope: Mixture-of-Experts observability and router analysis."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:  # pyproject.toml holds the one version string
    __version__ = version("moescope")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"


def open_store(root=None, database_url=None, *, create: bool = True):
    """Open (or create) a store directory: storage plus `store.metric(...)` (moescope.analysis.store.AnalysisStore).

    root defaults to settings.store ($MOESCOPE_STORE, else ./moescope-data); create=False
    refuses a path that holds no store instead of creating one.
    """
    from moescope.analysis.store import AnalysisStore
    from moescope.settings import get_settings

    settings = get_settings()
    return AnalysisStore(root if root is not None else settings.store, database_url or settings.database_url,
                         create=create)


__all__ = ["open_store", "__version__"]
