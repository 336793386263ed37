"""Preference data as users hold it: JSONL, Parquet, a save_to_disk folder, a Hub name; SimPO's
dataset schema (message lists, extra columns) and NeMo-Aligner's column names."""

import json

import pytest

from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.loading import load_datasets
from megatron_simpo.data.sources import ColumnMap, SourceError, kind_of, read_rows
from megatron_simpo.model.tiny import build_tokenizer, make_pair
from tests.multiprocess import run_on_ranks


def _simpo_schema(rows):
    """princeton-nlp/llama3-ultrafeedback-armorm's columns: prompt string, chosen/rejected as
    user + assistant messages, and columns the trainer ignores."""
    out = []
    for index, row in enumerate(rows):
        user = {"role": "user", "content": row["prompt"]}
        out.append({"prompt_id": f"id{index}", "prompt": row["prompt"],
                    "chosen": [user, {"role": "assistant", "content": row["chosen"]}],
                    "rejected": [user, {"role": "assistant", "content": row["rejected"]}],
                    "all_generated_responses": [row["chosen"], row["rejected"]],
                    "all_rm_scores": [0.9, 0.1]})
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 64 + 16 pairs as JSONL, Parquet and a DatasetDict folder (train/test)."""
    import random

    from datasets import Dataset, DatasetDict

    out = tmp_path_factory.mktemp("sources")
    rng = random.Random(0)
    train, valid = (_simpo_schema([make_pair(rng) for _ in range(n)]) for n in (64, 16))
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    Dataset.from_list(train).to_parquet(str(out / "train.parquet"))
    Dataset.from_list(valid).to_parquet(str(out / "valid.parquet"))
    DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(valid)).save_to_disk(
        str(out / "arrow"))
    nemo = [{"prompt": r["prompt"], "chosen_response": r["chosen"][1]["content"],
             "rejected_response": r["rejected"][1]["content"]} for r in train]
    (out / "nemo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in nemo))
    build_tokenizer().save_pretrained(out / "tokenizer")
    return out


def _pairs(train, valid=None, **options):
    config = DataConfig(train_data_path=str(train), valid_data_path=valid and str(valid),
                        seq_length=64, max_prompt_length=48, **options)
    return load_datasets(config, build_tokenizer(), seed=0)


def test_every_source_kind_gives_the_same_pairs(sources):
    assert [kind_of(str(sources / name)) for name in
            ("train.jsonl", "train.parquet", "arrow")] == ["jsonl", "parquet", "arrow"]
    assert kind_of("princeton-nlp/llama3-ultrafeedback-armorm") == "hub"
    expected = _pairs(sources / "train.jsonl", sources / "valid.jsonl")
    assert len(expected[0]) == 64 and len(expected[1]) == 16
    assert _pairs(sources / "train.parquet", sources / "valid.parquet") == expected
    assert _pairs(sources / "arrow", sources / "arrow") == expected  # splits train / test
    nemo = _pairs(sources / "nemo.jsonl", chosen_column="chosen_response",
                  rejected_column="rejected_response")
    assert nemo[0] == expected[0]  # plain strings through the mapping: the same tokens


def test_rows_name_their_source_and_row(sources):
    rows = read_rows(str(sources / "train.parquet"), split="train")
    assert rows[3]["source"] == f"{sources / 'train.parquet'} row 3"
    assert set(rows[3]) == {"prompt", "chosen", "rejected", "source"}  # extras ignored
    rows = read_rows(str(sources / "arrow"), split="test")
    assert rows[0]["source"] == f"{sources / 'arrow'}[test] row 0"


def test_bad_sources_give_one_clear_line(sources, tmp_path, monkeypatch):
    from datasets import Dataset

    with pytest.raises(SourceError, match=r"missing column\(s\) 'chosen_response'.*has prompt_id"):
        read_rows(str(sources / "train.parquet"), split="train",
                  columns=ColumnMap(chosen="chosen_response"))
    with pytest.raises(SourceError, match=r"no split 'validation' \(has train, test\)"):
        read_rows(str(sources / "arrow"), split="validation")
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(SourceError, match="unknown data file type .csv"):
        kind_of(str(tmp_path / "pairs.csv"))
    with pytest.raises(SourceError, match="missing.parquet does not exist"):
        kind_of(str(tmp_path / "missing.parquet"))
    rows = [{"prompt": "reverse abc", "chosen": "cba", "rejected": "cbb"}] * 3
    rows[2] = {"prompt": "reverse abc", "chosen": " ", "rejected": "cbb"}
    Dataset.from_list(rows).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match=r"empty\.parquet row 2: empty chosen response"):
        _pairs(tmp_path / "empty.parquet")
    # A Hub name that is not in the local cache, offline: one line naming it, no traceback.
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match=r"cannot read someone/no-such-pairs \(split 'train'\)"):
        _pairs("someone/no-such-pairs")


def _first_loss(rank, argv):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.loop import run

    return run(parse_args(argv)).losses[0]


def test_parquet_arrow_jsonl_and_nemo_columns_train_to_the_same_first_loss(sources, tmp_path):
    from megatron_simpo.model.tiny import TINY_MODEL

    config = dict(TINY_MODEL, vocab_size=len(build_tokenizer()))
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = ["--model-config", str(tmp_path / "config.json"), "--tokenizer",
            str(sources / "tokenizer"), "--seq-length", "64", "--max-prompt-length", "48",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "1",
            "--seed", "3"]
    losses = {name: run_on_ranks(1, _first_loss, base + ["--train-data-path",
                                                         str(sources / path)] + extra)[0]
              for name, path, extra in (
                  ("jsonl", "train.jsonl", []), ("parquet", "train.parquet", []),
                  ("arrow", "arrow", ["--train-split", "train"]),
                  ("nemo", "nemo.jsonl", ["--chosen-column", "chosen_response",
                                          "--rejected-column", "rejected_response"]))}
    assert len(set(losses.values())) == 1, losses
