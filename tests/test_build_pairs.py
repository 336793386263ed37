"""megatron-simpo-build-pairs: on-policy pairs (the SimPO v0.2 recipe's data) from the tiny model.

Seeds to samples against transformers' own generate; the best/worst rule and its drops against a
hand-written table; the authors' column types, read by the trainer with no column flags; a tiny
reward model's scores against transformers' own forward; refusals in one line; an interrupted
run resumed to the same file; two processes writing what one writes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_simpo.evaluation import generation, pairs_run, pairs_world, vllm_backend
from megatron_simpo.evaluation.answers import Sampling

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["reverse abcdefgh", "hi", "reverse ponmlkji", "say ok", "reverse aabbccdd"]
REWARD = '''
import os

def letters(prompt, response):
    """Verifiable reward: how many letters of the reversed word the response gets right."""
    word = prompt.split()[-1][::-1]
    return float(sum(a == b for a, b in zip(word, response)) + 0.01 * len(response))

def by_length(prompt, response):
    return float(len(response))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny default's tokenizer with a random Llama-3-architecture model (seeded), a
    prompts file and a reward-function module."""
    import torch
    import transformers

    from megatron_simpo.model.tiny import write_default

    root = tmp_path_factory.mktemp("pairs")
    paths = write_default(root / "tiny", train_pairs=4, valid_pairs=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(paths["config"]))
    model.save_pretrained(root / "hf")
    transformers.AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(root / "hf")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": "x"}) + "\n"
                                                for p in PROMPTS))
    (root / "reward.py").write_text(REWARD)
    return root


def _flags(tiny, output, *extra, reward="letters"):
    return ["--prompts-path", str(tiny / "prompts.jsonl"), "--hf", str(tiny / "hf"),
            "--output", str(output), "--reward-fn", f"{tiny / 'reward.py'}:{reward}",
            "--max-new-tokens", "10", "--batch-size", "2", "--backend", "transformers", *extra]


def _run(argv, say=lambda _: None):
    from megatron_simpo.cli.build_pairs import COMMAND

    return pairs_run.build_pairs(COMMAND.parse(argv)["config"], say=say)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_defaults_are_the_authors_and_seeds_give_the_same_samples(tiny):
    """The v0.2 recipe's settings are the defaults; sample k of a prompt is transformers' own
    generate after torch.manual_seed(seed k); the same seeds give the same samples."""
    import torch
    import transformers

    from megatron_simpo.cli.build_pairs import COMMAND

    config = COMMAND.parse(["--prompts-path", "p", "--output", "o.jsonl", "--hf", "h",
                            "--reward-fn", "m:f"])["config"]
    assert (config.sample_seeds, config.temperature, config.top_p, config.max_new_tokens) == \
        ((13, 21, 42, 79, 100), 0.8, 0.95, 4096)
    assert COMMAND.parse(_flags(tiny, "o.jsonl", "--seeds", "7", "8", "9", "--num-samples",
                                "2"))["config"].sample_seeds == (7, 8)

    sample = generation.transformers_sampler(tiny / "hf", dtype="float32",
                                             apply_chat_template=True)
    sampling = Sampling(temperature=0.8, top_p=0.95, max_new_tokens=10)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    first = sample(conversations, sampling, (13, 21, 42))
    assert first == sample(conversations, sampling, (13, 21, 42))
    assert len(first) == 2 and all(len(s) == 3 for s in first)
    assert len(set(first[0])) > 1  # the seeds differ

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "hf",
                                                              dtype=torch.float32).eval()
    [alone] = sample(conversations[:1], sampling, (13, 21, 42))
    # Temperature and top-p alone, whatever the folder's generation_config holds
    # (tests/test_generation_settings.py: one that holds a release's top_k and penalty).
    model.generation_config = transformers.GenerationConfig()
    ids = tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    for seed, text in zip((13, 21, 42), alone):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=0.8, top_p=0.95, top_k=0, repetition_penalty=1.0,
                             max_new_tokens=10, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# prompt -> (samples, hand-written outcome): argmax / argmin with the first index on equal
# scores (reward: the length), and the drops.
CASES = {
    "p-best-worst": (["bb", "a", "ccc", "a", "dd"], ("ccc", "a")),
    "p-identical": (["same"] * 5, "identical"),
    "p-tie": (["ab", "cd", "ef", "gh", "ij"], "tie"),
    "p-first-of-equals": (["aa", "bb", "c", "dd", "e"], ("aa", "c")),
    "p-empty-worst": (["", "abc", "ab", "ab", "ab"], "empty"),
}


def test_best_and_worst_and_the_drops_follow_a_hand_written_table(tiny, monkeypatch, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CASES))
    scored = []
    (tmp_path / "length.py").write_text(
        "CALLS = []\ndef score(prompt, response):\n    CALLS.append(prompt)\n"
        "    return float(len(response))\n")

    def fake_sampler(hf_dir, **_):
        def sample(conversations, sampling, seeds):
            assert len(seeds) == 5
            return [list(CASES[c[-1]["content"]][0]) for c in conversations]
        return sample

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    from megatron_simpo.evaluation import rewards

    real = rewards.load_reward_fn

    def recording(spec):
        function = real(spec)
        scored.append(function.__globals__["CALLS"])
        return function

    monkeypatch.setattr(rewards, "load_reward_fn", recording)
    said = []
    _run(["--prompts-path", str(prompts), "--hf", str(tiny / "hf"), "--output",
          str(tmp_path / "pairs.jsonl"), "--reward-fn", f"{tmp_path / 'length.py'}:score",
          "--backend", "transformers", "--batch-size", "2"], say=said.append)
    rows = _jsonl(tmp_path / "pairs.jsonl")
    kept = {p: outcome for p, (_, outcome) in CASES.items() if isinstance(outcome, tuple)}
    assert [r["prompt"] for r in rows] == list(kept)
    for row in rows:
        chosen, rejected = kept[row["prompt"]]
        assert row["chosen"] == [{"content": row["prompt"], "role": "user"},
                                 {"content": chosen, "role": "assistant"}]
        assert row["rejected"][-1] == {"content": rejected, "role": "assistant"}
        assert row["all_rm_scores"] == [float(len(s)) for s in CASES[row["prompt"]][0]]
    # Identical samples are never scored (as the authors' post_process drops them first).
    assert "p-identical" not in scored[-1] and scored[-1].count("p-tie") == 5
    assert "dropped 1 prompts whose samples were all identical, 1 whose best and worst scores " \
           "tied, 1 with an empty best or worst sample" in said[-1]


