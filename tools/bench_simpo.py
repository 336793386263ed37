#!/usr/bin/env python
"""Benchmarks: SimPO vs DPO steps, and memory-lean vs plain log-probs.

Each variant runs in a fresh worker process of this one run, on the same model and batch, so
that peak memory is its own (CPU: the process's peak RSS above its resident size before the
measured work; GPU: torch.cuda.max_memory_allocated above the allocation before it). For the
log-prob stage the inputs (hidden states, output weight) exist before the measurement; for
steps the measurement starts before the models are built, so weights, gradients, optimizer
state and DPO's reference model all count. Times are
medians over --steps after --warmup. Prints a table of values and ratios; --output writes JSON.

  python tools/bench_simpo.py                 # both benchmarks, CPU-sized defaults
  python tools/bench_simpo.py --only logprobs --vocab 128256 --seq 2048 --hidden 2048
  # GPU: Llama-3.2-1B shape with Transformer Engine; then FP8 vs bf16 (speed, loss after 50 steps)
  python tools/bench_simpo.py --only steps --preset llama3.2-1b --transformer-impl transformer_engine \
      --pairs 4 --step-seq 2048 --chunk 1024
  python tools/bench_simpo.py --only fp8 --preset llama3.2-1b --transformer-impl transformer_engine \
      --pairs 4 --step-seq 2048 --chunk 1024 --fp8-recipe tensorwise

Steps also report tokens/s, model TFLOP/s (megatron_simpo.model.flops: the matmuls SimPO needs, causal
attention, log-probs of response tokens only) and, on known GPUs, MFU against the bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path



def _peak_tracker():
    """(start(), peak_bytes()) for the current device."""
    import psutil
    import torch

    if torch.cuda.is_available():
        def start():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()

        def peak(base):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
    else:
        def start():
            return psutil.Process().memory_info().rss

        def peak(base):  # ru_maxrss is in KiB on Linux
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return start, peak


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_seconds(run, steps: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        _sync()
        began = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _logprob_stage(rank, variant, vocab, seq, hidden_size, chunk, steps, warmup):
    """Forward + backward of the log-prob stage alone, from hidden states to d(hidden), d(W)."""
    import torch

    from megatron_simpo.training.logprobs import fused_output_logprobs, vocab_parallel_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(seq, hidden_size, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=g) / 50
              ).requires_grad_()
    labels = torch.randint(0, vocab, (seq,), device=device, generator=g)
    if variant == "lean_main_grad":
        # As under Megatron DDP: the fp32 gradient buffer exists before the step, and the lean
        # path adds into it instead of building its own sum.
        weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)

    def run():
        if variant == "plain":
            logps = vocab_parallel_logprobs((hidden @ weight.t()).unsqueeze(0), labels.unsqueeze(0),
                                            vocab_size=vocab)
        else:
            logps = fused_output_logprobs(hidden, weight, labels, vocab_size=vocab, chunk_size=chunk)
        logps.sum().backward()
        hidden.grad = weight.grad = None
        if variant == "lean_main_grad":
            weight.main_grad.zero_()

    run()  # allocator warm-up before the baseline is taken
    start, peak = _peak_tracker()
    base = start()
    return {"seconds": _median_seconds(run, steps, warmup), "peak_bytes": peak(base)}


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


def _preference_step(rank, algorithm, model_dict, pairs, seq, steps, warmup, chunk,
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

    config, parallel = ModelConfig.from_dict(model_dict), ParallelConfig()
    env = runtime.initialize(parallel, seed=0)
    overrides = {}
    if fp8 is not None:
        fp8 = Fp8Config(**fp8)
        check_fp8_support(fp8)
        overrides = fp8.transformer_overrides()
    # Peak from before the models exist: DPO's reference weights count against it.
    start, peak = _peak_tracker()
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
    seconds = _median_seconds(lambda: step(batch), steps, warmup)
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


def _letters(rng, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _trl_precision() -> dict:
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
    return [{"prompt": _letters(rng, seq // 2 - 1), "chosen": _letters(rng, seq // 2 - 1),
             "rejected": _letters(rng, seq // 2 - 1)} for _ in range(pairs)]


def _trl_cpo_step(rank, model_dir, rows, steps, warmup, beta, gamma, lr, out_dir, threads):
    """TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (pure SimPO) on the HF model.

    Returns its step times (Trainer callbacks around each optimizer step; collation excluded),
    TRL's loss on the initial weights, and the token ids TRL built, so the other side scores the
    very same tokens.
    """
    import torch
    import transformers
    from datasets import Dataset

    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError:  # TRL < 1.0 exports it at the top level
        from trl import CPOConfig, CPOTrainer

    start, peak = _peak_tracker()
    base = start()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.began)

    config = CPOConfig(output_dir=out_dir, per_device_train_batch_size=len(rows),
                       max_steps=warmup + steps, learning_rate=lr, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                       save_strategy="no", report_to=[], seed=0,
                       dataloader_num_workers=0, loss_type="simpo", cpo_alpha=0.0, beta=beta,
                       simpo_gamma=gamma, max_length=4096, disable_dropout=True,
                       **_trl_precision())
    trainer = CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    torch.set_num_threads(threads)  # after the Trainer: accelerate sets its own count
    # TRL's own SimPO loss on the untrained weights (one batch holds every pair).
    with torch.no_grad():
        first_loss, _ = trainer.get_batch_loss_metrics(
            model, next(iter(trainer.get_train_dataloader())))
    trainer.train()
    pairs = _trl_token_ids(trainer)
    return {"seconds": statistics.median(times[warmup:]), "peak_bytes": peak(base),
            "first_loss": first_loss.item(), "threads": torch.get_num_threads(), "pairs": pairs}


def _trl_token_ids(trainer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids as TRL tokenized its dataset (BOS/EOS included)."""
    pairs = []
    for row in trainer.train_dataset:
        prompt = list(row["prompt_input_ids"])
        pairs.append((prompt, list(row["chosen_input_ids"])[len(prompt):],
                      list(row["rejected_input_ids"])[len(prompt):]))
    return pairs


