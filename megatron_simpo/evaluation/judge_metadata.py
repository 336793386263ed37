"""What Arena-Hard's judge reads beside an answer: its length and markdown style.

arena-hard-auto's ``show_result.py`` reads, for its style-controlled leaderboard, the answer's
``token_len``, ``header_count``, ``list_count`` and ``bold_count`` (and, up to ff46f0a, prints
the average ``token_len``), and fits the verdicts on their differences between the two answers
of a battle. Its ``gen_answer.py`` writes them beside single-turn answers, in this order (the
v2 ``show_result.py`` takes them in order: length first):

    {"token_len": int,
     "header_count": {"h1": n, ..., "h6": n},
     "list_count": {"ordered": n, "unordered": n},
     "bold_count": {"**": n, "__": n}}

as ``conv_metadata`` up to ff46f0a (Nov 2024; flags ``--style-control``,
``--length-control-only``, ``--markdown-control-only``), as ``metadata`` since 900183d
("reformat v0.1", Apr 2025) and v2.0 (``--control-features length markdown``).

Counting rules (arena-hard-auto's, restated; ``count_markdown``):

- fenced code goes first: for each span ```...``` (no backtick inside), that inner text is
  deleted wherever it occurs in the answer (arena-hard-auto removes the text by value, so an
  identical run outside the fence goes too; the fences themselves stay and count as nothing);
- ``h<k>``: lines starting with exactly k ``#`` followed by white space;
- ``ordered``: lines starting, after optional white space, with digits, ``.`` and white space;
  ``unordered``: the same with one of ``-``, ``*``, ``+``;
- ``**`` / ``__``: spans ``**text**`` / ``__text__`` whose text has no newline and no ``*``
  (resp. ``_``), counted left to right without overlap;
- ``token_len``: tokens of the whole answer (code included) under a tiktoken encoding, with
  special-token text encoded as plain text: gpt-3.5-turbo's, cl100k_base, up to ff46f0a;
  gpt-4o's, o200k_base, since 900183d (``ENCODINGS``). Machines running this trainer are often
  offline: tiktoken is used when the encoding's file is in the local tiktoken cache (checked
  against its published SHA-256, so nothing is ever fetched); otherwise the model's own
  tokenizer counts, which ``token_counter`` says in its description (the generation log prints
  it). Put the file in ``$TIKTOKEN_CACHE_DIR`` on a machine that has it to get arena-hard-auto's
  own lengths.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

ENCODINGS = {
    "cl100k_base": ("gpt-3.5-turbo",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("gpt-4o", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}
"""tiktoken encoding -> (the model arena-hard-auto names it by, the published SHA-256 of its
file: tiktoken's ``expected_hash``)."""


def encoding_url(encoding: str) -> str:
    """Where tiktoken loads ``encoding`` from (its cache key is this URL's SHA-1)."""
    return f"https://openaipublic.blob.core.windows.net/encodings/{encoding}.tiktoken"


CL100K_URL = encoding_url("cl100k_base")

_FENCED = re.compile(r"```([^`]*)```")
_HEADERS = {f"h{k}": re.compile(rf"^#{{{k}}}\s", re.MULTILINE) for k in range(1, 7)}
_ORDERED = re.compile(r"^\s*\d+\.\s", re.MULTILINE)
_UNORDERED = re.compile(r"^\s*[-*+]\s", re.MULTILINE)
_BOLD = {"**": re.compile(r"\*\*[^*\n]+\*\*"), "__": re.compile(r"__[^_\n]+__")}

TokenCount = Callable[[str], int]


def without_code(text: str) -> str:
    """``text`` with every fenced block's inner text deleted wherever it occurs (the rule above)."""
    for inner in _FENCED.findall(text):
        if inner:
            text = text.replace(inner, "")
    return text


def count_markdown(text: str) -> dict[str, dict[str, int]]:
    """The three style counts of an answer (fenced code removed first)."""
    prose = without_code(text)
    return {
        "header_count": {level: len(p.findall(prose)) for level, p in _HEADERS.items()},
        "list_count": {"ordered": len(_ORDERED.findall(prose)),
                       "unordered": len(_UNORDERED.findall(prose))},
        "bold_count": {mark: len(p.findall(prose)) for mark, p in _BOLD.items()},
    }


def conv_metadata(answer: str, count_tokens: TokenCount) -> dict:
    """Arena-Hard's ``conv_metadata`` (since 900183d: ``metadata``) of a single-turn answer."""
    return {"token_len": count_tokens(answer), **count_markdown(answer)}


def tiktoken_cache_file(encoding: str = "cl100k_base") -> Path | None:
    """Where tiktoken keeps ``encoding`` (its cache rules: ``$TIKTOKEN_CACHE_DIR``, else
    ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``), or None where caching is off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not folder:
        return None
    return Path(folder) / hashlib.sha1(encoding_url(encoding).encode()).hexdigest()


def _cached(encoding: str) -> Path | None:
    """The cached file of ``encoding`` if tiktoken is installed and the file is intact."""
    import importlib.util

    if importlib.util.find_spec("tiktoken") is None:
        return None
    path = tiktoken_cache_file(encoding)
    if path is None or not path.is_file():
        return None
    return path if hashlib.sha256(path.read_bytes()).hexdigest() == ENCODINGS[encoding][1] \
        else None


def token_counter(tokenizer_dir: str | Path,
                  encoding: str = "cl100k_base") -> tuple[TokenCount, str]:
    """(count, how it counts): tiktoken's ``encoding`` when it is cached here, else the tokenizer
    in ``tokenizer_dir`` (no special tokens added)."""
    model = ENCODINGS[encoding][0]
    if _cached(encoding) is not None:
        import tiktoken

        coder = tiktoken.get_encoding(encoding)
        return (lambda text: len(coder.encode(text, disallowed_special=())),
                f"tiktoken {model} ({encoding}), as arena-hard-auto counts")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    where = tiktoken_cache_file(encoding)
    return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            f"the model's tokenizer ({tokenizer_dir}): tiktoken's {encoding} is not in the "
            f"local cache ({where}), so token_len differs from arena-hard-auto's own counts")
