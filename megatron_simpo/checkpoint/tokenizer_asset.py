"""The tokenizer a checkpoint carries (``<iteration>/tokenizer/``): the tokenizer's own files
from the folder it came from, never model weights or other files beside them.

A ``--tokenizer`` or ``--hf-path`` folder is often a whole Hugging Face model folder; a copy of
all of it would put the model's weights into every saved iteration, and an export that copies the
tokenizer's folder would write them (and that model's ``config.json``) over its own.

The model's ``config.json`` travels with the tokenizer (not into an export, which writes its
own): transformers picks a tokenizer's class by the ``model_type`` beside it (Mistral's and
Mixtral's files name ``LlamaTokenizer``, which loads as their ``tokenizer.json`` beside a Mistral
config, but as a rebuilt Llama tokenizer alone, with other token ids around special tokens).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
                   "tekken.json", "tiktoken.model")
"""``tekken.json``: Mistral's own format (Mistral-Nemo, Ministral, Mistral-Small), which
transformers loads in place of ``tokenizer.json`` where mistral-common is installed (vLLM
installs it: ``MistralCommonBackend``) or where the folder has no ``tokenizer.json``; without
it the copy would load as another tokenizer class than the model folder does."""
TOKENIZER_FOLDERS = ("additional_chat_templates",)
"""A tokenizer's named chat templates beside its default one (e.g. ``tool_use``, which
``apply_chat_template`` picks for rows with tools), as transformers saves them."""
MODEL_CONFIG = "config.json"


def tokenizer_entries(folder: str | Path, *, model_config: bool = True) -> list[Path]:
    """The files and folders of ``folder`` that make its tokenizer (``model_config``: with the
    model's config.json, which picks the tokenizer's class)."""
    folder = Path(folder)
    names = TOKENIZER_FILES + ((MODEL_CONFIG,) if model_config else ())
    entries = [folder / name for name in names if (folder / name).is_file()]
    entries += sorted(path for path in folder.glob("*.tiktoken") if path.is_file())
    return entries + [folder / name for name in TOKENIZER_FOLDERS if (folder / name).is_dir()]


def copy_tokenizer(source: str | Path, dest: str | Path, *, model_config: bool = True) -> bool:
    """Copy the tokenizer of ``source`` into ``dest`` (made if needed); False if ``source``
    holds no tokenizer file (nothing is copied then)."""
    entries = tokenizer_entries(source, model_config=model_config)
    if not any(entry.name != MODEL_CONFIG for entry in entries):
        return False
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, dest / entry.name)
    return True