def _simpo_from_hf(model_dir, lr, chunk, initialized=lambda: None):
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

    start, peak = _peak_tracker()
    bases = []
    config, env, parts = _simpo_from_hf(model_dir, lr, chunk, lambda: bases.append(start()))
    base = bases[0]
    tokenized = [TokenizedPair(*pair) for pair in pairs]
    batch = collate_pairs(tokenized, padded_length(tokenized, 1 << 20)).to(env.device)
    loss = LossConfig(beta=beta, gamma=gamma)
    losses = []

    def step():
        result = train_step([parts.model], parts.optimizer, batch.split(1), loss,
                            head=parts.head)
        losses.append(result.metrics["loss"])

    seconds = _median_seconds(step, steps, warmup)
    return {"seconds": seconds, "peak_bytes": peak(base), "first_loss": losses[0],
            "threads": torch.get_num_threads()}


def _save_random_hf_model(config, folder) -> None:
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


def _trl_comparison(args, config) -> dict:
    """Same tiny Llama, same pairs, one CPU process each: TRL's CPOTrainer vs this trainer."""
    import tempfile

    from megatron_simpo.distributed.launch import run_on_ranks

    beta, gamma, lr = 2.5, 1.375, 1e-5
    with tempfile.TemporaryDirectory() as tmp:
        _save_random_hf_model(config, tmp)
        rows = _trl_rows(args.pairs, args.step_seq)
        threads = args.threads or os.cpu_count()
        trl = run_on_ranks(1, _trl_cpo_step, tmp, rows, args.steps, args.warmup, beta, gamma, lr,
                           f"{tmp}/trl", threads)[0]
        ours = run_on_ranks(1, _megatron_simpo_step, tmp, trl.pop("pairs"), args.steps,
                            args.warmup, beta, gamma, lr, args.chunk, threads)[0]
    return {"pairs": args.pairs, "seq": args.step_seq, "model": config.to_dict(), "trl": trl,
            "megatron_simpo": ours, "time_ratio": ours["seconds"] / trl["seconds"],
            "peak_ratio": ours["peak_bytes"] / trl["peak_bytes"],
            "first_loss_abs_diff": abs(ours["first_loss"] - trl["first_loss"])}


