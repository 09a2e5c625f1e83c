"""The prepared GPU benchmark runs end to end on a machine without a GPU (``--cpu-smoke``).

A GPU is lent to this project rarely and briefly; ``bash ci/gpu.sh`` (which runs
``bench/bench_gpu.py``) must work the first time it gets one. This runs the script's whole logic
with every GPU system skipped: argument handling, data, the iqdb CPU path, the open section, the
checks and the result file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_gpu.py"


@pytest.mark.skipif(
    not SCRIPT.exists(),
    reason="no bench/ next to the tests (ci/wheel.sh runs the suite apart from the source)",
)
def test_the_gpu_benchmark_runs_end_to_end_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_smoke.md"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--cpu-smoke",
        "--no-tests",
        "--n",
        "4000",
        "--dims",
        "32",
        "--batches",
        "1,64",
        "--ks",
        "10,100",
        "--budget",
        "150",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "SECTION FAILED" not in proc.stdout + proc.stderr, tail
    text = out.read_text()
    assert "iqdb cpu" in text, text[:2000]
    assert "Open a 4,000 x 32 durable snapshot" in text, text[:2000]
    assert "Grow a database from empty to 4,000 x 128" in text, text[-3000:]
    assert "| 64 | 100 | iqdb cpu |" in text and "1.0000" in text, text[:3000]  # searched, exact
