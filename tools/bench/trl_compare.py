"""This trainer vs TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0): the same tiny Llama (random
weights, char-level tokenizer), the same pairs and token ids, one CPU process each.

Reports step times, peak memory and the first-step loss of both (they score the very same
tokens). Needs TRL: pip install trl (or pip install -e '.[bench]'). The helpers here (TRL's
classes and precision, the HF model, this trainer on its weights) serve the lengths benchmark
too.

  python -m tools.bench trl --pairs 4 --step-seq 256
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from megatron_simpo.cli.flags import user_error
from tools.bench.common import (Model, Timing, command, device_name, median_seconds,
                                peak_tracker, print_table, report_header, write_report)


@dataclass(frozen=True)
class TrlOptions:
    pairs: int = 4
    """Pairs per step (one batch holds them all)."""
    step_seq: int = 256
    """Tokens of each side of a pair (half prompt, half response)."""
    threads: int | None = None
    """CPU threads of each side (default: all cores)."""


COMMAND = command("trl", __doc__, model=Model, trl=TrlOptions, timing=Timing)


def require_trl(prog: str) -> None:
    """End the command with one line if TRL is not installed."""
    try:
        import trl  # noqa: F401
    except ImportError:
        user_error(prog, "needs TRL: pip install trl (or pip install -e '.[bench]')")


def cpo_classes() -> tuple[type, type]:
    """TRL's (CPOConfig, CPOTrainer)."""
    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError:  # TRL < 1.0 exports it at the top level
        from trl import CPOConfig, CPOTrainer
    return CPOConfig, CPOTrainer


def step_timer(times: list, losses: list | None = None):
    """A Trainer callback appending each optimizer step's seconds to ``times`` (and each logged
    loss to ``losses``)."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.began)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if losses is not None and logs and "loss" in logs:
                losses.append(logs["loss"])

    return StepTimer()


def letters(rng, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def trl_precision() -> dict:
    """TRL's precision settings matching ours: fp32 on CPU (TRL's configs default to bf16
    autocast, 35x slower there), and on a GPU the usual recipe, fp32 weights under bf16 autocast
    (ours: bf16 weights with fp32 main parameters in the optimizer)."""
    import torch

    on_gpu = torch.cuda.is_available()
    return {"use_cpu": not on_gpu, "bf16": on_gpu}


def _trl_rows(pairs: int, seq: int) -> list[dict]:
    """Plain-text pairs for the char-level tiny tokenizer: one token per letter, so each side of
    a pair is about ``seq`` tokens (half prompt, half response)."""
    import random

    rng = random.Random(0)
    return [{"prompt": letters(rng, seq // 2 - 1), "chosen": letters(rng, seq // 2 - 1),
             "rejected": letters(rng, seq // 2 - 1)} for _ in range(pairs)]


def _trl_cpo_step(rank, model_dir, rows, steps, warmup, beta, gamma, lr, out_dir, threads):
    """TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (pure SimPO) on the HF model.

    Returns its step times (Trainer callbacks around each optimizer step; collation excluded),
    TRL's loss on the initial weights, and the token ids TRL built, so the other side scores the
    very same tokens.
    """
    import torch
    import transformers
    from datasets import Dataset

    CPOConfig, CPOTrainer = cpo_classes()

    start, peak = peak_tracker()
    base = start()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times = []
    config = CPOConfig(output_dir=out_dir, per_device_train_batch_size=len(rows),
                       max_steps=warmup + steps, learning_rate=lr, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                       save_strategy="no", report_to=[], seed=0,
                       dataloader_num_workers=0, loss_type="simpo", cpo_alpha=0.0, beta=beta,
                       simpo_gamma=gamma, max_length=4096, disable_dropout=True,
                       **trl_precision())
    trainer = CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[step_timer(times)])
    torch.set_num_threads(threads)  # after the Trainer: accelerate sets its own count
    # TRL's own SimPO loss on the untrained weights (one batch holds every pair).
    with torch.no_grad():
        first_loss, _ = trainer.get_batch_loss_metrics(
            model, next(iter(trainer.get_train_dataloader())))
    trainer.train()
    pairs = trl_token_ids(trainer)
    return {"seconds": statistics.median(times[warmup:]), "peak_bytes": peak(base),
            "first_loss": first_loss.item(), "threads": torch.get_num_threads(), "pairs": pairs}


def trl_token_ids(trainer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids as TRL tokenized its dataset (BOS/EOS included)."""
    pairs = []
    for row in trainer.train_dataset:
        prompt = list(row["prompt_input_ids"])
        pairs.append((prompt, list(row["chosen_input_ids"])[len(prompt):],
                      list(row["rejected_input_ids"])[len(prompt):]))
    return pairs


