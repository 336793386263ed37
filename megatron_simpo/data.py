"""Preference batches: the pair layout the step consumes.

A batch holds n pairs as 2n rows, interleaved: row 2i is pair i's chosen response, row 2i+1
its rejected one, each preceded by the same prompt. Interleaving keeps both halves of a pair in
the same micro-batch whatever the split, so a pair never straddles micro-batches or ranks.

For a token sequence ``full = prompt + response`` of length L, the model reads
``tokens = full[:-1]`` and is scored on ``labels = full[1:]``; ``loss_mask`` is 1 exactly on the
positions whose label is a response token. Rows are right-padded to a common length; under the
causal mask real tokens never attend to the padding that follows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from megatron_simpo.batching import round_up

@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids (the prompt already carries the chat template)."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class PreferenceBatch:
    """The sequences of n pairs, 2n of them: sequence 2i is pair i's chosen response, 2i+1 its
    rejected one. Unpacked (the default), sequence j is row j and tensors are [2n, s]. Packed,
    the sequences lie back to back in one row ([1, s] tensors): ``sequence_ids`` says which
    sequence each position belongs to, ``cu_seqlens`` where each segment starts."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    reference_logp_sum: torch.Tensor | None = None
    """[2n] summed response log-probs of the frozen reference model (dpo, ipo, rdpo), from its
    forward pass or precomputed (--reference-logps)."""
    sequence_ids: torch.Tensor | None = None
    """Packed only: [1, s] the sequence (0 .. 2n-1) of each position; 0 on the padding tail,
    whose loss mask is 0."""
    cu_seqlens: torch.Tensor | None = None
    """Packed only: [segments + 1] int32 segment starts in the row (the 2n sequences, then the
    padding tail if any), as Transformer Engine's THD layout takes them."""
    attention_mask: torch.Tensor | None = None
    """Packed for the local layer spec: [1, 1, s, s] bool, True where a position may NOT attend
    (another sequence, or the future): block-diagonal causal."""
    packed_pairs: int = 0
    """Packed only: the number of pairs in the row."""
    longest_segment: int = 0
    """Packed only: the longest segment of ``cu_seqlens`` (THD's max_seqlen, known on the host
    so that the forward never reads it back from the device)."""

    @property
    def packed(self) -> bool:
        return self.sequence_ids is not None

    @property
    def num_sequences(self) -> int:
        return 2 * self.packed_pairs if self.packed else self.tokens.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.num_sequences // 2

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def split(self, num_microbatches: int) -> list["PreferenceBatch"]:
        """Equal micro-batches of whole pairs, in order."""
        if self.num_pairs % num_microbatches != 0:
            raise ValueError(f"{self.num_pairs} pairs do not split into {num_microbatches} micro-batches")
        rows = 2 * self.num_pairs // num_microbatches
        return [self.rows(i * rows, (i + 1) * rows) for i in range(num_microbatches)]

    def rows(self, start: int, stop: int) -> "PreferenceBatch":
        if self.packed:
            raise ValueError("a packed batch is one row: it does not split into pairs by rows")
        if start % 2 or stop % 2:
            raise ValueError("row ranges must cover whole pairs (even bounds)")
        ref = None if self.reference_logp_sum is None else self.reference_logp_sum[start:stop]
        return PreferenceBatch(self.tokens[start:stop], self.labels[start:stop],
                               self.loss_mask[start:stop], self.position_ids[start:stop], ref)

    def to(self, device: torch.device) -> "PreferenceBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def with_reference(self, reference_logp_sum: torch.Tensor) -> "PreferenceBatch":
        return replace(self, reference_logp_sum=reference_logp_sum)


def _sequence(pair: TokenizedPair, index: int, offset: int, limit: int) -> tuple[torch.Tensor, int]:
    """(prompt + response tokens, prompt length) of a pair's chosen (offset 0) or rejected row."""
    which = "chosen" if offset == 0 else "rejected"
    response = pair.chosen if offset == 0 else pair.rejected
    if len(pair.prompt) == 0:
        raise ValueError(f"pair {index}: empty prompt (need at least one token, e.g. BOS)")
    if len(response) == 0:
        raise ValueError(f"pair {index}: empty {which} response")
    full = torch.from_numpy(np.concatenate([np.asarray(pair.prompt, dtype=np.int64),
                                            np.asarray(response, dtype=np.int64)]))
    if len(full) - 1 > limit:
        raise ValueError(f"pair {index}: prompt + {which} is {len(full)} tokens, more than "
                         f"seq_length + 1 = {limit + 1}")
    return full, len(pair.prompt)


