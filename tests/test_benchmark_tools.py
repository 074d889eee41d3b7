"""The benchmark plumbing a GPU run depends on: each result kept as it ends (a suite stopped at its
time limit by benchmarks/run_gpu.sh writes no JSON), and summarize.py reading what was kept."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import summarize  # noqa: E402


def test_each_result_is_kept_as_it_ends_and_summarized(tmp_path):
    rows = tmp_path / "bench-kernels.rows.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_kernels.py", "-k", "test_random_masking and torch",
         "--benchmark-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env={**os.environ, "FASTMAE_BENCH_ROWS": str(rows)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["extra_info"]["op"] == "random_masking" and row["extra_info"]["provider"] == "torch"
    truncated = tmp_path / "bench-e2e.json"
    truncated.write_text('{"benchmarks": [')  # a suite killed while writing
    infos = summarize.results([str(rows), str(truncated)])
    assert [(i["op"], i["provider"]) for i in infos] == [("random_masking", "torch")]
    assert "| random_masking | fwd |" in summarize.table(infos)
