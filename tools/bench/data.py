"""Benchmark: preparing preference data, tokenized once into the memory-mapped cache vs the
in-memory path (every rank reads and tokenizes the whole set into Python lists).

The data: ``--pairs`` synthetic pairs with SimPO's length distribution
(``megatron_simpo.data.synthetic``: prompts lognormal, median ~120 tokens, tail to 1,800; responses
median ~350; cut at 2,048), as plain text of Zipf-distributed words, in a JSONL file; a BPE
tokenizer with a ``--vocab`` vocabulary trained on it here with ``tokenizers``, with Llama-3's
special tokens and chat template. Every measurement runs on ``--ranks`` spawned gloo ranks, as
the trainer's data stage does (``data_cache.prepare_data``, then the first global batch's plan
and micro-batch), and reports per rank:

* cold: an empty cache (rank 0 tokenizes with ``--dataset-num-proc`` processes, the others
  wait): seconds and pairs/s;
* warm: the cache reused (a new run): seconds of the data stage, from reading the cache to the
  first micro-batch (imports and tokenizer loading excluded);
* the resident memory each rank gains in the data stage (RSS after minus before, file-backed
  pages of the memory map included), for the cache and for the in-memory path.

  python -m tools.bench data                    # 100,000 pairs, 32k vocabulary, 2 ranks
  python -m tools.bench data --pairs 5000 --list-pairs 5000   # a quick look
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.bench.common import command, write_report

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|pad|>"]


def write_pairs(path: Path, num_pairs: int, seed: int = 0) -> None:
    """SimPO-like pairs as text: about one word per target token (BPE merges common words)."""
    import numpy as np

    from megatron_simpo.data.synthetic import preference_lengths

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = np.array(["".join(rng.choice(letters, size=rng.integers(2, 9)))
                        for _ in range(60_000)])
    weights = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.1
    weights /= weights.sum()

    def text(n: int) -> str:
        return " ".join(lexicon[rng.choice(len(lexicon), size=max(1, int(n * 0.8)), p=weights)])

    with path.open("w") as out:
        for prompt, chosen, rejected in preference_lengths(num_pairs, seed):
            user = text(prompt)
            out.write(json.dumps({
                "prompt": user,
                "chosen": [{"role": "user", "content": user},
                           {"role": "assistant", "content": text(chosen)}],
                "rejected": [{"role": "user", "content": user},
                             {"role": "assistant", "content": text(rejected)}]}) + "\n")


def train_tokenizer(data: Path, out: Path, vocab_size: int, sample: int = 20_000) -> None:
    """A byte-level BPE trained on the first ``sample`` rows, with Llama-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with data.open() as rows:
            for index, line in enumerate(rows):
                if index == sample:
                    return
                row = json.loads(line)
                yield row["prompt"]
                yield row["chosen"][1]["content"]

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0],
                                        eos_token="<|eot_id|>", pad_token="<|pad|>")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.save_pretrained(out)


def _data_stage(rank, path, tokenizer_path, cache_dir, cached, num_proc, global_batch):
    """On one rank: RSS and seconds of the data stage (preparing the pairs, then the first
    global batch's plan and this rank's first micro-batch)."""
    import psutil
    import torch.distributed as dist

    from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
    from megatron_simpo.data.config import DataConfig
    from megatron_simpo.data.sampler import PairSampler
    from megatron_simpo.data.collate import collate_microbatch
    from megatron_simpo.data.loading import load_datasets
    from megatron_simpo.data.tokenization import load_tokenizer
    from megatron_simpo.data.cache import prepare_data

    import datasets  # noqa: F401  (imports before the baseline)

    dist.init_process_group("gloo")
    tokenizer = load_tokenizer(tokenizer_path)
    config = DataConfig(train_data_path=str(path), data_cache_dir=str(cache_dir),
                        dataset_num_proc=num_proc, seq_length=2048, max_prompt_length=1800)
    process = psutil.Process()
    dist.barrier()
    before = process.memory_info().rss
    began = time.perf_counter()
    if cached:
        prepared = prepare_data(config, tokenizer, tokenizer_path, seed=0)
        pairs, messages = prepared.train, prepared.messages
    else:
        pairs, _ = load_datasets(config, tokenizer, seed=0)
        messages = []
    indices = PairSampler(len(pairs), global_batch, seed=0).global_batch(0)
    plan = plan_global_batch(indices, [PairLengths.of(pairs[i]) for i in indices],
                             dp_size=dist.get_world_size(), micro_batch_size=2,
                             config=BatchingConfig(), seq_length=2048)
    collate_microbatch(pairs, plan.ranks[rank][0])
    seconds = time.perf_counter() - began
    grown = process.memory_info().rss - before
    dist.barrier()
    dist.destroy_process_group()
    return {"seconds": seconds, "rss_growth_bytes": grown, "pairs": len(pairs),
            "messages": messages}