def _length_rows(num_pairs: int, scale: float, max_length: int) -> list[dict]:
    """Plain-text pairs with SimPO-like lengths (megatron_simpo.data.synthetic) for the char-level
    tiny tokenizer (one token per letter; TRL adds BOS to the prompt and EOS to responses)."""
    import random

    from megatron_simpo.data.synthetic import preference_lengths

    rng = random.Random(0)
    rows = []
    for prompt, chosen, rejected in preference_lengths(num_pairs, 0, scale, max_length):
        rows.append({"prompt": _letters(rng, max(1, prompt - 1)),
                     "chosen": _letters(rng, max(1, chosen - 1)),
                     "rejected": _letters(rng, max(1, rejected - 1))})
    return rows


def _trl_length_run(rank, model_dir, rows, global_batch, micro, warmup, beta, gamma, lr, out_dir,
                    threads):
    """TRL's CPOTrainer (SimPO, cpo_alpha=0) over ``rows`` in order: global batches of
    ``global_batch`` pairs by gradient accumulation over micro-batches of ``micro`` pairs, each
    padded to its own longest row (TRL's collator). Returns the step times and TRL's token ids."""
    import torch
    import transformers
    from datasets import Dataset

    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError:  # TRL < 1.0 exports it at the top level
        from trl import CPOConfig, CPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times, losses = [], []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.began)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = CPOConfig(output_dir=out_dir, per_device_train_batch_size=micro,
                       gradient_accumulation_steps=global_batch // micro,
                       max_steps=len(rows) // global_batch, learning_rate=lr,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                       seed=0, dataloader_num_workers=0, loss_type="simpo",
                       cpo_alpha=0.0, beta=beta, simpo_gamma=gamma, max_length=1 << 16,
                       disable_dropout=True, train_sampling_strategy="sequential",
                       **_trl_precision())
    trainer = CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    torch.set_num_threads(threads)  # after the Trainer: accelerate sets its own count
    trainer.train()
    pairs = _trl_token_ids(trainer)
    return {"step_seconds": times, "losses": losses, "pairs": pairs,
            "threads": torch.get_num_threads()}


def _layout_run(rank, model_dir, pairs, global_batch, micro, batching, seq_length, chunk, lr,
                threads):
    """This trainer over the same pairs, global batches in the same order, laid out as
    ``batching`` says: per-step times (planning and collation included), real and processed
    tokens."""
    import torch

    torch.set_num_threads(threads)
    from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
    from megatron_simpo.data.collate import TokenizedPair, collate_microbatch
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.step import train_step

    config, env, parts = _simpo_from_hf(model_dir, lr, chunk)
    tokenized = [TokenizedPair(*pair) for pair in pairs]
    batching = BatchingConfig(**batching)
    loss = LossConfig(beta=2.5, gamma=1.375)
    times, real, processed, losses = [], [], [], []
    for start in range(0, len(tokenized) - global_batch + 1, global_batch):
        began = time.perf_counter()
        indices = list(range(start, start + global_batch))
        plan = plan_global_batch(indices, [PairLengths.of(tokenized[i]) for i in indices],
                                 dp_size=1, micro_batch_size=micro, config=batching,
                                 seq_length=seq_length)
        microbatches = [collate_microbatch(tokenized, mb).to(env.device) for mb in plan.ranks[0]]
        result = train_step([parts.model], parts.optimizer, microbatches, loss,
                            head=parts.head)
        times.append(time.perf_counter() - began)
        real.append(plan.real_tokens)
        processed.append(plan.processed_tokens)
        losses.append(result.metrics["loss"])
    return {"step_seconds": times, "real_tokens": real, "processed_tokens": processed,
            "losses": losses}


