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


def test_bench_simpo_runs_and_reports_ratios(tmp_path, monkeypatch):
    from megatron_simpo.distributed import launch
    from tests import multiprocess
    from tests.tiny import tiny_hf_config
    from tools.bench import logprobs

    timing = ("--steps", "1", "--warmup", "0", "--chunk", "16")
    # The log-prob stage's variants on the suite's reused rank instead of a fresh process each
    # (the steps benchmark below runs as a user runs it: its command, fresh worker processes).
    monkeypatch.setattr(launch, "run_on_ranks", multiprocess.run_on_ranks)
    logprobs.main([*timing, "--seq", "64", "--vocab", "1000", "--hidden", "32",
                   "--output", str(tmp_path / "logprobs.json")])

    toy = tmp_path / "config.json"  # the tiny test model: the report's shape is what is checked
    toy.write_text(json.dumps(tiny_hf_config("llama3")))
    completed = _bench("steps", tmp_path / "steps.json", *timing, "--step-seq", "32",
                       "--pairs", "2", "--model-config", str(toy))
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


def test_the_gemma2_preset_is_gemma_2_2b():
    """The benchmark's Gemma-2 shape, exported as config.json, is google/gemma-2-2b: its
    published config fields, and transformers builds 2,614,341,888 parameters from it."""
    import torch
    import transformers

    from megatron_simpo.model.architecture import ModelConfig, hf_config_dict
    from tools.bench.common import PRESETS

    hf = hf_config_dict(ModelConfig(**PRESETS["gemma2-2b"]), None, torch.bfloat16)
    published = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                     query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)
    assert {key: hf[key] for key in published} == published
    config = transformers.Gemma2Config(**hf)
    assert [config.layer_types[i] for i in (0, 1, 24, 25)] == [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    with torch.device("meta"):
        model = transformers.Gemma2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 2_614_341_888
