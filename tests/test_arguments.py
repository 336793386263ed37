"""The command line is generated from the config dataclasses: one default for every option."""

import dataclasses

import pytest

from megatron_simpo.cli.arguments import SECTIONS, build_parser, parse_args
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.data.config import DataConfig
from megatron_simpo.cli.flags import Section, check_coverage, field_docs
from megatron_simpo.training.losses import LossConfig
from megatron_simpo.training.optimizer import OptimizerSettings
from megatron_simpo.distributed.parallel import ParallelConfig


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_minimal_command_line_equals_the_dataclass_defaults(paths):
    config = parse_args(["--train-data-path", str(paths / "train.jsonl"), "--model-config",
                         str(paths / "config.json"), "--tokenizer", str(paths), "--train-iters", "5"])
    expected = TrainConfig(data=DataConfig(train_data_path=str(paths / "train.jsonl"),
                                           tokenizer_path=str(paths)),
                           model_config_path=str(paths / "config.json"), train_iters=5)
    assert config == expected
    assert config.loss == LossConfig() and config.optimizer == OptimizerSettings()
    assert config.parallel == ParallelConfig() and config.fp8 is None


def test_megatron_lms_exit_signal_handler_is_taken_and_says_what_runs_do(paths):
    # Megatron-LM's launch scripts pass it; the behaviour it asks for is every run's here.
    argv = ["--train-data-path", str(paths / "train.jsonl"), "--model-config",
            str(paths / "config.json"), "--tokenizer", str(paths), "--train-iters", "5"]
    assert parse_args([*argv, "--exit-signal-handler"]) == parse_args(argv)
    help_text = " ".join(build_parser().format_help().split())
    assert ("--exit-signal-handler Megatron-LM's switch for what every run here does: SIGTERM or "
            "SIGINT saves a checkpoint at the next step boundary and stops") in help_text


def test_help_lists_the_supported_architectures():
    from megatron_simpo.model.architecture import SUPPORTED_ARCHITECTURES

    text = " ".join(build_parser().format_help().split())
    assert "Gemma3ForCausalLM" in SUPPORTED_ARCHITECTURES
    assert f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}" in text
    assert "Gemma3ForConditionalGeneration" in text


def test_simpo_margin_default_lives_in_the_loss_config():
    assert LossConfig().margin == pytest.approx(2.5 * 0.55)  # the authors' Llama-3-8B recipe
    assert LossConfig(beta=2.0).margin == pytest.approx(1.1)
    assert LossConfig(gamma=0.0).margin == 0.0  # --simpo-gamma 0 turns it off
    assert LossConfig(algorithm="dpo", beta=0.1).margin == 0.0


def test_every_flag_shows_its_dataclass_default_and_docstring():
    parser = build_parser()
    actions = {action.dest: action for action in parser._actions}
    for section in SECTIONS:
        fields = {f.name: f for f in dataclasses.fields(section.cls)}
        docs = field_docs(section.cls)
        for name in section.fields:
            action = actions[section.dest(name)]
            assert action.option_strings[0] == section.flag(name)
            assert docs[name] and action.help.startswith(docs[name]), (section.cls, name)
            default = fields[name].default
            if default is True and action.option_strings[0].startswith("--no-"):
                # the help speaks of the field: the flag's effect is said, not "True"
                assert action.help.endswith("(default: on; this flag turns it off)"), name
            elif default not in (None, False, dataclasses.MISSING):
                assert action.help.endswith(f"(default: {default})"), (name, action.help)
    help_text = parser.format_help()
    for flag in ("--tensor-model-parallel-size", "--micro-batch-size", "--global-batch-size",
                 "--load", "--save", "--bf16", "--fp8-format", "--simpo-beta", "--lr"):
        assert flag in help_text


def test_a_field_without_a_flag_is_refused():
    partial = Section("loss", LossConfig, key="loss", fields=("algorithm", "beta"))
    with pytest.raises(TypeError, match="LossConfig: flags"):
        check_coverage([partial], skip={})


