"""The training loop: exact resume, resharded loading, bad inputs, non-finite steps, saves that fail."""

import json
from pathlib import Path

import pytest

from tests.multiprocess import run_on_ranks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_simpo.model.tiny import write_default

    return write_default(tmp_path_factory.mktemp("tiny"), train_pairs=512, valid_pairs=32, seed=7)


def _argv(tiny, **flags):
    source = [] if "pretrained_checkpoint" in flags or flags.pop("no_source", False) else \
        ["--model-config", str(tiny["config"])]
    argv = source + ["--tokenizer", str(tiny["tokenizer"]),
            "--train-data-path", str(tiny["train"]), "--valid-data-path", str(tiny["valid"]),
            "--seq-length", "64", "--max-prompt-length", "48", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "1e-3", "--lr-warmup-fraction", "0.25",
            "--seed", "3"]
    if flags.pop("distributed_optimizer", True):
        argv.append("--use-distributed-optimizer")
    if "max_tokens_per_microbatch" in flags:  # the budget sizes micro-batches
        at = argv.index("--micro-batch-size")
        del argv[at:at + 2]
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _train(rank, argv):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.loop import run

    summary = run(parse_args(argv))
    return summary.losses, summary.evals


@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2),
                                    dict(pipeline_model_parallel_size=2),
                                    dict(distributed_optimizer=False),
                                    dict(tensor_model_parallel_size=2, bf16=True),
                                    dict(overlap_grad_reduce=True, overlap_param_gather=True),
                                    dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                    dict(pipeline_model_parallel_size=2, pack_sequences=True,
                                         max_tokens_per_microbatch=160)],
                         ids=["tp2", "pp2", "dp2_plain_optimizer", "tp2_bf16",
                              "dp2_overlap_param_gather", "tp2_sequence_parallel",
                              "pp2_packed"])
def test_resume_is_bitwise_identical(tiny, tmp_path, layout):
    """Resumed runs repeat the straight run's steps; with --log-interval 3 (and a save at 4,
    off that cadence) each metrics.jsonl row holds the mean of the steps since the previous
    row, every step logged once across the resume."""
    straight, straight_evals = run_on_ranks(2, _train, _argv(tiny, train_iters=8, eval_interval=4,
                                                             save=tmp_path / "a", **layout))[0]
    first, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=8, save=tmp_path / "b",
                                             save_interval=4, log_interval=3, **layout)
                            )[0]
    assert first == straight  # same run: saving (or evaluating) along the way changes nothing
    _assert_rows_are_window_means(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"),
                                  [(1, 3), (4, 4), (5, 6), (7, 8)])
    # Resume from iteration 4 of run "b" (remove the final checkpoint so the tracker says 4).
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").write_text("4\n")
    resumed, resumed_evals = run_on_ranks(2, _train, _argv(tiny, train_iters=8, load=tmp_path / "b",
                                                           save=tmp_path / "c", **layout))[0]
    assert len(straight) == 8 and len(resumed) == 4
    assert resumed == straight[4:], f"{resumed} != {straight[4:]}"
    # The resumed run evaluates the saved weights first: they are the in-memory ones at step 4.
    assert [at for at, _ in straight_evals] == [0, 4, 8]
    assert resumed_evals == straight_evals[1:]
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "loss" in m] == list(range(1, 9))
    assert all(m["tflops_per_gpu"] > 0 for m in metrics if "loss" in m)
    assert {"eval/rewards/accuracies", "eval/loss"} <= set(metrics[0])
    # The same resume into "b" itself: its rows after 4 are dropped and written again.
    run_on_ranks(2, _train, _argv(tiny, train_iters=8, load=tmp_path / "b", save=tmp_path / "b",
                                  overwrite=True, log_interval=3, **layout))
    _assert_rows_are_window_means(metrics, _metrics(tmp_path / "b"),
                                  [(1, 3), (4, 4), (5, 6), (7, 8)])


STEP_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss", "logits/chosen",
                "logits/rejected")


def _assert_rows_are_window_means(per_step: list[dict], logged: list[dict],
                                  windows: list[tuple[int, int]]) -> None:
    """``logged``'s training rows are at the windows' last iterations, each the mean of the
    --log-interval 1 run's rows of its steps (the last step's learning rate, grad norm and
    consumed samples); held-out rows stay apart."""
    steps = {row["iteration"]: row for row in per_step if "loss" in row}
    rows = [row for row in logged if "loss" in row]
    assert [row["iteration"] for row in rows] == [last for _, last in windows]
    for row, (first, last) in zip(rows, windows):
        window = [steps[i] for i in range(first, last + 1)]
        for name in STEP_METRICS:
            mean = sum(step[name] for step in window) / len(window)
            assert row[name] == pytest.approx(mean, rel=0, abs=1e-5), name
        for name in ("learning_rate", "grad_norm", "consumed_samples", "skipped"):
            assert row[name] == pytest.approx(steps[last][name], abs=1e-5), name
        assert not any(name.startswith("eval/") for name in row)
    assert all(set(row) <= {"iteration"} | {n for n in row if n.startswith("eval/")}
               for row in logged if "loss" not in row)


