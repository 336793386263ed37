"""Data rules: chat template, prompt masking, truncation, shards, bad rows."""

import json

import pytest

from megatron_simpo.data.config import DataConfig
from megatron_simpo.data.sampler import PairSampler
from megatron_simpo.data.collate import TokenizedPair, collate_pairs
from megatron_simpo.data.loading import load_datasets
from megatron_simpo.data.sources import read_preference_rows
from megatron_simpo.model.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(path, **kw):
    return DataConfig(train_data_path=str(path), **{"seq_length": 64, "max_prompt_length": 40, **kw})


def _tokenize(tokenizer, tmp_path, rows, **kw):
    """The training pairs of ``rows`` written as a JSONL file (the one data path)."""
    path = _write(tmp_path / "d.jsonl", rows)
    return load_datasets(_config(path, **kw), tokenizer, seed=0)[0]


def test_chat_template_applied_and_response_is_the_assistant_turn(tokenizer, tmp_path):
    [pair] = _tokenize(tokenizer, tmp_path, [{"prompt": "hi", "chosen": "ab", "rejected": "c"}])
    assert tokenizer.decode(pair.prompt) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
                                             "\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(pair.chosen) == "ab<|eot_id|>"
    assert tokenizer.decode(pair.rejected) == "c<|eot_id|>"


def test_message_list_rows_with_the_prompt_repeated(tokenizer, tmp_path):
    user = {"role": "user", "content": "hi"}
    row = {"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "ab"}],
           "rejected": [{"role": "assistant", "content": "c"}]}
    [pair] = _tokenize(tokenizer, tmp_path, [row])
    assert tokenizer.decode(pair.chosen) == "ab<|eot_id|>"
    assert tokenizer.decode(pair.rejected) == "c<|eot_id|>"


