"""The data path's tokens on rows where TRL's trainers are the reference: text without a chat
template (one text per sequence, EOS once, BOS once), prompts cut on the left (BOS kept), and
rows that must be refused in one line (null contents, lone surrogates)."""

import json

import pytest

from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.loading import load_datasets
from megatron_simpo.data.tokenization import encode_prompts
from megatron_simpo.model.tiny import CHAT_TEMPLATE, build_tokenizer

_CORPUS = ["The capital of France is Paris. Question: what is the capital? Answer: Paris",
           "Hello world, hello there. The answer is yes. The answer is no."] * 50


def _bpe(metaspace: bool):
    """A small trained BPE: Metaspace (SentencePiece-like: Llama-2, Mistral) or byte-level
    (Llama-3), adding BOS like Llama's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|unk|>", "<|begin_of_text|>", "<|end_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = Tokenizer(models.BPE(unk_token="<|unk|>"))
    if metaspace:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = list("abcdefghijklmnopqrstuvwxyzACFHQT.,?:\n \u2581")
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet))
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<|pad|>",
                                        unk_token="<|unk|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _pairs(tokenizer, tmp_path, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(train_data_path=str(path), **{"seq_length": 256,
                                                      "max_prompt_length": 200, **kw})
    return load_datasets(config, tokenizer, seed=0)[0]


@pytest.mark.parametrize("metaspace", [True, False], ids=["metaspace", "byte-level"])
def test_text_without_template_is_tokenized_as_one_text(tmp_path, metaspace):
    """TRL (DPOTrainer, and CPOTrainer's build_tokenized_answer) tokenizes prompt + response as
    one text; the response is what follows the prompt's tokens. Tokenized alone, a response
    gains a word-start marker (SentencePiece) or loses a merge across the boundary."""
    tokenizer = _bpe(metaspace)
    eos = tokenizer.eos_token_id
    rows = [{"prompt": "Question: what is the capital?\nAnswer:", "chosen": "Paris",
             "rejected": "no"},
            {"prompt": "Question: what is the capital? Answer: ", "chosen": "Paris",
             "rejected": "no"}]
    pairs = _pairs(tokenizer, tmp_path, rows, apply_chat_template=False)
    for row, pair in zip(rows, pairs):
        for response, ids in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
            joined = tokenizer(row["prompt"] + response)["input_ids"]
            assert list(pair.prompt) + list(ids) == joined + [eos]
        assert list(pair.prompt) == encode_prompts(
            tokenizer, [[{"role": "user", "content": row["prompt"]}]],
            apply_chat_template=False)[0][:len(pair.prompt)]


def test_text_without_template_gets_one_eos_and_one_bos(tmp_path):
    """Text formatted already (--no-apply-chat-template) may end with EOS and begin with BOS:
    neither is added a second time (TRL adds EOS only where the text lacks it)."""
    tokenizer = _bpe(False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = [{"prompt": "<|begin_of_text|>Question: what is the capital?\n",
             "chosen": "Paris<|eot_id|>", "rejected": "no"}]
    [pair] = _pairs(tokenizer, tmp_path, rows, apply_chat_template=False)
    assert list(pair.prompt).count(bos) == 1 and pair.prompt[0] == bos
    assert list(pair.chosen).count(eos) == 1 and pair.chosen[-1] == eos
    assert list(pair.rejected).count(eos) == 1 and pair.rejected[-1] == eos
    [prompt] = encode_prompts(tokenizer, [[{"role": "user", "content": rows[0]["prompt"]}]],
                              apply_chat_template=False)
    assert prompt == list(pair.prompt)  # evaluation sees the prompt training saw


def test_a_prompt_cut_on_the_left_keeps_its_bos(tmp_path):
    tokenizer = build_tokenizer()
    [pair] = _pairs(tokenizer, tmp_path, [{"prompt": "x" * 100, "chosen": "ab", "rejected": "c"}],
                    seq_length=64, max_prompt_length=40)
    assert len(pair.prompt) == 40 and pair.prompt[0] == tokenizer.bos_token_id
    assert tokenizer.decode(pair.prompt[1:]) == \
        "x" * 25 + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": None}], "rejected": "c"},
     r"d.jsonl:1: column 'chosen' has a message whose content is null"),
    ({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "c"},
     r"d.jsonl:1: column 'prompt' has a message whose content is null"),
])
def test_null_contents_are_refused_not_trained_as_empty(tmp_path, row, message):
    """A null content rendered by the template is an empty turn: refused like an empty one."""
    with pytest.raises(DataError, match=message):
        _pairs(build_tokenizer(), tmp_path, [row])


def test_a_lone_surrogate_escape_is_named_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hi", "chosen": "ab", "rejected": "c"}\n'
                    '{"prompt": "hi \\ud83d", "chosen": "ab", "rejected": "c"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: a \\uXXXX escape of half a surrogate pair"):
        load_datasets(DataConfig(train_data_path=str(path), seq_length=64, max_prompt_length=40),
                      build_tokenizer(), seed=0)


# A template with tool support (as Llama-3.1's or Qwen's: the schemas in the prompt) and a
# template argument of its own (as Qwen3's enable_thinking).
_TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if brief %}..{% endif %}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "{% for tool in tools %}{{ tool['name'] }}({{ tool['parameters'] | tojson }})\n"
    "{% endfor %}<|eot_id|>{% endif %}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}")
_TOOL = {"name": "add", "parameters": {"a": "int", "b": "int"}}


def _tools_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = _TOOLS_TEMPLATE
    return tokenizer


def _expected(tokenizer, row, **options):
    """TRL's tokens for a conversational row: the template renders the prompt (with the
    generation prompt) and prompt + response with the row's tools and arguments; the response
    is what follows the prompt."""
    prompt = [{"role": "user", "content": row["prompt"]}]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **options)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = [list(ids)]
    for column in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": row[column]}], **options)
        full = full["input_ids"] if hasattr(full, "keys") else full
        assert full[:len(ids)] == ids
        out.append(list(full[len(ids):]))
    return out


@pytest.mark.parametrize("as_text", [False, True], ids=["list", "json-text"])
def test_a_rows_tools_and_template_arguments_reach_the_template(tmp_path, as_text):
    """TRL passes a row's ``tools`` (a list, or its JSON text) and ``chat_template_kwargs`` to
    the chat template; rows without them are rendered as before, in the same run."""
    tokenizer = _tools_tokenizer()
    rows = [{"prompt": "add 2 and 3", "chosen": "5", "rejected": "6",
             "tools": json.dumps([_TOOL]) if as_text else [_TOOL]},
            {"prompt": "add 2 and 3", "chosen": "5", "rejected": "6",
             "chat_template_kwargs": {"brief": True}},
            {"prompt": "add 2 and 3", "chosen": "5", "rejected": "6", "tools": []}]
    pairs = _pairs(tokenizer, tmp_path, rows)
    expected = [_expected(tokenizer, rows[0], tools=[_TOOL]),
                _expected(tokenizer, rows[1], brief=True), _expected(tokenizer, rows[2])]
    assert [[list(p.prompt), list(p.chosen), list(p.rejected)] for p in pairs] == expected
    assert "system" in tokenizer.decode(pairs[0].prompt)  # the tool schemas' turn
    assert tokenizer.decode(pairs[1].prompt).startswith("<|begin_of_text|>..")
    assert pairs[2].prompt != pairs[0].prompt


def test_tools_from_a_parquet_source_through_the_cache(tmp_path):
    """The datasets path (Parquet, the tokenize-once cache in its worker map) reads the same
    columns and gives the same tokens as JSONL."""
    import pandas as pd

    from megatron_simpo.data.cache import prepare_data

    tokenizer = _tools_tokenizer()
    rows = [{"prompt": f"add {i} and 3", "chosen": str(i + 3), "rejected": "0",
             "tools": json.dumps([_TOOL]) if i % 2 else ""} for i in range(6)]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    config = DataConfig(train_data_path=str(tmp_path / "d.parquet"), seq_length=256,
                        max_prompt_length=200, data_cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(config, tokenizer, tmp_path, seed=0)
    got = sorted([list(p.prompt), list(p.chosen), list(p.rejected)] for p in prepared.train)
    want = sorted(_expected(tokenizer, r, **({"tools": [_TOOL]} if r["tools"] else {}))
                  for r in rows)
    assert got == want


@pytest.mark.parametrize("tokenizer, kw, message", [
    (build_tokenizer(), {}, "d.jsonl:1: the tokenizer's chat template renders no tools"),
    (_tools_tokenizer(), {"apply_chat_template": False},
     "d.jsonl:1: its tools and chat_template_kwargs go to the chat template, which is not"),
])
def test_tools_that_would_be_left_out_are_refused(tmp_path, tokenizer, kw, message):
    row = {"prompt": "add 2 and 3", "chosen": "5", "rejected": "6", "tools": [_TOOL]}
    with pytest.raises(DataError, match=message):
        _pairs(tokenizer, tmp_path, [row], **kw)


@pytest.mark.parametrize("value, message", [
    ("[{", "column 'tools' is not JSON"), ({"name": "add"}, "column 'tools' must be a list of tool schemas"),
])
def test_malformed_tools_are_named_by_row(tmp_path, value, message):
    row = {"prompt": "add 2 and 3", "chosen": "5", "rejected": "6", "tools": value}
    with pytest.raises(DataError, match=f"d.jsonl:1: {message}"):
        _pairs(_tools_tokenizer(), tmp_path, [row])


def test_on_policy_prompts_with_tools_are_refused(tmp_path):
    from megatron_simpo.data.sources import read_prompt_rows

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "tools": None}) + "\n"
                    + json.dumps({"prompt": "b", "tools": [_TOOL]}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: column 'tools': on-policy sampling"):
        read_prompt_rows(str(path), split="train")


def test_a_tool_call_turn_with_null_content_is_kept(tmp_path):
    """OpenAI/transformers' tool-call format: an assistant turn whose content is null beside its
    tool_calls (the template renders the calls); only a null content with nothing else is
    refused."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% else %}{{ m['content'] }}"
        "{% endif %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>"
        "assistant<|end_header_id|>\n\n{% endif %}")
    call = [{"type": "function", "function": {"name": "w", "arguments": {}}}]
    prompt = [{"role": "user", "content": "weather?"},
              {"role": "assistant", "content": None, "tool_calls": call},
              {"role": "tool", "content": "sunny"}]
    [pair] = _pairs(tokenizer, tmp_path, [{"prompt": prompt, "chosen": "It is sunny.",
                                           "rejected": "no"}])
    assert len(pair.prompt) > 0


