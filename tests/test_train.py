"""The training loop: exact resume, resharded loading, and a run that learns (through the launcher)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiprocess import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_simpo.tiny import write_default

    return write_default(tmp_path_factory.mktemp("tiny"), train_pairs=512, valid_pairs=32, seed=7)


def _argv(tiny, **flags):
    source = [] if "pretrained_checkpoint" in flags else ["--model-config", str(tiny["config"])]
    argv = source + ["--tokenizer", str(tiny["tokenizer"]),
            "--train-data-path", str(tiny["train"]), "--valid-data-path", str(tiny["valid"]),
            "--seq-length", "64", "--max-prompt-length", "48", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "1e-3", "--lr-warmup-fraction", "0.25",
            "--seed", "3"]
    if flags.pop("distributed_optimizer", True):
        argv.append("--use-distributed-optimizer")
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _train(rank, argv):
    from megatron_simpo.arguments import parse_args
    from megatron_simpo.train import run

    summary = run(parse_args(argv))
    return summary.losses, summary.evals


@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2),
                                    dict(pipeline_model_parallel_size=2),
                                    dict(distributed_optimizer=False),
                                    dict(tensor_model_parallel_size=2, bf16=True),
                                    dict(overlap_grad_reduce=True, overlap_param_gather=True),
                                    dict(tensor_model_parallel_size=2, sequence_parallel=True)],
                         ids=["tp2", "pp2", "dp2_plain_optimizer", "tp2_bf16",
                              "dp2_overlap_param_gather", "tp2_sequence_parallel"])
def test_resume_is_bitwise_identical(tiny, tmp_path, layout):
    straight, straight_evals = run_on_ranks(2, _train, _argv(tiny, train_iters=8, eval_interval=4,
                                                             save=tmp_path / "a", **layout))[0]
    first, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=8, save=tmp_path / "b",
                                             save_interval=4, **layout)
                            )[0]
    assert first == straight  # same run: saving (or evaluating) along the way changes nothing
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


def test_launcher_reports_a_bad_flag_once(tiny, tmp_path):
    from megatron_simpo.tiny import write_default

    write_default(tmp_path / "demo" / "assets", train_pairs=64, valid_pairs=16, seed=11)
    env = dict(os.environ, MODEL="tiny", SAVE=str(tmp_path / "demo"), PYTHON=sys.executable)
    completed = subprocess.run(["bash", str(ROOT / "examples" / "train_simpo_llama3.sh"),
                                "--lr-decay-style", "exponential"],
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "train_simpo: error: argument --lr-decay-style: invalid choice: 'exponential'"), lines
    assert not (tmp_path / "demo" / "metrics.jsonl").exists()


def _main_error(capsys, monkeypatch, argv, world="1"):
    from megatron_simpo.train import main

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
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=1, fp16=True))
    assert "--fp16 is not supported" in err
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

    from megatron_simpo.train import main

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
    assert _error_lines(results[1][2]) == []
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not list(save.glob("iter_*"))
    steps = [row for row in _metrics(save) if "skipped" in row]
    assert [row["iteration"] for row in steps] == [1, 2, 3]
    assert all(row["skipped"] == 1 and row["grad_norm"] is None for row in steps)


def test_a_collapsed_model_is_reported(tiny, tmp_path):
    code, out, _ = run_on_ranks(1, _main_in_rank, _argv(tiny, train_iters=8, lr=1e6,
                                                        lr_warmup_fraction=0))[0]
    assert code == 0
    assert "warning: the gradient norm has been exactly 0 for 3 steps" in out


def test_a_save_folder_holding_another_run_is_refused(tiny, tmp_path, capsys, monkeypatch):
    from megatron_simpo.arguments import parse_args
    from megatron_simpo.train import prepare

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
    run_on_ranks(1, _train, _argv(tiny, train_iters=2, save=run, save_interval=1))
    (run / "latest_checkpointed_iteration.txt").write_text("1\n")
    err = _main_error(capsys, monkeypatch, _argv(tiny, train_iters=3, load=run, save=run))
    assert f"--save {run} holds iterations after the resumed one (1): 2" in err
    losses, _ = run_on_ranks(1, _train, _argv(tiny, train_iters=3, load=run, save=run,
                                              overwrite=True))[0]
    assert len(losses) == 2
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert [row["iteration"] for row in _metrics(run) if "loss" in row] == [1, 2, 3]


def _launch(env_overrides: dict, *args, **popen) -> subprocess.Popen:
    env = dict(os.environ, MODEL="tiny", PYTHON=sys.executable, MASTER_PORT=str(_free_port()))
    env.update(env_overrides)
    return subprocess.Popen(["bash", str(ROOT / "examples" / "train_simpo_llama3.sh"),
                             *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    from megatron_simpo.tiny import write_default

    root = tmp_path_factory.mktemp("assets")
    write_default(root, train_pairs=2048, valid_pairs=64, seed=11)
    return root


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's run through the launcher, with its run length given on the command line (400
    iterations replace the launcher's 500): (save folder, completed process)."""
    from megatron_simpo.tiny import write_default

    out = tmp_path_factory.mktemp("demo_run") / "demo"
    write_default(out / "assets", train_pairs=20000, valid_pairs=128, seed=11)
    launcher = _launch({"SAVE": str(out)}, "--train-iters", 400)
    stdout, stderr = launcher.communicate(timeout=900)
    return out, subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)


