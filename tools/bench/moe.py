"""A tiny mixture-of-experts model (Mixtral layout) trained at EP 1 and at EP 2: SimPO steps'
tokens/s and the peak memory of each rank, on 2 ranks (CPU: gloo; GPUs: NCCL).

At EP 1 both ranks hold every expert (DP 2); at EP 2 each holds half of them and tokens travel
to their experts by all-to-all, so the expert weights, gradients and optimizer state per rank
halve while the attention and embedding stay replicated.

  python -m tools.bench moe --experts 8 --hidden 256 --pairs 4 --step-seq 256
"""

from __future__ import annotations

from dataclasses import dataclass

from tools.bench.common import (Timing, command, device_name, median_seconds, peak_tracker,
                                print_table, report_header, write_report)
from tools.bench.steps import _pairs, _seeded_weights


@dataclass(frozen=True)
class MoEOptions:
    experts: int = 8
    """Experts per layer (top-2 routing)."""
    hidden: int = 256
    """Hidden size; each expert's inner size is 2x."""
    layers: int = 4
    """Decoder layers, all mixture of experts."""
    pairs: int = 4
    """Pairs per step (2 per rank)."""
    step_seq: int = 256
    """Tokens of each side of a pair."""


COMMAND = command("moe", __doc__, moe=MoEOptions, timing=Timing)


def _config(options: MoEOptions) -> dict:
    return dict(architecture="MixtralForCausalLM", num_layers=options.layers,
                hidden_size=options.hidden, ffn_hidden_size=2 * options.hidden,
                moe_ffn_hidden_size=2 * options.hidden, num_experts=options.experts,
                moe_router_topk=2, num_attention_heads=8, num_query_groups=2,
                head_dim=options.hidden // 8, vocab_size=32000, max_position_embeddings=4096,
                rope_theta=1000000.0)


def moe_step(rank, model_dict, ep, pairs, seq, steps, warmup):
    """This rank's median step time and peak memory (from before the model is built)."""
    import torch

    from megatron_simpo.data.collate import collate_pairs
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.flops import step_flops
    from megatron_simpo.training.components import build_components
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.training.step import train_step

    config = ModelConfig.from_dict(model_dict)
    parallel = ParallelConfig(expert_model_parallel_size=ep)
    env = runtime.initialize(parallel, seed=0, model_config=config)
    start, peak = peak_tracker()
    base = start()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    parts = build_components(config, parallel,
                             OptimizerSettings(lr=1e-5, use_distributed_optimizer=True),
                             params_dtype=dtype, logprob_chunk_size=256,
                             load_policy=_seeded_weights)
    per_rank = pairs // env.data_parallel_size
    batch_pairs = _pairs(config.vocab_size, pairs, seq, 0)[rank * per_rank:(rank + 1) * per_rank]
    batch = collate_pairs(batch_pairs, seq).to(env.device)
    loss = LossConfig(beta=2.5, gamma=1.375)
    seconds = median_seconds(lambda: train_step([parts.model], parts.optimizer, [batch], loss,
                                                head=parts.head), steps, warmup)
    rows = [len(p.prompt) + len(r) - 1 for p in batch_pairs for r in (p.chosen, p.rejected)]
    flops = step_flops(config, rows, int(batch.loss_mask.sum())) * env.data_parallel_size
    parameters = sum(p.numel() for p in parts.model.parameters())
    return {"seconds": seconds, "peak_bytes": peak(base), "parameters": parameters,
            "tokens_per_second": 2 * pairs * seq / seconds,
            "model_tflops_per_second": flops / seconds / 1e12}


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    options = COMMAND.parse(argv)
    moe, timing = options["moe"], options["timing"]
    model = _config(moe)
    report = report_header()
    report["moe"] = {"model": model, "pairs": moe.pairs, "seq": moe.step_seq}
    rows = []
    for ep in (1, 2):
        ranks = run_on_ranks(2, moe_step, model, ep, moe.pairs, moe.step_seq, timing.steps,
                             timing.warmup)
        report["moe"][f"ep{ep}"] = ranks
        rows += [(f"EP {ep}, rank {rank} ({r['parameters'] / 1e6:.1f}M params)", r)
                 for rank, r in enumerate(ranks)]
    print_table(device_name(), rows)
    write_report(timing.output, report)
