"""FP8 vs bf16 SimPO steps (a GPU with Transformer Engine): speed, and the loss after training.

Both precisions first train --parity-steps steps on the same fresh batches (the loss after them
is compared), then time steps as the steps benchmark does.

  python -m tools.bench fp8 --preset llama3.2-1b --transformer-impl transformer_engine \
      --pairs 4 --step-seq 2048 --chunk 1024 --fp8-recipe tensorwise
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_simpo.cli.flags import user_error
from megatron_simpo.model.precision import Fp8Format, Fp8Recipe
from tools.bench.common import (Model, Timing, command, device_name, print_table, report_header,
                                write_report)
from tools.bench.steps import StepOptions, preference_step, step_args


@dataclass(frozen=True)
class Fp8Options:
    fp8_format: Fp8Format = "hybrid"
    """FP8 format."""
    fp8_recipe: Fp8Recipe = "tensorwise"
    """FP8 scaling recipe."""
    parity_steps: int = 50
    """Steps trained in bf16 and FP8 to compare losses."""


COMMAND = command("fp8", __doc__, model=Model, batch=StepOptions, fp8=Fp8Options, timing=Timing)


def main(argv=None) -> None:
    from megatron_simpo.distributed.launch import run_on_ranks

    options = COMMAND.parse(argv)
    model, batch, settings = options["model"], options["batch"], options["fp8"]
    if batch.transformer_impl != "transformer_engine":
        user_error(COMMAND.prog, "fp8 needs --transformer-impl transformer_engine (FP8 GEMMs are "
                                 "Transformer Engine's)")
    common = step_args(model, batch, options["timing"])
    fp8 = dict(format=settings.fp8_format, recipe=settings.fp8_recipe)
    bf16 = run_on_ranks(1, preference_step, "simpo", *common, None, settings.parity_steps)[0]
    low = run_on_ranks(1, preference_step, "simpo", *common, fp8, settings.parity_steps)[0]
    last_bf16, last_fp8 = bf16["parity_losses"][-1], low["parity_losses"][-1]
    report = report_header()
    report["fp8"] = r = {
        "model": common[0], "pairs": batch.pairs, "seq": batch.step_seq,
        "transformer_impl": batch.transformer_impl, "fp8": fp8, "bf16": bf16, "fp8_run": low,
        "tokens_per_second_ratio": low["tokens_per_second"] / bf16["tokens_per_second"],
        "final_loss_relative_diff": abs(last_fp8 - last_bf16) / abs(last_bf16)}
    print_table(device_name(), [("SimPO step, bf16", bf16),
                                (f"SimPO step, FP8 {settings.fp8_recipe}", low)])
    print(f"FP8 / bf16 tokens/s: {r['tokens_per_second_ratio']:.3f}x; loss after "
          f"{settings.parity_steps} steps differs by {100 * r['final_loss_relative_diff']:.2f}%")
    write_report(options["timing"].output, report)
