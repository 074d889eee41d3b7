import pytest

from bench_utils import copy_bandwidth_gbps


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The device's measured copy bandwidth (GB/s, bytes read + written), measured once."""
    return copy_bandwidth_gbps()