def _lengths_comparison(args, config) -> dict:
    """Layouts on SimPO-like lengths, and TRL's CPOTrainer, on the same weights and pairs."""
    import tempfile

    from megatron_simpo.distributed.launch import run_on_ranks

    beta, gamma, lr = 2.5, 1.375, 1e-6
    warmup, steps, G, micro = args.warmup, args.steps, args.global_batch, args.micro_batch
    seq_length = int(2048 * args.length_scale)
    budget = args.max_tokens or 2 * micro * seq_length
    threads = args.threads or os.cpu_count()
    variants = {
        "global-max (before)": dict(batch_layout="global-max"),
        "in-order (TRL's layout)": dict(batch_layout="in-order"),
        "sorted (default)": dict(batch_layout="sorted"),
        f"token budget {budget}": dict(max_tokens_per_microbatch=budget),
        f"packed {budget}": dict(max_tokens_per_microbatch=budget, pack_sequences=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        _save_random_hf_model(config, tmp)
        # TRL adds BOS and EOS: leave it room under the length cap.
        rows = _length_rows((warmup + steps) * G, args.length_scale, seq_length - 2)
        trl = run_on_ranks(1, _trl_length_run, tmp, rows, G, micro, warmup, beta, gamma, lr,
                           f"{tmp}/trl", threads)[0]
        pairs = trl.pop("pairs")
        ours = {name: run_on_ranks(1, _layout_run, tmp, pairs, G, micro, batching, seq_length,
                                   args.chunk, lr, threads)[0]
                for name, batching in variants.items()}

    def real_tokens(first, last):
        return sum(2 * len(p) + len(c) + len(r) - 2 for p, c, r in pairs[first * G:last * G])

    timed = slice(warmup, warmup + steps)
    report = {"model": config.to_dict(), "global_batch": G, "micro_batch": micro,
              "length_scale": args.length_scale, "seq_length": seq_length, "budget": budget,
              "warmup": warmup, "steps": steps, "threads": threads, "variants": {}}
    trl_seconds = sum(trl["step_seconds"][timed])
    trl_real = real_tokens(warmup, warmup + steps)
    report["trl"] = {"seconds": trl_seconds, "real_tokens_per_second": trl_real / trl_seconds,
                     "first_loss": trl["losses"][0] if trl["losses"] else None}
    for name, run in ours.items():
        seconds = sum(run["step_seconds"][timed])
        real, processed = sum(run["real_tokens"][timed]), sum(run["processed_tokens"][timed])
        assert real == trl_real, (name, real, trl_real)  # the very same tokens
        report["variants"][name] = {"seconds": seconds, "padding_efficiency": real / processed,
                                    "real_tokens_per_second": real / seconds,
                                    "first_loss": run["losses"][0]}
    base = report["variants"]["global-max (before)"]["real_tokens_per_second"]
    for row in report["variants"].values():
        row["speedup_vs_global_max"] = row["real_tokens_per_second"] / base
        row["speedup_vs_trl"] = row["real_tokens_per_second"] / report["trl"]["real_tokens_per_second"]
    return report


# Model shapes by name (ModelConfig fields, head_dim spelled out as a converted config has it);
# the default CPU shape is small enough for 2 cores.
PRESETS = {
    "cpu-small": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                      num_query_groups=2, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                      rope_theta=500000.0),
    # The same with a 4k vocabulary: per token, the output layer then costs about what it does
    # in Llama-3-8B relative to the decoder (~15%), so padding costs what it costs there.
    "cpu-lengths": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536,
                        num_attention_heads=8, num_query_groups=2, head_dim=64, vocab_size=4096,
                        max_position_embeddings=4096, rope_theta=500000.0),
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                        num_attention_heads=32, num_query_groups=8, head_dim=64,
                        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling_factor=32.0, tie_word_embeddings=True),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                      num_attention_heads=32, num_query_groups=8, head_dim=128, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
}


def _print_table(device: str, rows: list) -> None:
    print(f"device: {device}")
    print(f"{'what':<34}{'median s':>10}{'peak MB':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}")
    for name, row in rows:
        tokens = row.get("tokens_per_second")
        tflops = row.get("model_tflops_per_second")
        mfu = row.get("mfu_vs_bf16_peak")
        print(f"{name:<34}{row['seconds']:>10.4f}{row['peak_bytes'] / 2**20:>10.1f}"
              f"{'' if tokens is None else f'{tokens:.0f}':>11}"
              f"{'' if tflops is None else f'{tflops:.2f}':>9}"
              f"{'' if mfu is None else f'{100 * mfu:.1f}%':>7}")


