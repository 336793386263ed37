"""``--recipe``: the SimPO authors' configurations as presets that the user's flags override."""

import re
from pathlib import Path

import pytest

from megatron_simpo.cli.arguments import parse_args
from megatron_simpo.cli.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
# The authors' numbers, written out independently of the recipe table (princeton-nlp/SimPO
# training_configs/*.yaml; gemma-2-9b-it-DPO's model card): algorithm, beta, gamma/beta or
# (absolute) gamma, lr, max length, max prompt length, dataset.
AUTHORS = {
    "gemma2-9b-it-simpo": ("simpo", 10.0, 0.5, None, 8e-7, 2048, 1800, "princeton-nlp/gemma2-ultrafeedback-armorm"),
    "gemma2-9b-it-dpo": ("dpo", 0.01, None, None, 5e-7, 2048, 1800, "princeton-nlp/gemma2-ultrafeedback-armorm"),
    "llama3-8b-instruct-simpo-v0.2": ("simpo", 10.0, 0.3, None, 1e-6, 2048, 1800, "princeton-nlp/llama3-ultrafeedback-armorm"),
    "llama3-8b-instruct-simpo": ("simpo", 2.5, 0.55, None, 1e-6, 2048, 1800, "princeton-nlp/llama3-ultrafeedback"),
    "llama3-8b-base-simpo": ("simpo", 2.0, 0.5, None, 6e-7, 2048, 1800, "HuggingFaceH4/ultrafeedback_binarized"),
    "mistral-7b-instruct-simpo": ("simpo", 2.5, None, 0.3, 5e-7, 2048, 1800, "snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset"),
    "mistral-7b-base-simpo": ("simpo", 2.0, None, 1.6, 3e-7, 1024, 512, "HuggingFaceH4/ultrafeedback_binarized"),
}
CKPT = ["--pretrained-checkpoint", "/ckpt/model"]


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_each_recipe_is_the_authors_configuration(name):
    algorithm, beta, ratio, gamma, lr, length, prompt, dataset = AUTHORS[name]
    config = parse_args(["--recipe", name, *CKPT])
    loss = config.loss
    assert (loss.algorithm, loss.beta, loss.gamma_beta_ratio, loss.gamma) == (algorithm, beta, ratio, gamma)
    assert config.optimizer.lr == lr and config.optimizer.min_lr == 0
    assert config.optimizer.lr_decay_style == "cosine" and config.optimizer.lr_warmup_fraction == 0.1
    assert config.optimizer.weight_decay == 0 and config.optimizer.clip_grad == 1.0
    assert (config.global_batch_size, config.train_epochs, config.train_iters) == (128, 1, None)
    assert (config.data.seq_length, config.data.max_prompt_length) == (length, prompt)
    assert config.data.train_data_path == config.data.valid_data_path == dataset
    assert config.bf16 and config.seed == 42


def test_the_readme_table_shows_the_recipes():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| `([a-z0-9.-]+)` \| ([^|]+) \| (\w+) \| ([\d.]+) \| ([^|]+) \| ([\de.-]+) \| (\d+) / (\d+) \| ([^|]+) \|", line)
        if match and match.group(1) in RECIPES:
            rows[match.group(1)] = match.groups()[1:]
    assert set(rows) == set(RECIPES)
    for name, (model, algorithm, beta, margin, lr, length, prompt, data) in rows.items():
        recipe = RECIPES[name]
        assert (model.strip(), algorithm, float(beta), float(lr)) == (
            recipe.hf_model, recipe.algorithm, recipe.beta, recipe.lr)
        assert (int(length), int(prompt), data.strip()) == (
            recipe.seq_length, recipe.max_prompt_length, recipe.dataset)
        expected = ("-" if recipe.algorithm != "simpo" else f"gamma/beta {recipe.gamma_beta_ratio:g}"
                    if recipe.gamma_beta_ratio is not None else f"gamma {recipe.gamma:g}")
        assert margin.strip() == expected


def test_the_users_flags_replace_the_recipes_of_the_same_meaning(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    config = parse_args(["--recipe", "gemma2-9b-it-simpo", *CKPT, "--lr", "5e-7", "--simpo-gamma", "2",
                         "--train-iters", "10", "--train-data-path", str(pairs),
                         "--max-tokens-per-microbatch", "4096", "--seq-length", "4096"])
    assert config.optimizer.lr == 5e-7 and config.loss.beta == 10
    assert (config.loss.gamma, config.loss.gamma_beta_ratio) == (2.0, None)
    assert (config.train_iters, config.train_epochs) == (10, None)
    # any data flag replaces the recipe's dataset and its splits together
    assert config.data.train_data_path == str(pairs) and config.data.valid_data_path is None
    assert config.data.train_split == "train"
    assert config.batching.max_tokens_per_microbatch == 4096 and config.data.seq_length == 4096
    # the flag's other spelling and the = form count as the same flag
    assert parse_args(["--recipe=llama3-8b-base-simpo", *CKPT, "--simpo-beta=3"]).loss.beta == 3


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "llama4-simpo"], "--recipe llama4-simpo: no such recipe; the recipes are gemma2-9b-it-dpo, "),
    (["--recipe", "gemma2-9b-it-simpo", "--algorithm", "dpo"],
     "--algorithm dpo contradicts --recipe gemma2-9b-it-simpo (simpo)"),
    (["--recipe"], "--recipe: name one of"),
])
def test_a_wrong_recipe_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args([*argv, *CKPT])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_help_lists_the_recipes(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--recipe" in out and all(name in out for name in RECIPES)
