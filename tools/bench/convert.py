"""Benchmark the converters on a synthetic checkpoint (random weights): Llama-3.2-1B-shaped
(``--model dense``) or a 3.2 GB Qwen3-MoE (``--model moe``: Qwen3-30B-A3B's vocabulary, heads
and expert width, 64 experts in 8 layers).

Writes the HF checkpoint (bf16, sharded safetensors), then times
``python -m megatron_simpo.cli.convert`` hf-to-megatron and megatron-to-hf as subprocesses
while sampling the summed proportional memory (PSS) of each process tree. Reports wall time and
peak memory over the model's size in bytes, as a table and (with --output) JSON. A toy model of
the same architecture is converted first: its peak is the processes' fixed cost.

  python -m tools.bench convert --tensor-parallel-size 2
  python -m tools.bench convert --model moe --tensor-parallel-size 1 --expert-model-parallel-size 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tools.bench.common import command, write_report


LLAMA32_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                  intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=128256,
                  max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                  hidden_act="silu", tie_word_embeddings=True, torch_dtype="bfloat16",
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


# Qwen3-30B-A3B's vocabulary, attention and expert shapes (hidden 2048 -> 1024), 8 of its 48
# layers with 64 of its 128 experts: 1.6 B parameters, 1,536 expert tensors.
QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=1024,
                 intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=64,
                 num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                 mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                 tie_word_embeddings=False, attention_bias=False, torch_dtype="bfloat16",
                 router_aux_loss_coef=0.001, output_router_logits=False)

MODELS = {"dense": ("Llama-3.2-1B shape", LLAMA32_1B),
          "moe": ("Qwen3-MoE, 64 experts x 8 layers", QWEN3_MOE)}


def toy(config: dict) -> dict:
    """The same architecture at toy size: its conversion measures the fixed cost of the
    processes (Python, torch, megatron-core imports), which does not grow with the model."""
    small = dict(config, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    if "num_experts" in config:
        small.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return small


def write_synthetic(path: Path, config: dict, shard_size: str) -> int:
    """Random bf16 weights in HF layout; returns the model's size in bytes."""
    import torch

    from megatron_simpo.convert.hf_io import write_safetensors
    from megatron_simpo.convert.llama import expected_hf_shape, hf_names_for, megatron_names
    from megatron_simpo.model.architecture import ModelConfig

    model_config = ModelConfig.from_hf_config(config)
    names = []
    for name in megatron_names(model_config):
        names += [n for n in hf_names_for(name, model_config) if n not in names]
    generator = torch.Generator().manual_seed(0)
    state = {n: (0.02 * torch.randn(expected_hf_shape(n, model_config), generator=generator)
                 ).to(torch.bfloat16) for n in names}
    path.mkdir(parents=True)
    write_safetensors(state.items(), {n: (tuple(t.shape), t.dtype) for n, t in state.items()},
                      path, shard_size)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * t.element_size() for t in state.values())


def measure(command: list[str]) -> dict:
    """Run ``command``; wall seconds and peak memory of its process tree (sampled, ~10 Hz).

    Memory is the summed PSS (proportional set size): pages shared between the tree's processes
    (forked checkpoint writers, memory-mapped safetensors read by several ranks) are counted
    once, split between their users, instead of once per process as a summed RSS would.
    """
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_pss_bytes": peak}


@dataclass(frozen=True)
class ConvertOptions:
    tensor_parallel_size: int = 2
    """TP of the Megatron checkpoint."""
    pipeline_parallel_size: int = 1
    """PP of the Megatron checkpoint."""
    expert_model_parallel_size: int = 1
    """EP of the Megatron checkpoint (--model moe)."""
    model: Literal["dense", "moe"] = "dense"
    """dense: Llama-3.2-1B-shaped; moe: a Qwen3-MoE with 64 experts."""
    workdir: str | None = None
    """Where to write the checkpoints (default: a temp dir)."""
    output: str | None = None
    """Write the results as JSON here."""


COMMAND = command("convert", __doc__, options=ConvertOptions)


def main(argv=None) -> None:
    args = COMMAND.parse(argv)["options"]

    def convert_both(tmp: Path, config: dict) -> tuple[int, dict]:
        model_bytes = write_synthetic(tmp / "hf", config, "1GB")
        python = sys.executable
        return model_bytes, {
            "hf_to_megatron": measure([python, "-m", "megatron_simpo.cli.convert", "hf-to-megatron",
                                       "--hf-path", str(tmp / "hf"), "--save", str(tmp / "mg"),
                                       "--tensor-parallel-size", str(args.tensor_parallel_size),
                                       "--pipeline-parallel-size", str(args.pipeline_parallel_size),
                                       "--expert-model-parallel-size",
                                       str(args.expert_model_parallel_size), "--dtype", "bf16"]),
            "megatron_to_hf": measure([python, "-m", "megatron_simpo.cli.convert", "megatron-to-hf",
                                       "--load", str(tmp / "mg"), "--save", str(tmp / "hf2")]),
        }

    if args.expert_model_parallel_size > 1 and args.model != "moe":
        raise SystemExit("--expert-model-parallel-size needs --model moe")
    title, config = MODELS[args.model]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        _, fixed = convert_both(Path(tmp), toy(config))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model_bytes, runs = convert_both(Path(tmp), config)
    result = {"model": f"{title}, random bf16", "model_bytes": model_bytes,
              "tensor_parallel_size": args.tensor_parallel_size,
              "pipeline_parallel_size": args.pipeline_parallel_size,
              "expert_model_parallel_size": args.expert_model_parallel_size, "runs": {}}
    print(f"model: {title}, {model_bytes / 1e9:.2f} GB (bf16), TP={args.tensor_parallel_size} "
          f"PP={args.pipeline_parallel_size} EP={args.expert_model_parallel_size}")
    print(f"{'direction':<16}{'wall s':>8}{'peak PSS GB':>13}{'peak/model':>12}"
          f"{'fixed GB':>10}{'(peak-fixed)/model':>20}")
    for name, run in runs.items():
        ratio = run["peak_pss_bytes"] / model_bytes
        fixed_bytes = fixed[name]["peak_pss_bytes"]
        net = (run["peak_pss_bytes"] - fixed_bytes) / model_bytes
        result["runs"][name] = {**run, "peak_over_model_bytes": ratio,
                                "fixed_process_bytes": fixed_bytes,
                                "peak_minus_fixed_over_model_bytes": net}
        print(f"{name:<16}{run['seconds']:>8.1f}{run['peak_pss_bytes'] / 1e9:>13.2f}{ratio:>12.2f}"
              f"{fixed_bytes / 1e9:>10.2f}{net:>20.2f}")
    write_report(args.output, result)