def test_flags_given_only_are_passed_on(paths):
    base = ["--train-data-path", str(paths / "train.jsonl"), "--model-config",
            str(paths / "config.json"), "--tokenizer", str(paths), "--train-iters", "5"]
    config = parse_args(base + ["--beta", "2", "--simpo-gamma", "0.5", "--no-length-normalization",
                                "--fp8-format", "hybrid", "--transformer-impl",
                                "transformer_engine", "--bf16", "--use-distributed-optimizer"])
    assert (config.loss.beta, config.loss.margin, config.loss.normalize_length) == (2.0, 0.5, False)
    assert config.fp8.format == "hybrid" and config.fp8.recipe == "delayed"
    assert config.optimizer.use_distributed_optimizer and config.bf16
    assert parse_args(base).data.apply_chat_template is True
    data = parse_args(base + ["--no-apply-chat-template", "--data-cache-path", "/tmp/c",
                              "--dataset-num-proc", "3", "--override-data", "--eval-dump",
                              "--save", "/tmp/s", "--load", "/tmp/s", "--valid-fraction", "0.1"])
    assert data.data.apply_chat_template is False and data.data.data_cache_dir == "/tmp/c"
    assert data.data.dataset_num_proc == 3 and data.override_data and data.eval_dump


@pytest.mark.parametrize("rank, expected_lines", [("0", 1), ("1", 0)])
def test_a_bad_flag_is_one_line_from_rank_zero(capsys, monkeypatch, rank, expected_lines):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--train-data-path", "x.jsonl", "--lr-decay-style", "exponential"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == expected_lines
    if expected_lines:
        assert err.startswith("train_simpo: error: argument --lr-decay-style: invalid choice")


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens-per-microbatch", "4096", "--micro-batch-size", "2"],
     "give --micro-batch-size or --max-tokens-per-microbatch, not both"),
    (["--pack-sequences"], "--pack-sequences needs --max-tokens-per-microbatch"),
    (["--batch-layout", "global-max", "--max-tokens-per-microbatch", "4096"],
     "goes with --batch-layout sorted"),
    (["--pack-sequences", "--max-tokens-per-microbatch", "4100", "--sequence-parallel",
      "--tensor-model-parallel-size", "8"], "must be a multiple of 8 with --pack-sequences"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
])
def test_batching_flags_refuse_contradictions(paths, flags, message, capsys):
    base = ["--train-data-path", str(paths / "train.jsonl"), "--model-config",
            str(paths / "config.json"), "--tokenizer", str(paths), "--train-iters", "5"]
    with pytest.raises(SystemExit):
        parse_args(base + flags)
    assert message in capsys.readouterr().err


def test_token_budget_leaves_the_micro_batch_size_to_the_plan(paths):
    config = parse_args(["--train-data-path", str(paths / "train.jsonl"), "--model-config",
                         str(paths / "config.json"), "--tokenizer", str(paths), "--train-iters",
                         "5", "--max-tokens-per-microbatch", "4096", "--pack-sequences"])
    assert config.micro_batch_size is None and config.batching.pack_sequences
    assert config.check_world(4) is None  # micro-batches per rank vary
    assert TrainConfig(data=config.data, model_config_path=config.model_config_path,
                       train_iters=5).micro_batch_size == 1


# ---- every other command: its flags from its config dataclass, one way to end ----------------

def _commands():
    from megatron_simpo.cli import analyze_run as analysis, generate_answers as generation
    from megatron_simpo.cli import build_pairs, convert as cli

    return {"convert_hf_to_megatron": cli.IMPORT, "convert_megatron_to_hf": cli.EXPORT,
            "generate_answers": generation.COMMAND, "analyze_run": analysis.COMMAND,
            "build_pairs": build_pairs.COMMAND}


# The flag names users know, unchanged (Megatron-LM's and the tools' own).
_FLAGS = {
    "convert_hf_to_megatron": ["--hf-path", "--save", "--tensor-parallel-size",
                               "--pipeline-parallel-size", "--dtype", "--force",
                               "--allow-non-finite"],
    "convert_megatron_to_hf": ["--load", "--save", "--iteration", "--dtype", "--max-shard-size",
                               "--force", "--allow-non-finite"],
    "generate_answers": ["--benchmark", "--questions", "--output", "--hf", "--load", "--hf-out",
                         "--model-id", "--backend", "--temperature", "--top-p",
                         "--max-new-tokens", "--seed", "--batch-size", "--tensor-parallel-size",
                         "--no-apply-chat-template", "--dtype"],
    "analyze_run": ["--output", "--reference"],
    "build_pairs": ["--prompts-path", "--output", "--hf", "--load", "--hf-out", "--prompt-column",
                    "--num-samples", "--seeds", "--temperature", "--top-p", "--max-new-tokens",
                    "--batch-size", "--backend", "--tensor-parallel-size", "--reward-model",
                    "--reward-fn", "--trust-remote-code", "--no-apply-chat-template"],
}