def test_every_batch_layout_trains_the_same_model(tiny, tmp_path):
    """Padding to the global longest (the original layout), sorted micro-batches, a token
    budget and packing: the same losses and held-out metrics, step after step, on DP2; the
    metrics report how much of the work was padding."""
    runs = {}
    for name, flags in (("global", dict(batch_layout="global-max")), ("sorted", {}),
                        ("budget", dict(max_tokens_per_microbatch=192)),
                        ("packed", dict(max_tokens_per_microbatch=160, pack_sequences=True)),
                        ("shared", dict(max_tokens_per_microbatch=160, pack_sequences=True,
                                        share_prompt=True))):
        losses, evals = run_on_ranks(2, _train, _argv(tiny, train_iters=4, eval_interval=2,
                                                      save=tmp_path / name, **flags))[0]
        efficiency = [m["padding_efficiency"] for m in _metrics(tmp_path / name) if "loss" in m]
        runs[name] = losses, evals, efficiency
        saved = [m["prompt_tokens_saved"] for m in _metrics(tmp_path / name) if "loss" in m]
        assert all(n > 0 for n in saved) if name == "shared" else not any(saved), name
    base_losses, base_evals, base_efficiency = runs["global"]
    for name, (losses, evals, efficiency) in runs.items():
        assert losses == pytest.approx(base_losses, abs=1e-5), name
        for (at, metrics), (base_at, base) in zip(evals, base_evals):
            assert at == base_at and metrics == pytest.approx(base, abs=1e-5), name
        assert len(efficiency) == 4 and all(0 < e <= 1 for e in efficiency)
    mean = {name: sum(run[2]) / 4 for name, run in runs.items()}
    assert mean["global"] <= mean["sorted"] <= mean["packed"]  # tiny data: alike lengths


def _train_and_count_leftovers(rank, argv):
    """Train, then count the DDP wrappers the run left in this (reused) rank (those of earlier
    calls not counted) and the threads the rank holds."""
    import gc
    import os

    from megatron.core.distributed import DistributedDataParallel

    from megatron_simpo.distributed import runtime

    def wrappers() -> int:
        gc.collect()
        return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())

    before = wrappers()
    _train(rank, argv)
    runtime.shutdown()
    return wrappers() - before, len(os.listdir("/proc/self/task"))


def test_a_finished_run_frees_its_model_and_process_groups(tiny, tmp_path):
    # A process that goes on after run() (a sweep, a notebook, these tests' reused ranks) gets
    # the model, optimizer and process groups back: Megatron-Core's DDP and optimizer form a
    # cycle through C++ autograd nodes that the run cuts when it ends.
    argv = _argv(tiny, train_iters=2, save=tmp_path / "run", overwrite=True)
    (alive, threads), _ = run_on_ranks(2, _train_and_count_leftovers, argv)
    (alive_again, threads_again), _ = run_on_ranks(2, _train_and_count_leftovers, argv)
    assert alive == alive_again == 0
    assert threads_again - threads < 10  # a run's gloo groups hold about 50 threads


def test_checkpoint_loads_at_another_layout(tiny, tmp_path):
    straight, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=6, save=tmp_path / "a",
                                                save_interval=3, tensor_model_parallel_size=2))[0]
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("3\n")
    resharded, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=6, load=tmp_path / "a",
                                                 pipeline_model_parallel_size=2))[0]
    assert len(resharded) == 3
    for a, b in zip(resharded, straight[3:]):
        assert abs(a - b) <= 1e-5, (resharded, straight[3:])


def test_pretrained_checkpoint_starts_a_new_run(tiny, tmp_path):
    # Saved mid-run with parameter gathering overlapped with the next forward (nothing ran a
    # forward between the step and the save): the checkpoint must still hold the complete
    # updated weights, which is all a model-only load reads.
    run_on_ranks(2, _train, _argv(tiny, train_iters=4, save=tmp_path / "a", save_interval=2,
                                  overlap_grad_reduce=True, overlap_param_gather=True))
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("2\n")
    _, in_memory_evals = run_on_ranks(2, _train, _argv(tiny, train_iters=4, eval_interval=2))[0]
    assert in_memory_evals[1][0] == 2
    losses, evals = run_on_ranks(2, _train, _argv(tiny, train_iters=2, save=tmp_path / "b",
                                                  pretrained_checkpoint=tmp_path / "a",
                                                  tensor_model_parallel_size=2))[0]
    # A new run: iteration counting restarts and the eval at step 0 is the trained model's.
    assert len(losses) == 2 and evals[0][0] == 0
    for name, value in in_memory_evals[1][1].items():
        assert abs(evals[0][1][name] - value) <= 1e-5, name
    assert (tmp_path / "b" / "iter_0000002").is_dir()


@pytest.fixture(scope="module")
def easy_preference(tiny, tmp_path_factory):
    """The tiny default's model and tokenizer with a preference learnt in a few steps (the
    reversal over 8 random digits), and a random model to start from as a checkpoint (the
    reference model of dpo, ipo and rdpo)."""
    import random

    from megatron_simpo.model.tiny import make_pair

    root = tmp_path_factory.mktemp("easy")
    for name, count, seed in (("train", 256, 1), ("valid", 32, 2)):
        rng, rows = random.Random(seed), []
        for _ in range(count):
            row = make_pair(rng)
            row["rejected"] = "".join(rng.choice("0123456789") for _ in range(8))
            rows.append(json.dumps(row) + "\n")
        (root / f"{name}.jsonl").write_text("".join(rows))
    data = dict(tiny, train=root / "train.jsonl", valid=root / "valid.jsonl")
    # The random initialisation as a checkpoint: one step at a negligible learning rate.
    argv = _argv(data, train_iters=1, save=root / "start")
    argv[argv.index("--lr") + 1] = "1e-9"
    run_on_ranks(1, _train, argv)
    return data, root / "start"


@pytest.mark.parametrize("algorithm", ["ipo", "cpo", "orpo", "rdpo", "rrhf", "slic"])
def test_every_baseline_learns_a_held_out_preference(easy_preference, algorithm):
    data, start = easy_preference
    argv = _argv(data, train_iters=10, eval_interval=10, algorithm=algorithm,
                 pretrained_checkpoint=start)
    for flag, value in (("--lr", "3e-3"), ("--micro-batch-size", "16"),
                        ("--global-batch-size", "16")):
        argv[argv.index(flag) + 1] = value
    losses, evals = run_on_ranks(1, _train, argv)[0]
    (first, before), (last, after) = evals[0], evals[-1]
    assert (first, last) == (0, 10)
    assert before["eval/rewards/accuracies"] < 0.6 and after["eval/rewards/accuracies"] >= 0.9
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"] + 0.1
    assert after["eval/loss"] < before["eval/loss"] and losses[-1] < losses[0]
    assert ("eval/log_odds_ratio" in after) == (algorithm == "orpo")


