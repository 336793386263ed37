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