def test_tools_as_arrow_structs_read_as_their_jsonl(tmp_path):
    """Parquet holds every row's tool schemas and template arguments in one struct type: a key
    one row has is null in the others (``"x": null`` rendered, an argument defined as None).
    They are left out, so the same rows give the same tokens (and fingerprint) as JSONL."""
    import pandas as pd

    from megatron_simpo.data.cache import prepare_data

    tokenizer = _tools_tokenizer()
    tokenizer.chat_template = _TOOLS_TEMPLATE.replace(
        "{% if brief %}..{% endif %}", "{% if brief is defined %}[{{ brief }}]{% endif %}")
    rows = [{"prompt": "add 2 and 3", "chosen": "5", "rejected": "6", "tools": [_TOOL],
             "chat_template_kwargs": {"brief": True}},
            {"prompt": "neg 2", "chosen": "-2", "rejected": "2",
             "tools": [{"name": "neg", "parameters": {"x": "int"}}],
             "chat_template_kwargs": {"other": 1}}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    got = {}
    for name in ("d.jsonl", "d.parquet"):
        prepared = prepare_data(DataConfig(train_data_path=str(tmp_path / name), seq_length=256,
                                           max_prompt_length=200,
                                           data_cache_dir=str(tmp_path / f"cache-{name}")),
                                tokenizer, tmp_path, seed=0)
        got[name] = ([[list(p.prompt), list(p.chosen), list(p.rejected)] for p in prepared.train],
                     prepared.fingerprint)
    assert "null" not in tokenizer.decode(got["d.parquet"][0][1][0])
    assert got["d.parquet"] == got["d.jsonl"]


def test_a_template_argument_that_tokenization_sets_is_refused(tmp_path):
    row = {"prompt": "a", "chosen": "b", "rejected": "c",
           "chat_template_kwargs": {"messages": []}}
    with pytest.raises(DataError, match="d.jsonl:1: column 'chat_template_kwargs' sets messages"):
        _pairs(_tools_tokenizer(), tmp_path, [row])
