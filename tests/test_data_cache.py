"""Tokenize once: the Arrow cache equals the in-memory path, is reused, is built by one rank per
node, reports bad rows from its worker processes, and reads pairs without copying them."""

import json
import random

import numpy as np
import pytest

from megatron_simpo.data import cache as data_cache
from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.loading import load_datasets
from megatron_simpo.data.cache import PairTable, prepare_data
from megatron_simpo.model.tiny import build_tokenizer, make_pair
from tests.multiprocess import run_on_ranks


def _rows(n, seed, identical_every=0):
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        row = make_pair(rng)
        if identical_every and index % identical_every == 3:
            row["rejected"] = row["chosen"]
        # Messages in some rows, strings in others (JSONL allows both in one file).
        if index % 2:
            row["chosen"] = [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["chosen"]}]
        rows.append(row)
    return rows


def _uniform(rows):
    """The rows with one Arrow type per column (chosen as strings), for Parquet and Arrow."""
    return [{**r, "chosen": r["chosen"] if isinstance(r["chosen"], str)
             else r["chosen"][1]["content"]} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datasets import Dataset, DatasetDict

    out = tmp_path_factory.mktemp("data")
    train, valid = _rows(300, 0, identical_every=50), _rows(40, 1)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    Dataset.from_list(_uniform(train)).to_parquet(str(out / "train.parquet"))
    DatasetDict(train=Dataset.from_list(_uniform(train)),
                test=Dataset.from_list(_uniform(valid))).save_to_disk(str(out / "arrow"))
    build_tokenizer().save_pretrained(out / "tokenizer")
    return out


def _config(data, tmp_path, train="train.jsonl", **options):
    options.setdefault("seq_length", 48)
    options.setdefault("max_prompt_length", 12)  # some prompts and responses get cut
    return DataConfig(train_data_path=str(data / train), data_cache_dir=str(tmp_path / "cache"),
                      **options)


def _as_lists(pairs):
    return [(list(map(int, p.prompt)), list(map(int, p.chosen)), list(map(int, p.rejected)))
            for p in pairs]


@pytest.mark.parametrize("source, options", [
    ("train.jsonl", dict(valid_data_path="valid.jsonl")),
    ("train.jsonl", dict(valid_fraction=0.2, dataset_num_proc=2)),
    ("train.parquet", dict(valid_fraction=0.1)),
    ("arrow", dict(valid_data_path="arrow", train_split="train", valid_split="test")),
    ("train.jsonl", dict(valid_fraction=0.1, seq_length=18)),
], ids=["jsonl", "jsonl_held_out_2_procs", "parquet", "arrow_dict", "jsonl_responses_cut"])
def test_cached_pairs_equal_the_in_memory_path(data, tmp_path, source, options):
    if "valid_data_path" in options:
        options["valid_data_path"] = str(data / options["valid_data_path"])
    config = _config(data, tmp_path, source, **options)
    tokenizer = build_tokenizer()
    dropped, cut = [], {"prompts": 0, "responses": 0}
    train, valid = load_datasets(config, tokenizer, seed=5, dropped=dropped, cut=cut)
    prepared = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert isinstance(prepared.train, PairTable)
    assert _as_lists(prepared.train) == _as_lists(train)
    assert _as_lists(prepared.valid) == _as_lists(valid)
    assert prepared.dropped == dropped and prepared.cut == cut and cut["prompts"] > 0
    if "seq_length" in options:  # every response loses its end; some pairs become identical
        assert cut["responses"] == 2 * (len(train) + len(valid) + len(dropped)) and dropped
    else:
        assert len(dropped) == 6 and cut["responses"] == 0
    lengths = prepared.train.lengths("chosen")
    assert lengths.tolist() == [len(p[1]) for p in _as_lists(train)]


def test_a_second_preparation_reuses_the_cache_and_never_tokenizes(data, tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    config = _config(data, tmp_path, valid_data_path=str(data / "valid.jsonl"))
    first = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert all(m.startswith("> data: tokenized") for m in first.messages)
    # The same bytes under another name are the same data (its rows are cached anew: messages
    # name the file).
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes((data / "train.jsonl").read_bytes())
    moved = prepare_data(_config(data, tmp_path, train=str(copy),
                                 valid_data_path=str(data / "valid.jsonl")),
                         tokenizer, data / "tokenizer", seed=5)
    assert moved.fingerprint == first.fingerprint

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_cache, "tokenize_records", refuse)
    again = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert all(m.startswith("> data: reusing tokenized") for m in again.messages)
    assert _as_lists(again.train) == _as_lists(first.train)
    assert again.fingerprint == first.fingerprint
    # Anything that changes the pairs is another entry, and another fingerprint.
    for changed in (dict(seq_length=40), dict(max_prompt_length=10),
                    dict(apply_chat_template=False)):
        with pytest.raises(AssertionError, match="tokenized again"):
            prepare_data(_config(data, tmp_path, valid_data_path=str(data / "valid.jsonl"),
                                 **changed), tokenizer, data / "tokenizer", seed=5)
    edited = tmp_path / "edited.jsonl"
    edited.write_text((data / "train.jsonl").read_text().replace("reverse", "revert", 1))
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_data(_config(data, tmp_path, train=str(edited)), tokenizer, data / "tokenizer",
                     seed=5)
    held_out = prepare_data(_config(data, tmp_path, valid_fraction=0.1), tokenizer,
                            data / "tokenizer", seed=5)
    assert held_out.fingerprint != first.fingerprint  # the training pairs are others


def test_bad_rows_are_named_even_from_worker_processes(data, tmp_path):
    rows = _rows(30, 2)
    rows[17]["rejected"] = "   "
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(train_data_path=str(path), data_cache_dir=str(tmp_path / "cache"),
                        seq_length=48, max_prompt_length=12, dataset_num_proc=2)
    with pytest.raises(DataError, match=rf"^{path}:18: empty rejected response$"):
        prepare_data(config, build_tokenizer(), data / "tokenizer", seed=0)
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-built is left behind
    from datasets import Dataset

    Dataset.from_list([{k: v if isinstance(v, str) else v[1]["content"] for k, v in r.items()}
                       for r in rows]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet row 17: empty rejected response$"):
        prepare_data(DataConfig(train_data_path=str(tmp_path / "bad.parquet"),
                                data_cache_dir=str(tmp_path / "cache")),
                     build_tokenizer(), data / "tokenizer", seed=0)
    refuse = _config(data, tmp_path, identical_pairs="refuse")
    with pytest.raises(DataError, match=r"train.jsonl:4: chosen and rejected are the same"):
        prepare_data(refuse, build_tokenizer(), data / "tokenizer", seed=0)


def test_pairs_are_views_of_the_memory_mapped_file(data, tmp_path):
    prepared = prepare_data(_config(data, tmp_path), build_tokenizer(), data / "tokenizer", 0)
    pair = prepared.train[7]
    assert pair.prompt.dtype == np.int32 and not pair.prompt.flags.owndata
    assert all(not v.flags.owndata for column in prepared.train._columns.values()
               for v in column.values)


def test_list_columns_read_across_arrow_chunks():
    import pyarrow as pa

    rng = random.Random(0)
    lists = [[rng.randrange(100) for _ in range(rng.randrange(1, 9))] for _ in range(25)]
    chunks = [lists[0:7], lists[7:8], lists[8:20], lists[20:]]
    column = pa.chunked_array([pa.array(c, type=pa.list_(pa.int32())) for c in chunks])
    table = pa.table({"prompt": column, "chosen": column, "rejected": column,
                      "identical": pa.array([False] * 25)})
    pairs = PairTable(table)
    assert [pairs[i].chosen.tolist() for i in range(25)] == lists
    picked = pairs.subset([24, 3, 9])
    assert [p.prompt.tolist() for p in picked] == [lists[24], lists[3], lists[9]]
    assert picked.lengths("rejected").tolist() == [len(lists[i]) for i in (24, 3, 9)]


def _prepare_on_rank(rank, config_fields, node_local):
    import os

    import torch.distributed as dist

    from megatron_simpo.data.config import DataConfig, DataError

    dist.init_process_group("gloo")  # as runtime.initialize does before the data is read

    fields = dict(config_fields)
    if node_local:  # two "nodes", each with its cache on its own disk
        fields["data_cache_dir"] = f"{fields['data_cache_dir']}/node{rank}"
        os.environ["LOCAL_RANK"] = "0"
    try:
        prepared = prepare_data(DataConfig(**fields), build_tokenizer(), fields["tokenizer_path"],
                                seed=0)
    except DataError as error:
        return f"DataError: {error}"
    return prepared.messages, prepared.fingerprint, _as_lists(prepared.train)


def test_one_rank_per_node_builds_and_every_rank_reads(data, tmp_path):
    fields = dict(train_data_path=str(data / "train.jsonl"), seq_length=48, max_prompt_length=12,
                  data_cache_dir=str(tmp_path / "shared"), tokenizer_path=str(data / "tokenizer"))
    shared = run_on_ranks(2, _prepare_on_rank, fields, False)
    assert shared[0][0][0].startswith("> data: tokenized")
    assert shared[1][0][0].startswith("> data: reusing tokenized")  # rank 0 built it
    assert shared[0][1:] == shared[1][1:]
    local = run_on_ranks(2, _prepare_on_rank, dict(fields, data_cache_dir=str(tmp_path / "local")),
                         True)
    assert all(messages[0].startswith("> data: tokenized") for messages, _, _ in local)
    assert local[0][1:] == local[1][1:] == shared[0][1:]
    # A build error reaches every rank, with the builder's message.
    rows = _rows(10, 3)
    rows[4]["chosen"] = 7
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = run_on_ranks(2, _prepare_on_rank, dict(fields, train_data_path=str(tmp_path / "bad.jsonl")),
                          False)
    assert errors[0] == errors[1] and errors[0].startswith(f"DataError: {tmp_path / 'bad.jsonl'}:5:")


def _damage_between_check_and_read(rank, config_fields):
    """prepare_data on a rank, with the entry's Arrow file changed after rank 0 checked and
    opened it, before rank 1 (which builds nothing) checks it."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    real = data_cache._open

    def damaged_under(folder, key, checked, vocab_size):
        if rank == 0:
            opened = real(folder, key, checked, vocab_size)
            dist.barrier()
            return opened
        dist.barrier()
        path = next((folder / "pairs").glob("*.arrow"))
        with path.open("r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            byte = handle.read(1)[0]
            handle.seek(-1, 1)
            handle.write(bytes([byte ^ 0xFF]))
        return real(folder, key, checked, vocab_size)

    data_cache._open = damaged_under
    try:
        return _prepare_or_its_error(config_fields)
    finally:
        data_cache._open = real


def _prepare_or_its_error(config_fields) -> str | None:
    """prepare_data on this rank: None, or the DataError it ends in, as text."""
    from megatron_simpo.data.config import DataConfig, DataError

    try:
        prepare_data(DataConfig(**config_fields), build_tokenizer(),
                     config_fields["tokenizer_path"], seed=0)
    except DataError as error:
        return f"DataError: {error}"
    return None


def test_an_entry_damaged_under_a_reading_rank_is_refused_on_every_rank(data, tmp_path):
    """A rank that did not build the entry checks it too; damage it finds cannot be repaired
    there (other ranks read the entry): one message on every rank, naming the flag."""
    import re

    fields = dict(train_data_path=str(data / "train.jsonl"), seq_length=48, max_prompt_length=12,
                  data_cache_dir=str(tmp_path / "shared"), tokenizer_path=str(data / "tokenizer"))
    errors = run_on_ranks(2, _damage_between_check_and_read, fields)
    assert errors[0] == errors[1]
    assert re.fullmatch(rf"DataError: the data cache entry {tmp_path}/shared/pairs-[0-9a-f]{{24}} "
                        r"changed after its builder checked it: pairs/data-00000-of-00001\.arrow "
                        r"does not match its checksum \(its bytes changed\); rerun "
                        r"\(--rebuild-data-cache tokenizes it again\)", errors[0]), errors[0]


def _unreadable_on_rank_1(rank, config_fields):
    """prepare_data on a rank, rank 1 unable to read the entry's files (an I/O error: a node
    whose mount of the shared cache failed)."""
    import errno
    import hashlib

    import torch.distributed as dist

    dist.init_process_group("gloo")
    real = hashlib.file_digest

    def failing(handle, digest):
        raise OSError(errno.EIO, "Input/output error")

    if rank == 1:
        hashlib.file_digest = failing
    try:
        return _prepare_or_its_error(config_fields)
    finally:
        hashlib.file_digest = real
        dist.destroy_process_group()


def test_an_entry_one_rank_cannot_read_is_one_message_on_every_rank(data, tmp_path):
    """An OSError while a rank hashes the entry was a traceback on that rank and a collateral
    one on the others (exit code 1): it is now the entry's fault in words, agreed on by every
    rank, as damage is."""
    import re

    fields = dict(train_data_path=str(data / "train.jsonl"), seq_length=48, max_prompt_length=12,
                  data_cache_dir=str(tmp_path / "shared"), tokenizer_path=str(data / "tokenizer"))
    errors = run_on_ranks(2, _unreadable_on_rank_1, fields, timeout=120)
    assert errors[0] == errors[1]
    assert re.search(r"pairs/data-00000-of-00001\.arrow cannot be read \(Input/output error\)",
                     errors[0]), errors[0]


def test_an_unwritable_cache_is_one_clear_line(data, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    config = DataConfig(train_data_path=str(data / "train.jsonl"),
                        data_cache_dir=str(blocked / "cache"))
    with pytest.raises(DataError, match=rf"^cannot write the data cache {blocked}/cache: .* "
                                        r"\(choose another with --data-cache-dir\)$"):
        prepare_data(config, build_tokenizer(), data / "tokenizer", seed=0)


def _offline_hub_cache(root, name, files, monkeypatch):
    """What ``load_dataset(name)`` leaves in datasets' cache after a download (one config,
    "default"), built offline from local Parquet files; datasets then reads ``name`` offline."""
    import glob
    import shutil

    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    builder = Parquet(cache_dir=str(root / "build"), data_files=files,
                      dataset_name=name.split("/")[1], config_name="default")
    builder.download_and_prepare()
    [built] = glob.glob(str(root / "build" / name.split("/")[1] / "*" / "0.0.0"))
    target = root / "hub" / name.replace("/", "___") / "default" / "0.0.0" / "0123456789abcdef"
    shutil.copytree(built, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_a_hub_name_is_read_offline_from_the_local_cache(data, tmp_path, monkeypatch):
    from datasets import Dataset

    valid = _uniform(_rows(40, 1))
    Dataset.from_list(valid).to_parquet(str(tmp_path / "valid.parquet"))
    _offline_hub_cache(tmp_path, "someone/simpo-pairs",
                       {"train": str(data / "train.parquet"),
                        "test": str(tmp_path / "valid.parquet")}, monkeypatch)
    tokenizer = build_tokenizer()
    hub = _config(data, tmp_path, train="train.parquet")
    hub = DataConfig(**{**hub.__dict__, "train_data_path": "someone/simpo-pairs",
                        "valid_data_path": "someone/simpo-pairs"})
    prepared = prepare_data(hub, tokenizer, data / "tokenizer", seed=5)
    assert prepared.messages[0].startswith("> data: tokenized someone/simpo-pairs[train] (300 rows)")
    assert prepared.messages[1].startswith("> data: tokenized someone/simpo-pairs[test] (40 rows)")
    local = _config(data, tmp_path, train="train.parquet",
                    valid_data_path=str(tmp_path / "valid.parquet"))
    train, held_out = load_datasets(local, tokenizer, seed=5)
    assert _as_lists(prepared.train) == _as_lists(train)
    assert _as_lists(prepared.valid) == _as_lists(held_out)
    again = prepare_data(hub, tokenizer, data / "tokenizer", seed=5)  # the same fingerprint
    assert all(m.startswith("> data: reusing") for m in again.messages)
    assert again.fingerprint == prepared.fingerprint


def test_a_warm_start_does_not_hash_the_source_again(data, tmp_path, monkeypatch):
    """Content hashes are remembered beside the cache by (path, size, mtime): an unchanged
    source is not hashed again; one whose modification time changed is."""
    import os

    from megatron_simpo.data import fingerprints

    source = tmp_path / "train.jsonl"
    source.write_bytes((data / "train.jsonl").read_bytes())
    config = _config(data, tmp_path, train=str(source))
    tokenizer = build_tokenizer()
    hashed = []
    real = fingerprints._hash_files

    def counting(root, files):
        hashed.append(root)
        return real(root, files)

    monkeypatch.setattr(fingerprints, "_hash_files", counting)
    first = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert source in hashed and (tmp_path / "cache" / fingerprints.MEMO_FILE).is_file()
    hashed.clear()
    again = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert hashed == [] and again.fingerprint == first.fingerprint
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    touched = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert hashed == [source] and touched.fingerprint == first.fingerprint
    assert all(m.startswith("> data: reusing tokenized") for m in touched.messages)


# ---- the cache cannot lie: checksums, token ids, dead builders ------------------------------

def _entry(prepared_messages):
    """The entry folder a "> data: tokenized <where> (N rows) in <folder> (s)" message names."""
    from pathlib import Path

    return Path(prepared_messages[0].split(" in ", 1)[1].rsplit(" (", 1)[0])


def _arrow(folder):
    [path] = (folder / "pairs").glob("*.arrow")
    return path


def _rewrite_arrow(path, change):
    """Read an entry's Arrow file (IPC stream, as save_to_disk writes it), ``change`` its table,
    write it back in place."""
    import pyarrow as pa

    table = change(pa.ipc.open_stream(path.read_bytes()).read_all())  # a copy, not a map
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _swap_chosen_rejected(table):
    columns = {name: table.column(name) for name in table.column_names}
    columns["chosen"], columns["rejected"] = columns["rejected"], columns["chosen"]
    return table.from_arrays([columns[n] for n in table.column_names], schema=table.schema)


def _random_bytes(folder):
    path = _arrow(folder)
    size = path.stat().st_size
    with path.open("r+b") as handle:  # the token ids sit in the middle of the file
        handle.seek(size // 2)
        handle.write(random.Random(0).randbytes(64))
    assert path.stat().st_size == size


def _swapped(folder):
    size = _arrow(folder).stat().st_size
    _rewrite_arrow(_arrow(folder), _swap_chosen_rejected)
    assert _arrow(folder).stat().st_size == size  # the same bytes, in each other's place


def _truncated(folder):
    path = _arrow(folder)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 1000)


def _garbled_state(folder):
    state = folder / "pairs" / "state.json"
    state.write_text(state.read_text().replace('"', "'", 3))


def _stale(folder):  # an entry written before checksums existed
    summary = json.loads((folder / "prepared.json").read_text())
    del summary["files"]
    (folder / "prepared.json").write_text(json.dumps(summary))


_DAMAGE = {
    "random_bytes": (_random_bytes, r"pairs/data-00000-of-00001\.arrow does not match its "
                                    r"checksum \(its bytes changed\)"),
    "swapped_columns": (_swapped, r"pairs/data-00000-of-00001\.arrow does not match its checksum"),
    "truncated": (_truncated, r"pairs/data-00000-of-00001\.arrow is \d+ bytes, \d+ when built"),
    "deleted": (lambda f: _arrow(f).unlink(), r"pairs/data-00000-of-00001\.arrow is missing"),
    "garbled_state": (_garbled_state, r"pairs/state\.json does not match its checksum"),
    "half_built": (lambda f: (f / "prepared.json").unlink(), r"half-built: it has no prepared\.json"),
    "garbled_summary": (lambda f: (f / "prepared.json").write_text('{"key": [1, '),
                        r"prepared\.json cannot be read \(JSONDecodeError\)"),
    "stale": (_stale, r"stale: written by an older version, without checksums"),
    "no_tokens_digest": (lambda f: (f / "prepared.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "prepared.json").read_text()).items()
         if k != "tokens"})), r"stale: written by an older version, without its tokens' digest"),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_a_damaged_entry_is_named_in_one_line_and_rebuilt(data, tmp_path, damage):
    import re

    tokenizer = build_tokenizer()
    config = _config(data, tmp_path)
    first = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    folder = _entry(first.messages)
    expected = _as_lists(first.train)
    edit, reason = _DAMAGE[damage]
    edit(folder)
    again = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    named = [m for m in again.messages if " is damaged (" in m]
    assert len(named) == 1 and "\n" not in named[0]
    assert re.fullmatch(rf"> data: the data cache entry {re.escape(str(folder))} is damaged "
                        rf"\({reason}.*\); tokenizing {re.escape(str(data))}/train\.jsonl again",
                        named[0]), named[0]
    assert again.messages[1].startswith("> data: tokenized")
    assert _as_lists(again.train) == expected  # rebuilt: the pairs as first tokenized
    third = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert [m.split(" in ")[0] for m in third.messages] == \
        [f"> data: reusing tokenized {data}/train.jsonl (300 rows)"]
    assert not list(folder.parent.glob(".*building*"))


def test_token_ids_are_checked_against_the_vocabulary(data, tmp_path):
    """A tokenizer larger than the model's vocabulary is one line naming both; an entry whose
    bytes match their checksums but hold an id outside the vocabulary (a builder's bug) is
    refused naming the row, and --rebuild-data-cache tokenizes it again."""
    from megatron_simpo.data.integrity import file_checksums

    tokenizer = build_tokenizer()
    config = _config(data, tmp_path)
    size = len(tokenizer)
    with pytest.raises(DataError, match=rf"^tokenizer {data}/tokenizer has {size} tokens, more "
                                        rf"than the model's vocabulary \({size - 1}\); give the "
                                        r"model's own tokenizer \(--tokenizer\)$"):
        prepare_data(config, tokenizer, data / "tokenizer", seed=5, vocab_size=size - 1)
    first = prepare_data(config, tokenizer, data / "tokenizer", seed=5, vocab_size=size)
    folder, expected = _entry(first.messages), _as_lists(first.train)

    def poke(table):
        import pyarrow as pa

        rows = table.column("rejected").to_pylist()
        rows[7][2] = size  # one past the last id
        index = table.column_names.index("rejected")
        return table.set_column(index, table.field(index),
                                pa.array(rows, type=table.field(index).type))

    _rewrite_arrow(_arrow(folder), poke)
    summary = json.loads((folder / "prepared.json").read_text())
    summary["files"] = file_checksums(folder / "pairs")
    (folder / "prepared.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match=rf"^the data cache entry {folder} holds "
                                        rf"{data}/train\.jsonl:8: token id {size} in rejected is outside the vocabulary "
                                        rf"\[0, {size}\); --rebuild-data-cache tokenizes it again"):
        prepare_data(config, tokenizer, data / "tokenizer", seed=5, vocab_size=size)
    rebuilt = prepare_data(_config(data, tmp_path, rebuild_data_cache=True), tokenizer,
                           data / "tokenizer", seed=5, vocab_size=size)
    assert rebuilt.messages[0] == f"> data: --rebuild-data-cache: tokenizing {data}/train.jsonl again"
    assert _as_lists(rebuilt.train) == expected


def test_a_tokenizer_without_chat_template_is_warned_about_once(data, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    prepared = prepare_data(_config(data, tmp_path, valid_data_path=str(data / "valid.jsonl")),
                            tokenizer, data / "tokenizer", seed=5)
    warnings = [m for m in prepared.messages if m.startswith("warning")]
    assert warnings == [f"warning: tokenizer {data}/tokenizer has no chat template: pairs are "
                        "tokenized as plain text, roles dropped; give --no-apply-chat-template if "
                        "the columns are formatted already, or use a tokenizer with a chat template"]
    plain = prepare_data(_config(data, tmp_path, apply_chat_template=False), tokenizer,
                         data / "tokenizer", seed=5)
    assert not [m for m in plain.messages if m.startswith("warning")]


_SLOW_BUILDER = r"""
import os, sys, time
from pathlib import Path

from megatron_simpo.data import cache as data_cache
from megatron_simpo.data.config import DataConfig
from megatron_simpo.model.tiny import build_tokenizer

source, cache_dir, marks, tokenizer_path = sys.argv[1:]
real = data_cache.tokenize_records

def slow(rows, tokenizer, config):  # in each tokenizing worker: say so, then take a while
    (Path(marks) / str(os.getpid())).touch()
    time.sleep(60)
    return real(rows, tokenizer, config)

data_cache.tokenize_records = slow
prepare = lambda: data_cache.prepare_data(
    DataConfig(train_data_path=source, data_cache_dir=cache_dir, seq_length=48,
               max_prompt_length=12, dataset_num_proc=2), build_tokenizer(), tokenizer_path, seed=0)
if os.environ.get("UNDER_STOP_REQUESTS"):  # as megatron-simpo-train tokenizes
    from megatron_simpo.distributed.lifecycle import StopRequests
    requests = StopRequests(before_training=True)
    try:
        with requests:
            prepare()
    except BaseException as error:
        print("stopped:", type(error).__name__, requests.received, flush=True)
else:
    prepare()
"""


def _descendants(pid):
    from pathlib import Path

    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child] + _descendants(child)
    return found


def _start_slow_builder(data, tmp_path, under_stop_requests=False):
    """A builder process tokenizing with 2 workers that sleep; (process, its descendants). Its
    stdout goes to ``tmp_path / "stdout"``."""
    import os
    import subprocess
    import sys
    import time

    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, UNDER_STOP_REQUESTS="1" if under_stop_requests else "")
    with (tmp_path / "stderr").open("w") as stderr, (tmp_path / "stdout").open("w") as stdout:
        # files: survivors cannot block their reader; a session of its own, for a Ctrl-C
        process = subprocess.Popen([sys.executable, "-c", _SLOW_BUILDER, str(data / "train.jsonl"),
                                    str(tmp_path / "cache"), str(marks), str(data / "tokenizer")],
                                   stderr=stderr, stdout=stdout, env=env,
                                   start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2:
        assert process.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "stderr").read_text()
        time.sleep(0.1)
    family = _descendants(process.pid)
    assert {int(m.name) for m in marks.iterdir()} <= set(family)
    return process, family


def _assert_all_gone(pids):
    import os
    import signal
    import time

    from megatron_simpo.data.integrity import _alive

    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # the test's own processes: none is left behind, even on failure
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "builder processes outlived their builder"


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc, prctl")
def test_a_killed_builder_leaves_no_workers_and_its_folder_is_swept(data, tmp_path):
    process, family = _start_slow_builder(data, tmp_path)
    process.kill()  # kill -9: no handler runs in the builder
    process.wait()
    _assert_all_gone(family)
    [left] = list((tmp_path / "cache").glob(".*.building-*"))
    prepared = prepare_data(_config(data, tmp_path), build_tokenizer(), data / "tokenizer", 0)
    assert prepared.messages[0] == (f"> data: removed {left}, left by a build that was killed "
                                    f"(pid {process.pid})")
    assert prepared.messages[1].startswith("> data: tokenized") and not left.exists()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc, prctl")
@pytest.mark.parametrize("under_stop_requests", [False, True])
def test_sigterm_while_tokenizing_says_stopping_and_cleans_up(data, tmp_path,
                                                               under_stop_requests):
    # Alone (a tool), the build ends with 143; under megatron-simpo-train's stop handling
    # (lifecycle.StopRequests before training), the trainer's handler notes the signal too.
    import signal

    process, family = _start_slow_builder(data, tmp_path, under_stop_requests)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        _assert_all_gone(family + [process.pid])
    stderr = (tmp_path / "stderr").read_text()
    line = (f"> data: received SIGTERM while tokenizing {data}/train.jsonl: stopping (the partial "
            "cache entry is removed; the next run tokenizes it again)\n")
    assert stderr.count("> data: received") == 1 and line in stderr
    assert "Traceback" not in stderr
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    if under_stop_requests:
        assert process.returncode == 0, stderr
        assert (tmp_path / "stdout").read_text() == f"stopped: SystemExit {signal.SIGTERM}\n"
    else:
        assert process.returncode == 128 + signal.SIGTERM


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc, prctl")
def test_ctrl_c_while_tokenizing_is_the_builders_alone(data, tmp_path):
    """Ctrl-C reaches the builder's whole process group: the workers leave it to the builder (no
    KeyboardInterrupt traceback from each), which stops, removes its partial entry, and ends."""
    import os
    import signal

    process, family = _start_slow_builder(data, tmp_path, under_stop_requests=True)
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    finally:
        _assert_all_gone(family + [process.pid])
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 0, stderr
    # (what the stop leaves datasets' pool to raise on its way out varies; the signal is noted)
    assert (tmp_path / "stdout").read_text().split()[::2] == ["stopped:", str(signal.SIGINT)]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_a_folder_that_is_not_a_tokenizer_is_one_line(tmp_path):
    from megatron_simpo.data.tokenization import load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path / "empty")
    assert str(error.value) == (f"cannot load tokenizer from {tmp_path / 'empty'}: the folder "
                                "holds none of tokenizer.json, tokenizer_config.json, "
                                "tokenizer.model, vocab.json, vocab.txt, spiece.model, tekken.json, "
                                "*.tiktoken")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path / "damaged")
    assert str(error.value).startswith(f"cannot load tokenizer from {tmp_path / 'damaged'}: ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["vocab.tiktoken", "tekken.json",
                                  "additional_chat_templates/tool_use.jinja"])
def test_every_file_the_tokenizer_carries_is_part_of_its_fingerprint(tmp_path, name):
    """Tokenizers built on tiktoken keep their vocabulary in a ``*.tiktoken`` file, Mistral's
    in ``tekken.json``; a named chat template renders the rows with tools: another file is
    another tokenizer (the cache must not hand out the old tokens). The model's weights and
    config beside it are not the tokenizer."""
    from megatron_simpo.data.fingerprints import tokenizer_fingerprint
    from megatron_simpo.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("YQ== 0\n")
    before = tokenizer_fingerprint(tmp_path, tokenizer)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert tokenizer_fingerprint(tmp_path, tokenizer) == before
    (tmp_path / name).write_text("Yg== 0\n")
    assert tokenizer_fingerprint(tmp_path, tokenizer) != before


def test_the_fingerprint_hashes_the_files_a_checkpoint_carries():
    """data/ cannot import checkpoint/: the two lists of a tokenizer's files are held equal."""
    from megatron_simpo.checkpoint import tokenizer_asset
    from megatron_simpo.data import fingerprints

    assert set(fingerprints.TOKENIZER_FILES) == set(tokenizer_asset.TOKENIZER_FILES)
    assert fingerprints.TOKENIZER_FOLDERS == tokenizer_asset.TOKENIZER_FOLDERS


