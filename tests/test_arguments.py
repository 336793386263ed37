"""The command line is generated from the config dataclasses: one default for every option."""

import dataclasses

import pytest

from megatron_simpo.arguments import SECTIONS, build_parser, parse_args
from megatron_simpo.config import TrainConfig
from megatron_simpo.data import DataConfig
from megatron_simpo.flags import Section, check_coverage, field_docs
from megatron_simpo.losses import LossConfig
from megatron_simpo.optimizer import OptimizerSettings
from megatron_simpo.parallel import ParallelConfig


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
            if default not in (None, False, dataclasses.MISSING):
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
                              "--save", "/tmp/s"])
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
