"""Local core attention: Megatron-Core's DotProductAttention vs SDPAttention (torch SDPA).

Forward + backward of the attention core alone, causal, grouped-query, fp32 on CPU (bf16 on a
GPU), median of --steps after --warmup, both in one process; prints the SDPA / local time ratio
and the largest output difference.

  python -m tools.bench attention --seq 1024 --heads 8 --groups 2
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

from tools.bench.common import Timing, command, sync, write_report


@dataclass(frozen=True)
class AttentionOptions:
    seq: int = 1024
    """Tokens per sequence."""
    batch: int = 2
    """Sequences."""
    heads: int = 8
    """Query heads."""
    groups: int = 2
    """Key/value heads (query groups)."""
    head_dim: int = 64
    """Channels per head."""


COMMAND = command("attention", __doc__, shape=AttentionOptions, timing=Timing)


def _run(rank, seq, batch, heads, groups, head_dim, steps, warmup):
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.attention import SDPAttention
    from megatron_simpo.model.builder import transformer_config
    from megatron_simpo.distributed.parallel import ParallelConfig

    config = ModelConfig(vocab_size=1024, hidden_size=heads * head_dim, ffn_hidden_size=256,
                         num_layers=1, num_attention_heads=heads, num_query_groups=groups,
                         max_position_embeddings=seq)
    runtime.initialize(ParallelConfig(), seed=0, model_config=config)
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    device = "cuda" if gpu else "cpu"
    tconfig = transformer_config(config, ParallelConfig(), params_dtype=dtype)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(seq, batch, n, head_dim, generator=g).to(device, dtype)
              for n in (heads, groups, groups)]
    report = {}
    outputs = {}
    for name, cls in (("local", DotProductAttention), ("sdpa", SDPAttention)):
        module = cls(tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")
        times = []
        for step in range(warmup + steps):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            sync()
            start = time.perf_counter()
            out = module(*leaves, attention_mask=None)
            out.float().sum().backward()
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
        outputs[name] = out.detach().float()
        report[name] = {"seconds": statistics.median(times)}
    report["time_ratio"] = report["sdpa"]["seconds"] / report["local"]["seconds"]
    report["max_abs_diff"] = (outputs["sdpa"] - outputs["local"]).abs().max().item()
    return report


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    options = COMMAND.parse(argv)
    shape, timing = options["shape"], options["timing"]
    report = run_on_ranks(1, _run, shape.seq, shape.batch, shape.heads, shape.groups,
                          shape.head_dim, timing.steps, timing.warmup)[0]
    report.update(dataclasses.asdict(shape), **dataclasses.asdict(timing),
                  date=time.strftime("%Y-%m-%d"))
    print(f"local {report['local']['seconds']:.4f} s, SDPA {report['sdpa']['seconds']:.4f} s: "
          f"SDPA / local time {report['time_ratio']:.3f}x; max |diff| {report['max_abs_diff']:.2e}")
    write_report(timing.output, report)