def test_launcher_run_raises_held_out_accuracy(demo_run):
    out, completed = demo_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [e["eval/rewards/accuracies"] for e in evals if "eval/rewards/accuracies" in e]
    assert accuracies[0] < 0.7 and accuracies[-1] >= 0.8, accuracies
    assert "held-out reward accuracy" in completed.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "400"
    assert (out / "iter_0000400" / "model_config.json").is_file()
    assert (out / "iter_0000400" / "tokenizer" / "tokenizer.json").is_file()


def _demo_folder(tmp_path: Path, assets: Path, name: str) -> Path:
    import shutil

    out = tmp_path / name
    shutil.copytree(assets, out / "assets")
    return out


def test_sigterm_to_one_rank_saves_at_the_next_boundary_and_resumes_exactly(demo_assets, tmp_path):
    import signal
    import time

    import psutil

    flags = ["--train-iters", 30, "--log-interval", 1, "--eval-interval", 1000,
             "--save-interval", 1000]
    straight_dir = _demo_folder(tmp_path, demo_assets, "straight")
    straight = _launch({"SAVE": str(straight_dir)}, *flags)
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    run_dir = _demo_folder(tmp_path, demo_assets, "run")
    launcher = _launch({"SAVE": str(run_dir)}, *flags)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for a few steps, then preempt one rank
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "megatron_simpo.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    stopped = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 30 and f"> stopped at iteration {stopped}: a stop signal" in out
    resumed = _launch({"SAVE": str(run_dir)}, *flags, "--load", run_dir)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    rows = [row for row in _metrics(run_dir) if "loss" in row]
    assert [row["iteration"] for row in rows] == list(range(1, 31))  # none twice, none lost
    expected = [row["loss"] for row in _metrics(straight_dir) if "loss" in row]
    assert [row["loss"] for row in rows] == expected


def test_launcher_extra_arguments_replace_its_defaults(demo_assets, demo_run, tmp_path):
    # The README's own example: a run length given on the command line replaces the
    # launcher's (--train-iters for the tiny model: the demo run above stopped at 400, not 500;
    # --train-epochs for the 8B recipe).
    out_dir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (out_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "400"
    # The 8B recipe on the tiny model: every recipe default of another meaning is replaced.
    recipe_dir = tmp_path / "recipe"
    completed = _launch({"MODEL": "llama3-8b-instruct", "CHECKPOINT": str(out_dir),
                         "DATA": str(demo_assets / "train.jsonl"), "SAVE": str(recipe_dir),
                         "GPUS_PER_NODE": "2", "TRANSFORMER_IMPL": "local", "TP": "1"},
                        "--train-iters", 2, "--seq-length", 64, "--max-prompt-length", 48,
                        "--global-batch-size", 4, "--valid-data-path", demo_assets / "valid.jsonl",
                        "--tokenizer", demo_assets / "tokenizer")
    out, err = completed.communicate(timeout=600)
    assert completed.returncode == 0, err[-3000:]
    assert "2 iterations of 4 pairs" in out
    # DPO from the tiny model's checkpoint, with the margin and run length of one's choice.
    dpo_dir = _demo_folder(tmp_path, demo_assets, "dpo")
    completed = _launch({"SAVE": str(dpo_dir)}, "--algorithm", "dpo", "--beta", 0.1,
                        "--pretrained-checkpoint", out_dir, "--train-epochs", 1,
                        "--global-batch-size", 1024, "--micro-batch-size", 16)
    out, err = completed.communicate(timeout=600)
    assert completed.returncode == 0, err[-3000:]
    first_eval = next(row for row in _metrics(dpo_dir) if "eval/loss" in row)
    assert abs(first_eval["eval/loss"] - 0.6931471805599453) <= 1e-6  # policy == reference


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


def test_ranks_stop_with_a_checkpoint_when_the_launcher_is_killed(demo_assets, tmp_path):
    import signal
    import time

    import psutil

    run_dir = _demo_folder(tmp_path, demo_assets, "run")
    launcher = _launch({"SAVE": str(run_dir)}, "--train-iters", 2000, "--log-interval", 1,
                       "--eval-interval", 100000, "--save-interval", 100000)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and '"loss"' in metrics.read_text():
            break
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "megatron_simpo.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGKILL)  # the torchrun agent (exec'd by the launcher script)
    launcher.communicate(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks outlived their launcher"
    stopped = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= stopped < 2000


def test_exit_interval_saves_and_stops_and_a_tiny_validation_set_is_reported(tiny, tmp_path):
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(Path(tiny["valid"]).read_text().splitlines(keepends=True)[:3]))
    save = tmp_path / "run"
    argv = _argv(tiny, train_iters=8, save=save, exit_interval=3) + ["--valid-data-path", valid]
    [(code, out, _), _] = run_on_ranks(2, _main_in_rank, argv)
    assert code == 0
    assert "> stopped at iteration 3: --exit-interval reached" in out
    assert "warning: the validation set has 3 pair(s), fewer than one micro-batch per " \
           "data-parallel rank (4): no evaluation" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