def collate_pairs(pairs: Sequence[TokenizedPair], seq_length: int, pad_id: int = 0
                  ) -> PreferenceBatch:
    """Lay out pairs as interleaved, right-padded rows of exactly ``seq_length`` positions.

    Each prompt + response must have at least one prompt token, a non-empty response and at most
    ``seq_length + 1`` tokens (truncation is the dataset's job, before this point).
    """
    n_rows = 2 * len(pairs)
    tokens = torch.full((n_rows, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n_rows, seq_length), dtype=torch.float32)
    for index, pair in enumerate(pairs):
        for offset in (0, 1):
            full, prompt_length = _sequence(pair, index, offset, seq_length)
            row, length = 2 * index + offset, len(full) - 1
            tokens[row, :length] = full[:-1]
            labels[row, :length] = full[1:]
            loss_mask[row, prompt_length - 1:length] = 1.0
    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(n_rows, -1)
    return PreferenceBatch(tokens, labels, loss_mask, position_ids.contiguous())


def collate_packed(pairs: Sequence[TokenizedPair], length: int, pad_id: int = 0, *,
                   attention_mask: bool = True) -> PreferenceBatch:
    """Lay out pairs back to back in ONE row of ``length`` positions: chosen 0, rejected 0,
    chosen 1, ... then padding. Position ids restart at 0 for every sequence.

    ``attention_mask`` builds the explicit block-diagonal causal mask the local layer spec uses;
    without it the row is for Transformer Engine's THD layout (``cu_seqlens`` alone).
    """
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    labels = torch.full((1, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, length), dtype=torch.float32)
    position_ids = torch.zeros((1, length), dtype=torch.long)
    sequence_ids = torch.zeros((1, length), dtype=torch.long)
    starts, at = [0], 0
    for index, pair in enumerate(pairs):
        for offset in (0, 1):
            full, prompt_length = _sequence(pair, index, offset, length)
            size = len(full) - 1
            if at + size > length:
                raise ValueError(f"packed pairs need more than {length} positions")
            tokens[0, at:at + size] = full[:-1]
            labels[0, at:at + size] = full[1:]
            loss_mask[0, at + prompt_length - 1:at + size] = 1.0
            position_ids[0, at:at + size] = torch.arange(size)
            sequence_ids[0, at:at + size] = 2 * index + offset
            at += size
            starts.append(at)
    if at < length:  # the padding tail is a segment of its own: it attends only to itself
        position_ids[0, at:] = torch.arange(length - at)
        starts.append(length)
    cu_seqlens = torch.tensor(starts, dtype=torch.int32)
    mask = None
    if attention_mask:
        segment = torch.repeat_interleave(torch.arange(len(starts) - 1),
                                          cu_seqlens.diff().long())
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = ~(causal & (segment.unsqueeze(0) == segment.unsqueeze(1)))
        mask = mask.view(1, 1, length, length)
    return PreferenceBatch(tokens, labels, loss_mask, position_ids, None, sequence_ids,
                           cu_seqlens, mask, packed_pairs=len(pairs),
                           longest_segment=int(cu_seqlens.diff().max()))


def collate_microbatch(pairs: Sequence[TokenizedPair], microbatch, pad_id: int = 0, *,
                       attention_mask: bool = True) -> PreferenceBatch:
    """The pairs ``microbatch`` (a ``batching.Microbatch``) names, taken from ``pairs``: padded
    rows of its length, or its packed row (``attention_mask`` as in ``collate_packed``)."""
    chosen = [pairs[i] for i in microbatch.pairs]
    if microbatch.packed:
        return collate_packed(chosen, microbatch.length, pad_id, attention_mask=attention_mask)
    return collate_pairs(chosen, microbatch.length, pad_id)