def test_message_prompts_from_a_dataset_folder_keep_their_ids(tiny, monkeypatch, tmp_path):
    """Prompts as messages (a system turn) from a save_to_disk folder with its own prompt_id
    column (a repeated id skipped): the model sees the whole conversation, the pairs keep the
    ids and the messages, and the trainer reads the save_to_disk output with no column flags."""
    import datasets
    import transformers

    from megatron_simpo.data.loading import DataConfig, load_datasets

    system = {"role": "system", "content": "be brief"}
    conversations = [[system, {"role": "user", "content": f"question {i}"}] for i in range(3)]
    datasets.Dataset.from_dict({"prompt_id": ["id-0", "id-1", "id-0"],
                                "messages": conversations}).save_to_disk(tmp_path / "prompts")
    seen = []

    def fake_sampler(hf_dir, **_):
        def sample(batch, sampling, seeds):
            seen.extend(batch)
            return [["a", "bbb", "cc"] for _ in batch]
        return sample

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    said = []
    _run(["--prompts-path", str(tmp_path / "prompts"), "--prompt-column", "messages",
          "--hf", str(tiny / "hf"), "--output", str(tmp_path / "pairs"), "--seeds", "1", "2", "3",
          "--reward-fn", f"{tiny / 'reward.py'}:by_length", "--backend", "transformers"],
         say=said.append)
    assert seen == conversations[:2] and "1 repeated prompts skipped" in said[0]
    rows = datasets.load_from_disk(str(tmp_path / "pairs")).to_list()
    assert [r["prompt_id"] for r in rows] == ["id-0", "id-1"]
    for row, conversation in zip(rows, conversations):
        assert row["prompt"] == conversation
        assert row["chosen"] == conversation + [{"content": "bbb", "role": "assistant"}]
        assert row["rejected"] == conversation + [{"content": "a", "role": "assistant"}]
        assert row["all_rm_scores"] == [1.0, 3.0, 2.0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    train, _ = load_datasets(DataConfig(train_data_path=str(tmp_path / "pairs"), seq_length=64,
                                        max_prompt_length=40), tokenizer, seed=0)
    expected = tokenizer("bbb<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert len(train) == 2 and all(list(p.chosen) == expected for p in train)


def test_reward_stats_cover_every_sample_identical_ones_scored_once(tiny, monkeypatch, tmp_path):
    """--reward-stats: the hand-computed means over CASES (reward: the length); the prompt
    whose samples are all identical is scored once and counted for its 5 samples; the pairs
    file is the same as without the flag."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CASES))
    (tmp_path / "length.py").write_text(
        "CALLS = []\ndef score(prompt, response):\n    CALLS.append(prompt)\n"
        "    return float(len(response))\n")

    def fake_sampler(hf_dir, **_):
        def sample(conversations, sampling, seeds):
            return [list(CASES[c[-1]["content"]][0]) for c in conversations]
        return sample

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    from megatron_simpo.evaluation import rewards

    real, calls = rewards.load_reward_fn, []

    def recording(spec):
        function = real(spec)
        calls.append(function.__globals__["CALLS"])
        return function

    monkeypatch.setattr(rewards, "load_reward_fn", recording)
    flags = ["--prompts-path", str(prompts), "--hf", str(tiny / "hf"), "--reward-fn",
             f"{tmp_path / 'length.py'}:score", "--backend", "transformers", "--batch-size", "2"]
    _run(flags + ["--output", str(tmp_path / "plain.jsonl")])
    _run(flags + ["--output", str(tmp_path / "pairs.jsonl"), "--reward-stats",
                  str(tmp_path / "stats.json")])
    assert calls[-1].count("p-identical") == 1 and calls[-1].count("p-tie") == 5
    stats = json.loads((tmp_path / "stats.json").read_text())
    lengths = [len(s) for samples, _ in CASES.values() for s in samples]
    assert stats == {"prompts": 5, "samples": 5, "pairs": 2,
                     "dropped": {"identical": 1, "tie": 1, "empty": 1},
                     "mean_reward": sum(lengths) / 25, "mean_chosen": (3 + 2) / 2,
                     "mean_rejected": (1 + 1) / 2}
    assert (tmp_path / "pairs.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    assert not (tmp_path / "pairs.jsonl.parts").exists()


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The tiny model's pairs in one uninterrupted run (JSONL), shared by the tests below."""
    output = tmp_path_factory.mktemp("uninterrupted") / "pairs.jsonl"
    _run(_flags(tiny, output))
    return output


def test_the_authors_schema_read_by_the_trainer_with_no_column_flags(tiny, uninterrupted,
                                                                    tmp_path):
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers

    from megatron_simpo.data.loading import DataConfig, load_datasets

    _run(_flags(tiny, tmp_path / "pairs.parquet"))
    # princeton-nlp/llama3-ultrafeedback-armorm's columns and types.
    message = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    authors = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()),
                         ("all_generated_responses", pa.list_(pa.string())),
                         ("all_rm_scores", pa.list_(pa.float64())),
                         ("chosen", message), ("rejected", message)])
    table = pq.read_table(tmp_path / "pairs.parquet")
    assert table.schema.remove_metadata() == authors
    rows = _jsonl(uninterrupted)
    assert table.to_pylist() == rows  # the two formats hold the same pairs
    assert 0 < len(rows) <= len(PROMPTS)
    for row in rows:
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert len(row["all_generated_responses"]) == len(row["all_rm_scores"]) == 5
        scores = row["all_rm_scores"]
        responses = row["all_generated_responses"]
        assert row["chosen"][1]["content"] == responses[scores.index(max(scores))]
        assert row["rejected"][1]["content"] == responses[scores.index(min(scores))]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    for source in (uninterrupted, tmp_path / "pairs.parquet"):
        train, _ = load_datasets(DataConfig(train_data_path=str(source), seq_length=64,
                                            max_prompt_length=32), tokenizer, seed=0)
        assert len(train) == len(rows)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}],
                                               add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(rows[0]["chosen"], tokenize=False)
        expected = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        assert any(list(p.chosen) == expected for p in train)