@pytest.mark.parametrize("prog", sorted(_FLAGS))
def test_every_command_shows_its_dataclass_defaults_and_docstrings(prog):
    command = _commands()[prog]
    assert command.prog == prog
    parser = command.parser()
    actions = {action.dest: action for action in parser._actions}
    for section in command.sections:
        fields = {f.name: f for f in dataclasses.fields(section.cls)}
        docs = field_docs(section.cls)
        for name in section.fields:
            action = actions[section.dest(name)]
            assert docs[name] and action.help.startswith(docs[name]), (section.cls, name)
            default = fields[name].default
            if default is True and action.option_strings[0].startswith("--no-"):
                # the help speaks of the field: the flag's effect is said, not "True"
                assert action.help.endswith("(default: on; this flag turns it off)"), name
            elif default not in (None, False, dataclasses.MISSING):
                assert action.help.endswith(f"(default: {default})"), (name, action.help)
    help_text = parser.format_help()
    for flag in _FLAGS[prog]:
        assert f"{flag} " in help_text or f"{flag}\n" in help_text, (prog, flag)


def test_one_default_for_each_converter_option():
    import inspect

    from megatron_simpo.convert.conversion import ExportConfig
    from megatron_simpo.convert.megatron_to_hf import export_rank0

    config = _commands()["convert_megatron_to_hf"].parse(["--load", "a", "--save", "b"])["config"]
    assert config == ExportConfig(load="a", save="b") and config.max_shard_size == "5GB"
    assert all(p.default is inspect.Parameter.empty
               for p in inspect.signature(export_rank0).parameters.values())


def test_analysis_takes_its_run_as_a_positional_argument():
    from megatron_simpo.evaluation.analysis import AnalysisConfig

    parsed = _commands()["analyze_run"].parse(["runs/a", "--reference", "r.jsonl"])
    assert parsed["config"] == AnalysisConfig(run="runs/a", reference="r.jsonl")


