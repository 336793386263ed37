"""What the data path is told (``DataConfig``) and the error it raises on bad data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class DataError(ValueError):
    """Bad preference data; the message names the file and line (or the setting) at fault."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the pairs come from and how they are cut to length."""

    train_data_path: str
    """Preference pairs: a .jsonl/.json/.parquet file, a Dataset.save_to_disk folder or a
    Hugging Face Hub dataset name; columns prompt, chosen, rejected (strings or lists of
    {role, content} messages)."""
    valid_data_path: str | None = None
    """Held-out pairs (same kinds of source); without it, valid_fraction of the training
    pairs is held out."""
    train_split: str = "train"
    """Split of a Hub dataset or DatasetDict folder to train on."""
    valid_split: str = "test"
    """Split of --valid-data-path (Hub dataset or DatasetDict folder) to evaluate on."""
    dataset_config: str | None = None
    """Configuration (subset) name of a Hub dataset."""
    prompt_column: str = "prompt"
    """Column holding the prompt."""
    chosen_column: str = "chosen"
    """Column holding the preferred response (NeMo-Aligner: chosen_response)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred response (NeMo-Aligner: rejected_response)."""
    valid_fraction: float = 0.0
    """Share of the training rows held out (seeded) when no validation file is given."""
    tokenizer_path: str | None = None
    """Hugging Face tokenizer folder; its chat template is applied (default: the checkpoint's)."""
    apply_chat_template: bool = True
    """Render rows with the tokenizer's chat template. --no-apply-chat-template takes the
    columns as text already formatted (e.g. NeMo-Aligner JSONL with its template baked in):
    prompt + response is encoded as one text with the tokenizer's special tokens (one BOS, also
    where the text starts with it), the response is what follows the prompt's tokens, and EOS
    is appended unless the response ends with it."""
    seq_length: int = 2048
    """Most tokens of prompt + response (the paper's max length); responses are cut on the
    right to fit."""
    max_prompt_length: int = 1800
    """Most prompt tokens; longer prompts lose tokens on the left (a leading BOS is kept)."""
    data_cache_dir: str | None = None
    """Where tokenized pairs are kept (Arrow, memory-mapped by every rank; one folder per
    source and setting, reused by later runs); default $XDG_CACHE_HOME/megatron_simpo/data
    (~/.cache/...). On a disk that all nodes share, one rank builds it; on local disks, one rank
    per node."""
    rebuild_data_cache: bool = False
    """Tokenize the sources again even when the cache holds sound entries for them (rank 0
    replaces them). Damaged, half-built or stale entries are rebuilt without it."""
    dataset_num_proc: int | None = None
    """Processes that tokenize a source the first time (datasets.map's num_proc); default one
    per 10,000 rows, at most the CPU count."""
    identical_pairs: Literal["drop", "refuse"] = "drop"
    """Pairs whose chosen and rejected responses are the same tokens teach nothing: drop them
    (counted, with a warning), or refuse the data naming the first one."""

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2, got {self.seq_length}")
        if not 1 <= self.max_prompt_length < self.seq_length:
            raise ValueError(f"--max-prompt-length ({self.max_prompt_length}) must be >= 1 and "
                             f"less than --seq-length ({self.seq_length})")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"--dataset-num-proc must be >= 1, got {self.dataset_num_proc}")
        if self.valid_data_path and self.valid_fraction > 0:
            raise ValueError("give --valid-data-path or --valid-fraction, not both (a held-out "
                             "share of the training pairs is only taken without a validation "
                             "source)")
        if not self.valid_data_path and self.valid_split != "test":
            raise ValueError(f"--valid-split {self.valid_split} applies to --valid-data-path, "
                             "which is not given")
        if self.identical_pairs not in ("drop", "refuse"):
            raise ValueError(f"--identical-pairs must be drop or refuse, got {self.identical_pairs!r}")