# ---- JSONL preference data ------------------------------------------------------------------

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
    the prompt is encoded with the tokenizer's special tokens (its BOS), each response as text
    followed by EOS."""
    seq_length: int = 2048
    """Most tokens of prompt + response (the paper's max length); responses are cut on the
    right to fit."""
    max_prompt_length: int = 1800
    """Most prompt tokens; longer prompts lose tokens on the left."""
    data_cache_dir: str | None = None
    """Where tokenized pairs are kept (Arrow, memory-mapped by every rank; one folder per
    source and setting, reused by later runs); default $XDG_CACHE_HOME/megatron_simpo/data
    (~/.cache/...). On a disk that all nodes share, one rank builds it; on local disks, one rank
    per node."""
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
        if self.identical_pairs not in ("drop", "refuse"):
            raise ValueError(f"--identical-pairs must be drop or refuse, got {self.identical_pairs!r}")


def read_preference_rows(path: str | Path, columns=None) -> list[dict]:
    """Rows of a JSONL file, columns mapped (``sources.ColumnMap``); every problem is reported
    with the file and line number."""
    from megatron_simpo.sources import ColumnMap

    columns = columns or ColumnMap()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at "
                                 f"column {error.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object")
            missing = [name for _, name in columns if name not in row]
            if missing:
                raise DataError(f"{where}: missing column(s) {', '.join(missing)}")
            rows.append({**{ours: row[theirs] for ours, theirs in columns}, "source": where})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _messages(value, where: str, column: str, roles: tuple[str, ...] = ()) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if column == "prompt" else \
               [{"role": "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                       for m in value):
        unknown = sorted({str(m["role"]) for m in value} - set(roles)) if roles else []
        if unknown:
            raise DataError(f"{where}: column {column!r} has messages with unknown role(s) "
                             f"{', '.join(map(repr, unknown))} (known: {', '.join(roles)})")
        return list(value)
    raise DataError(f"{where}: column {column!r} must be a string or a list of "
                     f"{{role, content}} messages")


def known_roles(tokenizer) -> tuple[str, ...]:
    """Message roles a prompt may use: system, user, assistant, and tool where the chat
    template renders tool messages."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return ("system", "user", "assistant") + (("tool",) if "tool" in template else ())


def _response_messages(prompt: list[dict], value, where: str, column: str) -> list[dict]:
    """The assistant turn(s) of a response; a full conversation repeating the prompt is cut."""
    messages = _messages(value, where, column)
    if messages[:len(prompt)] == prompt and len(messages) > len(prompt):
        messages = messages[len(prompt):]
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise DataError(f"{where}: column {column!r} must hold assistant message(s) after the prompt")
    if not any(str(m["content"]).strip() for m in messages):
        raise DataError(f"{where}: empty {column} response")
    return messages


@dataclass(frozen=True)
class TokenizedRow:
    """One row after the chat template, tokenization and truncation, with what happened to it."""

    source: str
    """Where the row came from (file:line, or source[split] row N)."""
    pair: TokenizedPair
    identical: bool
    """Chosen and rejected are the same tokens after truncation (such a pair teaches nothing)."""
    prompt_cut: bool
    """The prompt lost tokens on the left (--max-prompt-length)."""
    responses_cut: int
    """How many of the two responses lost tokens on the right (--seq-length)."""


def tokenize_records(rows: list[dict], tokenizer, config: DataConfig) -> list[TokenizedRow]:
    """Apply the chat template, tokenize, and truncate: prompt from the left, response from the
    right. Every row comes back (identical pairs flagged, not dropped); a bad row raises
    DataError naming it.

    The response tokens are what the template adds after the generation prompt (Llama-3: the
    answer and ``<|eot_id|>``); without a chat template the prompt is encoded with the
    tokenizer's special tokens and the response gets the EOS token appended.
    """
    has_template = uses_chat_template(tokenizer, config.apply_chat_template)
    roles = known_roles(tokenizer)
    prompts, fulls = [], []
    for row in rows:
        where = row["source"]
        prompt = _messages(row["prompt"], where, "prompt", roles)
        if not any(str(m["content"]).strip() for m in prompt):
            raise DataError(f"{where}: empty prompt")
        responses = [_response_messages(prompt, row[c], where, c) for c in ("chosen", "rejected")]
        prompts.append(prompt)
        if has_template:
            fulls.extend(prompt + r for r in responses)
        else:
            fulls.extend("".join(str(m["content"]) for m in r) for r in responses)
    if not rows:
        return []
    # One batched call per kind: the template is rendered far faster than row by row.
    prompt_ids = encode_prompts(tokenizer, prompts, apply_chat_template=has_template)
    if has_template:
        fulls = tokenizer.apply_chat_template(fulls, tokenize=False)
        full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        full_ids = [ids + eos for ids in tokenizer(fulls, add_special_tokens=False)["input_ids"]]
    records = []
    for index, row in enumerate(rows):
        prompt = prompt_ids[index]
        answers = []
        for offset, column in enumerate(("chosen", "rejected")):
            full = full_ids[2 * index + offset]
            if has_template:
                if full[:len(prompt)] != prompt:
                    raise DataError(f"{row['source']}: the chat template does not render the "
                                     f"prompt as a prefix of the conversation; cannot find the "
                                     f"{column} response tokens")
                full = full[len(prompt):]
            answers.append(full)
        kept_prompt = prompt[-config.max_prompt_length:]
        budget = config.seq_length - len(kept_prompt)
        chosen, rejected = (answer[:budget] for answer in answers)
        for column, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer:
                raise DataError(f"{row['source']}: empty {column} response after tokenization")
        records.append(TokenizedRow(row["source"], TokenizedPair(kept_prompt, chosen, rejected),
                                    identical=chosen == rejected,
                                    prompt_cut=len(kept_prompt) < len(prompt),
                                    responses_cut=sum(len(a) > budget for a in answers)))
    return records


def uses_chat_template(tokenizer, apply_chat_template: bool = True) -> bool:
    """Whether prompts are rendered with a chat template: asked for, and the tokenizer has one."""
    return apply_chat_template and getattr(tokenizer, "chat_template", None) is not None


def encode_prompts(tokenizer, conversations: list[list[dict]], *,
                   apply_chat_template: bool = True) -> list[list[int]]:
    """Token ids of prompts exactly as training sees them: the chat template with the
    generation prompt, encoded without adding special tokens again (the template's BOS is the
    only one); without a template (none, or not applied), the messages' text with the
    tokenizer's special tokens. Generation for evaluation uses this too, so it never differs
    from training."""
    if uses_chat_template(tokenizer, apply_chat_template):
        rendered = tokenizer.apply_chat_template(conversations, add_generation_prompt=True,
                                                 tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    texts = ["\n".join(str(m["content"]) for m in messages) for messages in conversations]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def identical_pair_error(source: str, config: DataConfig) -> DataError:
    return DataError(f"{source}: chosen and rejected are the same tokens (after truncation to "
                     f"--seq-length {config.seq_length}); such a pair teaches nothing "
                     "(--identical-pairs drop skips them)")


def tokenize_rows(rows: list[dict], tokenizer, config: DataConfig,
                  dropped: list[str] | None = None, cut: dict[str, int] | None = None
                  ) -> list[TokenizedPair]:
    """``tokenize_records``, keeping the pairs: those whose two responses are the same tokens
    are left out and their rows added to ``dropped`` (or refused, as
    ``config.identical_pairs`` says). ``cut`` counts prompts cut on the left (``"prompts"``)
    and responses cut on the right (``"responses"``)."""
    pairs = []
    for record in tokenize_records(rows, tokenizer, config):
        if cut is not None:
            cut["prompts"] += record.prompt_cut
            cut["responses"] += record.responses_cut
        if record.identical:
            if config.identical_pairs == "refuse":
                raise identical_pair_error(record.source, config)
            if dropped is not None:
                dropped.append(record.source)
            continue
        pairs.append(record.pair)
    return pairs


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load tokenizer from {path}: {error}") from error


def held_out_split(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out row indices in the seeded permutation's order, the other rows in file order):
    ``fraction`` of the rows, at least one."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = max(1, int(round(fraction * num_rows)))
    return order[:n_valid], sorted(order[n_valid:])


def load_datasets(config: DataConfig, tokenizer, seed: int, dropped: list[str] | None = None,
                  cut: dict[str, int] | None = None
                  ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train pairs, validation pairs), tokenized; the held-out split is seeded and disjoint.
    Rows left out as identical pairs are added to ``dropped``, truncations counted in ``cut``."""
    from megatron_simpo.sources import ColumnMap, SourceError, read_rows

    columns = ColumnMap(config.prompt_column, config.chosen_column, config.rejected_column)
    try:
        train_rows = read_rows(config.train_data_path, split=config.train_split,
                               columns=columns, dataset_config=config.dataset_config)
        valid_rows = (read_rows(config.valid_data_path, split=config.valid_split,
                                columns=columns, dataset_config=config.dataset_config)
                      if config.valid_data_path else None)
    except SourceError as error:
        raise DataError(str(error)) from None
    if valid_rows is None and config.valid_fraction > 0:
        held_out, kept = held_out_split(len(train_rows), config.valid_fraction, seed)
        valid_rows = [train_rows[i] for i in held_out]
        train_rows = [train_rows[i] for i in kept]
    elif valid_rows is None:
        valid_rows = []
    return tokenize_rows(train_rows, tokenizer, config, dropped, cut), \
        (tokenize_rows(valid_rows, tokenizer, config, dropped, cut) if valid_rows else [])


def length_statistics(pairs: Sequence[TokenizedPair]) -> str:
    """Token counts of a set of pairs (a list, or a data_cache.PairTable, read from its length
    arrays): total, and prompt / response p50, p90, p99, max."""
    if hasattr(pairs, "lengths"):
        prompts = pairs.lengths("prompt")
        responses = np.concatenate([pairs.lengths("chosen"), pairs.lengths("rejected")])
    else:
        prompts = np.array([len(p.prompt) for p in pairs], dtype=np.int64)
        responses = np.array([len(r) for p in pairs for r in (p.chosen, p.rejected)],
                             dtype=np.int64)

    def percentiles(values: np.ndarray) -> str:
        ordered = np.sort(values)
        picks = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)]
        return "/".join(str(int(v)) for v in picks + [ordered[-1]])

    total = int(2 * prompts.sum() + responses.sum())
    return (f"{total} tokens; prompt tokens p50/p90/p99/max {percentiles(prompts)}, response "
            f"tokens {percentiles(responses)}")


def padded_length(pairs: Sequence[TokenizedPair], seq_length: int, multiple: int = 8) -> int:
    """Model input length for a batch: its longest pair (minus the last token), rounded up."""
    longest = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs) - 1
    return min(round_up(longest, multiple), seq_length)


class PairSampler:
    """Deterministic order of pairs by seed and epoch; a position is a count of consumed pairs.

    Each epoch is a fresh seeded permutation of the training pairs; the incomplete last global
    batch of an epoch is dropped. Global batch ``k`` of the run is split into contiguous, disjoint
    shards, one per data-parallel rank. Resuming needs only ``consumed_samples``.
    """

    def __init__(self, num_pairs: int, global_batch_size: int, seed: int):
        if num_pairs < global_batch_size:
            raise DataError(f"the training set has {num_pairs} pairs, fewer than "
                             f"--global-batch-size ({global_batch_size})")
        self.num_pairs, self.global_batch_size, self.seed = num_pairs, global_batch_size, seed
        self.batches_per_epoch = num_pairs // global_batch_size
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_pairs, generator=generator).tolist()
        return self._order

    def global_batch(self, consumed_samples: int) -> list[int]:
        """Indices of the global batch that starts at ``consumed_samples``."""
        if consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed samples {consumed_samples} is not a multiple of the "
                             f"global batch size {self.global_batch_size}")
        batch = consumed_samples // self.global_batch_size
        epoch, within = divmod(batch, self.batches_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start:start + self.global_batch_size]

    @staticmethod
    def shard(indices: list[int], dp_rank: int, dp_size: int) -> list[int]:
        per_rank = len(indices) // dp_size
        return indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