def _assert_scores_are_the_models(rows, tokenizer, forward):
    """Every all_rm_scores entry is ``forward`` of the tokenized (prompt, response) alone."""
    import torch

    assert rows
    for row in rows:
        for response, score in zip(row["all_generated_responses"], row["all_rm_scores"]):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["prompt"]},
                 {"role": "assistant", "content": response}], return_tensors="pt",
                return_dict=True)
            with torch.no_grad():
                expected = forward(ids)
            assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_reward_model_scores_equal_transformers_forward_with_its_template(tiny, tmp_path):
    """A tiny random sequence classifier (one output, its own template): every all_rm_scores
    entry equals transformers' forward on that (prompt, response) alone, though the tool
    batches by length with padding."""
    import torch
    import transformers

    from megatron_simpo.evaluation.rewards import length_batches

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    config = transformers.AutoConfig.from_pretrained(tiny / "hf")
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(1)
    reward_model = transformers.LlamaForSequenceClassification(config).eval()
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    output = tmp_path / "pairs.jsonl"
    flags = _flags(tiny, output)
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = \
        ["--reward-model", str(tmp_path / "rm"), "--reward-batch-size", "3"]
    _run(flags)
    _assert_scores_are_the_models(_jsonl(output), tokenizer,
                                  lambda ids: reward_model(**ids).logits[0, 0].item())
    # Longest first; a sequence ending in the pad id, or any without one, goes alone.
    assert length_batches([[1, 2], [1, 2, 3], [1], [5, 0]], 2, pad=0) == [[1, 0], [2], [3]]
    assert length_batches([[1, 2], [1]], 2, pad=None) == [[0], [1]]


@pytest.mark.parametrize("kind, message", [
    ("causal", "--reward-model {rm}: a LlamaForCausalLM, not a sequence-classification reward "
               "model"),
    ("remote", "--reward-model {rm}: its sequence classifier is the model repository's own code "
               "(modeling_custom.RewardModel); it runs only with --trust-remote-code"),
    ("two-labels", "--reward-model {rm}: a classifier with 2 outputs; a reward model has one"),
    ("no-tokenizer", "--reward-model {rm}: cannot load its tokenizer (Couldn't instantiate"),
])
def test_a_reward_model_that_cannot_be_used_is_one_line(tiny, tmp_path, capsys, kind, message):
    from megatron_simpo.cli.build_pairs import main

    rm = tmp_path / "rm"
    rm.mkdir()
    config = json.loads((tiny / "hf" / "config.json").read_text())
    if kind == "remote":
        config.update(architectures=["RewardModel"],
                      auto_map={"AutoModelForSequenceClassification":
                                "modeling_custom.RewardModel"})
    elif kind == "two-labels":
        config.update(architectures=["LlamaForSequenceClassification"])
    elif kind == "no-tokenizer":  # (its lines were the error: several, without the flag)
        config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "L"})
    (rm / "config.json").write_text(json.dumps(config))
    flags = _flags(tiny, tmp_path / "pairs.jsonl")
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = ["--reward-model", str(rm)]
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("build_pairs: error: " + message.format(rm=rm))
    assert not (tmp_path / "pairs.jsonl.parts").exists()  # refused before anything started


def test_an_interrupted_run_resumes_to_the_same_pairs(tiny, uninterrupted, tmp_path,
                                                      monkeypatch, capsys):
    """Stopped after the first batch was written: the rerun samples only the prompts left, and
    writes what an uninterrupted run writes; a rerun with other settings is refused."""
    real = generation.transformers_sampler
    sampled, stop_after = [], [1]

    def recording(hf_dir, **options):
        sample = real(hf_dir, **options)

        def wrapped(conversations, sampling, seeds):
            if stop_after and len(sampled) == stop_after[0]:
                raise KeyboardInterrupt
            sampled.append([c[-1]["content"] for c in conversations])
            return sample(conversations, sampling, seeds)
        return wrapped

    monkeypatch.setattr(generation, "transformers_sampler", recording)
    output = tmp_path / "pairs.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(_flags(tiny, output))
    assert sampled == [PROMPTS[:2]] and not output.exists()
    parts = sorted(p.name for p in (tmp_path / "pairs.jsonl.parts").iterdir())
    assert parts == ["batch-000000.jsonl", "settings.json"]

    from megatron_simpo.cli.build_pairs import main

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_flags(tiny, output, "--temperature", "0.7"))
    [line] = capsys.readouterr().err.splitlines()
    assert ("was started with other settings (--temperature 0.8 -> 0.7): give the same ones to "
            "resume") in line
    # A batch file on disk is checked before it is trusted.
    bad = tmp_path / "pairs.jsonl.parts" / "batch-000001.jsonl"
    bad.write_text(json.dumps({"index": 2, "prompt_id": "x", "samples": [], "scores": None}))
    with pytest.raises(SystemExit):
        main(_flags(tiny, output))
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"build_pairs: error: {bad}: not this run's batch of 2 prompts from "
                    f"{tiny / 'prompts.jsonl'}:3; move {bad.parent} away to start over")
    bad.unlink()

    stop_after.clear()
    _run(_flags(tiny, output))
    assert sampled == [PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:]]  # each prompt sampled once
    assert output.read_bytes() == uninterrupted.read_bytes()
    assert not (tmp_path / "pairs.jsonl.parts").exists()