def _on_ranks(ranks, *args):
    from megatron_simpo.distributed.launch import run_on_ranks

    return run_on_ranks(ranks, _data_stage, *args)


@dataclass(frozen=True)
class DataOptions:
    pairs: int = 100_000
    """Synthetic pairs (the cache is measured on them)."""
    list_pairs: int = 20_000
    """Pairs for the in-memory path (every rank holds them all as Python lists; 100,000 would
    need ~10 GB per rank); the cache is measured on the same pairs too, for the ratio."""
    vocab: int = 32_000
    """BPE vocabulary trained on the data."""
    ranks: int = 2
    """gloo ranks of every measurement."""
    dataset_num_proc: int | None = None
    """Tokenizing processes of a cold cache."""
    global_batch: int = 128
    """Pairs of the first global batch planned."""
    workdir: str | None = None
    """Keep the data here (default: a temp dir)."""
    output: str | None = None
    """Write the report as JSON."""


COMMAND = command("data", __doc__, options=DataOptions)


def main(argv=None) -> None:
    args = COMMAND.parse(argv)["options"]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    data, small = work / f"pairs{args.pairs}.jsonl", work / f"pairs{args.list_pairs}.jsonl"
    began = time.perf_counter()
    if not data.is_file():
        write_pairs(data, args.pairs)
    if not small.is_file():
        with data.open() as rows, small.open("w") as out:
            for index, line in zip(range(args.list_pairs), rows):
                out.write(line)
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(data, work / "tokenizer", args.vocab)
    print(f"setup (data + tokenizer): {time.perf_counter() - began:.0f} s in {work}", flush=True)
    def run(path, cache, cached):
        return _on_ranks(args.ranks, path, work / "tokenizer", cache, cached,
                         args.dataset_num_proc, args.global_batch)

    report = {"pairs": args.pairs, "list_pairs": args.list_pairs, "vocab": args.vocab,
              "ranks": args.ranks, "cpus": os.cpu_count()}
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    report["cold"] = run(data, cache, True)
    report["warm"] = run(data, cache, True)
    report["cached_small_cold"] = run(small, cache, True)
    report["cached_small_warm"] = run(small, cache, True)
    report["list_small"] = run(small, cache, False)

    def worst(key, field):
        return max(rank[field] for rank in report[key])

    cold = worst("cold", "seconds")
    report["summary"] = {
        "cold_pairs_per_second": args.pairs / cold, "cold_seconds": cold,
        "warm_seconds": worst("warm", "seconds"),
        "warm_rss_growth_mb_per_rank": worst("warm", "rss_growth_bytes") / 2**20,
        "list_seconds_small": worst("list_small", "seconds"),
        "list_rss_growth_mb_per_rank_small": worst("list_small", "rss_growth_bytes") / 2**20,
        "cached_rss_growth_mb_per_rank_small": worst("cached_small_warm", "rss_growth_bytes") / 2**20,
    }
    summary = report["summary"]
    summary["rss_ratio_cached_vs_list"] = (summary["cached_rss_growth_mb_per_rank_small"]
                                           / summary["list_rss_growth_mb_per_rank_small"])
    print(json.dumps(summary, indent=1))
    write_report(args.output, report, indent=1)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