def test_dpo_run_starts_at_log_2_with_the_policy_as_reference(tiny, tmp_path):
    import math

    run_on_ranks(1, _train, _argv(tiny, train_iters=2, save=tmp_path / "sft"))
    losses, evals = run_on_ranks(2, _train, _argv(tiny, train_iters=3, algorithm="dpo", beta=0.1,
                                                  pretrained_checkpoint=tmp_path / "sft",
                                                  pipeline_model_parallel_size=2))[0]
    # Policy == reference at the start: every reward is 0 and every pair's loss is log 2.
    assert abs(evals[0][1]["eval/loss"] - math.log(2)) <= 1e-6
    assert abs(evals[0][1]["eval/rewards/margins"]) <= 1e-6
    assert abs(losses[0] - math.log(2)) <= 1e-6 and losses[-1] != losses[0]


def _main_error(capsys, monkeypatch, argv, world="1"):
    from megatron_simpo.cli.train import main

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_command_lines_fail_before_training(tiny, tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, global_batch_size=6), "2")
    assert "--global-batch-size (6) must be divisible by --micro-batch-size (2) x data-parallel size (2)" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, seq_length=512))
    assert "--seq-length (512) exceeds the model's maximum sequence length (256)" in err
    missing = tmp_path / "missing.jsonl"
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1) + ["--train-data-path", str(missing)])
    assert f"--train-data-path: {missing} does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, load=tmp_path / "empty"))
    assert f"--load {tmp_path / 'empty'}: no checkpoint there" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, tensor_model_parallel_size=3), "3")
    assert "--tensor-model-parallel-size (3) must divide the number of attention heads" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, simpo_gamma=1.0,
                                                 simpo_gamma_beta_ratio=0.5))
    assert "--simpo-gamma or --simpo-gamma-beta-ratio, not both" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, algorithm="dpo"))
    assert "--algorithm dpo needs the reference model's weights" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, recompute_granularity="full"))
    assert "--recompute-granularity full needs --recompute-method" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, recompute_method="block"))
    assert "--recompute-method and --recompute-num-layers go with --recompute-granularity full" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, load=tmp_path / "new",
                                                 save=tmp_path / "new", no_source=True))
    assert (f"--load {tmp_path / 'new'} holds no checkpoint yet (it is --save: a first start), "
            "and there is nothing to start from: give --pretrained-checkpoint or --model-config "
            "too") in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp16=True))
    assert "--fp16 is not supported" in err
    monkeypatch.setattr("megatron_simpo.training.metrics.TENSORBOARD_PACKAGE", "tensorboard_not_here")
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, tensorboard_dir=tmp_path))
    assert "--tensorboard-dir needs the tensorboard_not_here package (pip install tensorboard_not_here)" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1,
                                                 override_opt_param_scheduler=True))
    assert "--override-opt-param-scheduler applies to a resume: it needs --load" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, load=tmp_path,
                                                 override_opt_param_scheduler=True)
                      + ["--use-checkpoint-opt_param-scheduler"])  # Megatron-LM's spelling
    assert "give --override-opt-param-scheduler (the command line's schedule) or " \
           "--use-checkpoint-opt-param-scheduler (the checkpoint's), not both" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, loss_type="hinge",
                                                 label_smoothing=0.1))
    assert "--label-smoothing applies to the sigmoid loss only" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, sequence_parallel=True))
    assert "--sequence-parallel splits activations over tensor-parallel ranks: it needs " \
           "--tensor-model-parallel-size > 1" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, sequence_parallel=True,
                                                 tensor_model_parallel_size=2, seq_length=63))
    assert "--seq-length (63) must be a multiple of 2: --sequence-parallel splits it over 2 TP ranks" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp8_recipe="tensorwise",
                                                 fp8_margin=1))
    assert "--fp8-recipe, --fp8-margin: only with --fp8-format" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp8_format="hybrid", bf16=True))
    assert "--fp8-format needs --transformer-impl transformer_engine" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp8_format="hybrid",
                                                 transformer_impl="transformer_engine"))
    assert "--fp8-format needs --bf16" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp8_format="e4m3", bf16=True,
                                                 transformer_impl="transformer_engine",
                                                 seq_length=56))
    assert "--seq-length (56) must be a multiple of 16: FP8 GEMMs (delayed) need multiples of 16 tokens" in err
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp8_format="e4m3",
                                                 fp8_recipe="mxfp8", bf16=True, seq_length=64,
                                                 transformer_impl="transformer_engine",
                                                 first_last_layers_bf16=True,
                                                 num_layers_at_end_in_bf16=3))
    assert "--num-layers-at-end-in-bf16 (3) exceeds the layers of a pipeline stage (2 layers / PP 1)" in err
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp8_format="hybrid",
                                                     bf16=True, transformer_impl="transformer_engine"))
        assert "--transformer-impl transformer_engine needs Transformer Engine, which is not installed" in err
    assert not dist.is_initialized()


# ---- runs that survive -------------------------------------------------------------------------

def _refuse_constant(name):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def _metrics(save: Path) -> list[dict]:
    return [json.loads(line, parse_constant=_refuse_constant)
            for line in (save / "metrics.jsonl").read_text().splitlines()]


def _main_in_rank(rank, argv):
    """``train.main`` as a user runs it: (exit code, stdout, stderr) of this rank."""
    import contextlib
    import io

    from megatron_simpo.cli.train import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("train_simpo:")]


