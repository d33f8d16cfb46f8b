"""Suite-wide setup. Triton kernels run on the CPU interpreter when there is no GPU; the
variable must be set before any @triton.jit kernel is defined, hence here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

POSTGRES_URL = os.environ.get("MOESCOPE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def store(tmp_path):
    from moescope.analysis.store import AnalysisStore as Store

    s = Store(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def postgres_url():
    return POSTGRES_URL