@pytest.mark.parametrize("argv, message", [
    ([], "give one of --hf and --load"),
    (["--hf", "h", "--load", "l"], "give one of --hf and --load"),
    (["--hf", "h", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--hf", "h", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--hf", "h", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--hf", "h", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--hf", "h", "--top-p", "5"], "--top-p must be in (0, 1], got 5.0"),
    (["--hf", "h", "--dtype", "foo"], "--dtype must be one of auto, bfloat16"),
    (["--hf", "h", "--hf-out", "o"], "--hf-out goes with --load"),
    (["--hf", "h", "--backend", "gpt"], "argument --backend: invalid choice"),
])
def test_answers_options_are_validated_naming_the_flag(argv, message, capsys):
    base = ["--benchmark", "arena_hard", "--questions", "q.jsonl", "--output", "o"]
    with pytest.raises(SystemExit) as info:
        _commands()["generate_answers"].parse(base + argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("generate_answers: error: ") and message in line


@pytest.mark.parametrize("argv, message", [
    (["--hf", "h"], "give one of --reward-model and --reward-fn"),
    (["--hf", "h", "--reward-fn", "m:f", "--reward-model", "r"],
     "give one of --reward-model and --reward-fn"),
    (["--reward-fn", "m:f"], "give one of --hf and --load"),
    (["--hf", "h", "--reward-fn", "m:f", "--trust-remote-code"],
     "--trust-remote-code goes with --reward-model"),
    (["--hf", "h", "--reward-fn", "m:f", "--reward-batch-size", "4"],
     "--reward-batch-size goes with --reward-model (--reward-fn is called on one text"),
    (["--hf", "h", "--reward-fn", "m:f", "--reward-dtype", "float32"],
     "--reward-dtype goes with --reward-model"),
    (["--hf", "h", "--reward-fn", "m:f", "--seeds", "1", "1"], "--seeds must differ, got 1 1"),
    (["--hf", "h", "--reward-fn", "m:f", "--num-samples", "6"],
     "--num-samples must be 2..5 (one per --seeds), got 6"),
    (["--hf", "h", "--reward-fn", "m:f", "--seeds", "4"], "a pair needs at least two samples"),
    (["--hf", "h", "--reward-fn", "m:f", "--seeds", "x"], "argument --seeds: invalid int value"),
    (["--hf", "h", "--reward-fn", "m:f", "--temperature", "nan"],
     "--temperature must be a finite number >= 0, got nan"),
    (["--hf", "h", "--reward-fn", "m:f", "--dtype", "foo"], "--dtype must be one of auto"),
    (["--hf", "h", "--reward-fn", "m:f", "--reward-stats", "."],
     "--reward-stats . is a folder: give the JSON file to write"),
])
def test_pairs_options_are_validated_naming_the_flag(argv, message, capsys):
    base = ["--prompts-path", "p.jsonl", "--output", "pairs.jsonl"]
    with pytest.raises(SystemExit) as info:
        _commands()["build_pairs"].parse(base + argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("build_pairs: error: ") and message in line


@pytest.mark.parametrize("command, base", [
    ("generate_answers", ["--benchmark", "arena_hard", "--questions", "q.jsonl", "--output", "o"]),
    ("build_pairs", ["--prompts-path", "p.jsonl", "--output", "pairs.jsonl", "--reward-fn", "m:f"]),
])
def test_hf_out_replaces_an_earlier_export_and_nothing_else(command, base, tmp_path, capsys):
    from megatron_simpo.convert.export_marker import EXPORT_MARKER

    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    argv = base + ["--load", "run", "--hf-out", str(folder)]
    with pytest.raises(SystemExit) as info:
        _commands()[command].parse(argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"{command}: error: --hf-out {folder} holds files that are not an export of "
                    f"this project (no {EXPORT_MARKER}); give a new or empty folder (an export "
                    "made before exports held that file: remove its files yourself) (see --help)")
    (folder / EXPORT_MARKER).write_text("{}")  # an earlier export (a resumed command's)
    assert _commands()[command].parse(argv)["config"].hf_out == str(folder)
    assert _commands()[command].parse(base + ["--load", "run", "--hf-out",
                                              str(tmp_path / "new")])["config"]


def test_list_flags_take_several_values():
    parsed = _commands()["build_pairs"].parse(["--prompts-path", "p", "--output", "o.parquet",
                                               "--hf", "h", "--reward-fn", "m:f",
                                               "--seeds", "3", "1", "2"])["config"]
    assert parsed.seeds == (3, 1, 2) and parsed.sample_seeds == (3, 1, 2)


@pytest.mark.parametrize("rank, expected_lines", [("0", 1), ("1", 0)])
def test_run_command_ends_in_one_line_from_rank_zero(capsys, monkeypatch, rank, expected_lines):
    from megatron_simpo.distributed import runtime
    from megatron_simpo.cli.flags import run_command

    shutdowns = []
    monkeypatch.setattr(runtime, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setenv("RANK", rank)

    def missing():
        raise KeyError("--save x: no such key")

    with pytest.raises(SystemExit) as exit_info:
        run_command("tool", missing, errors={KeyError: 3}, distributed=True)
    assert exit_info.value.code == 3 and shutdowns == [1]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == expected_lines
    if expected_lines:  # a KeyError's message, not its repr
        assert err == "tool: error: --save x: no such key\n"
    with pytest.raises(SystemExit) as exit_info:  # the default: a user's mistake, exit code 2
        run_command("tool", lambda: open("/nonexistent/file"))
    assert exit_info.value.code == 2 and shutdowns == [1]
    if expected_lines:
        assert capsys.readouterr().err.startswith("tool: error: [Errno 2]")
    with pytest.raises(ZeroDivisionError):  # anything else is a bug: its traceback
        run_command("tool", lambda: 1 / 0, distributed=True)
    assert run_command("tool", lambda: 7) == 7 and shutdowns == [1, 1]


def test_a_stop_signal_ends_a_command_in_one_line_after_its_clean_up(capsys, monkeypatch):
    import os
    import signal
    import sys
    import time

    from megatron_simpo.cli.flags import run_command

    monkeypatch.setenv("RANK", "0")
    cleaned = []

    def work(number):
        def call():
            try:
                os.kill(os.getpid(), number)
                # Short sleeps: a signal the kernel hands to another thread of this process
                # (pytest's may hold several) does not cut a long sleep of the main one short;
                # Python's handler runs in the main thread between two of them.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                cleaned.append(number)  # a temporary folder, an unfinished output
        return call

    with pytest.raises(SystemExit) as exit_info:
        run_command("tool", work(signal.SIGTERM))
    assert exit_info.value.code == 128 + signal.SIGTERM and cleaned == [signal.SIGTERM]
    assert capsys.readouterr().err == "tool: stopped by SIGTERM\n"
    # Ctrl-C: Python's own ending (the process dies by SIGINT, so a shell script running it
    # stops too), without its traceback; said once by nested commands.
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    with pytest.raises(KeyboardInterrupt):
        run_command("outer", lambda: run_command("tool", work(signal.SIGINT)))
    assert cleaned[-1] == signal.SIGINT
    assert capsys.readouterr().err == "tool: stopped by SIGINT\n"
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)  # the uncaught interrupt
    assert capsys.readouterr().err == ""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as before the command
    noted = []  # a command's own handling (training's) is left in place
    signal.signal(signal.SIGTERM, lambda *_: noted.append(True))
    try:
        assert run_command("tool", lambda: (os.kill(os.getpid(), signal.SIGTERM),
                                            time.sleep(0.1), "went on")[-1]) == "went on"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert noted == [True]


ORPHANED = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=dict(
    os.environ, TORCHELASTIC_RUN_ID="job"), stderr=open(sys.argv[2], "w"))
print(child.pid, flush=True)
child.wait()
"""
UNDER_TORCHRUN = """
import time
from megatron_simpo.cli.flags import run_command
run_command("tool", lambda: (print("running", flush=True), time.sleep(60)))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="prctl")
def test_a_command_under_torchrun_ends_when_its_agent_is_killed(tmp_path):
    """kill -9 of torchrun's agent (reference-logps, build-pairs under torchrun): the rank is
    signalled by the kernel and ends as on SIGTERM, not left computing for nobody."""
    import signal
    import subprocess
    import sys

    import psutil

    agent = subprocess.Popen([sys.executable, "-c", ORPHANED, UNDER_TORCHRUN,
                              str(tmp_path / "err")], stdout=subprocess.PIPE, text=True)
    rank = psutil.Process(int(agent.stdout.readline()))
    assert agent.stdout.readline().strip() == "running"  # (the rank writes to the same pipe)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    try:
        rank.wait(timeout=30)  # (not our child: its exit code is not ours to read)
    finally:
        if rank.is_running():
            rank.kill()
    assert (tmp_path / "err").read_text() == "tool: stopped by SIGTERM\n"


def test_an_abbreviated_flag_is_refused_not_completed(paths, capsys):
    """Flags are taken as spelled in full (Megatron-LM's allow_abbrev=False): --train-iter is
    not silently --train-iters (the launch scripts drop defaults by their full names)."""
    base = ["--train-data-path", str(paths / "train.jsonl"), "--model-config",
            str(paths / "config.json"), "--tokenizer", str(paths)]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base + ["--train-iter", "5"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "unrecognized arguments: --train-iter 5" in line
    assert parse_args(base + ["--train-iters", "5"]).train_iters == 5


@pytest.mark.parametrize("argv, given", [([], "none given"), (["hf2megatron"], "got 'hf2megatron'")])
def test_the_converter_without_its_direction_is_one_line(argv, given, capsys):
    from megatron_simpo.cli.convert import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "convert: error: the first argument is the direction, one of hf-to-megatron, "
        f"megatron-to-hf ({given})"]


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "--expert-model-parallel-size",
                                  "--expert-tensor-parallel-size"])
def test_converter_layout_sizes_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as info:
        _commands()["convert_hf_to_megatron"].parse(["--hf-path", "h", "--save", "s", flag, "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"convert_hf_to_megatron: error: {flag} must be a positive integer, got 0 (see --help)"]