def simpo_from_hf(model_dir, lr, chunk, initialized=lambda: None):
    """(model config, runtime env, components) of this trainer on one rank (CPU in fp32, a GPU
    in bf16), holding the HF weights in ``model_dir``; ``initialized()`` runs once the runtime
    is up (memory baselines)."""
    import torch
    import transformers

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.distributed.parallel import ParallelConfig

    config, parallel = ModelConfig.from_hf_config(model_dir), ParallelConfig()
    env = runtime.initialize(parallel, seed=0, model_config=config)
    initialized()
    hf_state = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).state_dict()

    def load(model):
        load_rank_state(model, hf_to_megatron(hf_state, config, config.padded_vocab_size(1)),
                        config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)

    # bf16 weights on a GPU (fp32 main parameters in the optimizer), as a GPU user trains.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    parts = build_components(config, parallel, OptimizerSettings(lr=lr, clip_grad=1.0),
                             params_dtype=dtype, logprob_chunk_size=chunk, load_policy=load)
    return config, env, parts


def _megatron_simpo_step(rank, model_dir, pairs, steps, warmup, beta, gamma, lr, chunk, threads):
    """This trainer on the same HF weights and token ids: first-step loss and step times."""
    import torch

    torch.set_num_threads(threads)
    from megatron_simpo.data.collate import TokenizedPair, collate_pairs, padded_length
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.step import train_step

    start, peak = peak_tracker()
    bases = []
    config, env, parts = simpo_from_hf(model_dir, lr, chunk, lambda: bases.append(start()))
    base = bases[0]
    tokenized = [TokenizedPair(*pair) for pair in pairs]
    batch = collate_pairs(tokenized, padded_length(tokenized, 1 << 20)).to(env.device)
    loss = LossConfig(beta=beta, gamma=gamma)
    losses = []

    def step():
        result = train_step([parts.model], parts.optimizer, batch.split(1), loss,
                            head=parts.head)
        losses.append(result.metrics["loss"])

    seconds = median_seconds(step, steps, warmup)
    return {"seconds": seconds, "peak_bytes": peak(base), "first_loss": losses[0],
            "threads": torch.get_num_threads()}


def save_random_hf_model(config, folder) -> None:
    """A seeded random HF Llama of ``config``'s shape and the char-level tiny tokenizer."""
    import torch
    import transformers

    from megatron_simpo.model.architecture import hf_config_dict
    from megatron_simpo.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    hf_config = transformers.AutoConfig.for_model(
        **hf_config_dict(config, None, torch.float32), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)



def trl_report(model: Model, options: TrlOptions, timing: Timing) -> dict:
    """Same tiny Llama, same pairs, one CPU process each: TRL's CPOTrainer vs this trainer."""
    import tempfile

    from megatron_simpo.distributed.launch import run_on_ranks

    config = model.config()
    beta, gamma, lr = 2.5, 1.375, 1e-5
    with tempfile.TemporaryDirectory() as tmp:
        save_random_hf_model(config, tmp)
        rows = _trl_rows(options.pairs, options.step_seq)
        threads = options.threads or os.cpu_count()
        trl = run_on_ranks(1, _trl_cpo_step, tmp, rows, timing.steps, timing.warmup, beta, gamma,
                           lr, f"{tmp}/trl", threads)[0]
        ours = run_on_ranks(1, _megatron_simpo_step, tmp, trl.pop("pairs"), timing.steps,
                            timing.warmup, beta, gamma, lr, model.chunk, threads)[0]
    return {"pairs": options.pairs, "seq": options.step_seq, "model": config.to_dict(), "trl": trl,
            "megatron_simpo": ours, "time_ratio": ours["seconds"] / trl["seconds"],
            "peak_ratio": ours["peak_bytes"] / trl["peak_bytes"],
            "first_loss_abs_diff": abs(ours["first_loss"] - trl["first_loss"])}


def main(argv=None) -> None:
    options = COMMAND.parse(argv)
    require_trl(COMMAND.prog)
    report = report_header()
    report["trl"] = r = trl_report(options["model"], options["trl"], options["timing"])
    print_table(device_name(), [("SimPO step, TRL CPOTrainer", r["trl"]),
                                ("SimPO step, megatron_simpo", r["megatron_simpo"])])
    print(f"megatron_simpo / TRL CPOTrainer step: time {r['time_ratio']:.3f}x, peak "
          f"{r['peak_ratio']:.3f}x; first-step loss differs by {r['first_loss_abs_diff']:.2e}")
    write_report(options["timing"].output, report)