def test_non_finite_training_stops_and_writes_no_checkpoint(tiny, tmp_path):
    save = tmp_path / "run"
    results = run_on_ranks(2, _main_in_rank, _argv(tiny, train_iters=8, simpo_beta=3e38,
                                                    save=save, save_interval=1))
    assert [code for code, _, _ in results] == [3, 3]
    [line] = _error_lines(results[0][2])
    assert line.startswith("train_simpo: error: 3 steps in a row (up to iteration 3) had a "
                           "non-finite loss or gradient and were skipped (--max-skipped-steps 3)")
    assert line.endswith("then start again (this run saved no checkpoint)")
    assert _error_lines(results[1][2]) == []
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not list(save.glob("iter_*"))
    steps = [row for row in _metrics(save) if "skipped" in row]
    assert [row["iteration"] for row in steps] == [1, 2, 3]
    assert all(row["skipped"] == 1 and row["grad_norm"] is None for row in steps)


def test_a_logged_row_is_the_mean_of_its_window():
    """LogWindow: the step metrics' mean over the window's steps that were not skipped (the
    skipped ones counted), time and padding over all of them, throughput as totals over the
    time, the last step's learning rate and grad norm."""
    import math

    from megatron_simpo.training.metrics import LogWindow, StepRecord, log_line
    from megatron_simpo.training.step import StepResult

    steps = [  # (loss, accuracy, skipped, grad norm, lr, tokens, padding, saved, seconds, flops)
        (0.7, 0.5, False, 1.5, 1e-3, 100, 0.9, 4, 2.0, 6e12),
        (math.nan, math.nan, True, None, 2e-3, 300, 0.7, 0, 1.0, 3e12),
        (0.4, 1.0, False, 0.5, 3e-3, 200, 0.8, 8, 1.0, 3e12)]
    window = LogWindow()
    for loss, accuracy, skipped, norm, lr, tokens, padding, saved, seconds, flops in steps:
        result = StepResult({"loss": loss, "rewards/accuracies": accuracy,
                             "rewards/margins": loss}, norm, not skipped, skipped)
        window.add(StepRecord(result, (0,), lr, tokens, padding, saved), seconds, flops)
    row = window.close(24, 2)
    assert not window and row == pytest.approx(dict(
        loss=(0.7 + 0.4) / 2, **{"rewards/accuracies": 0.75, "rewards/margins": 0.55},
        learning_rate=3e-3, grad_norm=0.5, consumed_samples=24, iteration_time_s=4 / 3,
        tokens_per_second=600 / 4, padding_efficiency=0.8, prompt_tokens_saved=4,
        tflops_per_gpu=12 / 4 / 2, skipped=1), rel=1e-12)
    assert log_line(3, 10, row).endswith("| skipped: 1 (non-finite loss or gradient) |")
    window.add(StepRecord(StepResult({"loss": math.inf}, None, False, True), (0,), 1e-3, 1,
                          1.0, 0), 1.0, 0)
    only_skipped = window.close(32, 1)  # nothing to average: null in metrics.jsonl
    assert math.isnan(only_skipped["loss"]) and only_skipped["grad_norm"] is None


def _save_zero_model(rank, save, config_path):
    """A checkpoint whose weights are all 0, as after a collapse: every gradient is exactly 0."""
    import torch

    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import build_model
    from megatron_simpo.distributed.parallel import ParallelConfig

    config = ModelConfig.from_hf_config(config_path)
    runtime.initialize(ParallelConfig(), seed=0)
    model = build_model(config, ParallelConfig())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    checkpointing.save_model_only(save, 0, model, config)


def test_a_collapsed_model_is_reported(tiny, tmp_path):
    run_on_ranks(1, _save_zero_model, str(tmp_path / "zero"), str(tiny["config"]))
    code, out, _ = run_on_ranks(1, _main_in_rank, _argv(
        tiny, train_iters=4, pretrained_checkpoint=tmp_path / "zero"))[0]
    assert code == 0
    assert "warning: the gradient norm has been exactly 0 for 3 steps" in out


def test_a_save_folder_holding_another_run_is_refused(tiny, tmp_path, capsys, monkeypatch):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.run_setup import prepare

    monkeypatch.setenv("WORLD_SIZE", "1")
    other = tmp_path / "other"
    (other / "iter_0000020").mkdir(parents=True)
    (other / "iter_0000020" / "metadata.json").write_text("{}")
    (other / "latest_checkpointed_iteration.txt").write_text("20\n")
    (other / "metrics.jsonl").write_text("")
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=2, save=other))
    assert f"--save {other} already holds a run" in err
    assert f"resume it with --load {other}, or give --overwrite to replace it" in err
    prepare(parse_args(_argv(tiny, train_iters=2, save=other, overwrite=True)))  # accepted
    # A resumed run must not find later iterations in its --save: here it resumes from 1.
    run = tmp_path / "run"
    run_on_ranks(1, _train, _argv(tiny, train_iters=3, save=run, save_interval=1,
                                  eval_interval=1, eval_dump=True))
    (run / "latest_checkpointed_iteration.txt").write_text("1\n")
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=3, load=run, save=run))
    assert f"--save {run} holds iterations after the resumed one (1): 2, 3" in err
    losses, _ = run_on_ranks(1, _train, _argv(tiny, train_iters=3, load=run, save=run,
                                              overwrite=True))[0]
    assert len(losses) == 2
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert [row["iteration"] for row in _metrics(run) if "loss" in row] == [1, 2, 3]
    # the replaced iterations' per-pair dumps go with their metrics lines
    assert sorted(p.name for p in (run / "eval_dump").iterdir()) == ["iter_0000000.jsonl"]


