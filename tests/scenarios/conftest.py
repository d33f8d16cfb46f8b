"""A store shared by the tests of one scenario module (each scenario is trained once per module)."""
import pytest


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    from moescope.analysis.store import AnalysisStore as Store

    s = Store(tmp_path_factory.mktemp("scenario") / "store")
    yield s
    s.close()
