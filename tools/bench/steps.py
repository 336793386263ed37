"""SimPO vs DPO: full optimizer steps on the same model and batch.

SimPO, DPO with its reference model, and DPO with precomputed reference log-probs (as with
--reference-logps: no reference model), each in a fresh worker process. The peak-memory
baseline is taken before the models are built, so weights, gradients, optimizer state and DPO's
reference model all count. Steps also report tokens/s, model TFLOP/s (megatron_simpo.model.flops: the
matmuls SimPO needs, causal attention, log-probs of response tokens only) and, on known GPUs,
MFU against the bf16 peak.

  python -m tools.bench steps --preset llama3.2-1b --transformer-impl transformer_engine \
      --pairs 4 --step-seq 2048 --chunk 1024
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_simpo.model.builder import TransformerImpl
from tools.bench.common import (Model, Timing, command, device_name, median_seconds,
                                peak_tracker, print_table, report_header, write_report)


@dataclass(frozen=True)
class StepOptions:
    pairs: int = 4
    """Pairs per step."""
    step_seq: int = 256
    """Tokens of each side of a pair (half prompt, half response)."""
    transformer_impl: TransformerImpl = "local"
    """Megatron-Core's layer spec."""


COMMAND = command("steps", __doc__, model=Model, batch=StepOptions, timing=Timing)


def _pairs(vocab: int, pairs: int, seq: int, seed: int):
    """``pairs`` random pairs of exactly ``seq`` tokens each side (half prompt, half response)."""
    import torch

    from megatron_simpo.data.collate import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    half = seq // 2

    def ids():
        return torch.randint(0, vocab, (half,), generator=g).tolist()

    return [TokenizedPair(ids(), ids(), ids()) for _ in range(pairs)]


def _seeded_weights(model) -> None:
    """Fill a model with the same weights on every call: N(0, 0.02), norms 1 (one rank)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def preference_step(rank, algorithm, model_dict, pairs, seq, steps, warmup, chunk,
                    transformer_impl="local", fp8=None, parity_steps=0):
    """Median time and peak memory of full optimizer steps (the DPO reference pass included;
    "dpo_precomputed" is DPO with its reference log-probs attached to the batch instead, as
    with --reference-logps: no reference model).

    With ``parity_steps``, first trains that many steps on fresh batches (same seeds in every
    variant) and reports the losses, so precisions can be compared on the same trajectory.
    """
    import torch

    from megatron_simpo.distributed import runtime
    from megatron_simpo.data.collate import collate_pairs
    from megatron_simpo.model.flops import bf16_peak_flops, step_flops
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.precision import Fp8Config, check_fp8_support
    from megatron_simpo.training.step import train_step

    # built as training builds it: a window no row of ``seq`` tokens outgrows is left out
    config, parallel = ModelConfig.from_dict(model_dict).for_rows(seq), ParallelConfig()
    env = runtime.initialize(parallel, seed=0)
    overrides = {}
    if fp8 is not None:
        fp8 = Fp8Config(**fp8)
        check_fp8_support(fp8)
        overrides = fp8.transformer_overrides()
    # Peak from before the models exist: DPO's reference weights count against it.
    start, peak = peak_tracker()
    base = start()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    # DPO's reference starts as the policy does: both get the same seeded weights.
    parts = build_components(
        config, parallel, OptimizerSettings(lr=1e-5, use_distributed_optimizer=True),
        params_dtype=dtype, transformer_impl=transformer_impl, transformer_overrides=overrides,
        reference_overrides=overrides, logprob_chunk_size=chunk, load_policy=_seeded_weights,
        with_reference=algorithm == "dpo", load_reference=_seeded_weights)
    loss = (LossConfig(beta=2.5, gamma=1.375) if algorithm == "simpo"
            else LossConfig(algorithm="dpo", beta=0.1))

    def step(batch):
        if algorithm == "dpo_precomputed":  # what --reference-logps attaches (values: any)
            sums = -torch.rand(batch.tokens.shape[0], generator=torch.Generator().manual_seed(0))
            batch = batch.with_reference(sums.to(batch.tokens.device) * 100)
        return train_step([parts.model], parts.optimizer, batch.split(1), loss,
                          head=parts.head, reference_model=parts.reference)

    parity_losses = [step(collate_pairs(_pairs(config.vocab_size, pairs, seq, 1000 + i), seq)
                          .to(env.device)).metrics["loss"] for i in range(parity_steps)]
    batch_pairs = _pairs(config.vocab_size, pairs, seq, 0)
    batch = collate_pairs(batch_pairs, seq).to(env.device)
    seconds = median_seconds(lambda: step(batch), steps, warmup)
    # Model FLOPs of what SimPO needs: both sequences of every pair, log-probs of responses.
    rows = [len(p.prompt) + len(r) - 1 for p in batch_pairs for r in (p.chosen, p.rejected)]
    flops = step_flops(config, rows, int(batch.loss_mask.sum()))
    result = {"seconds": seconds, "peak_bytes": peak(base),
              "tokens_per_second": 2 * pairs * seq / seconds,
              "model_tflops_per_second": flops / seconds / 1e12}
    peak_flops = bf16_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if peak_flops:
        result["mfu_vs_bf16_peak"] = flops / seconds / peak_flops
    if parity_steps:
        result["parity_losses"] = parity_losses
    return result


def step_args(model: Model, batch: StepOptions, timing: Timing) -> tuple:
    """``preference_step``'s arguments after the algorithm, up to the transformer impl."""
    return (model.config().to_dict(), batch.pairs, batch.step_seq, timing.steps, timing.warmup,
            model.chunk, batch.transformer_impl)


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    options = COMMAND.parse(argv)
    model, batch = options["model"], options["batch"]
    common = step_args(model, batch, options["timing"])
    simpo = run_on_ranks(1, preference_step, "simpo", *common)[0]
    dpo = run_on_ranks(1, preference_step, "dpo", *common)[0]
    dpo_precomputed = run_on_ranks(1, preference_step, "dpo_precomputed", *common)[0]
    report = report_header()
    report["steps"] = r = {
        "model": common[0], "pairs": batch.pairs, "seq": batch.step_seq,
        "transformer_impl": batch.transformer_impl, "simpo": simpo, "dpo": dpo,
        "dpo_precomputed": dpo_precomputed,
        "time_ratio": simpo["seconds"] / dpo["seconds"],
        "peak_ratio": simpo["peak_bytes"] / dpo["peak_bytes"],
        "time_ratio_vs_precomputed": simpo["seconds"] / dpo_precomputed["seconds"],
        "peak_ratio_vs_precomputed": simpo["peak_bytes"] / dpo_precomputed["peak_bytes"]}
    print_table(device_name(), [("step, SimPO", simpo), ("step, DPO (+ reference)", dpo),
                                ("step, DPO (precomputed reference)", dpo_precomputed)])
    print(f"SimPO / DPO step: time {r['time_ratio']:.3f}x, peak {r['peak_ratio']:.3f}x; "
          f"SimPO / DPO with precomputed reference: time "
          f"{r['time_ratio_vs_precomputed']:.3f}x, peak {r['peak_ratio_vs_precomputed']:.3f}x")
    write_report(options["timing"].output, report)

