"""Where preference rows come from: JSONL files, or anything Hugging Face ``datasets`` reads.

``--train-data-path`` / ``--valid-data-path`` name one of:

* a ``.jsonl`` file: read line by line here, so a bad line is reported with its number;
* a ``.json`` file (JSON lines or one JSON array) or a ``.parquet`` file: ``datasets``'s
  ``json`` / ``parquet`` builders;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``:
  ``datasets.load_from_disk`` (a ``DatasetDict`` takes ``--train-split`` / ``--valid-split``);
* a Hugging Face Hub dataset name (``princeton-nlp/llama3-ultrafeedback-armorm``) with its split
  and ``--dataset-config``: ``datasets.load_dataset``, which honours ``HF_DATASETS_OFFLINE=1``
  and its cache.

``read_prompt_rows`` reads the prompts alone (on-policy pairs are sampled from them).
Columns are ``prompt`` / ``chosen`` / ``rejected`` unless mapped (``--prompt-column`` etc.; e.g.
NeMo-Aligner's ``chosen_response`` / ``rejected_response``); other columns are ignored. Every row
carries where it came from (``file:line``, or ``source[split] row N``) for error messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_simpo.data.config import DataError

FILE_KINDS = ("jsonl", "json", "parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class SourceError(ValueError):
    """A data source that cannot be read; the message names it (and the row)."""


TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
"""Optional columns a preference row passes to the chat template (TRL's names and meaning):
read where a source has them, under these names."""


def without_filled_nulls(value):
    """A ``TEMPLATE_COLUMNS`` value as read from Arrow (Parquet, Arrow, the Hub), without the
    null keys Arrow adds: one struct type holds every row's objects, so a tool schema or
    template argument that one row has appears in every other row as null (``"x": null`` in
    the rendered schemas, an argument a template finds defined). Dropped, as a JSONL row that
    never had them reads; a JSON-text column (a string) is read as written."""
    if isinstance(value, dict):
        return {k: without_filled_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_filled_nulls(v) for v in value]
    return value


def column_value(name: str, value, encoded: bool):
    """A row's value of column ``name`` as ``rows_dataset`` gives it: JSON text where the
    dataset is ``encoded`` (JSONL), else as Arrow holds it, the template columns without the
    null keys Arrow fills in (``without_filled_nulls``)."""
    if encoded:
        return json.loads(value)
    return without_filled_nulls(value) if name in TEMPLATE_COLUMNS else value


@dataclass(frozen=True)
class ColumnMap:
    """Which columns hold the prompt and the two responses."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    def __iter__(self):
        return iter((("prompt", self.prompt), ("chosen", self.chosen),
                     ("rejected", self.rejected)))


def kind_of(source: str) -> str:
    """jsonl, json, parquet, arrow (a save_to_disk folder) or hub; refuses what is none."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            return "arrow"
        raise SourceError(f"{source}: a folder, but not one written by Dataset.save_to_disk "
                          "(no dataset_info.json / dataset_dict.json)")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".jsonl", ".json", ".parquet"):
            return suffix[1:]
        raise SourceError(f"{source}: unknown data file type {suffix or '(no suffix)'} "
                          "(.jsonl, .json, .parquet, a save_to_disk folder, or a Hub dataset name)")
    if suffix in (".jsonl", ".json", ".parquet") or "/" in source and source.startswith(("/", ".")):
        raise SourceError(f"{source} does not exist")
    if _HUB_NAME.match(source):
        return "hub"
    raise SourceError(f"{source} does not exist")


def where_of(source: str, kind: str, split: str) -> str:
    """How a source is named in messages: a file by its path, anything else with its split."""
    return source if kind in FILE_KINDS else f"{source}[{split}]"


def row_source(where: str, index: int) -> str:
    """Where row ``index`` of a source without line numbers came from."""
    return f"{where} row {index}"


def rows_dataset(source: str, kind: str, *, split: str, columns: ColumnMap = ColumnMap(),
                 dataset_config: str | None = None):
    """The one choice of a source's reader: (``datasets.Dataset`` with the columns prompt,
    chosen, rejected, whether their values are JSON-encoded). JSONL is read by our own reader
    for line numbers in errors (a ``source`` column holds ``file:line``); its values are
    JSON-encoded so that rows of mixed shapes (a string here, messages there) make one Arrow
    column. Rows of other sources are named by ``row_source``."""
    if kind == "jsonl":
        import datasets

        rows = read_preference_rows(source, columns)
        names = ("prompt", "chosen", "rejected") + tuple(
            name for name in TEMPLATE_COLUMNS if any(name in row for row in rows))
        return datasets.Dataset.from_dict(
            {"source": [row["source"] for row in rows],
             **{name: [json.dumps(row.get(name)) for row in rows] for name in names}}), True
    dataset, _ = open_dataset(source, kind, split=split, columns=columns,
                              dataset_config=dataset_config)
    return dataset, False


def read_rows(source: str, *, split: str, columns: ColumnMap = ColumnMap(),
              dataset_config: str | None = None) -> list[dict]:
    """Rows as ``{prompt, chosen, rejected, source}`` dicts, columns mapped."""
    kind = kind_of(source)
    dataset, encoded = rows_dataset(source, kind, split=split, columns=columns,
                                    dataset_config=dataset_config)
    where = where_of(source, kind, split)
    names = [name for name in ("prompt", "chosen", "rejected") + TEMPLATE_COLUMNS
             if name in dataset.column_names]
    return [{**{name: column_value(name, row[name], encoded) for name in names},
             "source": row["source"] if encoded else row_source(where, index)}
            for index, row in enumerate(dataset)]


def _jsonl_objects(path: Path):
    """(where, row) for each non-blank line of a JSONL file; every problem is reported with
    the file and line number."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
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
            if "\\u" in line.lower() and _has_lone_surrogate(row):
                raise DataError(f"{where}: a \\uXXXX escape of half a surrogate pair (e.g. a "
                                 "cut emoji) is not Unicode text")
            yield where, row