def test_prompt_truncated_from_the_left_response_from_the_right(tokenizer, tmp_path):
    long_prompt = "x" * 100
    [pair] = _tokenize(tokenizer, tmp_path, [{"prompt": long_prompt, "chosen": "a" * 50,
                                              "rejected": "b"}], seq_length=64, max_prompt_length=40)
    assert len(pair.prompt) == 40
    assert tokenizer.decode(pair.prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert len(pair.chosen) == 24 and tokenizer.decode(pair.chosen) == "a" * 24  # cut at the end
    assert tokenizer.decode(pair.rejected) == "b<|eot_id|>"


def test_prompt_is_masked_and_labels_are_shifted():
    batch = collate_pairs([TokenizedPair([1, 2, 3], [4, 5], [6])], seq_length=6, pad_id=0)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 0, 0], [1, 2, 3, 0, 0, 0]]
    assert batch.labels.tolist() == [[2, 3, 4, 5, 0, 0], [2, 3, 6, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', r"d.jsonl:2: missing column\(s\) rejected"),
    ('{"prompt": "a", "chosen": "b", "rejected": ', r"d.jsonl:2: not valid JSON"),
    ('["a", "b"]', r"d.jsonl:2: a row must be a JSON object"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', r"d.jsonl:2: empty chosen response"),
    ('{"prompt": "a", "chosen": "b", "rejected": "  "}', r"d.jsonl:2: empty rejected response"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', r"d.jsonl:2: empty prompt"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', r"d.jsonl:2: column 'chosen' must be"),
])
def test_bad_rows_are_named(tokenizer, tmp_path, line, message):
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    with pytest.raises(ValueError, match=message):
        _tokenize(tokenizer, tmp_path, [good, line])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_preference_rows(tmp_path / "nope.jsonl")


def test_shards_are_disjoint_cover_the_batch_and_epochs_reshuffle():
    sampler = PairSampler(num_pairs=100, global_batch_size=16, seed=5)
    assert sampler.batches_per_epoch == 6
    epoch = [i for b in range(6) for i in sampler.global_batch(16 * b)]
    assert len(set(epoch)) == 96  # one epoch never repeats a pair
    batch = sampler.global_batch(32)
    shards = [PairSampler.shard(batch, r, 4) for r in range(4)]
    assert sorted(i for s in shards for i in s) == sorted(batch)
    assert all(len(s) == 4 for s in shards)
    assert sampler.global_batch(16 * 6) != sampler.global_batch(0)  # epoch 2 reshuffles
    assert PairSampler(100, 16, 5).global_batch(48) == sampler.global_batch(48)  # deterministic


def test_held_out_split_is_disjoint_and_seeded(tokenizer, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(40)]
    path = _write(tmp_path / "d.jsonl", rows)
    config = DataConfig(train_data_path=str(path), valid_fraction=0.25, seq_length=64,
                        max_prompt_length=40)
    train, valid = load_datasets(config, tokenizer, seed=1)
    assert len(train) == 30 and len(valid) == 10
    assert not {tuple(p.prompt) for p in train} & {tuple(p.prompt) for p in valid}
    assert load_datasets(config, tokenizer, seed=1)[1] == valid


def test_non_utf8_bytes_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                     b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_preference_rows(path)


def test_prompt_messages_need_known_roles(tokenizer, tmp_path):
    row = {"prompt": [{"role": "robot", "content": "beep"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match=r"d.jsonl:1: column 'prompt' has messages with unknown "
                                         r"role\(s\) 'robot' \(known: system, user, assistant\)"):
        _tokenize(tokenizer, tmp_path, [row])
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert _tokenize(tokenizer, tmp_path, [{"prompt": system, "chosen": "a", "rejected": "b"}])


def test_identical_pairs_are_dropped_or_refused(tokenizer, tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": "ab", "rejected": "cd"},
            # Identical only after truncation to the sequence length.
            {"prompt": "r", "chosen": "x" * 80 + "1", "rejected": "x" * 80 + "2"}]
    path = _write(tmp_path / "d.jsonl", rows)
    dropped = []
    pairs = load_datasets(_config(path), tokenizer, 0, dropped)[0]
    assert len(pairs) == 1 and dropped == [f"{path}:1", f"{path}:3"]
    with pytest.raises(ValueError, match=rf"{path}:1: chosen and rejected are the same tokens"):
        load_datasets(_config(path, identical_pairs="refuse"), tokenizer, 0)


def test_truncations_are_counted_and_lengths_summarised(tokenizer, tmp_path):
    from megatron_simpo.data.pair_table import length_statistics

    rows = [{"prompt": "p" * 60, "chosen": "a", "rejected": "b"},      # prompt cut on the left
            {"prompt": "hi", "chosen": "a" * 80, "rejected": "b"},     # chosen cut on the right
            {"prompt": "hi", "chosen": "ab", "rejected": "c"}]
    path = _write(tmp_path / "d.jsonl", rows)
    cut = {"prompts": 0, "responses": 0}
    pairs = load_datasets(_config(path), tokenizer, 0, None, cut)[0]
    assert cut == {"prompts": 1, "responses": 1}
    assert len(pairs[0].prompt) == 40 and len(pairs[1].prompt) + len(pairs[1].chosen) == 64
    prompts = sorted(len(p.prompt) for p in pairs)
    total = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    summary = length_statistics(pairs)
    assert summary.startswith(f"{total} tokens; prompt tokens p50/p90/p99/max "
                              f"{prompts[1]}/{prompts[2]}/{prompts[2]}/{prompts[2]}")


def test_text_already_formatted_is_not_templated_again(tokenizer, tmp_path):
    """--no-apply-chat-template (NeMo-Aligner JSONL with its template baked in): the prompt is
    its own text encoded with the tokenizer's special tokens, responses get EOS; evaluation's
    prompt encoding follows the same switch."""
    from megatron_simpo.data.tokenization import encode_prompts

    baked = "<extra_id_0>system\n\n<extra_id_1>user\nreverse abc\n<extra_id_1>assistant\n"
    rows = [{"prompt": baked, "chosen_response": "cba", "rejected_response": "cbb"}]
    [plain] = _tokenize(tokenizer, tmp_path, [{"prompt": r["prompt"], "chosen": r["chosen_response"],
                                               "rejected": r["rejected_response"]} for r in rows],
                        apply_chat_template=False, seq_length=256, max_prompt_length=200)
    assert list(plain.prompt) == tokenizer(baked, add_special_tokens=True)["input_ids"]
    assert list(plain.chosen) == tokenizer("cba", add_special_tokens=False)["input_ids"] + \
        [tokenizer.eos_token_id]
    [templated] = _tokenize(tokenizer, tmp_path, [{"prompt": baked, "chosen": "cba",
                                                    "rejected": "cbb"}],
                            seq_length=256, max_prompt_length=200)
    assert templated.prompt[0] == tokenizer.bos_token_id and list(templated.prompt) != list(plain.prompt)
    assert encode_prompts(tokenizer, [[{"role": "user", "content": baked}]],
                          apply_chat_template=False) == [list(plain.prompt)]


# Gemma's chat formats as their releases write them, reduced to the rule on a system message:
# Gemma-2's template raises on one, Gemma-3's folds it into the first user turn.
_GEMMA_TURNS = ("{% for message in loop_messages %}{% set role = 'model' if message['role'] == "
                "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + "
                "(first_user_prefix if loop.first else '') + message['content'] | trim + "
                "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<start_of_turn>model\\n' }}{% endif %}")
GEMMA2_TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
                   "{{ raise_exception('System role not supported') }}{% endif %}"
                   "{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
                   + _GEMMA_TURNS)
GEMMA3_TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
                   "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
                   "{% set loop_messages = messages[1:] %}{% else %}"
                   "{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
                   + _GEMMA_TURNS)


def test_system_messages_follow_the_templates_own_rule(tokenizer, tmp_path):
    """A template that refuses a system message (Gemma-2) is one line naming the row; one that
    folds it into the first user turn (Gemma-3) is followed, with a note; Llama-3's renders it."""
    import copy

    from megatron_simpo.data.config import DataError
    from megatron_simpo.data.tokenization import check_tokenizer, system_role

    gemma2, gemma3 = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    gemma2.chat_template, gemma3.chat_template = GEMMA2_TEMPLATE, GEMMA3_TEMPLATE
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rows = [{"prompt": "ok", "chosen": "a", "rejected": "b"},
            {"prompt": system, "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError) as error:
        _tokenize(gemma2, tmp_path, rows)
    assert str(error.value) == (
        f"{tmp_path / 'd.jsonl'}:2: the chat template refuses a system message (System role not "
        "supported; 1 prompt(s) have one): drop the system messages or fold them into the "
        "first user turn")
    assert len(_tokenize(gemma2, tmp_path, rows[:1])) == 1  # no system message: no refusal
    [_, folded] = _tokenize(gemma3, tmp_path, rows)
    as_user = gemma3.apply_chat_template([{"role": "user", "content": "be brief\n\nhi"}],
                                         add_generation_prompt=True, tokenize=False)
    as_ids = gemma3(as_user, add_special_tokens=False)["input_ids"]
    assert folded.prompt == as_ids[:1] + as_ids[-39:]  # cut on the left, its BOS kept
    assert [system_role(t)[0] for t in (tokenizer, gemma2, gemma3)] == ["native", "refuses",
                                                                       "folds"]
    config = _config(tmp_path / "d.jsonl")
    [note] = check_tokenizer(gemma3, "/t/gemma3", config, None)
    assert note == ("note: the chat template of /t/gemma3 has no system role: a system message "
                    "is folded into the first user turn (the template's own rule, e.g. Gemma-3's)")
    assert check_tokenizer(tokenizer, "/t/llama", config, None) == []
    # build-pairs: the policy's prompts and the reward model's conversations, by the same rule
    from megatron_simpo.data.tokenization import check_system_messages

    assert check_system_messages(gemma3, [system], ["p.jsonl:1"], "/t/gemma3") == [note]
    assert check_system_messages(gemma2, [[system[1]]], ["p.jsonl:1"], "/t/gemma2") == []
    with pytest.raises(DataError, match=r"^prompt 1: the chat template of --reward-model /rm "
                                        r"refuses a system message \(System role not supported"):
        check_system_messages(gemma2, [[system[1]], system], tokenizer_path="--reward-model /rm")
