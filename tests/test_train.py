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
            "--use-distributed-optimizer", "--seed", "3"]
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
                                    dict(pipeline_model_parallel_size=2)])
def test_resume_is_bitwise_identical(tiny, tmp_path, layout):
    straight, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=8, save=tmp_path / "a", **layout))[0]
    first, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=8, save=tmp_path / "b",
                                             save_interval=4, **layout)
                            )[0]
    assert first == straight  # same run, saving along the way changes nothing
    # Resume from iteration 4 of run "b" (remove the final checkpoint so the tracker says 4).
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").write_text("4\n")
    resumed, _ = run_on_ranks(2, _train, _argv(tiny, train_iters=8, load=tmp_path / "b",
                                               save=tmp_path / "c", **layout))[0]
    assert len(straight) == 8 and len(resumed) == 4
    assert resumed == straight[4:], f"{resumed} != {straight[4:]}"
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "loss" in m] == list(range(1, 9))
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
    run_on_ranks(1, _train, _argv(tiny, train_iters=2, save=tmp_path / "a"))
    losses, evals = run_on_ranks(2, _train, _argv(tiny, train_iters=2, save=tmp_path / "b",
                                                  pretrained_checkpoint=tmp_path / "a",
                                                  tensor_model_parallel_size=2))[0]
    # A new run: iteration counting restarts and the eval at step 0 is the trained model's.
    assert len(losses) == 2 and evals[0][0] == 0
    assert (tmp_path / "b" / "iter_0000002").is_dir()