def test_two_processes_write_what_one_writes(tiny, uninterrupted, tmp_path):
    """Under torchrun, each process samples its share of the batches; rank 0 merges them in
    prompt order: the same file as one process."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    output = tmp_path / "pairs.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(ROOT / "tools" / "build_pairs.py"), *_flags(tiny, output)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert output.read_bytes() == uninterrupted.read_bytes()


@pytest.mark.gpu
def test_vllm_samples_follow_its_own_seeded_generate(tiny):
    """Each sample is vLLM's own generate of that prompt alone with SamplingParams(seed=...):
    batching many prompts and seeds into one call changes nothing."""
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vllm import SamplingParams

    from megatron_simpo.data.tokenization import encode_prompts

    sample = vllm_backend.vllm_sampler(tiny / "hf", tensor_parallel_size=1, dtype="auto",
                                     apply_chat_template=True, gpu_memory_utilization=0.3)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    seeds = (13, 21, 42, 79, 100)
    batched = sample(conversations, Sampling(0.8, 0.95, 16), seeds)
    tokenizer = sample.llm.get_tokenizer()
    for conversation, samples in zip(conversations, batched):
        [ids] = encode_prompts(tokenizer, [conversation])
        for seed, text in zip(seeds, samples):
            [out] = sample.llm.generate([{"prompt_token_ids": ids}], SamplingParams(
                temperature=0.8, top_p=0.95, max_tokens=16, seed=seed))
            assert text == out.outputs[0].text.strip()


ARMO_LIKE = '''
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING  # (as ArmoRM's)
from transformers.utils import ModelOutput, add_start_docstrings_to_model_forward


@dataclass
class RewardOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class ArmoLikeRewardModel(LlamaPreTrainedModel):
    """ArmoRM's shape: several reward objectives from the last token, combined into ``score``."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    @add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        rewards = self.regression_layer(hidden[torch.arange(len(hidden)), last])
        weights = torch.tensor([0.5, 0.3, 0.2], dtype=rewards.dtype, device=rewards.device)
        return RewardOutput(score=(rewards * weights).sum(-1, keepdim=True), rewards=rewards)