def test_the_data_fingerprint_is_the_pairs_tokens_not_the_cache_format(data, tmp_path,
                                                                       monkeypatch):
    """A new cache format (this package's tokenization changed) rebuilds the entry; a resume
    is refused only if the pairs' tokens changed with it. The fingerprint is the digest of the
    token ids (computed here independently) and the held-out split."""
    import dataclasses
    import hashlib

    tokenizer = build_tokenizer()
    config = _config(data, tmp_path)
    first = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    original = data_cache.cache_key
    monkeypatch.setattr(data_cache, "cache_key", lambda *a, **k: dataclasses.replace(
        original(*a, **k), format="megatron_simpo.pairs/next"))
    again = prepare_data(config, tokenizer, data / "tokenizer", seed=5)
    assert again.messages[-1].startswith("> data: tokenized")  # another entry, built anew
    assert len(list((tmp_path / "cache").glob("pairs-*"))) == 2
    assert again.fingerprint == first.fingerprint
    digest = hashlib.sha256()  # every row's lengths and ids, column by column, in file order
    rows = [tuple(map(list, (p.prompt, p.chosen, p.rejected))) for p in
            data_cache.load_entry(next((tmp_path / "cache").glob("pairs-*")), len(tokenizer))]
    for column in range(3):
        ids = [row[column] for row in rows]
        digest.update(("prompt", "chosen", "rejected")[column].encode())
        digest.update(np.array([len(x) for x in ids], dtype="<i8").tobytes())
        digest.update(np.array([t for x in ids for t in x], dtype="<i4").tobytes())
    expected = hashlib.sha256(json.dumps([[digest.hexdigest()], "valid-path"]).encode())
    assert first.fingerprint == expected.hexdigest()[:16]