def _has_lone_surrogate(value) -> bool:
    """A string of ``value`` (nested) holds an unpaired surrogate: JSON allows its escape,
    tokenizers cannot encode it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_preference_rows(path: str | Path, columns=None) -> list[dict]:
    """Rows of a JSONL file, columns mapped (``ColumnMap``); every problem is reported
    with the file and line number."""
    columns = columns or ColumnMap()
    rows = []
    for where, row in _jsonl_objects(Path(path)):
        missing = [name for _, name in columns if name not in row]
        if missing:
            raise DataError(f"{where}: missing column(s) {', '.join(missing)}")
        rows.append({**{ours: row[theirs] for ours, theirs in columns},
                     **{name: row[name] for name in TEMPLATE_COLUMNS if name in row},
                     "source": where})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_prompt_rows(source: str, *, split: str, prompt_column: str = "prompt",
                     dataset_config: str | None = None) -> list[dict]:
    """Prompts only, from any source the trainer reads (``kind_of``): ``{prompt, prompt_id,
    source}`` dicts, ``prompt_id`` the source's own column of that name where it has one (the
    UltraFeedback sets do), else None. Other columns (responses among them) are ignored."""
    kind = kind_of(source)
    if kind == "jsonl":
        rows = []
        for where, row in _jsonl_objects(Path(source)):
            if prompt_column not in row:
                raise DataError(f"{where}: missing column {prompt_column} (--prompt-column)")
            _no_template_options(row, where)
            rows.append({"prompt": row[prompt_column], "prompt_id": row.get("prompt_id"),
                         "source": where})
        if not rows:
            raise DataError(f"{source}: no rows")
        return rows
    dataset, where = open_source(source, kind, split, dataset_config)
    if prompt_column not in dataset.column_names:
        raise SourceError(f"{where}: missing column {prompt_column!r} (has "
                          f"{', '.join(dataset.column_names)}; map it with --prompt-column)")
    if len(dataset) == 0:
        raise SourceError(f"{where}: no rows")
    for name in TEMPLATE_COLUMNS:
        if name in dataset.column_names:
            for index, value in enumerate(dataset[name]):
                _no_template_options({name: value}, row_source(where, index))
    ids = dataset["prompt_id"] if "prompt_id" in dataset.column_names else [None] * len(dataset)
    return [{"prompt": prompt, "prompt_id": prompt_id, "source": row_source(where, index)}
            for index, (prompt, prompt_id) in enumerate(zip(dataset[prompt_column], ids))]


def _no_template_options(row: dict, where: str) -> None:
    """Prompts are sampled without a row's tools or template arguments (on-policy pairs): a
    row that has them is refused, rather than sampled from another prompt than it names."""
    for name in TEMPLATE_COLUMNS:
        if row.get(name) not in (None, "", [], {}):
            raise DataError(f"{where}: column {name!r}: on-policy sampling renders prompts "
                            "without the chat template's tools or arguments; remove the column "
                            "(or its values) to sample these prompts without them")


def open_dataset(source: str, kind: str, *, split: str, columns: ColumnMap = ColumnMap(),
                 dataset_config: str | None = None):
    """(``datasets.Dataset`` with the columns prompt, chosen, rejected, and those of
    ``TEMPLATE_COLUMNS`` it has; how to name it in messages) for a source that ``datasets``
    reads (not JSONL)."""
    dataset, where = open_source(source, kind, split, dataset_config)
    missing = [f"{name!r}" for _, name in columns if name not in dataset.column_names]
    if missing:
        raise SourceError(f"{where}: missing column(s) {', '.join(missing)} (has "
                          f"{', '.join(dataset.column_names)}; map them with --prompt-column, "
                          "--chosen-column, --rejected-column)")
    if len(dataset) == 0:
        raise SourceError(f"{where}: no rows")
    dataset = dataset.select_columns([name for _, name in columns] + [
        name for name in TEMPLATE_COLUMNS if name in dataset.column_names
        and name not in (theirs for _, theirs in columns)])
    renames = {theirs: ours for ours, theirs in columns if theirs != ours}
    if renames:
        # Through temporary names: a mapping may swap names (e.g. chosen <-> rejected).
        dataset = dataset.rename_columns({theirs: f"__{ours}" for theirs, ours in renames.items()})
        dataset = dataset.rename_columns({f"__{ours}": ours for ours in renames.values()})
    return dataset, where


def open_source(source: str, kind: str, split: str, dataset_config: str | None):
    """(datasets.Dataset, how to name it) for a non-JSONL source."""
    import datasets

    try:
        if kind in ("json", "parquet"):
            return datasets.load_dataset(kind, data_files=source, split="train"), source
        if kind == "arrow":
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise SourceError(f"{source}: no split {split!r} (has "
                                      f"{', '.join(loaded)})")
                return loaded[split], f"{source}[{split}]"
            return loaded, source
        return (datasets.load_dataset(source, dataset_config, split=split),
                f"{source}[{split}]")
    except SourceError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(f"cannot read {source}" + (f" (split {split!r})" if kind == "hub" else "")
                          + f": {reason}") from None
    except Exception as error:  # datasets raises its own types (DatasetNotFoundError, ...)
        if type(error).__module__.startswith("datasets"):
            reason = str(error).strip().splitlines()[0]
            raise SourceError(f"cannot read {source}: {reason}") from None
        raise