def _train_until_the_disk_is_full(rank, argv):
    """Saves fail with ENOSPC from iteration 2 on (on every rank, as on a full shared disk)."""
    import errno

    from megatron.core import dist_checkpointing

    real_save, calls = dist_checkpointing.save, []

    def save(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(state, path, *args, **kwargs)

    dist_checkpointing.save = save
    try:
        return _main_in_rank(rank, argv)
    finally:
        dist_checkpointing.save = real_save


def test_a_failed_save_names_the_folder_and_reason_and_keeps_the_last_checkpoint(tiny, tmp_path):
    save = tmp_path / "run"
    results = run_on_ranks(2, _train_until_the_disk_is_full,
                           _argv(tiny, train_iters=4, save=save, save_interval=1))
    assert [code for code, _, _ in results] == [2, 2]
    [line] = _error_lines(results[0][2])
    assert line == (f"train_simpo: error: cannot save iteration 2 to {save}: No space left on "
                    f"device: {save / 'iter_0000002.partial'}; iteration 1 stays the latest "
                    "checkpoint")
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]


def test_exit_interval_saves_and_stops_and_a_tiny_validation_set_is_reported(tiny, tmp_path):
    """Also: one command line for every start of a requeued job (Megatron-LM's --load): --load
    naming --save starts from the beginning while no checkpoint is there (the steps of a start
    that saved none are dropped), and resumes once one is."""
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(Path(tiny["valid"]).read_text().splitlines(keepends=True)[:3]))
    save = tmp_path / "run"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"iteration": 1, "loss": 9.0}\n')  # saved nothing
    argv = _argv(tiny, train_iters=8, save=save, load=save, exit_interval=3) + [
        "--valid-data-path", valid]
    [(code, out, _), _] = run_on_ranks(2, _main_in_rank, argv)
    assert code == 0
    assert f"> --load {save}: no checkpoint there yet; the run starts from the beginning" in out
    assert "> stopped at iteration 3: --exit-interval reached" in out
    assert "warning: the validation set has 3 pair(s), fewer than one micro-batch per " \
           "data-parallel rank (4): no evaluation" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    left = save / "iter_0000005.partial"  # a save its run never finished (a second signal)
    (left / "weights").mkdir(parents=True)
    (left / "weights" / "__0_0.distcp").write_bytes(b"\0" * 100)
    [(code, out, _), _] = run_on_ranks(2, _main_in_rank, argv)  # the job's next start
    assert code == 0 and f"> resumed from {save / 'iter_0000003'} at iteration 3" in out
    assert f"> removed {left}: a save that never finished (its run ended mid-save)" in out
    assert not left.exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert [row["iteration"] for row in _metrics(save)] == list(range(1, 7))
    assert all(row["loss"] != 9.0 for row in _metrics(save))


def test_resuming_on_changed_data_is_refused_unless_overridden(tiny, tmp_path):
    """Checkpoints record the data's fingerprint; a resume on other pairs (here one row less)
    ends in one line naming the checkpoint, unless --override-data; the same data resumes
    with no word (the bitwise resume tests)."""
    run_on_ranks(1, _train, _argv(tiny, train_iters=2, save=tmp_path / "a"))
    changed = tmp_path / "train.jsonl"
    changed.write_text("".join(Path(tiny["train"]).read_text().splitlines(keepends=True)[1:]))
    argv = _argv(tiny, train_iters=4, load=tmp_path / "a", save=tmp_path / "b",
                 override_opt_param_scheduler=True)  # 2 more iterations, a new schedule
    argv[argv.index("--train-data-path") + 1] = str(changed)
    [(code, out, err)] = run_on_ranks(1, _main_in_rank, argv)
    assert code == 2
    [line] = _error_lines(err)
    assert line.startswith(f"train_simpo: error: --load {tmp_path / 'a' / 'iter_0000002'} was "
                           "trained on other data (fingerprint ")
    assert line.endswith("give --override-data to go on from its position (16 samples) in the "
                         "new data")
    [(code, out, err)] = run_on_ranks(1, _main_in_rank, argv + ["--override-data"])
    assert code == 0, err
    assert "warning: --override-data: resuming" in out
    assert [row["iteration"] for row in _metrics(tmp_path / "b") if "loss" in row] == [3, 4]


@pytest.mark.parametrize("context_parallel", [1, 2])
def test_eval_dump_holds_every_held_out_pair(tiny, tmp_path, context_parallel):
    """--eval-dump: one line per held-out pair at each evaluation (at DP2, and at CP2, where
    both ranks hold every pair's sums); its means are the eval metrics, its token counts the
    pairs' response lengths, and its log-prob sums those of the Hugging Face model the run
    started from (at iteration 0)."""
    import torch
    import transformers

    from megatron_simpo.cli import convert as cli
    from megatron_simpo.data.config import DataConfig
    from megatron_simpo.data.loading import load_datasets
    from megatron_simpo.data.tokenization import load_tokenizer

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tiny["config"])).eval()
    hf.save_pretrained(tmp_path / "hf")
    load_tokenizer(tiny["tokenizer"]).save_pretrained(tmp_path / "hf")
    cli.hf_to_megatron_main(["--hf-path", str(tmp_path / "hf"), "--save", str(tmp_path / "mg")])
    _, evals = run_on_ranks(2, _train, _argv(tiny, pretrained_checkpoint=tmp_path / "mg",
                                             train_iters=2, eval_interval=2, eval_dump=True,
                                             context_parallel_size=context_parallel,
                                             save=tmp_path / "run"))[0]
    valid = load_datasets(DataConfig(train_data_path=str(tiny["train"]),
                                     valid_data_path=str(tiny["valid"]), seq_length=64,
                                     max_prompt_length=48),
                          load_tokenizer(tiny["tokenizer"]), seed=3)[1]
    for at, metrics in evals:
        rows = [json.loads(line) for line in
                (tmp_path / "run" / "eval_dump" / f"iter_{at:07d}.jsonl").read_text().splitlines()]
        assert [row["pair"] for row in rows] == list(range(len(valid)))  # 32 pairs, each once
        assert [(r["chosen_tokens"], r["rejected_tokens"]) for r in rows] == \
            [(len(p.chosen), len(p.rejected)) for p in valid]
        for name, key in (("eval/rewards/margins", "reward_margin"),
                          ("eval/rewards/chosen", "reward_chosen"),
                          ("eval/logps/chosen", "chosen_logp_mean"),
                          ("eval/logps/rejected", "rejected_logp_mean")):
            mean = sum(row[key] for row in rows) / len(rows)
            assert abs(mean - metrics[name]) <= 1e-5, (at, name)
        accuracy = sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) / len(rows)
        assert abs(accuracy - metrics["eval/rewards/accuracies"]) <= 1e-6
        if at == 0:
            for row in rows[:4]:
                pair = valid[row["pair"]]
                for side, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                    ids = torch.tensor([list(pair.prompt) + list(response)])
                    with torch.no_grad():
                        logps = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
                    targets = ids[0, 1:]
                    scored = logps[torch.arange(len(targets)), targets][len(pair.prompt) - 1:]
                    assert abs(row[f"{side}_logp_sum"] - scored.sum().item()) <= 1e-4