def main() -> None:
    from megatron_simpo.distributed.launch import run_on_ranks
    from megatron_simpo.model.builder import TRANSFORMER_IMPLS
    from megatron_simpo.model.precision import FP8_FORMATS, FP8_RECIPES

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["steps", "logprobs", "fp8", "trl", "lengths"],
                        help="one benchmark (default: steps and logprobs; fp8 needs a GPU + TE; "
                             "trl compares with TRL's CPOTrainer on CPU: pip install trl; "
                             "lengths: micro-batch layouts on SimPO-like lengths vs TRL)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256, help="log-prob benchmark vocabulary")
    parser.add_argument("--seq", type=int, default=2048, help="log-prob benchmark tokens")
    parser.add_argument("--hidden", type=int, default=512, help="log-prob benchmark hidden size")
    parser.add_argument("--chunk", type=int, default=256, help="memory-lean chunk (tokens)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="model shape for the step benchmarks")
    parser.add_argument("--model-config", help="HF config.json instead of --preset")
    parser.add_argument("--transformer-impl", default="local", choices=TRANSFORMER_IMPLS)
    parser.add_argument("--fp8-format", choices=FP8_FORMATS, default="hybrid",
                        help="FP8 format of the fp8 benchmark")
    parser.add_argument("--fp8-recipe", choices=FP8_RECIPES,
                        default="tensorwise")
    parser.add_argument("--parity-steps", type=int, default=50,
                        help="fp8 benchmark: steps trained in bf16 and FP8 to compare losses")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--step-seq", type=int, default=256)
    parser.add_argument("--threads", type=int,
                        help="trl benchmark: CPU threads of each side (default: all cores)")
    parser.add_argument("--global-batch", type=int, default=16,
                        help="lengths benchmark: pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=2,
                        help="lengths benchmark: pairs per micro-batch (TRL and fixed layouts)")
    parser.add_argument("--length-scale", type=float, default=0.25,
                        help="lengths benchmark: SimPO's lengths times this (cap 2048 x this)")
    parser.add_argument("--max-tokens", type=int,
                        help="lengths benchmark: token budget / packed row (default: a "
                             "micro-batch of --micro-batch pairs at the length cap)")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.only == "fp8" and args.transformer_impl != "transformer_engine":
        parser.error("--only fp8 needs --transformer-impl transformer_engine (FP8 GEMMs are "
                     "Transformer Engine's)")
    import torch

    from megatron_simpo.model.architecture import ModelConfig

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if args.model_config:
        config = ModelConfig.from_hf_config(args.model_config)
    else:
        config = ModelConfig(**PRESETS[args.preset])
    rows = []
    if args.only in (None, "logprobs"):
        shape = (args.vocab, args.seq, args.hidden, args.chunk, args.steps, args.warmup)
        plain = run_on_ranks(1, _logprob_stage, "plain", *shape)[0]
        lean = run_on_ranks(1, _logprob_stage, "lean", *shape)[0]
        lean_ddp = run_on_ranks(1, _logprob_stage, "lean_main_grad", *shape)[0]
        report["logprobs"] = {"vocab": args.vocab, "seq": args.seq, "hidden": args.hidden,
                              "chunk": args.chunk, "plain": plain, "lean": lean,
                              "lean_main_grad": lean_ddp,
                              "peak_ratio": lean["peak_bytes"] / plain["peak_bytes"],
                              "time_ratio": lean["seconds"] / plain["seconds"],
                              "main_grad_peak_ratio": lean_ddp["peak_bytes"] / plain["peak_bytes"]}
        rows += [("log-prob stage, plain", plain), ("log-prob stage, lean", lean),
                 ("log-prob stage, lean into main_grad", lean_ddp)]
    common = (config.to_dict(), args.pairs, args.step_seq, args.steps, args.warmup, args.chunk,
              args.transformer_impl)
    if args.only in (None, "steps"):
        simpo = run_on_ranks(1, _preference_step, "simpo", *common)[0]
        dpo = run_on_ranks(1, _preference_step, "dpo", *common)[0]
        dpo_precomputed = run_on_ranks(1, _preference_step, "dpo_precomputed", *common)[0]
        report["steps"] = {"model": config.to_dict(), "pairs": args.pairs, "seq": args.step_seq,
                           "transformer_impl": args.transformer_impl, "simpo": simpo, "dpo": dpo,
                           "dpo_precomputed": dpo_precomputed,
                           "time_ratio": simpo["seconds"] / dpo["seconds"],
                           "peak_ratio": simpo["peak_bytes"] / dpo["peak_bytes"],
                           "time_ratio_vs_precomputed":
                               simpo["seconds"] / dpo_precomputed["seconds"],
                           "peak_ratio_vs_precomputed":
                               simpo["peak_bytes"] / dpo_precomputed["peak_bytes"]}
        rows += [("step, SimPO", simpo), ("step, DPO (+ reference)", dpo),
                 ("step, DPO (precomputed reference)", dpo_precomputed)]
    if args.only == "fp8":
        fp8 = dict(format=args.fp8_format, recipe=args.fp8_recipe)
        bf16 = run_on_ranks(1, _preference_step, "simpo", *common, None, args.parity_steps)[0]
        low = run_on_ranks(1, _preference_step, "simpo", *common, fp8, args.parity_steps)[0]
        last_bf16, last_fp8 = bf16["parity_losses"][-1], low["parity_losses"][-1]
        report["fp8"] = {"model": config.to_dict(), "pairs": args.pairs, "seq": args.step_seq,
                         "transformer_impl": args.transformer_impl, "fp8": fp8, "bf16": bf16,
                         "fp8_run": low,
                         "tokens_per_second_ratio": low["tokens_per_second"] / bf16["tokens_per_second"],
                         "final_loss_relative_diff": abs(last_fp8 - last_bf16) / abs(last_bf16)}
        rows += [("SimPO step, bf16", bf16), (f"SimPO step, FP8 {args.fp8_recipe}", low)]
    if args.only in ("trl", "lengths"):
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error(f"--only {args.only} needs TRL: pip install trl (or pip install -e "
                         "'.[bench]')")
    if args.only == "trl":
        report["trl"] = _trl_comparison(args, config)
        rows += [("SimPO step, TRL CPOTrainer", report["trl"]["trl"]),
                 ("SimPO step, megatron_simpo", report["trl"]["megatron_simpo"])]
    if args.only == "lengths":
        report["lengths"] = _lengths_comparison(args, config)
    if rows:
        _print_table(device, rows)
    if "logprobs" in report:
        r = report["logprobs"]
        print(f"lean / plain log-probs: peak {r['peak_ratio']:.3f}x, time {r['time_ratio']:.3f}x; "
              f"adding into DDP's main_grad: peak {r['main_grad_peak_ratio']:.3f}x")
    if "steps" in report:
        r = report["steps"]
        print(f"SimPO / DPO step: time {r['time_ratio']:.3f}x, peak {r['peak_ratio']:.3f}x; "
              f"SimPO / DPO with precomputed reference: time "
              f"{r['time_ratio_vs_precomputed']:.3f}x, peak {r['peak_ratio_vs_precomputed']:.3f}x")
    if "fp8" in report:
        r = report["fp8"]
        print(f"FP8 / bf16 tokens/s: {r['tokens_per_second_ratio']:.3f}x; loss after "
              f"{args.parity_steps} steps differs by {100 * r['final_loss_relative_diff']:.2f}%")
    if "trl" in report:
        r = report["trl"]
        print(f"megatron_simpo / TRL CPOTrainer step: time {r['time_ratio']:.3f}x, peak "
              f"{r['peak_ratio']:.3f}x; first-step loss differs by {r['first_loss_abs_diff']:.2e}")
    if "lengths" in report:
        r = report["lengths"]
        print(f"device: {device}; {r['steps']} steps of {r['global_batch']} pairs (micro-batches "
              f"of {r['micro_batch']}), lengths x{r['length_scale']} (cap {r['seq_length']})")
        print(f"{'layout':<28}{'padding eff.':>13}{'real tok/s':>12}{'vs before':>11}"
              f"{'vs TRL':>8}")
        trl_rate = r["trl"]["real_tokens_per_second"]
        print(f"{'TRL CPOTrainer (simpo)':<28}{'':>13}{trl_rate:>12.0f}{'':>11}{1.0:>8.2f}")
        print(f"first-step loss: TRL {r['trl']['first_loss']}, ours "
              f"{[round(row['first_loss'], 6) for row in r['variants'].values()]}")
        for name, row in r["variants"].items():
            print(f"{name:<28}{row['padding_efficiency']:>13.3f}"
                  f"{row['real_tokens_per_second']:>12.0f}{row['speedup_vs_global_max']:>11.2f}"
                  f"{row['speedup_vs_trl']:>8.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
