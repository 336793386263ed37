"""The embedded tiny default: a Llama-3-architecture model, its tokenizer and a preference task.

Nothing is downloaded. The task is "reverse 8 letters": the chosen answer is the reversal, the
rejected one is the reversal with two letters wrong. The rule is simple, so a tiny model learns it
from a few tens of thousands of seeded pairs, and the preference generalises to held-out pairs.
``letters_correct`` is the task's verifiable reward (``--reward-fn
megatron_simpo.model.tiny:letters_correct``), for on-policy pairs sampled from the model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnop"
TASK_LENGTH = 8
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|begin_of_text|>", "<|end_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n:.,?!'-")

# Llama-3's chat format, spelled with this tokenizer's special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# A Llama-3-architecture model (GQA, RoPE base 500000, RMSNorm, SwiGLU) at toy size.
TINY_MODEL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128,
                  intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
                  rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                  initializer_range=0.02)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with Llama-3-style special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>", unk_token="<|unk|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_pair(rng: random.Random) -> dict[str, str]:
    """One row: prompt, the correct reversal (chosen), and a reversal with two letters wrong."""
    word = "".join(rng.choice(LETTERS) for _ in range(TASK_LENGTH))
    answer = word[::-1]
    wrong = list(answer)
    for position in rng.sample(range(TASK_LENGTH), 2):
        wrong[position] = rng.choice([c for c in LETTERS if c != answer[position]])
    return {"prompt": f"reverse {word}", "chosen": answer, "rejected": "".join(wrong)}


def letters_correct(prompt: str, response: str) -> float:
    """The share of the reversal's letters the response gets right, position by position:

        reward = #{i : response[i] == reversal[i]} / max(len(reversal), len(response))

    (surrounding whitespace stripped), so 1.0 exactly for the reversal, and extra or missing
    letters cost as wrong ones. ``prompt`` is the task's ``reverse <word>``."""
    answer = prompt.split()[-1][::-1]
    response = response.strip()
    return sum(a == b for a, b in zip(answer, response)) / max(len(answer), len(response))


def write_default(out_dir: str | Path, *, train_pairs: int = 40000, valid_pairs: int = 256,
                  seed: int = 1234) -> dict[str, Path]:
    """Write tokenizer/, config.json, train.jsonl and valid.jsonl under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    config = dict(TINY_MODEL, vocab_size=len(tokenizer),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = random.Random(seed)
    seen: set[str] = set()
    paths = {}
    for name, count in (("valid", valid_pairs), ("train", train_pairs)):
        rows = []
        while len(rows) < count:
            row = make_pair(rng)
            if row["prompt"] in seen:  # held-out prompts never appear in training
                continue
            seen.add(row["prompt"])
            rows.append(row)
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[name] = path
    return {"tokenizer": out / "tokenizer", "config": out / "config.json", **paths}