def _count_forward_passes(rank, runs):
    """Train each argument list, counting the model's forward passes (one per micro-batch of
    every pipeline schedule: steps, evaluations, a reference model's passes)."""
    from megatron_simpo.distributed import runtime
    from megatron_simpo.training import step
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.loop import run

    real_forward, calls = step._forward, []

    def counting(batch, model):
        calls.append(batch.num_pairs)
        return real_forward(batch, model)

    step._forward = counting
    counts = []
    try:
        for argv in runs:
            calls.clear()
            summary = run(parse_args(argv))
            runtime.shutdown()  # the next run initialises its own process groups
            counts.append((len(calls), len(summary.evals)))
    finally:
        step._forward = real_forward
    return counts


def test_eval_dump_adds_no_forward_pass(easy_preference, tmp_path):
    """--eval-dump writes what the evaluation's own forward pass computed: a run with it makes
    exactly as many forward passes as one without, for SimPO and for DPO (whose reference
    model runs once per evaluation batch either way)."""
    data, start = easy_preference
    runs = []
    for algorithm in ("simpo", "dpo"):
        for dump in (False, True):
            name = f"{algorithm}_{'dump' if dump else 'plain'}"
            runs.append(_argv(data, train_iters=2, eval_interval=1, algorithm=algorithm,
                              pretrained_checkpoint=start, save=tmp_path / name,
                              **({"eval_dump": True} if dump else {})))
    simpo, simpo_dumped, dpo, dpo_dumped = run_on_ranks(1, _count_forward_passes, runs)[0]
    for plain, dumped in ((simpo, simpo_dumped), (dpo, dpo_dumped)):
        assert plain == dumped and plain[1] == 3  # evaluations at 0, 1 and 2
    for name in ("simpo_dump", "dpo_dump"):
        assert sorted(p.name for p in (tmp_path / name / "eval_dump").iterdir()) == \
            [f"iter_{at:07d}.jsonl" for at in range(3)]
    # 32 validation pairs in micro-batches of 2, 8 pairs per step in micro-batches of 2:
    # SimPO 3 x 16 + 2 x 4 passes; DPO's reference model doubles each.
    assert simpo[0] == 3 * 16 + 2 * 4 and dpo[0] == 2 * simpo[0]


# ---- resumes that do what the command line says ----------------------------------------------

