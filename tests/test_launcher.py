"""The launcher (examples/train_simpo_llama3.sh) end to end under torchrun: the demo run
learns, extra arguments replace its defaults, a bad flag is one line, and runs survive a stop
signal or a killed launcher. These tests start their own processes; only lean reused worlds
(tests/multiprocess.py: a few idle threads each) wait beside them."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _metrics(save: Path) -> list[dict]:
    """metrics.jsonl's rows; NaN/Infinity (not JSON) fail the test."""
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}")

    return [json.loads(line, parse_constant=refuse)
            for line in (save / "metrics.jsonl").read_text().splitlines()]


def _launch(env_overrides: dict, *args, **popen) -> subprocess.Popen:
    """The launcher as a user starts it: no MASTER_PORT (a free port is its default)."""
    env = dict(os.environ, MODEL="tiny", PYTHON=sys.executable)
    env.pop("MASTER_PORT", None)
    env.update(env_overrides)
    return subprocess.Popen(["bash", str(ROOT / "examples" / "train_simpo_llama3.sh"),
                             *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``process.communicate(timeout)``; past the timeout the launcher and every process it
    started are killed (a hung run must not outlive its test), then the test fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        out, err = process.communicate()
        raise AssertionError(f"no end within {timeout} s; killed. stderr:\n{err[-3000:]}") from None


def _kill(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process it started."""
    import psutil

    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in [*family, process]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            member.kill()


@contextlib.contextmanager
def _beside(process: subprocess.Popen):
    """``process`` runs while the block does (a launcher's start leaves a core idle); if the
    block fails, it is killed with everything it started (it must not outlive its test)."""
    try:
        yield process
    except BaseException:
        _kill(process)
        process.communicate()
        raise


def _training_ranks(launcher_pid: int) -> dict:
    """The training ranks under ``launcher_pid`` by LOCAL_RANK: processes running
    megatron_simpo.cli.train whose parent does not (a rank's forks, such as its tokenizing
    workers, show the same command line), skipping any that end while they are looked at."""
    import psutil

    def trains(process) -> bool:
        return "megatron_simpo.cli.train" in " ".join(process.cmdline())

    ranks = {}
    for process in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, KeyError, ValueError):
            if trains(process) and not trains(process.parent()):
                ranks[int(process.environ()["LOCAL_RANK"])] = process
    return ranks


TORCH_PORT = 29500
"""torchrun's and torch's default rendezvous port: another job on the machine may hold it."""


@contextlib.contextmanager
def _port_held(port: int):
    """``port`` taken by a listening socket while the block runs, as by another job (or by one
    already: then it is held as well)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            pass  # another process holds it
        yield sock.getsockname()[1] if port == 0 else port


def _one_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    from megatron_simpo.model.tiny import write_default

    root = tmp_path_factory.mktemp("assets")
    write_default(root, train_pairs=2048, valid_pairs=64, seed=11)
    return root


@pytest.fixture(scope="module")
def demo_launch(tmp_path_factory):
    """The demo's run through the launcher, started, with its run length given on the command
    line (400 iterations replace the launcher's 500), while another job holds port 29500 (until
    the run has ended: ``demo_run``); it runs beside the tests before the first that reads it:
    (save folder, launcher, the port's release)."""
    from megatron_simpo.model.tiny import write_default

    out = tmp_path_factory.mktemp("demo_run") / "demo"
    write_default(out / "assets", train_pairs=20000, valid_pairs=128, seed=11)
    with contextlib.ExitStack() as port:
        port.enter_context(_port_held(TORCH_PORT))  # beside another job on torch's default port
        launcher = _launch({"SAVE": str(out)}, "--train-iters", 400)
        try:
            yield out, launcher, port.close
        finally:  # no test read it (a selection of tests): it must not outlive them
            if launcher.poll() is None:
                _kill(launcher)
                launcher.communicate()


@pytest.fixture(scope="module")
def demo_run(demo_launch):
    """The demo's run (``demo_launch``) once ended: (save folder, completed process)."""
    out, launcher, release_port = demo_launch
    stdout, stderr = _finish(launcher, 900)
    release_port()
    return out, subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)


def _demo_folder(tmp_path: Path, assets: Path, name: str) -> Path:
    import shutil

    out = tmp_path / name
    shutil.copytree(assets, out / "assets")
    return out


def test_sigterm_to_one_rank_saves_at_the_next_boundary_and_resumes_exactly(demo_assets, tmp_path,
                                                                          demo_launch):
    # (The demo's run goes on beside this test's: the tests after it read it.)
    flags = ["--train-iters", 30, "--log-interval", 1, "--eval-interval", 1000,
             "--save-interval", 1000]
    straight_dir = _demo_folder(tmp_path, demo_assets, "straight")  # uninterrupted: its losses
    with _beside(_launch({"SAVE": str(straight_dir)}, *flags)) as straight:
        rows = _stop_one_rank_then_resume(_demo_folder(tmp_path, demo_assets, "run"), flags)
        _, err = _finish(straight, 600)
    assert straight.returncode == 0, err[-3000:]
    expected = [row["loss"] for row in _metrics(straight_dir) if "loss" in row]
    assert [row["loss"] for row in rows] == expected


def _stop_one_rank_then_resume(run_dir: Path, flags: list) -> list[dict]:
    """SIGTERM to one rank of a run after a few steps, then the same command resumes it, once
    more (the run is complete), and once with a longer run; the resumed run's loss rows."""
    import signal
    import time

    launcher = _launch({"SAVE": str(run_dir)}, *flags)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for a few steps, then preempt one rank
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    ranks = list(_training_ranks(launcher.pid).values())
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)
    out, err = _finish(launcher, 300)
    assert launcher.returncode == 0, err[-3000:]
    stopped = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 30 and f"> stopped at iteration {stopped}: a stop signal" in out
    resumed = _launch({"SAVE": str(run_dir)}, *flags)  # the same command: --load SAVE
    out, err = _finish(resumed, 600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"> resumed from {run_dir / f'iter_{stopped:07d}'} at iteration {stopped}" in out
    rows = [row for row in _metrics(run_dir) if "loss" in row]
    assert [row["iteration"] for row in rows] == list(range(1, 31))  # none twice, none lost
    again = _launch({"SAVE": str(run_dir)}, *flags)  # once more: the run is complete
    out, err = _finish(again, 600)
    assert again.returncode == 0, err[-3000:]
    assert "> the run is complete: iteration 30 of 30 is saved; nothing to train (to train " \
           "further: a larger --train-iters or --train-epochs with " \
           "--override-opt-param-scheduler, the learning-rate schedule stretched to the new " \
           "length)" in out and "\n iteration " not in out
    assert [row for row in _metrics(run_dir) if "loss" in row] == rows
    longer = _launch({"SAVE": str(run_dir)}, *flags[2:], "--train-iters", 32,
                     "--override-opt-param-scheduler")  # what that line advises
    out, err = _finish(longer, 600)
    assert longer.returncode == 0, err[-3000:]
    assert [row["iteration"] for row in _metrics(run_dir) if "loss" in row] == list(range(1, 33))
    return rows


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


def test_launcher_extra_arguments_replace_its_defaults(demo_assets, demo_run, tmp_path):
    # The README's own example: a run length given on the command line replaces the
    # launcher's (--train-iters for the tiny model: the demo run above stopped at 400, not 500;
    # --train-epochs for the 8B recipe).
    out_dir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (out_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "400"
    # The 8B recipe on the tiny model: every recipe default of another meaning is replaced.
    recipe_dir = tmp_path / "recipe"
    recipe = _launch({"MODEL": "llama3-8b-instruct", "CHECKPOINT": str(out_dir),
                      "DATA": str(demo_assets / "train.jsonl"), "SAVE": str(recipe_dir),
                      "GPUS_PER_NODE": "2", "TRANSFORMER_IMPL": "local", "TP": "1"},
                     "--train-iters", 2, "--seq-length", 64, "--max-prompt-length", 48,
                     "--global-batch-size", 4, "--valid-data-path", demo_assets / "valid.jsonl",
                     "--tokenizer", demo_assets / "tokenizer")
    # DPO from the tiny model's checkpoint, with the margin and run length of one's choice
    # (beside the recipe's run).
    dpo_dir = _demo_folder(tmp_path, demo_assets, "dpo")
    with _beside(recipe):
        completed = _launch({"SAVE": str(dpo_dir)}, "--algorithm", "dpo", "--beta", 0.1,
                            "--pretrained-checkpoint", out_dir, "--train-epochs", 1,
                            "--global-batch-size", 1024, "--micro-batch-size", 16)
        out, err = _finish(completed, 600)
        recipe_out, recipe_err = _finish(recipe, 600)
    assert recipe.returncode == 0, recipe_err[-3000:]
    assert "2 iterations of 4 pairs" in recipe_out
    assert completed.returncode == 0, err[-3000:]
    first_eval = next(row for row in _metrics(dpo_dir) if "eval/loss" in row)
    assert abs(first_eval["eval/loss"] - 0.6931471805599453) <= 1e-6  # policy == reference


def _long_run_after_its_first_step(demo_assets, tmp_path, save_interval=100000,
                                   ) -> tuple[Path, subprocess.Popen]:
    """A 2,000-iteration launcher run, once its first step is in metrics.jsonl (and its first
    checkpoint is saved, with a ``save_interval``)."""
    import time

    run_dir = _demo_folder(tmp_path, demo_assets, "run")
    launcher = _launch({"SAVE": str(run_dir)}, "--train-iters", 2000,
                       "--log-interval", 1, "--eval-interval", 100000,
                       "--save-interval", save_interval)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        saved = (run_dir / "latest_checkpointed_iteration.txt").is_file()
        if metrics.is_file() and '"loss"' in metrics.read_text() and (save_interval > 1 or saved):
            break
        time.sleep(0.2)
    return run_dir, launcher


def test_ranks_stop_with_a_checkpoint_when_the_launcher_is_killed(demo_assets, tmp_path):
    import signal

    import psutil

    run_dir, launcher = _long_run_after_its_first_step(demo_assets, tmp_path)
    ranks = list(_training_ranks(launcher.pid).values())
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGKILL)  # the torchrun agent (exec'd by the launcher script)
    _finish(launcher, 60)
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks outlived their launcher"
    stopped = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= stopped < 2000


def test_sigterm_to_the_launcher_saves_and_exits_0(demo_assets, tmp_path, monkeypatch):
    """Slurm's scancel and Ctrl-C reach the launcher (torchrun's agent) too: it passes the
    signal on (to each rank's process group), waits for the ranks to save (torchrun would kill
    them after 30 s), and ends with exit code 0 and no traceback. The run has saved before the
    signal: the checkpoint writer's helper process, started at that save, lives on for the
    stop-save."""
    import signal

    from megatron_simpo.cli import launch

    for name in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PET_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    run_dir, launcher = _long_run_after_its_first_step(demo_assets, tmp_path, save_interval=1)
    launcher.send_signal(signal.SIGTERM)
    out, err = _finish(launcher, 300)
    assert launcher.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    stopped = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < 2000 and f"> stopped at iteration {stopped}: a stop signal" in out
    assert f"> saved checkpoint {run_dir / f'iter_{stopped:07d}'}" in out
    # torchrun's 30 s deadline is lifted unless the user sets one
    from torch.distributed.run import parse_args

    args = parse_args(["--nproc-per-node", "2", "-m", launch.TRAIN_MODULE])
    launch.wait_for_stopping_ranks(args)
    assert args.shutdown_timeout == launch.STOPPING_RANKS_WAIT


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler (Python installs none of its own)."""
    import signal

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


SLOW_RANK_START = "import os, time\nif os.environ.get('LOCAL_RANK') == '1':\n    time.sleep(60)\n"
"""sitecustomize.py for a run whose rank 1 takes a minute to start Python (a slow node)."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("case", ["sigterm", "ctrl_c", "one_rank_not_started",
                                  "to_one_rank_only"])
def test_a_signal_before_training_began_stops_at_once_with_one_line(demo_assets, tmp_path, case):
    """A stop signal while the ranks still start (importing, tokenizing, loading): nothing to
    save, so they stop at once; one line, exit code 0, none of the agent's log lines. SIGTERM
    to the launcher (scancel; the agent passes it on), Ctrl-C to the whole process group, a
    rank not yet in Python (its signal's default ends it: the launcher says it), or SIGTERM to
    one rank alone (the agent then ends the other at once: no hang, no traceback)."""
    import signal
    import time

    run_dir = _demo_folder(tmp_path, demo_assets, "run")
    env = {"SAVE": str(run_dir)}
    if case == "one_rank_not_started":
        (tmp_path / "slow").mkdir()
        (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_RANK_START)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "slow"), *sys.path])
    launcher = _launch(env, "--train-iters", 2000, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert launcher.poll() is None and time.monotonic() < deadline
        ranks = {rank: p.pid for rank, p in _training_ranks(launcher.pid).items()}
        started = [0] if case == "one_rank_not_started" else [0, 1]
        with contextlib.suppress(OSError, KeyError):
            if len(ranks) == 2 and all(_catches_sigterm(ranks[rank]) for rank in started):
                break
        time.sleep(0.02)
    if case == "ctrl_c":
        os.killpg(launcher.pid, signal.SIGINT)
    elif case == "to_one_rank_only":
        os.kill(ranks[1], signal.SIGTERM)
    else:
        launcher.send_signal(signal.SIGTERM)
    out, err = _finish(launcher, 120)
    name = "SIGINT" if case == "ctrl_c" else "SIGTERM"
    assert launcher.returncode == 0, err[-3000:]
    line = (f"> stopped by {name} before training began: nothing to save; the same command "
            "starts again")
    assert out.splitlines()[-1:] == [line] and out.count("> stopped") == 1, out[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()
    said = [f"> rank {rank}: received {name}; stopping (training has not begun)"
            for rank in started]
    assert sorted(_one_line(err)) == said, err[-3000:]


def test_a_failed_stop_save_is_its_one_line_and_code(demo_assets, tmp_path):
    """A signal to the launcher whose stop-save fails (here: the folder it writes into cannot
    be made; a full disk in practice): the ranks' one line and exit code 2, not "stopped before
    they had saved"."""
    import signal

    run_dir, launcher = _long_run_after_its_first_step(demo_assets, tmp_path)
    for iteration in range(1, 2001):  # a file where each iteration's save folder would go
        (run_dir / f"iter_{iteration:07d}.partial").write_text("")
    launcher.send_signal(signal.SIGTERM)
    _, err = _finish(launcher, 300)
    assert launcher.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "before they had saved" not in err, err[-3000:]
    lines = [line for line in _one_line(err) if line.startswith("train_simpo")]
    assert len(lines) == 1 and lines[0].startswith(
        "train_simpo: error: cannot save iteration "), err[-3000:]
    assert f" to {run_dir}: File exists" in lines[0], lines


@pytest.mark.parametrize("argv", [["--help"], ["--nproc-per-node", "2", "-h", "--", "--lr", "1"]])
def test_launcher_help_is_its_own_and_torchruns(argv, capsys):
    from megatron_simpo.cli.launch import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert out.startswith("usage: python -m megatron_simpo.cli.launch [torchrun options] -- "
                          "<training flags>\n")
    assert "\ntorchrun options:\n" in out and "--nproc-per-node" in out
    assert "training_script" not in out  # the script is the launcher's own


def test_launcher_help_after_the_separator_is_trainings(capsys):
    from megatron_simpo.cli.launch import main

    with pytest.raises(SystemExit) as info:
        main(["--nproc-per-node", "2", "--", "--help"])
    assert info.value.code == 0 and "--simpo-gamma" in capsys.readouterr().out


def test_launcher_reports_a_bad_flag_once(tmp_path):
    from megatron_simpo.model.tiny import write_default

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


def test_launcher_rendezvouses_on_a_free_port_beside_a_job_on_29500(demo_run):
    # demo_run launched without MASTER_PORT while port 29500 was held (torchrun's default: an
    # EADDRINUSE traceback before).
    out, completed = demo_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "EADDRINUSE" not in completed.stderr
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "400"


def _tiny_flags(assets: Path) -> list[str]:
    return ["--model-config", str(assets / "config.json"), "--tokenizer", str(assets / "tokenizer"),
            "--valid-data-path", str(assets / "valid.jsonl"), "--seq-length", "64",
            "--max-prompt-length", "48", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "1"]


def _bad_row_file(demo_assets: Path, tmp_path: Path) -> Path:
    """The demo's training pairs with row 5 cut short: found only when the ranks read it."""
    lines = (demo_assets / "train.jsonl").read_text().splitlines()
    lines[4] = '{"prompt": "x", "chosen": '
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_process_run_beside_a_job_on_29500_reports_a_bad_row_in_one_line(demo_assets,
                                                                            tmp_path):
    # megatron-simpo-train as one plain process (no torchrun, no MASTER_PORT): its process
    # group starts on a free port, then the data's bad row ends it in one line, exit code 2.
    bad = _bad_row_file(demo_assets, tmp_path)
    env = dict(os.environ, PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning",
               OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    with _port_held(TORCH_PORT):
        completed = subprocess.run(
            [sys.executable, "-m", "megatron_simpo.cli.train", *_tiny_flags(demo_assets),
             "--train-data-path", str(bad), "--save", str(tmp_path / "run")],
            env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert _one_line(completed.stderr) == [f"train_simpo: error: {bad}:5: not valid JSON "
                                           "(Expecting value)"], completed.stderr[-3000:]


def test_launcher_reports_an_error_found_by_the_ranks_in_one_line(demo_assets, tmp_path):
    # The ranks find the bad row (the launcher checks only that the file can be read): rank 0's
    # line, exit code 2, and neither torchrun's failure report nor its agent's log lines.
    bad = _bad_row_file(demo_assets, tmp_path)
    launcher = _launch({"SAVE": str(_demo_folder(tmp_path, demo_assets, "run"))},
                       "--train-data-path", bad, "--train-iters", 2)
    _, err = _finish(launcher, 300)
    assert launcher.returncode == 2, err[-3000:]
    assert _one_line(err) == [f"train_simpo: error: {bad}:5: not valid JSON (Expecting value)"]


@pytest.mark.parametrize("case", ["save_cannot_be_written", "load_is_no_checkpoint",
                                  "batch_does_not_fit_the_world"])
def test_launcher_checks_before_the_ranks_start(case, tmp_path):
    # Mistakes the ranks used to find (one line, then torchrun's report and exit code 1): the
    # launcher's one process finds them first.
    from megatron_simpo.model.tiny import write_default

    save = tmp_path / "demo"
    write_default(save / "assets", train_pairs=64, valid_pairs=16, seed=11)
    args, expected = [], ""
    if case == "save_cannot_be_written":  # (root writes anywhere: a file on the path)
        (tmp_path / "a-file").write_text("")
        target = tmp_path / "a-file" / "run"
        args, expected = ["--save", target], f"--save {target} cannot be written (Not a directory"
    elif case == "load_is_no_checkpoint":
        (tmp_path / "empty").mkdir()
        args, expected = ["--load", tmp_path / "empty"], f"--load {tmp_path / 'empty'}: no checkpoint"
    else:
        args = ["--global-batch-size", 33]  # the launcher's world: 2 ranks of micro-batch 16
        expected = ("--global-batch-size (33) must be divisible by --micro-batch-size (16) x "
                    "data-parallel size (2)")
    launcher = _launch({"SAVE": str(save)}, *args)
    _, err = _finish(launcher, 300)
    assert launcher.returncode == 2, err[-3000:]
    lines = _one_line(err)
    assert len(lines) == 1 and lines[0].startswith(f"train_simpo: error: {expected}"), lines


def test_a_taken_master_port_is_one_line(demo_assets, tmp_path):
    # MASTER_PORT given and taken: the launcher (before any rank) and a one-process run (at
    # its rendezvous) say so in one line, exit code 2, not a 27-line EADDRINUSE traceback.
    # The port is one this test holds (torch's default may be another job's, and free again
    # before the runs look at it).
    with _port_held(0) as port, _beside(_launch({  # the two side by side
            "SAVE": str(_demo_folder(tmp_path, demo_assets, "run")),
            "MASTER_PORT": str(port)})) as launcher:
        expected = [f"train_simpo: error: MASTER_PORT {port} is in use on this machine "
                    "(another job?): leave MASTER_PORT unset on a single node (a free port is "
                    "then used), or choose another"]
        env = dict(os.environ, MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning")
        one_process = subprocess.run(
            [sys.executable, "-m", "megatron_simpo.cli.train", *_tiny_flags(demo_assets),
             "--train-data-path", str(demo_assets / "train.jsonl")],
            env=env, capture_output=True, text=True, timeout=300)
        _, err = _finish(launcher, 300)
    assert launcher.returncode == 2 and _one_line(err) == expected, err[-3000:]
    assert one_process.returncode == 2, one_process.stderr[-3000:]
    assert _one_line(one_process.stderr) == expected


_RANK_SCRIPT = """import os, sys, time
from megatron_simpo.cli.flags import run_command
rank, ending = int(os.environ["RANK"]), sys.argv[1]
if ending == "crash":
    raise RuntimeError("a bug")

def mistake():
    raise ValueError(f"bad thing seen by rank {rank}")

if ending == "rank1":  # a mistake only rank 1 sees; rank 0 goes on until the agent stops it
    if rank == 0:
        time.sleep(60)
    run_command("prog", mistake)
if ending == "peer":  # rank 1's mistake; rank 0's collective fails at once for its lost peer
    if rank == 1:
        try:
            run_command("prog", mistake)
        finally:
            time.sleep(1)  # the peer that lost it ends first
    folder = os.environ["MEGATRON_SIMPO_LAUNCHER_ERRORS"]
    while not os.path.exists(os.path.join(folder, "rank1.txt")):
        time.sleep(0.01)

    def collective():
        raise RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:1234")

    run_command("prog", collective)
# A mistake both ranks see (2, 3): rank 1 says it first and ends once rank 0 has said it too
# (unsynchronised, the agent could end a slower rank 0 before it said anything).
folder = os.environ["MEGATRON_SIMPO_LAUNCHER_ERRORS"]
said = lambda other: os.path.exists(os.path.join(folder, f"rank{other}.txt"))
if rank == 1:
    try:
        run_command("prog", mistake, errors={ValueError: int(ending)})
    finally:
        while not said(0):
            time.sleep(0.01)
while not said(1):
    time.sleep(0.01)
run_command("prog", mistake, errors={ValueError: int(ending)})
"""


@pytest.mark.parametrize("ending", ["2", "3", "rank1", "peer", "crash"])
def test_launcher_passes_on_a_rank_verdict_and_reports_a_crash(ending, tmp_path):
    # The launcher's agent on two ranks of a small script ending through run_command: a
    # verdict (2, 3) is one line (rank 0's; rank 1's when only rank 1 saw the mistake, also
    # when rank 0 ended first, its collective failing for the lost peer: no collateral
    # traceback) and the ranks' exit code; a crash keeps torchrun's report (and the agent's
    # log lines), exit 1.
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    code = ("import sys; from torch.distributed.run import parse_args; "
            "from megatron_simpo.cli.launch import start_ranks; "
            f"sys.exit(start_ranks(parse_args(['--nproc-per-node', '2', '--standalone', "
            f"{str(script)!r}, {ending!r}])))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if ending == "crash":
        assert completed.returncode == 1
        assert "RuntimeError: a bug" in completed.stderr and "Root Cause" in completed.stderr
        assert "exitcode" in completed.stderr  # the agent's held log line, or the report's
        return
    assert completed.returncode == (2 if ending in ("rank1", "peer") else int(ending)), \
        completed.stderr
    seen_by = 1 if ending in ("rank1", "peer") else 0
    assert _one_line(completed.stderr) == [f"prog: error: bad thing seen by rank {seen_by}"]


def test_moe_launcher_defaults_give_way_to_flags_of_the_same_meaning():
    """examples/train_simpo_moe.sh (PYTHON=echo prints the command it would run): the user's
    --train-iters replaces the default --train-epochs, --lr the default --lr, and the layout
    of the preset stays."""
    env = dict(os.environ, MODEL="mixtral-8x7b", CHECKPOINT="/ckpt", DATA="/data.jsonl",
               PYTHON="echo")
    completed = subprocess.run(["bash", str(ROOT / "examples" / "train_simpo_moe.sh"),
                                "--train-iters", "5", "--lr", "1e-6", "--valid-data-path",
                                "/v.jsonl"], env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    argv = completed.stdout.split()
    train = argv[argv.index("--") + 1:]
    assert "--train-epochs" not in train and "--valid-fraction" not in train
    assert train.count("--lr") == 1 and train[train.index("--lr") + 1] == "1e-6"
    assert train[-6:] == ["--train-iters", "5", "--lr", "1e-6", "--valid-data-path", "/v.jsonl"]
    layout = train[train.index("--tensor-model-parallel-size"):][:8]
    assert layout == ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4",
                      "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]


def test_llama3_launcher_defaults_give_way_to_flags_of_the_same_meaning():
    """examples/train_simpo_llama3.sh (PYTHON=echo): a token budget replaces the default
    micro-batch size, and an --algorithm the default recipe (a RECIPE you set stays, and the
    contradiction is then yours to hear about)."""
    def train_flags(extra_env, *args):
        env = dict(os.environ, CHECKPOINT="/ckpt", DATA="/data.jsonl", PYTHON="echo",
                   **extra_env)
        env.pop("RECIPE", None)
        env.update(extra_env)
        completed = subprocess.run(["bash", str(ROOT / "examples" / "train_simpo_llama3.sh"),
                                    *args], env=env, capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0, completed.stderr
        argv = completed.stdout.split()
        return argv[argv.index("--") + 1:]

    tiny = train_flags({"MODEL": "tiny", "SAVE": "/nowhere"}, "--pack-sequences",
                       "--max-tokens-per-microbatch", "512")
    assert "--micro-batch-size" not in tiny and tiny[-2:] == ["--max-tokens-per-microbatch", "512"]
    dpo = train_flags({}, "--algorithm", "dpo")
    assert "--recipe" not in dpo and dpo[-2:] == ["--algorithm", "dpo"]
    ipo = train_flags({}, "--algorithm=ipo")
    assert "--recipe" not in ipo and ipo[-1:] == ["--algorithm=ipo"]
    simpo = train_flags({}, "--algorithm", "simpo")  # the recipe's own: the recipe stays
    assert simpo[simpo.index("--recipe") + 1] == "llama3-8b-instruct-simpo"
    chosen = train_flags({"RECIPE": "gemma2-9b-it-simpo"}, "--algorithm", "dpo")
    assert chosen[chosen.index("--recipe") + 1] == "gemma2-9b-it-simpo"
    # The same command resumes (--load SAVE, Megatron-LM's convention); --overwrite starts
    # afresh; a --load of one's own replaces SAVE's.
    for model in ({}, {"MODEL": "tiny"}):
        same = train_flags({"SAVE": "/ckpt/run", **model})
        assert same[same.index("--load") + 1] == same[same.index("--save") + 1] == "/ckpt/run"
        assert "--load" not in train_flags({"SAVE": "/ckpt/run", **model}, "--overwrite")
        other = train_flags({"SAVE": "/ckpt/run", **model}, "--load", "/ckpt/old")
        assert other.count("--load") == 1 and other[-2:] == ["--load", "/ckpt/old"]
        elsewhere = train_flags({"SAVE": "/ckpt/run", **model}, "--save=/ckpt/new")
        assert elsewhere[elsewhere.index("--load") + 1] == "/ckpt/new"
        assert "--save" not in elsewhere and elsewhere[-1] == "--save=/ckpt/new"



def test_a_ranks_line_reaches_the_launcher_whole_and_a_restart_clears_it(tmp_path, monkeypatch):
    """A rank under the launcher leaves its exit code and line (flags.run_command); the launcher
    reads them (rank 0's first); a rank started in its place (an elastic restart) removes what
    the earlier one left."""
    from megatron_simpo.cli import flags, launch

    def mistake():
        raise ValueError(f"bad {os.environ['RANK']}")

    monkeypatch.setenv(flags.LAUNCHER_ERRORS, str(tmp_path))
    for rank, code in (("1", 3), ("0", 2)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(SystemExit) as ended:
            flags.run_command("train_simpo", mistake, errors={ValueError: code})
        assert ended.value.code == code
    assert launch._rank_verdict(str(tmp_path), None) == (2, "train_simpo: error: bad 0")
    flags.note_finished()  # (rank 0, which then ended well after a restart)
    assert sorted(os.listdir(tmp_path)) == ["local0.done", "rank0.txt", "rank1.txt"]
    flags.note_started()  # rank 0 starts again
    assert sorted(os.listdir(tmp_path)) == ["rank1.txt"]
    assert launch._rank_verdict(str(tmp_path), None) == (3, "train_simpo: error: bad 1")


def test_the_failure_that_decides_is_a_ranks_line_then_its_own_stop():
    """torchrun's first failure is the earliest to the second, the lowest rank on a tie: often
    a rank that only lost its peer (exit code 1). A rank that said why (2, 3) decides, else one
    that stopped itself on a signal before training (128 + N; -N may be the agent's doing)."""
    from types import SimpleNamespace

    from megatron_simpo.cli.launch import _deciding_failure

    def failed(**codes):
        failures = {int(rank[1:]): SimpleNamespace(exitcode=code) for rank, code in codes.items()}
        return SimpleNamespace(failures=failures,
                               get_first_failure=lambda: min(failures.items()))

    assert _deciding_failure(None) == (None, None)
    assert _deciding_failure(failed(r0=1, r1=2))[0] == 1
    assert _deciding_failure(failed(r0=1, r1=143, r2=3))[0] == 2
    assert _deciding_failure(failed(r0=1, r1=143))[0] == 1
    assert _deciding_failure(failed(r0=1, r1=-15))[0] == 0  # killed: torchrun's first
