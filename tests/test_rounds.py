"""Rounds of on-policy SimPO (examples/iterative_simpo.sh) and the reward per round.

The tiny default's task reward against hand-worked answers; two rounds of the script on a
handful of prompts (one warm-up step, one GPU-less rank): the round folders, each round's
reward statistics against a computation from its pairs file and the reward function, round 2
sampled with round 1's checkpoint, and analyze-run's table of the rounds; a damaged statistics
file is one line.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_simpo.model.tiny import letters_correct

ROOT = Path(__file__).resolve().parents[1]
# A reward with (almost) no ties: letters right, and a hash of the response in the decimals.
REWARD = '''
import hashlib

def score(prompt, response):
    word = prompt.split()[-1][::-1]
    digest = int(hashlib.sha256(response.encode()).hexdigest()[:8], 16) / 2 ** 32
    return float(sum(a == b for a, b in zip(word, response))) + digest
'''


@pytest.mark.parametrize("response, expected", [
    ("hgfedcba", 1.0), ("hgfedcbx", 7 / 8), (" hgfedcba\n", 1.0), ("hgfe", 4 / 8),
    ("hgfedcbaaa", 8 / 10), ("abcdefgh", 0.0), ("", 0.0)])
def test_letters_correct_counts_letters_in_place(response, expected):
    assert letters_correct("reverse abcdefgh", response) == expected


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """Two rounds of the script with MODEL=tiny on 6 prompts a round (2 samples each)."""
    from megatron_simpo.model.tiny import write_default

    root = tmp_path_factory.mktemp("rounds") / "run"
    write_default(root / "assets", train_pairs=16, valid_pairs=4)
    (root.parent / "reward.py").write_text(REWARD)
    env = dict(os.environ, MODEL="tiny", ROOT=str(root), PYTHON=sys.executable,
               GPUS_PER_NODE="1", MICRO_BATCH_SIZE="2", GLOBAL_BATCH_SIZE="2", WARMUP_ITERS="1",
               PROMPTS_PER_ROUND="6", NUM_SAMPLES="2", MAX_NEW_TOKENS="6",
               SAMPLING_BATCH_SIZE="4", HELDOUT_PROMPTS="",
               REWARD_FN=f"{root.parent / 'reward.py'}:score")
    done = subprocess.run(["bash", str(ROOT / "examples/iterative_simpo.sh"), "--rounds", "2",
                           "--lr", "1e-2"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout


def test_rounds_have_their_folders_and_reward_statistics(rounds):
    root, _ = rounds
    exec_globals = {}
    exec(REWARD, exec_globals)
    score = exec_globals["score"]
    train = [json.loads(line) for line in (root / "assets/train.jsonl").read_text().splitlines()]
    for number in (1, 2):
        folder = root / f"round-{number}"
        assert sorted(p.name for p in folder.iterdir()) == [
            "checkpoint", "pairs.jsonl", "prompts.jsonl", "rewards.json", "sampler-hf"]
        assert (folder / "checkpoint/latest_checkpointed_iteration.txt").is_file()
        # Fresh prompts each round, from the far end of the training set.
        prompts = [json.loads(line)["prompt"] for line in
                   (folder / "prompts.jsonl").read_text().splitlines()]
        assert prompts == [r["prompt"] for r in train[16 - 6 * number:16 - 6 * (number - 1)]]
        rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        stats = json.loads((folder / "rewards.json").read_text())
        assert stats["prompts"] == 6 and stats["samples"] == 2
        assert stats["pairs"] == len(rows) == 6 - sum(stats["dropped"].values())
        for row in rows:  # every score is the reward function's on its (prompt, response)
            assert row["all_rm_scores"] == [score(row["prompt"], r)
                                            for r in row["all_generated_responses"]]
        assert stats["mean_chosen"] == pytest.approx(
            sum(max(r["all_rm_scores"]) for r in rows) / len(rows), abs=1e-12)
        assert stats["mean_rejected"] == pytest.approx(
            sum(min(r["all_rm_scores"]) for r in rows) / len(rows), abs=1e-12)
        if stats["pairs"] == 6:  # no prompt dropped: every sample is in the pairs file
            assert stats["mean_reward"] == pytest.approx(
                math.fsum(s for r in rows for s in r["all_rm_scores"]) / 12, abs=1e-12)
    assert (root / "round-0/checkpoint/latest_checkpointed_iteration.txt").is_file()


def test_round_two_samples_with_round_one_checkpoint(rounds, tmp_path):
    from safetensors.torch import load_file

    from megatron_simpo.cli.convert import megatron_to_hf_main

    root, said = rounds
    assert f"round 2: sampling {root}/round-2/prompts.jsonl with {root}/round-1/checkpoint" in said
    megatron_to_hf_main(["--load", str(root / "round-1/checkpoint"), "--save", str(tmp_path)])
    made = load_file(tmp_path / "model.safetensors")
    sampled = load_file(root / "round-2/sampler-hf/model.safetensors")
    start = load_file(root / "round-1/sampler-hf/model.safetensors")
    assert set(made) == set(sampled)
    assert all((made[k] == sampled[k]).all() for k in made)
    assert any(not (start[k] == sampled[k]).all() for k in made)  # round 1 trained it


def test_analyze_run_tabulates_the_rounds(rounds):
    root, said = rounds
    summary = json.loads((root / "analysis/rounds.json").read_text())
    assert (root / "analysis/rewards_per_round.png").stat().st_size > 0
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for row in summary["rounds"][1:]:
        stats = json.loads((root / f"round-{row['round']}/rewards.json").read_text())
        assert {k: row[k] for k in ("mean_reward", "mean_chosen", "mean_rejected")} == \
            {k: stats[k] for k in ("mean_reward", "mean_chosen", "mean_rejected")}
        assert isinstance(row["heldout_reward_accuracy"], float)
    assert "round  sampled  chosen  rejected" in said


def test_a_damaged_reward_statistics_file_is_one_line(tmp_path, capsys):
    from megatron_simpo.cli.analyze_run import main

    folder = tmp_path / "round-1"
    folder.mkdir()
    (folder / "rewards.json").write_text(json.dumps(
        {"prompts": 6, "samples": 2, "pairs": 6, "dropped": {"identical": 0, "tie": 0, "empty": 0},
         "mean_reward": 0.5, "mean_chosen": "high", "mean_rejected": 0.1}))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"analyze_run: error: {folder / 'rewards.json'}: mean_chosen is 'high'; "
        "not a reward-statistics file written by build-pairs --reward-stats"]


@pytest.mark.parametrize("args, env, line", [
    (["--rounds", "0"], {}, "--rounds (or ROUNDS) must be a number >= 1, got '0'"),
    ([], {"ROUNDS": "two"}, "--rounds (or ROUNDS) must be a number >= 1, got 'two'"),
    (["--rounds", "1"], {"MODEL": "llama3-8b-instruct"}, "set ROOT to the folder of the rounds"),
    (["--rounds", "1"], {"MODEL": "tiny", "ROOT": "{root}"},
     "{root} holds rounds already: give --overwrite to start afresh, or another ROOT")])
def test_script_mistakes_are_one_line(tmp_path, args, env, line):
    (tmp_path / "round-1").mkdir()
    env = {k: v.format(root=tmp_path) for k, v in env.items()}
    done = subprocess.run(["bash", str(ROOT / "examples/iterative_simpo.sh"), *args],
                          env={**{k: v for k, v in os.environ.items()
                                  if k not in ("ROUNDS", "ROOT", "MODEL")}, **env},
                          cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stderr.splitlines()) == (
        2, [f"iterative_simpo.sh: error: {line.format(root=tmp_path)}"])
    assert (tmp_path / "round-1").is_dir()
