import json
import os

import pytest

from bench_utils import copy_bandwidth_gbps

# A JSON-lines file each passed benchmark's extra_info is appended to as soon as it ends: pytest-benchmark
# writes --benchmark-json only when the session ends, so a suite stopped at its time limit
# (benchmarks/run_gpu.sh) would otherwise leave nothing of the rows it had finished.
ROWS = os.environ.get("FASTMAE_BENCH_ROWS")


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The device's measured copy bandwidth (GB/s, bytes read + written), measured once."""
    return copy_bandwidth_gbps()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if ROWS and call.when == "call" and report.passed and bench is not None and bench.extra_info:
        with open(ROWS, "a") as f:
            f.write(json.dumps({"name": item.name, "extra_info": bench.extra_info}, default=str) + "\n")
