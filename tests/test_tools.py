"""The benchmark tools run end to end at toy sizes (their figures are recorded in docs/, not tested)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(name, out, *flags):
    """``python -m tools.bench NAME FLAGS --output OUT`` from the repository root."""
    return subprocess.run([sys.executable, "-m", "tools.bench", name, *flags, "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_bench_simpo_runs_and_reports_ratios(tmp_path):
    timing = ("--steps", "1", "--warmup", "0", "--chunk", "16")
    logprobs = _bench("logprobs", tmp_path / "logprobs.json", *timing, "--seq", "64", "--vocab",
                      "1000", "--hidden", "32")
    assert logprobs.returncode == 0, logprobs.stderr[-2000:]
    completed = _bench("steps", tmp_path / "steps.json", *timing, "--step-seq", "32",
                       "--pairs", "2")
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads((tmp_path / "steps.json").read_text())
    report["logprobs"] = json.loads((tmp_path / "logprobs.json").read_text())["logprobs"]
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


def test_bench_dispatch_names_every_benchmark_and_builds_its_options():
    """``python tools/bench/__main__.py --help`` (run as a file) lists the benchmarks; every
    benchmark module imports and parses its defaults (its options dataclasses build)."""
    import importlib

    from tools.bench.__main__ import BENCHMARKS

    listed = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "__main__.py"),
                             "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name, (module_name, _) in BENCHMARKS.items():
        assert f"  {name} " in listed.stdout
        module = importlib.import_module(f"tools.bench.{module_name}")
        if hasattr(module, "COMMAND"):  # microbatch parses with plain argparse
            assert all(value is not None for value in module.COMMAND.parse([]).values())
