import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _cpu_kernels_loaded():
    """The CPU kernels, loaded before any test: a first step would otherwise run
    through the NumPy twin while they load (tests/test_loading.py tests that)."""
    from optiscope.kernels import loading

    loading.backend()
    yield
