"""The benchmark tools run end to end at toy sizes (their figures are recorded in docs/, not tested)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_simpo_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_simpo.py"), "--steps", "1", "--warmup", "0",
         "--seq", "64", "--vocab", "1000", "--hidden", "32", "--chunk", "16", "--step-seq", "32",
         "--pairs", "2", "--output", str(out)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    # Toy sizes: the values are noise (a peak RSS can even sit below its baseline); the
    # report's shape is what is checked here.
    for section in ("logprobs", "steps"):
        assert {"time_ratio", "peak_ratio"} <= set(report[section])
        assert report[section]["time_ratio"] > 0
    assert "SimPO / DPO step" in completed.stdout
    assert {"time_ratio_vs_precomputed", "peak_ratio_vs_precomputed"} <= set(report["steps"])
    for algorithm in ("simpo", "dpo", "dpo_precomputed"):
        assert report["steps"][algorithm]["model_tflops_per_second"] > 0
        assert report["steps"][algorithm]["tokens_per_second"] > 0