def _scheduled_lr(step, *, lr, min_lr, warmup, steps):
    """The cosine schedule after ``step`` optimizer steps, written out: linear warmup from 0
    over ``warmup`` steps (ceil(fraction x steps)), cosine from ``lr`` to ``min_lr`` at
    ``steps``, then min_lr."""
    import math

    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if step > steps:
        return min_lr
    ratio = (step - warmup) / (steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def _refused(tiny, **flags) -> str:
    """The one error line of a resume refused on 2 ranks (exit code 2 on both, nothing from
    rank 1)."""
    results = run_on_ranks(2, _main_in_rank, _argv(tiny, **flags))
    assert [code for code, _, _ in results] == [2, 2], results[0][2]
    assert _error_lines(results[1][2]) == []
    [line] = _error_lines(results[0][2])
    return line


def test_a_resume_does_what_its_command_line_says_or_is_refused(tiny, tmp_path):
    """A finished 4-iteration run resumed to 6: refused without a flag (never a silent learning
    rate of 0), with each difference named; --override-opt-param-scheduler trains iterations
    5-6 on the command line's schedule; --use-checkpoint-opt-param-scheduler keeps the
    checkpoint's (past its end at its --min-lr, refused when that is 0); a cut-off last
    metrics line is dropped with a warning, a damaged one before it refuses the resume."""
    from megatron_simpo.checkpoint import checkpointing

    save = tmp_path / "run"
    run_on_ranks(2, _train, _argv(tiny, train_iters=4, save=save))
    iter4 = save / "iter_0000004"
    line = _refused(tiny, train_iters=6, load=save, save=save)
    assert line == (f"train_simpo: error: --load {iter4} contradicts the command line: "
                    "--train-iters 4 -> 6 (give --override-opt-param-scheduler to train on the "
                    "command line's learning-rate schedule, or --use-checkpoint-opt-param-"
                    "scheduler to keep the checkpoint's)")
    line = _refused(tiny, train_iters=4, load=save, save=save, lr="2e-3", seed=4,
                    global_batch_size=16)
    assert line.startswith(f"train_simpo: error: --load {iter4} contradicts the command line: "
                           "--lr 0.001 -> 0.002 (give --override-opt-param-scheduler")
    assert "; --seed 3 -> 4 (it orders the data: give --override-data to go on from the " \
           "checkpoint's position, 32 samples, in the new order); --global-batch-size 8 -> 16 " \
           "(no flag resumes at another global batch size: start a new run from the " \
           f"checkpoint with --pretrained-checkpoint {iter4})" in line
    line = _refused(tiny, train_iters=6, load=save, save=save,
                    use_checkpoint_opt_param_scheduler=True)
    assert line == ("train_simpo: error: --use-checkpoint-opt-param-scheduler: the checkpoint's "
                    "schedule ends after 4 steps at --min-lr 0, so iterations 5-6 would train "
                    "at learning rate 0; give --override-opt-param-scheduler for a schedule over "
                    "the new run length")
    # A new schedule over 6 iterations, from the checkpoint's 4 steps; kill -9 had cut the
    # metrics file's last line.
    metrics = save / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("".join(line + "\n" for line in lines) + '{"iteration": 5, "lo')
    argv = _argv(tiny, train_iters=6, load=save, save=save, min_lr="1e-4",
                 override_opt_param_scheduler=True)
    [(code, out, err), _] = run_on_ranks(2, _main_in_rank, argv)
    assert code == 0, err
    assert f"warning: {metrics} line {len(lines) + 1} is cut off (not JSON: a write interrupted " \
           "by a kill); dropped" in out.splitlines()
    assert "> --override-opt-param-scheduler: the command line's learning-rate schedule " \
           "(--min-lr 0.0 -> 0.0001, --train-iters 4 -> 6) from the checkpoint's step count" in out
    rows = {row["iteration"]: row for row in _metrics(save) if "loss" in row}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for iteration in range(1, 7):  # iteration i runs at the rate after i - 1 steps
        schedule = (dict(min_lr=0.0, warmup=1, steps=4) if iteration <= 4 else
                    dict(min_lr=1e-4, warmup=2, steps=6))  # ceil(0.25 x 6)
        expected = _scheduled_lr(iteration - 1, lr=1e-3, **schedule)
        assert rows[iteration]["learning_rate"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert rows[5]["learning_rate"] > 1e-4 and rows[6]["consumed_samples"] == 48
    saved = checkpointing.read_train_state(save / "iter_0000006").settings
    assert saved["schedule"] == dict(lr=1e-3, min_lr=1e-4, lr_decay_style="cosine",
                                     lr_warmup_fraction=0.25, weight_decay=0.0, adam_beta1=0.9,
                                     adam_beta2=0.999, adam_eps=1e-8, iterations=6)
    # The checkpoint's schedule past its end: iterations 7-8 at its --min-lr 1e-4.
    argv = _argv(tiny, train_iters=8, load=save, save=save, lr="5e-3",
                 use_checkpoint_opt_param_scheduler=True)
    [(code, out, err), _] = run_on_ranks(2, _main_in_rank, argv)
    assert code == 0, err
    assert "warning: --use-checkpoint-opt-param-scheduler: the checkpoint's learning-rate " \
           "schedule is kept (--lr 0.001, --min-lr 0.0001, --lr-decay-style cosine, " \
           "--lr-warmup-fraction 0.25, --weight-decay 0.0, --adam-beta1 0.9, --adam-beta2 " \
           "0.999, --adam-eps 1e-08, over 6 steps), not the command " \
           "line's (--lr 0.001 -> 0.005, --min-lr 0.0001 -> 0.0, --train-iters 6 -> 8)" in out
    assert "> iterations 7-8 run past the checkpoint's schedule at its final rate, --min-lr " \
           "0.0001" in out
    rows = {row["iteration"]: row for row in _metrics(save) if "loss" in row}
    assert sorted(rows) == list(range(1, 9))
    assert [rows[i]["learning_rate"] for i in (7, 8)] == [1e-4, 1e-4]
    # The next checkpoint records the schedule in effect (the kept one), so the same command
    # line resumes it without a flag; here a damaged line before the last stops that resume.
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("".join(line + "\n" for line in lines))
    line = _refused(tiny, train_iters=8, load=save, save=save, min_lr="1e-4")
    assert line.startswith(f"train_simpo: error: {metrics} line 2 is not JSON (")
    assert line.endswith("the file is damaged: fix or remove that line")


def test_a_resume_on_another_schedule_without_the_distributed_optimizer(tiny, tmp_path):
    """The plain optimizer's param groups are paired with the checkpoint's (megatron-core 0.19
    pairs them by their schedule too): a resume on a new --min-lr trains on the new schedule."""
    save = tmp_path / "run"
    run_on_ranks(2, _train, _argv(tiny, train_iters=4, save=save, distributed_optimizer=False))
    argv = _argv(tiny, train_iters=6, load=save, save=save, min_lr="1e-4",
                 override_opt_param_scheduler=True, distributed_optimizer=False)
    [(code, out, err), _] = run_on_ranks(2, _main_in_rank, argv)
    assert code == 0, err
    rows = {row["iteration"]: row for row in _metrics(save) if "loss" in row}
    for iteration in (5, 6):
        expected = _scheduled_lr(iteration - 1, lr=1e-3, min_lr=1e-4, warmup=2, steps=6)
        assert rows[iteration]["learning_rate"] == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_resume_on_another_objective_is_refused(tiny, tmp_path):
    """The objective is compared as the loss uses it: a default spelled out is the same
    objective; another algorithm, beta or margin is refused with each difference named (and
    what the loss derives from them); checkpoints from before the record are not checked."""
    import dataclasses

    from megatron_simpo.checkpoint.layout import TrainState
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.resume import (ResumeError, check_resume,
                                                command_line_schedule, settings_record)

    config = parse_args(_argv(tiny, train_iters=8, load=tmp_path))
    saved = TrainState(4, 32, None, settings_record(config, 8, command_line_schedule(config, 8)))
    same = parse_args(_argv(tiny, train_iters=8, load=tmp_path, simpo_beta=2.5,
                            simpo_gamma_beta_ratio=0.55, length_normalization=True))
    assert check_resume(same, saved, tmp_path) == []
    for flags, expected in [
            (dict(algorithm="cpo"), "--algorithm simpo -> cpo, --beta 2.5 -> 0.1, --simpo-gamma "
             "1.375 -> 0, --sft-weight 0 -> 1, --length-normalization True -> False"),
            (dict(beta=5), "--beta 2.5 -> 5, --simpo-gamma 1.375 -> 2.75"),
            (dict(simpo_gamma=1.0, sft_weight=0.5), "--simpo-gamma 1.375 -> 1, --sft-weight "
             "0 -> 0.5")]:
        other = parse_args(_argv(tiny, train_iters=8, load=tmp_path, **flags))
        with pytest.raises(ResumeError) as error:
            check_resume(other, saved, tmp_path)
        assert str(error.value) == (
            f"--load {tmp_path} contradicts the command line: {expected} (a run optimises one "
            f"objective: start a new run from the checkpoint with --pretrained-checkpoint "
            f"{tmp_path})")
    # the same margin as beta x ratio and as gamma (0.1 x 0.55 = 0.05500000000000001)
    ratio = parse_args(_argv(tiny, train_iters=8, load=tmp_path, beta=0.1,
                             simpo_gamma_beta_ratio=0.55))
    by_ratio = TrainState(4, 32, None, settings_record(ratio, 8, command_line_schedule(ratio, 8)))
    gamma = parse_args(_argv(tiny, train_iters=8, load=tmp_path, beta=0.1, simpo_gamma=0.055))
    assert check_resume(gamma, by_ratio, tmp_path) == []
    older = {k: v for k, v in saved.settings.items() if k != "objective"}
    other = parse_args(_argv(tiny, train_iters=8, load=tmp_path, algorithm="cpo"))
    assert check_resume(other, dataclasses.replace(saved, settings=older), tmp_path) == []


def test_resume_rules_on_the_run_length_in_iterations(tiny, tmp_path):
    """What only the loaded data tells (checked again once it is loaded): --train-epochs over
    other data (--override-data) amounts to another run length; a run length before the
    checkpoint's iteration has nothing to train."""
    from megatron_simpo.checkpoint.layout import TrainState
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.resume import (ResumeError, check_resume,
                                                command_line_schedule, settings_record)

    config = parse_args(_argv(tiny, train_epochs=1, load=tmp_path))
    record = settings_record(config, 64, command_line_schedule(config, 64))
    saved = TrainState(32, 256, None, record)
    assert check_resume(config, saved, tmp_path, None) == []
    assert check_resume(config, saved, tmp_path, 64) == []
    with pytest.raises(ResumeError) as error:
        check_resume(config, saved, tmp_path, 63)  # one pair less: 63 global batches
    assert str(error.value) == (
        f"--load {tmp_path} contradicts the command line: run length 64 -> 63 iterations "
        "(--train-epochs 1 over other data) (give --override-opt-param-scheduler to train on "
        "the command line's learning-rate schedule, or --use-checkpoint-opt-param-scheduler to "
        "keep the checkpoint's)")
    shorter = parse_args(_argv(tiny, train_iters=20, load=tmp_path,
                               override_opt_param_scheduler=True))
    with pytest.raises(ResumeError) as error:
        check_resume(shorter, saved, tmp_path, 20)
    assert str(error.value) == (f"--load {tmp_path} is at iteration 32, past the run's 20 "
                                "iterations (--train-iters 20)")


def test_a_run_without_validation_pairs_says_so(tiny):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.data.collate import TokenizedPair
    from megatron_simpo.data.sampler import PairSampler
    from megatron_simpo.training.training_data import TrainingData

    config = parse_args(_argv(tiny, train_iters=1))
    pairs = [TokenizedPair([1, 2], [3], [4, 5])] * 8
    data = TrainingData(pairs, [], 0, PairSampler(8, 8, 0), 1)
    assert "warning: no validation pairs (--valid-data-path or --valid-fraction): no held-out " \
           "metrics this run" in data.warnings(config, 1)
    assert not any("validation" in w for w in
                   TrainingData(pairs, pairs, 0, PairSampler(8, 8, 0), 1).warnings(config, 1))


def test_the_pairs_each_epoch_leaves_out_are_said(tiny):
    """Each epoch drops its last incomplete global batch (Megatron-LM's rule; TRL trains it):
    the run says how many pairs that leaves out, and nothing when the batches fit."""
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.data.collate import TokenizedPair
    from megatron_simpo.data.sampler import PairSampler
    from megatron_simpo.training.training_data import TrainingData

    config = parse_args(_argv(tiny, train_iters=1))  # global batch 8
    pair = TokenizedPair([1, 2], [3], [4, 5])
    sampler = PairSampler(20, 8, 0)
    assert sampler.batches_per_epoch * 8 == 16  # the sampler's own rule
    warnings = TrainingData([pair] * 20, [], 0, sampler, 1).warnings(config, 1)
    assert "> 4 pair(s) of each epoch are not trained: the epoch's last, incomplete global " \
           "batch (of 8) is dropped, as Megatron-LM does; each epoch's permutation leaves out " \
           "others" in warnings
    fitting = TrainingData([pair] * 16, [], 0, PairSampler(16, 8, 0), 1).warnings(config, 1)
    assert not any("not trained" in w for w in fitting)
