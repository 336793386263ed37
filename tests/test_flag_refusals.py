"""Flags that would have no effect, or numbers that would only end the run later, are refused
up front: one line naming the flag, exit code 2."""

import json

import pytest

from megatron_simpo.cli.arguments import parse_args


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "valid.jsonl").write_text("")
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _base(paths):
    return ["--train-data-path", str(paths / "train.jsonl"), "--model-config",
            str(paths / "config.json"), "--tokenizer", str(paths), "--train-iters", "5"]


@pytest.mark.parametrize("argv, message", [
    (["--simpo-gamma", "nan"], "--simpo-gamma must be a finite number, got nan"),
    (["--simpo-gamma-beta-ratio", "inf"], "--simpo-gamma-beta-ratio must be a finite number"),
    (["--beta", "inf"], "--beta must be a finite number, got inf"),
    (["--sft-weight", "nan"], "--sft-weight must be a finite number, got nan"),
    (["--algorithm", "orpo", "--orpo-lambda", "nan"], "--orpo-lambda must be a finite number"),
    (["--algorithm", "slic", "--slic-delta", "inf"], "--slic-delta must be a finite number"),
    (["--moe-aux-loss-coeff", "inf"], "--moe-aux-loss-coeff must be a finite number >= 0"),
    (["--moe-expert-capacity-factor", "inf"], "--moe-expert-capacity-factor must be a finite"),
    (["--valid-data-path", "VALID", "--valid-fraction", "0.1"],
     "give --valid-data-path or --valid-fraction, not both"),
    (["--valid-split", "test_prefs"], "--valid-split test_prefs applies to --valid-data-path"),
    (["--train-split", "train_prefs"], "--train-split train_prefs applies to a Hub dataset or a "
                                       "DatasetDict folder, not the file --train-data-path"),
    (["--valid-data-path", "VALID", "--valid-split", "x"], "--valid-split x applies to a Hub"),
    (["--dataset-config", "default"], "--dataset-config default applies to a Hub dataset"),
    (["--eval-interval", "10"], "--eval-interval needs validation pairs"),
    (["--eval-dump", "--save", "S"], "--eval-dump needs validation pairs"),
    (["--override-data"], "--override-data needs --load"),
    (["--overwrite"], "--overwrite needs --save"),
    (["--exit-interval", "3"], "--exit-interval needs --save"),
    (["--exit-duration-in-mins", "30"], "--exit-duration-in-mins needs --save"),
])
def test_a_flag_without_effect_or_a_non_finite_number_is_one_line(paths, argv, message, capsys):
    argv = [str(paths / "valid.jsonl") if a == "VALID" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        parse_args(_base(paths) + argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("train_simpo: error: ") and message in line


def test_the_same_flags_where_they_apply_are_taken(paths):
    config = parse_args(_base(paths) + ["--valid-fraction", "0.1", "--eval-interval", "2",
                                        "--save", "S", "--load", "S", "--override-data",
                                        "--overwrite", "--exit-interval", "3",
                                        "--exit-duration-in-mins", "30"])
    assert config.data.valid_fraction == 0.1 and config.override_data and config.overwrite


@pytest.mark.parametrize("content, message", [
    ([1, 2], "not a Hugging Face config (a JSON object), but a JSON list"),
    ({"architectures": ["LlamaForCausalLM"]}, "missing setting 'num_attention_heads'"),
])
def test_a_model_config_that_is_no_config_is_one_line(tmp_path, content, message):
    from megatron_simpo.model.architecture import ModelConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as error:
        ModelConfig.from_hf_config(path)
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize("size", ["abc", "-5GB", "0", "infGB", "nanMB"])
def test_a_bad_max_shard_size_is_refused_before_the_export(size):
    from megatron_simpo.convert.conversion import ExportConfig

    with pytest.raises(ValueError, match="--max-shard-size must be a positive size"):
        ExportConfig(load="l", save="s", max_shard_size=size)


def test_a_converter_save_that_is_a_file_is_one_line(tmp_path):
    from megatron_simpo.convert.conversion import _refuse_non_empty

    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        _refuse_non_empty(tmp_path / "f", force=True)


def _checkpoint(root, config_json):
    """A save folder whose iteration 2 holds the model config ``config_json`` (enough for the
    model-source checks: no weights are read)."""
    from megatron_simpo.model.architecture import ModelConfig

    folder = root / "iter_0000002"
    folder.mkdir(parents=True)
    ModelConfig.from_hf_config(config_json).save(folder / "model_config.json")
    (folder / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return folder


def test_a_resume_with_another_models_config_is_refused(tmp_path):
    from megatron_simpo.model.tiny import write_default
    from megatron_simpo.training.run_setup import resolve_model_source

    tiny = write_default(tmp_path / "tiny", train_pairs=8, valid_pairs=0, seed=1)
    folder = _checkpoint(tmp_path / "run", tiny["config"])
    other = json.loads(tiny["config"].read_text())
    other["num_hidden_layers"] = 4
    (tmp_path / "other.json").write_text(json.dumps(other))
    argv = ["--train-data-path", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]),
            "--train-iters", "4", "--seq-length", "64", "--max-prompt-length", "48",
            "--load", str(tmp_path / "run")]
    same = resolve_model_source(parse_args(argv + ["--model-config", str(tiny["config"])]))
    assert same.resume_from == folder and same.config.num_layers == 2
    with pytest.raises(ValueError) as error:
        resolve_model_source(parse_args(argv + ["--model-config", str(tmp_path / "other.json")]))
    assert str(error.value) == (
        f"--load {folder} holds another model than --model-config {tmp_path / 'other.json'} "
        "(num_layers 2 -> 4): resume with the --model-config the run started from, or leave "
        "it out")


@pytest.mark.parametrize("flag", ["--bf16", "--use-distributed-optimizer"])
def test_a_resume_that_changes_the_optimizer_states_layout_is_refused(paths, tmp_path, flag):
    from megatron_simpo.checkpoint.layout import TrainState
    from megatron_simpo.training.resume import (ResumeError, check_resume,
                                                command_line_schedule, settings_record)

    config = parse_args(_base(paths) + ["--load", str(tmp_path)])
    saved = TrainState(2, 256, None, settings_record(config, 5, command_line_schedule(config, 5)))
    assert check_resume(config, saved, tmp_path, 5) == []
    with pytest.raises(ResumeError) as error:
        check_resume(parse_args(_base(paths) + ["--load", str(tmp_path), flag]), saved, tmp_path, 5)
    assert str(error.value) == (
        f"--load {tmp_path} contradicts the command line: {flag} off -> on (the checkpoint's "
        "optimizer state is laid out for the first: resume with it, or start a new run from "
        f"--pretrained-checkpoint {tmp_path})")


def test_expert_parallelism_under_a_token_budget_needs_a_global_batch_the_ranks_share(paths):
    """EP > 1 with --max-tokens-per-microbatch: every DP rank must run as many micro-batches
    (their expert all-to-all), which a global batch not divisible by the DP size cannot give."""
    flags = ["--expert-model-parallel-size", "2", "--max-tokens-per-microbatch", "512",
             "--global-batch-size"]
    with pytest.raises(ValueError) as error:
        parse_args(_base(paths) + flags + ["7"]).check_world(2)
    assert str(error.value) == (
        "--global-batch-size (7) must be a multiple of the data-parallel size (2) with "
        "--expert-model-parallel-size (2) under a token budget: each micro-batch's expert "
        "all-to-all spans the data-parallel ranks, so every rank runs as many micro-batches")
    assert parse_args(_base(paths) + flags + ["8"]).check_world(2) is None
    assert parse_args(_base(paths) + flags[2:] + ["7"]).check_world(2) is None  # no EP