'''


def test_a_remote_code_reward_model_scores_by_its_score_output(tiny, tmp_path, monkeypatch):
    """A reward model in its repository's own code, shaped like ArmoRM (an output with
    ``score``, no ``logits``; its forward decorated with LLAMA_INPUTS_DOCSTRING, which
    transformers 5 no longer has: it failed to import, a traceback), runs with
    --trust-remote-code: every all_rm_scores entry equals the ``score`` of that code's forward
    on the (prompt, response) alone."""
    import importlib.util
    import shutil

    import torch
    import transformers

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "modeling_armo.py").write_text(ARMO_LIKE)
    found = importlib.util.spec_from_file_location("modeling_armo_test", rm / "modeling_armo.py")
    module = importlib.util.module_from_spec(found)
    import transformers.models.llama.modeling_llama as llama

    monkeypatch.setattr(llama, "LLAMA_INPUTS_DOCSTRING", "", raising=False)  # (to build it here)
    found.loader.exec_module(module)
    monkeypatch.delattr(llama, "LLAMA_INPUTS_DOCSTRING", raising=False)  # (as transformers 5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    config = transformers.AutoConfig.from_pretrained(tiny / "hf")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(2)
    reward_model = module.ArmoLikeRewardModel(config).eval()
    reward_model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    saved = json.loads((rm / "config.json").read_text())
    saved.update(architectures=["ArmoLikeRewardModel"],
                 auto_map={"AutoModelForSequenceClassification": "modeling_armo.ArmoLikeRewardModel"})
    (rm / "config.json").write_text(json.dumps(saved))
    output = tmp_path / "pairs.jsonl"
    flags = _flags(tiny, output)
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = \
        ["--reward-model", str(rm), "--trust-remote-code", "--reward-batch-size", "3"]
    _run(flags)
    _assert_scores_are_the_models(_jsonl(output), tokenizer,
                                  lambda ids: reward_model(**ids).score[0, 0].item())
    shutil.rmtree(rm)


LINE_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"
"""What str.splitlines() ends a line at besides \\n and \\r; JSON keeps them inside strings (the
first three raw under ensure_ascii=False, as the parts and the pairs are written)."""


def test_samples_holding_unicode_line_breaks_merge_and_resume(tiny, monkeypatch, tmp_path):
    """A batch file whose samples hold those characters is this run's batch: the run merges it,
    and a rerun reads it back (CRLF line ends and blank lines too) instead of refusing it."""
    samples = {p: [f"{p} {c} sample {k}" * (k + 1) for k, c in enumerate(LINE_BREAKS[:5])]
               for p in PROMPTS}

    def fake_sampler(hf_dir, **_):
        def sample(conversations, sampling, seeds):
            return [list(samples[c[-1]["content"]]) for c in conversations]
        return sample

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    output = tmp_path / "pairs.jsonl"
    _run(_flags(tiny, output, reward="by_length"))
    text = output.read_text(encoding="utf-8")
    assert "\u2028" in text
    rows = [json.loads(line) for line in text.split("\n") if line]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:  # by length: the last sample is the longest, the first the shortest
        assert row["chosen"][-1]["content"] == samples[row["prompt"]][-1]
        assert row["rejected"][-1]["content"] == samples[row["prompt"]][0]

    from megatron_simpo.cli.build_pairs import COMMAND

    config = COMMAND.parse(_flags(tiny, output, reward="by_length"))["config"]
    prompts = pairs_run.read_prompts(config, say=lambda _: None)[:2]
    written = [{"index": p.index, "prompt_id": p.prompt_id, "samples": samples[p.prompt],
                "scores": [float(len(s)) for s in samples[p.prompt]]} for p in prompts]
    part = tmp_path / "batch-000000.jsonl"
    pairs_run.write_part(part, written)
    assert pairs_run.read_part(part, prompts, seeds=5) == written
    part.write_bytes(part.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    assert pairs_run.read_part(part, prompts, seeds=5) == written


@pytest.mark.parametrize("backend, visible, local_rank, tp, device, engine", [
    ("vllm", None, 1, 2, 2, "2,3"),
    ("vllm", "4,5,6,7", 3, 1, 3, "7"),
    ("transformers", "4,5,6,7", 2, 1, 2, "4,5,6,7"),
])
def test_each_process_scores_on_its_own_gpu(monkeypatch, backend, visible, local_rank, tp,
                                            device, engine):
    """Under torchrun, the reward model (torch's current device) is on the process's own GPU
    with vLLM too, not on every process's GPU 0: the device is set in this process's view
    before vLLM's engine is given the group's GPUs."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(
        (index, os.environ.get("CUDA_VISIBLE_DEVICES"))))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    pairs_world.pin_device(backend, local_rank, tp, world=4)
    assert calls == [(device, visible)]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == (engine if visible or backend == "vllm"
                                                      else None)


def test_a_reward_template_refusing_system_messages_is_found_before_sampling(
        tiny, tmp_path, monkeypatch, capsys):
    """Prompts with a system turn and a reward model whose chat template refuses one (Gemma-2's
    rule): one line naming the first such row of the prompts file, before the policy loads or
    samples anything (it came after the first batch was sampled, naming "prompt 0")."""
    import transformers

    from megatron_simpo.cli.build_pairs import main

    rm = tmp_path / "rm"
    rm.mkdir()
    config = json.loads((tiny / "hf" / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"})
    (rm / "config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                               "'System role not supported') }}{% endif %}"
                               + tokenizer.chat_template)
    tokenizer.save_pretrained(rm)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}] if i < 2
                                           else [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": p}]}) + "\n"
                               for i, p in enumerate(PROMPTS)))

    def no_sampling(*_, **__):
        raise AssertionError("the policy loaded before the reward template was checked")

    monkeypatch.setattr(generation, "transformers_sampler", no_sampling)
    flags = _flags(tiny, tmp_path / "pairs.jsonl")
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = ["--reward-model", str(rm)]
    flags[flags.index("--prompts-path") + 1] = str(prompts)
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"build_pairs: error: {prompts}:3: the chat template of --reward-model "
                           f"{rm} refuses a system message (System role not supported; 3 "
                           "prompt(s) have one)")


def test_a_reward_of_any_real_number_type_is_taken_and_others_named():
    """A reward function computing with numpy or torch returns their scalars: finite real
    numbers are taken as floats (np.float32 was refused as "not a finite number"); text,
    booleans, non-finite values and several numbers are refused naming the prompt and sample."""
    import types

    import numpy as np
    import torch

    from megatron_simpo.evaluation.rewards import checked_rewards

    prompt = types.SimpleNamespace(source="prompts.jsonl:4", prompt_id="p4")
    taken = [np.float32(0.5), np.float64(0.25), np.int64(3), 2, 1.5, torch.tensor(0.75),
             np.array([0.125])]
    assert checked_rewards(taken, [(prompt, k) for k in range(len(taken))]) == \
        [0.5, 0.25, 3.0, 2.0, 1.5, 0.75, 0.125]
    for value in ("0.5", True, np.bool_(True), float("nan"), np.float32("inf"),
                  torch.tensor([0.1, 0.2]), None):
        with pytest.raises(ValueError, match=r"^reward .* for prompts.jsonl:4 \(prompt_id p4\) "
                                             r"sample 1: rewards must be finite numbers$"):
            checked_rewards([1.0, value], [(prompt, 0), (prompt, 1)])


def _settings_with_hf(tiny, tmp_path, hf: str) -> dict:
    """The parts' settings of the test command line with ``--hf hf``."""
    from megatron_simpo.cli.build_pairs import COMMAND

    flags = _flags(tiny, tmp_path / "pairs.jsonl")
    flags[flags.index("--hf") + 1] = hf
    config = COMMAND.parse(flags)["config"]
    return pairs_run.settings(config, pairs_run.read_prompts(config), "transformers")


def test_a_resume_knows_the_model_folder_however_it_is_spelled(tiny, tmp_path, monkeypatch):
    """The parts' settings hold the model folder's absolute path: the same folder spelled
    another way resumes (it was refused), and another folder under the same relative spelling,
    from another working folder, is refused (its samples were mixed in silently)."""
    def expected(hf):
        return _settings_with_hf(tiny, tmp_path, hf)

    folder = pairs_run.parts_folder(tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tiny)
    pairs_run.open_parts(folder, expected("hf"), create=True)
    pairs_run.open_parts(folder, expected(str(tiny / "hf")), create=False)
    pairs_run.open_parts(folder, expected("./hf/"), create=False)
    (tmp_path / "elsewhere" / "hf").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=f"other settings \\(--hf '{tiny / 'hf'}' -> "
                                         f"'{tmp_path / 'elsewhere' / 'hf'}'\\)"):
        pairs_run.open_parts(folder, expected("hf"), create=False)


def test_a_resume_of_parts_an_earlier_version_recorded_with_relative_paths(tiny, tmp_path,
                                                                           monkeypatch):
    """A parts folder an earlier version started holds --hf (and --prompts-path, --reward-fn)
    as given: resumed from the same folder with the same spelling, it goes on (it was refused:
    'hf' -> its absolute path); another folder is not (the record does not say from where an
    earlier version was run: its relative spelling is read from here)."""
    import json

    def expected(hf):
        return _settings_with_hf(tiny, tmp_path, hf)

    folder = pairs_run.parts_folder(tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tiny)
    old = {k: v for k, v in expected("hf").items() if k not in ("prompt_texts", "reward_dtype")}
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({**old, "hf": "hf"}))
    pairs_run.open_parts(folder, expected("hf"), create=False)
    pairs_run.open_parts(folder, expected(str(tiny / "hf")), create=False)
    (tmp_path / "elsewhere" / "hf").mkdir(parents=True)
    with pytest.raises(ValueError, match="other settings \\(--hf "):
        pairs_run.open_parts(folder, expected(str(tmp_path / "elsewhere" / "hf")), create=False)


def test_a_mistake_in_another_rank_s_share_is_said_by_that_rank(tiny, tmp_path, monkeypatch,
                                                                 capsys):
    """Under torchrun, rank 1 alone sees its batches: a reward that is not a number, or a
    damaged batch file of its own, is its one line, exit code 2 (it exited 2 without a word,
    and torchrun's traceback was all the user saw); rank 0 never sees them."""
    from megatron_simpo.cli.build_pairs import COMMAND, main

    (tmp_path / "nan.py").write_text("def f(prompt, response):\n"
                                     "    return float('nan') if prompt == 'say ok' else 1.0\n")

    def fake_sampler(hf_dir, **_):
        return lambda conversations, sampling, seeds: [[f"s{k}" for k in seeds]
                                                       for _ in conversations]

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    flags = _flags(tiny, tmp_path / "pairs.jsonl")
    flags[flags.index("--reward-fn") + 1] = f"{tmp_path / 'nan.py'}:f"
    config = COMMAND.parse(flags)["config"]
    prompts = pairs_run.read_prompts(config)
    folder = pairs_run.parts_folder(config.output)
    pairs_run.open_parts(folder, pairs_run.settings(config, prompts, "transformers"),
                         create=True)  # rank 0's part
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for damaged in (False, True):
        if damaged:
            (folder / "batch-000001.jsonl").write_text("{not json\n")
        with pytest.raises(SystemExit) as info:
            main(flags)
        assert info.value.code == 2
        [line] = capsys.readouterr().err.splitlines()[-1:]
        assert line.startswith("build_pairs: error: " + (
            f"{folder / 'batch-000001.jsonl'}: not this run's batch" if damaged else
            f"reward nan for {tiny / 'prompts.jsonl'}:4 (prompt_id "))


def test_a_text_sampled_twice_is_scored_once_per_prompt(tiny, tmp_path, monkeypatch):
    """A reward model batches by length with padding, which moves a score in its last digits
    (bf16 far more): a prompt's repeated sample, batched once padded and once not, got two
    rewards. Each distinct text of a prompt is scored once, so equal texts have equal rewards."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    config = transformers.AutoConfig.from_pretrained(tiny / "hf")
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(3)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    texts = ["hgfedcbaxyzxyzxyzxyz", "hgf", "hgf", "hgf", "hgf"]

    def fake_sampler(hf_dir, **_):
        return lambda conversations, sampling, seeds: [list(texts) for _ in conversations]

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    flags = _flags(tiny, tmp_path / "pairs.jsonl", "--reward-stats", str(tmp_path / "stats.json"))
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = \
        ["--reward-model", str(tmp_path / "rm"), "--reward-batch-size", "2"]
    _run(flags)
    for row in _jsonl(tmp_path / "pairs.jsonl"):
        scores = row["all_rm_scores"]
        assert scores[1] == scores[2] == scores[3] == scores[4], scores


def test_samples_cut_at_max_new_tokens_are_counted_in_the_last_line(tiny, monkeypatch, tmp_path):
    """A kept pair whose chosen or rejected sample was cut at --max-new-tokens before it ended
    (the authors' recipe keeps it, and training then ends it with the template's end of turn)
    is counted in the last line, from the batch files (a resumed run counts it too); it was
    never said."""
    from megatron_simpo.evaluation.answers import Reply

    samples = {"reverse abcdefgh": [("abc", True), ("a", False), ("abcdefgh", False)],
               "hi": [("hello", True), ("h", True), ("hell", False)]}

    def fake_sampler(hf_dir, **_):
        return lambda conversations, sampling, seeds: [
            [Reply(text, ended) for text, ended in samples[c[-1]["content"]]]
            for c in conversations]

    monkeypatch.setattr(generation, "transformers_sampler", fake_sampler)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in samples))
    flags = _flags(tiny, tmp_path / "pairs.jsonl", "--seeds", "1", "2", "3", reward="by_length")
    flags[flags.index("--prompts-path") + 1] = str(prompts)
    said = []
    _run(flags, say=said.append)
    assert said[-1].endswith("; kept, as the authors' recipe keeps them: 1 chosen and 1 "
                             "rejected samples cut at --max-new-tokens (or the model's context) "
                             "before they ended")
    rows = _jsonl(tmp_path / "pairs.jsonl")
    assert [r["chosen"][-1]["content"] for r in rows] == ["abcdefgh", "hello"]


def test_greedy_sampling_without_reward_stats_is_one_line(tiny, tmp_path, capsys):
    """--temperature 0 gives every seed the same sample: the run sampled every prompt and wrote
    an empty pairs file, exit code 0; it is refused in one line (with --reward-stats, greedy
    rewards are what is asked for)."""
    from megatron_simpo.cli.build_pairs import COMMAND, main

    with pytest.raises(SystemExit) as info:
        main(_flags(tiny, tmp_path / "pairs.jsonl", "--temperature", "0"))
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("build_pairs: error: --temperature 0 is greedy: every seed gives the "
                           "same sample, so no prompt makes a pair")
    assert COMMAND.parse(_flags(tiny, tmp_path / "pairs.jsonl", "--temperature", "0",
                                "--reward-stats", str(tmp_path / "s.json")))["config"]


@pytest.mark.parametrize("flag, value", [("--gpu-memory-utilization", "0.8"),
                                         ("--tensor-parallel-size", "2")])
def test_vllm_s_flags_on_the_transformers_backend_are_one_line(tiny, tmp_path, capsys, flag,
                                                               value):
    """A flag the backend would not use is refused (it was taken and ignored), before any model
    loads."""
    from megatron_simpo.cli.build_pairs import main

    with pytest.raises(SystemExit) as info:
        main(_flags(tiny, tmp_path / "pairs.jsonl", flag, value))
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"build_pairs: error: {flag} is vLLM's: the transformers backend ")


def test_without_a_chat_template_a_sample_is_its_prompt_s_exact_continuation(tiny):
    """--no-apply-chat-template: training joins the prompt's text and the response's, so the
    sample must be the exact continuation: the tokens training reads are the tokens the model
    sampled (they were stripped: "... abcdefgh" + " x\n" trained as "... abcdefghx")."""
    import torch
    import transformers

    from megatron_simpo.data.config import DataConfig
    from megatron_simpo.data.tokenization import encode_prompts, tokenize_records

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "hf",
                                                              dtype=torch.float32).eval()
    model.generation_config = transformers.GenerationConfig()
    sample = generation.transformers_sampler(tiny / "hf", dtype="float32",
                                             apply_chat_template=False)
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    seeds = tuple(range(1, 16))
    [replies] = sample([conversation], Sampling(0.8, 0.95, 10), seeds)
    assert any(reply != reply.strip() for reply in replies)  # (spaces and line breaks at ends)
    [ids] = encode_prompts(tokenizer, [conversation], apply_chat_template=False)
    seeds, replies = zip(*[(s, r) for s, r in zip(seeds, replies) if r.strip()])  # (trainable)
    rows = tokenize_records([{"source": f"seed {s}", "prompt": PROMPTS[0], "chosen": reply,
                              "rejected": "x"} for s, reply in zip(seeds, replies)], tokenizer,
                            DataConfig(train_data_path="-", seq_length=64, max_prompt_length=32,
                                       apply_chat_template=False))
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for seed, row in zip(seeds, rows):
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([ids]), do_sample=True, temperature=0.8, top_p=0.95,
                             top_k=0, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        out = [t for t in out if t not in special]  # (not text: not decoded)
        assert list(row.pair.chosen)[:len(out)] == out, seed


def test_a_prompt_the_chat_template_refuses_is_its_row(tiny, tmp_path, monkeypatch, capsys):
    """A template that raises for a conversation (Mistral's "roles must alternate"): one line
    naming the prompts file's row, before the model loads, for the policy's template and the
    reward model's, and in training's tokenization too (each was a jinja2 traceback)."""
    import shutil

    import transformers

    from megatron_simpo.cli.build_pairs import main
    from megatron_simpo.data.config import DataConfig, DataError
    from megatron_simpo.data.tokenization import tokenize_records

    alternate = ("{% for message in messages %}{% if (message['role'] == 'user') != "
                 "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
                 "alternate user/assistant/user/assistant/...') }}{% endif %}{% endfor %}")
    strict = tmp_path / "strict"
    shutil.copytree(tiny / "hf", strict)
    tokenizer = transformers.AutoTokenizer.from_pretrained(strict)
    tokenizer.chat_template = alternate + tokenizer.chat_template
    tokenizer.save_pretrained(strict)
    prompts = tmp_path / "prompts.jsonl"
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": two_users})
                       + "\n")

    def no_sampling(*_, **__):
        raise AssertionError("the policy loaded before its template was checked")

    monkeypatch.setattr(generation, "transformers_sampler", no_sampling)
    refused = "the chat template refuses this conversation (Conversation roles must alternate"
    for model in ("--hf", "--reward-model"):
        flags = _flags(tiny, tmp_path / "pairs.jsonl")
        flags[flags.index("--prompts-path") + 1] = str(prompts)
        if model == "--hf":
            flags[flags.index("--hf") + 1] = str(strict)
        else:
            (strict / "config.json").write_text(json.dumps(dict(
                json.loads((tiny / "hf" / "config.json").read_text()),
                architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"})))
            flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = \
                ["--reward-model", str(strict)]
        with pytest.raises(SystemExit) as info:
            main(flags)
        assert info.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"build_pairs: error: {prompts}:2") and refused in line, line
        shutil.rmtree(tmp_path / "pairs.jsonl.parts", ignore_errors=True)
    with pytest.raises(DataError, match=f"^train.jsonl:7: {re.escape(refused)}"):
        tokenize_records([{"source": "train.jsonl:7", "prompt": two_users, "chosen": "x",
                           "rejected": "y"}], tokenizer,
                         DataConfig(train_data_path="-", seq_length=64, max_prompt_length=32))


def test_a_float32_reward_model_is_scored_in_bfloat16_on_a_gpu(tiny, tmp_path, monkeypatch):
    """ArmoRM's config says float32: "its own dtype" loaded 30 GB beside vLLM's share of the GPU,
    where the authors' script loads it in bfloat16. --reward-dtype auto is its own dtype but
    bfloat16 on a GPU for a float32 one; a given dtype is what scores (here on CPU)."""
    import torch
    import transformers

    from megatron_simpo.evaluation.rewards import reward_dtype

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "hf")
    config = transformers.AutoConfig.from_pretrained(tiny / "hf")
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(4)
    model = transformers.LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["dtype"] == "float32"
    assert reward_dtype(str(tmp_path / "rm"), "auto", on_gpu=True) is torch.bfloat16
    assert reward_dtype(str(tmp_path / "rm"), "auto", on_gpu=False) == "auto"
    assert reward_dtype(str(tmp_path / "rm"), "float32", on_gpu=True) is torch.float32
    model.to(torch.bfloat16).save_pretrained(tmp_path / "rm16")
    assert reward_dtype(str(tmp_path / "rm16"), "auto", on_gpu=True) == "auto"

    monkeypatch.setattr(generation, "transformers_sampler", lambda hf_dir, **_: (
        lambda conversations, sampling, seeds: [["hgf", "hgfedcba", "a"] for _ in conversations]))
    flags = _flags(tiny, tmp_path / "pairs.jsonl", "--seeds", "1", "2", "3")
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = \
        ["--reward-model", str(tmp_path / "rm"), "--reward-dtype", "bfloat16"]
    _run(flags)
    rows = _jsonl(tmp_path / "pairs.jsonl")
    scores = [s for row in rows for s in row["all_rm_scores"]]
    assert rows and all(torch.tensor(s).bfloat16().item() == s for s in scores)  # bf16 logits


@pytest.mark.parametrize("kind, message", [
    ("code", "--reward-model {rm}: its code (modeling_broken.Broken) does not load with "
             "transformers {version} (cannot import name 'NO_SUCH_NAME' from"),
    ("weights", "--reward-model {rm}: cannot load its weights ("),
])
def test_a_reward_model_that_does_not_load_is_one_line(tiny, tmp_path, monkeypatch, capsys,
                                                        kind, message):
    """Remote code that does not import (not a docstring transformers dropped), found before the
    policy loads; a folder without weights: one line naming the flag (each was a traceback)."""
    import shutil

    import transformers

    from megatron_simpo.cli.build_pairs import main

    rm = tmp_path / f"rm_{kind}"  # (its own name: transformers caches remote code by folder)
    shutil.copytree(tiny / "hf", rm)
    (rm / "model.safetensors").unlink()
    config = json.loads((rm / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "L"},
                  pad_token_id=0)
    if kind == "code":
        (rm / "modeling_broken.py").write_text("from transformers import NO_SUCH_NAME\n")
        config.update(architectures=["Broken"],
                      auto_map={"AutoModelForSequenceClassification": "modeling_broken.Broken"})
    (rm / "config.json").write_text(json.dumps(config))
    if kind == "code":
        monkeypatch.setattr(generation, "transformers_sampler", lambda *_, **__: pytest.fail(
            "the policy loaded before the reward model's code was tried"))
    flags = _flags(tiny, tmp_path / "pairs.jsonl", "--max-new-tokens", "2")
    flags[flags.index("--reward-fn"):flags.index("--reward-fn") + 2] = \
        ["--reward-model", str(rm)] + (["--trust-remote-code"] if kind == "code" else [])
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()[-1:]
    assert line.startswith("build_pairs: error: " + message.format(
        rm=rm, version=transformers.__version__)), line


def test_a_resume_with_the_same_prompt_ids_but_other_text_is_refused(tiny, tmp_path):
    """Prompts with their own prompt_id column (UltraFeedback's), edited after an interruption
    (here a system turn added): the parts' settings compare the prompts' text too, not only
    their ids (the old batches were resumed, mixing samples of two prompt sets)."""
    from megatron_simpo.cli.build_pairs import COMMAND

    def expected(prompt):
        source = tmp_path / "prompts.jsonl"
        source.write_text("".join(json.dumps({"prompt_id": f"id-{i}", "prompt": prompt(p)}) + "\n"
                                  for i, p in enumerate(PROMPTS)))
        flags = _flags(tiny, tmp_path / "pairs.jsonl")
        flags[flags.index("--prompts-path") + 1] = str(source)
        config = COMMAND.parse(flags)["config"]
        return pairs_run.settings(config, pairs_run.read_prompts(config), "transformers")

    folder = pairs_run.parts_folder(tmp_path / "pairs.jsonl")
    pairs_run.open_parts(folder, expected(lambda p: p), create=True)
    pairs_run.open_parts(folder, expected(lambda p: p), create=False)
    with pytest.raises(ValueError, match=r"other settings \(the prompts' text '[0-9a-f]{64}' -> "
                                         r"'[0-9a-f]{64}'\)"):
        pairs_run.open_parts(folder, expected(lambda p: [{"role": "system", "content": "be "
                                                          "brief"}, {"role": "user",
                                                                     "content": p}]),
                             create=False)


def test_a_reward_function_that_takes_other_arguments_is_one_line(tiny, tmp_path, capsys):
    """--reward-fn names a function called as f(prompt, response): one that takes other
    arguments is one line naming the flag before any model loads (it was a TypeError traceback
    at the first batch)."""
    from megatron_simpo.cli.build_pairs import main

    (tmp_path / "one.py").write_text("def score(response):\n    return 1.0\n")
    flags = _flags(tiny, tmp_path / "pairs.jsonl")
    flags[flags.index("--reward-fn") + 1] = f"{tmp_path / 'one.py'}:score"
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"build_pairs: error: --reward-fn {tmp_path / 'one.py'}:score: score "
                           "is called as score(prompt, response), which it does not take")
    assert not (tmp_path / "pairs.jsonl.parts").exists()
