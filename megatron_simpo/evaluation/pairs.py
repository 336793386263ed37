"""On-policy preference pairs: which samples make the pair, and the file they go to.

The SimPO v0.2 recipe (princeton-nlp/SimPO, ``on_policy_data_gen/``): N samples per prompt from
the model being tuned, each scored by a reward model; chosen = the best sample, rejected = the
worst; prompts whose samples are all the same text are dropped. The rule here (``choose``):

    chosen = argmax(scores), rejected = argmin(scores)   (first index on equal scores)
    dropped "identical": all samples are the same text (not scored, as the authors' post_process)
    dropped "tie":       max(scores) == min(scores), or chosen and rejected are the same text
    dropped "empty":     chosen or rejected is empty (the trainer refuses empty responses)

Rows follow the authors' datasets (princeton-nlp/llama3-ultrafeedback-armorm; ``COLUMNS``):
``prompt_id`` (the source's own, else UltraFeedback's rule: SHA-256 of the prompt text),
``prompt`` (as the source holds it: a string, or a list of messages), ``all_generated_responses``
(strings, one per seed), ``all_rm_scores`` (float64s), ``chosen`` / ``rejected`` (the prompt's
messages then the assistant's response, each ``{"content", "role"}``), so the trainer reads the
file with no column flags (a response that repeats its prompt is cut there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

COLUMNS = ("prompt_id", "prompt", "all_generated_responses", "all_rm_scores", "chosen",
           "rejected")


def prompt_id_of(prompt) -> str:
    """UltraFeedback's prompt_id: the SHA-256 hex digest of the prompt's UTF-8 text (a message
    list: of its JSON)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Choice:
    """Which samples make the pair, or why the prompt is dropped."""

    chosen: int | None
    rejected: int | None
    dropped: Literal["identical", "tie", "empty"] | None = None


def all_identical(responses: list[str]) -> bool:
    return len(set(responses)) == 1


def choose(responses: list[str], scores: list[float] | None) -> Choice:
    """The pair by the rule in the module docstring; ``scores`` may be None only for samples
    that are all identical (they are never scored)."""
    if all_identical(responses):
        return Choice(None, None, "identical")
    if scores is None or len(scores) != len(responses):
        raise ValueError(f"{len(responses)} samples need as many scores, got {scores!r}")
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] == scores[worst] or responses[best] == responses[worst]:
        return Choice(None, None, "tie")
    if not responses[best].strip() or not responses[worst].strip():
        return Choice(None, None, "empty")
    return Choice(best, worst)


def _message(message: dict) -> dict:
    return {"content": str(message["content"]), "role": str(message["role"])}


def pair_record(prompt_id: str, prompt, messages: list[dict], responses: list[str],
                scores: list[float], choice: Choice, *, prompt_as_messages: bool = False) -> dict:
    """One row in the authors' schema (``COLUMNS``); the prompt as messages where it is not
    text (or ``prompt_as_messages``: a source mixing both kinds makes one column type)."""
    context = [_message(m) for m in messages]
    as_text = isinstance(prompt, str) and not prompt_as_messages
    return {"prompt_id": prompt_id, "prompt": prompt if as_text else context,
            "all_generated_responses": list(responses),
            "all_rm_scores": [float(s) for s in scores],
            "chosen": context + [{"content": responses[choice.chosen], "role": "assistant"}],
            "rejected": context + [{"content": responses[choice.rejected], "role": "assistant"}]}


def features(prompt_is_text: bool):
    """The authors' column types (``datasets.Features``): strings, a list of strings, a list of
    float64s, lists of {content, role} structs (the prompt too, where it is messages)."""
    import datasets

    message = {"content": datasets.Value("string"), "role": datasets.Value("string")}
    return datasets.Features({
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string") if prompt_is_text else datasets.List(message),
        "all_generated_responses": datasets.List(datasets.Value("string")),
        "all_rm_scores": datasets.List(datasets.Value("float64")),
        "chosen": datasets.List(message),
        "rejected": datasets.List(message)})


def output_kind(output: str | Path) -> Literal["jsonl", "parquet", "arrow"]:
    """By the name: .jsonl, .parquet, or (anything else) a ``save_to_disk`` folder."""
    suffix = Path(output).suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        return suffix[1:]
    if suffix in (".json", ".csv", ".arrow"):
        raise ValueError(f"--output {output}: write .jsonl, .parquet, or a folder name "
                         "(Dataset.save_to_disk)")
    return "arrow"


def write_pairs(rows: list[dict], output: str | Path, *, prompt_is_text: bool = True) -> Path:
    """Write ``rows`` to ``output`` (``output_kind``) whole or not at all: into a temporary
    name next to it, then renamed."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    kind = output_kind(output)
    if kind == "jsonl":
        partial.write_text("".join(json.dumps({c: r[c] for c in COLUMNS}, ensure_ascii=False)
                                   + "\n" for r in rows), encoding="utf-8")
    else:
        import datasets

        table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS},
                                           features=features(prompt_is_text))
        if kind == "parquet":
            table.to_parquet(str(partial))
        else:
            table.save_to_disk(str(partial))
    os.replace(partial, output)
    return output
