"""``megatron-simpo-build-pairs``: on-policy preference pairs from a model, prompts and a reward.

The run (:func:`build_pairs`): prompts from any source the trainer reads (``data.sources``, the
same column mapping and chat template), duplicates skipped; the model from ``--hf`` or a
Megatron checkpoint (``--load``, exported as generate-answers does); for each batch of
``--batch-size`` prompts, one sample per seed (``generation.Sample``), the samples scored
(``rewards``), and the batch written to ``<output>.parts/batch-NNNNNN.jsonl`` (a temporary name,
then renamed: whole or absent). The parts folder's ``settings.json`` records what the samples
depend on; a rerun with the same flags resumes (batches on disk are checked against it and never
sampled again), one with other settings is refused naming the setting. When every batch is on
disk, the pairs are written in prompt order (``pairs``) and the parts folder is removed.

Data parallel: under ``torchrun`` each process takes the batches ``b`` with ``b % WORLD_SIZE ==
RANK`` (its own GPU, ``LOCAL_RANK``; with vLLM, its own ``--tensor-parallel-size`` GPUs); rank 0
merges once every batch file is on disk. No process group is started (vLLM starts its own), so
the processes meet through the parts folder; torchrun ends all of them if one fails. Batches are
the same whatever the world size, so two processes write what one does. With ``--load`` each
process exports its own copy: export once (``megatron-simpo-convert-megatron-to-hf``) and give
``--hf`` for large models. Each process's devices, and the mistakes only one process sees
(said by it, whatever its rank), are ``pairs_world``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from megatron_simpo.distributed.files import jsonl_lines, write_text_atomically
from megatron_simpo.evaluation import (generation, pairs, pairs_world, reward_stats, rewards,
                                       settings_record, vllm_backend)
from megatron_simpo.evaluation.answers import Sampling

AUTHORS_SEEDS = (13, 21, 42, 79, 100)
_DEFAULT_GPU_SHARE = 0.6


@dataclass(frozen=True)
class PairsConfig:
    """``megatron-simpo-build-pairs``: the SimPO v0.2 recipe's data, from prompts to pairs."""

    prompts_path: str
    """the prompts: any source the trainer reads (.jsonl/.json/.parquet, a save_to_disk folder,
    a Hub dataset name); only the prompt column is used"""
    output: str
    """the pairs: .jsonl, .parquet, or a folder name (Dataset.save_to_disk); the authors' columns
    prompt_id, prompt, all_generated_responses, all_rm_scores, chosen, rejected"""
    hf: str | None = None
    """a Hugging Face model folder to sample from (this or --load)"""
    load: str | None = None
    """a Megatron checkpoint to sample from (save folder or iter_ folder; this or --hf)"""
    hf_out: str | None = None
    """with --load: keep the exported HF folder here (default: a temporary folder)"""
    prompts_split: str = "train"
    """split of a Hub dataset or DatasetDict folder (UltraFeedback binarized: train_prefs)"""
    dataset_config: str | None = None
    """configuration (subset) name of a Hub dataset"""
    prompt_column: str = "prompt"
    """column holding the prompt (a string, or a list of {role, content} messages)"""
    apply_chat_template: bool = True
    """prompts were trained with --no-apply-chat-template: they are encoded as plain text with
    the tokenizer's special tokens"""
    num_samples: int | None = None
    """samples per prompt: the first this many of --seeds (default: one per seed)"""
    seeds: tuple[int, ...] = AUTHORS_SEEDS
    """one sampling seed per sample (the authors')"""
    temperature: float = 0.8
    """sampling temperature (0: greedy)"""
    top_p: float = 0.95
    """nucleus sampling"""
    max_new_tokens: int = 4096
    """most tokens per sample"""
    batch_size: int = 8
    """prompts per batch: per generate call, and per file written (resume loses at most one)"""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """auto: vLLM where it is installed and a GPU is present, else transformers"""
    tensor_parallel_size: int = 1
    """vLLM only"""
    gpu_memory_utilization: float = _DEFAULT_GPU_SHARE
    """vLLM only: the share of each GPU vLLM takes (vLLM's default is 0.9; the reward model
    shares the GPU)"""
    dtype: str = "auto"
    """the sampled model's dtype (auto: bf16 on a GPU, fp32 on CPU for transformers)"""
    reward_model: str | None = None
    """a Hugging Face sequence-classification reward model (e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1),
    in its dtype (--reward-dtype) with its own chat template (this or --reward-fn)"""
    reward_fn: str | None = None
    """module:function or path/to/file.py:function, called as function(prompt, response) ->
    float (this or --reward-model)"""
    trust_remote_code: bool = False
    """allow a reward model whose classifier is its repository's own Python (ArmoRM)"""
    reward_batch_size: int = 8
    """sequences per reward-model forward (sorted by length)"""
    reward_dtype: str = "auto"
    """the reward model's dtype (auto: its own, but bfloat16 on a GPU where its own is float32,
    as the authors load ArmoRM, whose config says float32)"""
    reward_stats: str | None = None
    """also write the rewards' statistics here (JSON: mean reward of every sample, mean chosen
    and rejected reward, counts); prompts whose samples are all identical are then scored too
    (once), and still dropped"""

    def __post_init__(self) -> None:
        generation.check_model_source(self.hf, self.load, self.hf_out)
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("give one of --reward-model and --reward-fn")
        for flag, given in (("--trust-remote-code", self.trust_remote_code),
                            ("--reward-batch-size", self.reward_batch_size != 8),
                            ("--reward-dtype", self.reward_dtype != "auto")):
            if given and not self.reward_model:
                raise ValueError(f"{flag} goes with --reward-model (--reward-fn is called on "
                                 "one text at a time, in Python)")
        for flag, value in (("--batch-size", self.batch_size),
                            ("--reward-batch-size", self.reward_batch_size),
                            ("--max-new-tokens", self.max_new_tokens),
                            ("--tensor-parallel-size", self.tensor_parallel_size)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must differ, got {' '.join(map(str, self.seeds))}")
        if self.num_samples is not None and not 2 <= self.num_samples <= len(self.seeds):
            raise ValueError(f"--num-samples must be 2..{len(self.seeds)} (one per --seeds), "
                             f"got {self.num_samples}")
        if len(self.seeds) < 2:
            raise ValueError("a pair needs at least two samples: give two or more --seeds")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        generation.check_sampling(self.dtype, self.temperature, self.top_p)
        if self.reward_dtype not in generation.DTYPES:
            raise ValueError(f"--reward-dtype must be one of {', '.join(generation.DTYPES)}, got "
                             f"{self.reward_dtype!r}")
        if self.temperature == 0 and self.reward_stats is None:
            raise ValueError("--temperature 0 is greedy: every seed gives the same sample, so no "
                             "prompt makes a pair (the authors sample at 0.8; greedy rewards "
                             "alone: --reward-stats)")
        pairs.output_kind(self.output)
        if self.reward_stats is not None and Path(self.reward_stats).is_dir():
            raise ValueError(f"--reward-stats {self.reward_stats} is a folder: give the JSON "
                             "file to write")

    @property
    def sample_seeds(self) -> tuple[int, ...]:
        return self.seeds[:self.num_samples or len(self.seeds)]


@dataclass(frozen=True)
class Prompt:
    index: int
    prompt_id: str
    prompt: object
    source: str


def read_prompts(config: PairsConfig, say: Callable[[str], None] = print) -> list[Prompt]:
    """The distinct prompts in source order (a repeated prompt_id is skipped, counted)."""
    from megatron_simpo.data.sources import read_prompt_rows

    rows = read_prompt_rows(config.prompts_path, split=config.prompts_split,
                            prompt_column=config.prompt_column,
                            dataset_config=config.dataset_config)
    prompts, seen = [], set()
    for row in rows:
        prompt_id = row["prompt_id"] if row["prompt_id"] is not None else \
            pairs.prompt_id_of(row["prompt"])
        if str(prompt_id) in seen:
            continue
        seen.add(str(prompt_id))
        prompts.append(Prompt(len(prompts), str(prompt_id), row["prompt"], row["source"]))
    if len(prompts) < len(rows):
        say(f"> {len(rows) - len(prompts)} repeated prompts skipped")
    return prompts


def parts_folder(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


_PATHS = ("prompts_path", "hf", "reward_model", "reward_fn")
"""Settings recorded as ``settings_record.local_path`` holds them (absolute)."""


def settings(config: PairsConfig, prompts: list[Prompt], backend: str) -> dict:
    """What the samples and scores depend on (a resume must match it)."""
    def digest(values) -> str:
        return hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()

    kept = ("prompts_path", "prompts_split", "dataset_config", "prompt_column", "hf", "load",
            "apply_chat_template", "temperature", "top_p", "max_new_tokens", "batch_size",
            "dtype", "reward_model", "reward_fn", "reward_dtype")
    return {**{k: v for k, v in asdict(config).items() if k in kept},
            **{k: settings_record.local_path(getattr(config, k)) for k in _PATHS},
            "load": settings_record.model_identity(None, config.load) if config.load else None,
            "score_identical": config.reward_stats is not None,
            "seeds": list(config.sample_seeds), "backend": backend,
            "prompts": digest([p.prompt_id for p in prompts]),
            "prompt_texts": digest([p.prompt for p in prompts])}  # (the same ids, other text)


def open_parts(folder: Path, expected: dict, *, create: bool) -> None:
    """Create the parts folder with its settings (``create``: rank 0, when there is none), or
    check a resumed one's against them (every rank)."""
    path = folder / "settings.json"
    if create and not folder.is_dir():
        folder.mkdir(parents=True)
        settings_record.write(path, expected)
        return
    names = {"prompts": "the prompts", "prompt_texts": "the prompts' text",
             "score_identical": "--reward-stats (given:)"}
    differ = settings_record.differences(
        path, expected, lambda key: names.get(key, f"--{key.replace('_', '-')}"),
        start_over=str(folder), paths=_PATHS)
    if differ:
        raise ValueError(f"{folder} was started with other settings ({'; '.join(differ)}): "
                         "give the same ones to resume, or move it away")


def part_path(folder: Path, batch: int) -> Path:
    return folder / f"batch-{batch:06d}.jsonl"


def read_part(path: Path, batch: list[Prompt], seeds: int,
              score_identical: bool = False) -> list[dict] | None:
    """A batch's rows from disk, checked against the prompts it must hold; None if absent.
    Identical samples have no scores, or (``score_identical``) equal ones."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for _, line in jsonl_lines(path.read_text(encoding="utf-8"))]
        ok = [(r["index"], r["prompt_id"]) for r in rows] == \
             [(p.index, p.prompt_id) for p in batch] and all(
                 len(r["samples"]) == seeds and all(isinstance(t, str) for t in r["samples"])
                 and (r["scores"] is None if pairs.all_identical(r["samples"])
                      and not score_identical else
                      len(r["scores"]) == seeds and all(isinstance(v, float) for v in r["scores"])
                      and (len(set(r["scores"])) == 1 or not pairs.all_identical(r["samples"])))
                 and (r.get("finished") is None or len(r["finished"]) == seeds
                      and all(isinstance(f, bool) for f in r["finished"]))
                 for r in rows)
    except (ValueError, KeyError, TypeError):  # not UTF-8, not JSON, not our rows
        ok = False
    if not ok:
        raise ValueError(f"{path}: not this run's batch of {len(batch)} prompts from "
                         f"{batch[0].source}; move {path.parent} away to start over")
    return rows


def write_part(path: Path, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in rows))


def sample_batch(batch: list[Prompt], messages: list[list[dict]], sample, score,
                 config: PairsConfig) -> list[dict]:
    """One batch: samples per seed, each prompt's distinct texts scored once (a text sampled
    twice has one reward: batching with padding moves a score in its last digits); prompts
    whose samples are all identical are not scored (with ``--reward-stats``: their one text).
    ``finished``: whether each sample ended (``answers.Reply``; None from a sampler that does
    not say)."""
    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens)
    samples = sample(messages, sampling, config.sample_seeds)
    flat = [(i, text) for i, s in enumerate(samples)
            if config.reward_stats is not None or not pairs.all_identical(s)
            for text in dict.fromkeys(s)]
    values = score([batch[i].prompt for i, _ in flat], [messages[i] for i, _ in flat],
                   [text for _, text in flat]) if flat else []
    values = rewards.checked_rewards(list(values),
                                     [(batch[i], samples[i].index(text)) for i, text in flat])
    reward = dict(zip(flat, values))
    return [{"index": p.index, "prompt_id": p.prompt_id, "samples": samples[i],
             "scores": [reward[i, text] for text in samples[i]] if (i, samples[i][0]) in reward
             else None, "finished": [r.finished for r in samples[i]]
             if all(hasattr(r, "finished") for r in samples[i]) else None}
            for i, p in enumerate(batch)]


def merge(folder: Path, prompts: list[Prompt], messages: list[list[dict]], config: PairsConfig,
          say: Callable[[str], None]) -> Path:
    """The pairs in prompt order from the parts, written whole (the ``--reward-stats`` file
    first); the parts then removed."""
    records, dropped, every, choices = [], {"identical": 0, "tie": 0, "empty": 0}, [], []
    cut = {"chosen": 0, "rejected": 0}  # kept pairs' samples that never ended
    text = all(isinstance(p.prompt, str) for p in prompts)
    size, seeds = config.batch_size, len(config.sample_seeds)
    for b in range(0, len(prompts), size):
        rows = read_part(part_path(folder, b // size), prompts[b:b + size], seeds,
                         config.reward_stats is not None)
        if rows is None:
            raise ValueError(f"{part_path(folder, b // size)}: missing (a process stopped?); run "
                             "again with the same flags to finish")
        for row in rows:
            prompt = prompts[row["index"]]
            choice = pairs.choose(row["samples"], row["scores"])
            every.append(row)
            choices.append(choice)
            if choice.dropped:
                dropped[choice.dropped] += 1
                continue
            for side in cut:
                cut[side] += row.get("finished") is not None and \
                    not row["finished"][getattr(choice, side)]
            records.append(pairs.pair_record(prompt.prompt_id, prompt.prompt,
                                             messages[prompt.index], row["samples"],
                                             row["scores"], choice, prompt_as_messages=not text))
    if config.reward_stats is not None:
        reward_stats.write_stats(config.reward_stats, reward_stats.statistics(every, choices))
    path = pairs.write_pairs(records, config.output, prompt_is_text=text)
    shutil.rmtree(folder)
    say(f"> wrote {len(records)} pairs to {path}; dropped {dropped['identical']} prompts whose "
        f"samples were all identical, {dropped['tie']} whose best and worst scores tied, "
        f"{dropped['empty']} with an empty best or worst sample" + (
            f"; kept, as the authors' recipe keeps them: {cut['chosen']} chosen and "
            f"{cut['rejected']} rejected samples cut at --max-new-tokens (or the model's "
            "context) before they ended" if any(cut.values()) else ""))
    return path


def build_pairs(config: PairsConfig, say: Callable[[str], None] = print) -> Path | None:
    """Sample, score and write the pairs (module docstring); every input is checked before any
    model loads (ValueError naming the flag, file or row). Returns the output on rank 0."""
    from tqdm import tqdm

    from megatron_simpo.data.tokenization import (check_system_messages, encode_prompts,
                                                  known_roles, load_tokenizer, prompt_messages)
    from megatron_simpo.distributed.runtime import read_world

    rank, world, local_rank = read_world()
    backend = generation.pick_backend(config.backend)
    if backend == "transformers" and config.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size is vLLM's: the transformers backend runs on one "
                         "device")
    if backend == "transformers" and config.gpu_memory_utilization != _DEFAULT_GPU_SHARE:
        raise ValueError("--gpu-memory-utilization is vLLM's: the transformers backend takes "
                         "what it needs")
    if Path(config.output).exists():
        raise ValueError(f"--output {config.output} exists; move it away or give another")
    if config.hf and not (Path(config.hf) / "config.json").is_file():
        raise ValueError(f"--hf {config.hf}: no config.json (not a Hugging Face model folder)")
    prompts = read_prompts(config, say := say if rank == 0 else (lambda _: None))
    if config.reward_model:
        if rewards.check_reward_model(config.reward_model, config.trust_remote_code):
            rewards.load_remote_code(config.reward_model)
        rewards.check_reward_template(config.reward_model, config.trust_remote_code,
                                      [(p.prompt, p.source) for p in prompts])
    else:
        rewards.load_reward_fn(config.reward_fn)
    folder = parts_folder(config.output)
    expected = settings(config, prompts, backend)
    if rank == 0:
        open_parts(folder, expected, create=True)
    pairs_world.wait_until(lambda: (folder / "settings.json").is_file())
    open_parts(folder, expected, create=False)
    with pairs_world.own_share():
        pairs_world.pin_device(backend, local_rank, config.tensor_parallel_size, world)
    with contextlib.ExitStack() as stack:
        hf_dir = generation.model_folder(stack, hf=config.hf, load=expected["load"],
                                         hf_out=config.hf_out if rank == 0 else None)
        tokenizer = load_tokenizer(hf_dir)
        roles = known_roles(tokenizer)
        messages = [prompt_messages(p.prompt, p.source, roles) for p in prompts]
        notes = check_system_messages(tokenizer, messages, [p.source for p in prompts], hf_dir) \
            if config.apply_chat_template else []
        encode_prompts(tokenizer, messages, apply_chat_template=config.apply_chat_template,
                       sources=[p.source for p in prompts])  # (refused rows: before the model)
        size = config.batch_size
        mine = [b for b in range(math.ceil(len(prompts) / size)) if b % world == rank]
        with pairs_world.own_share():  # (a damaged batch file of this process's)
            todo = [b for b in mine if read_part(part_path(folder, b), prompts[b * size:(b + 1) *
                                                 size], len(config.sample_seeds),
                                                 config.reward_stats is not None) is None]
        for line in notes + [f"> {len(prompts)} prompts in {math.ceil(len(prompts) / size)} "
                             f"batches, {len(config.sample_seeds)} samples each ({backend}); "
                             f"{len(todo)} of this process's {len(mine)} batches to go"]:
            say(line)
        if todo:
            options = dict(dtype=config.dtype, apply_chat_template=config.apply_chat_template)
            sample = vllm_backend.vllm_sampler(
                hf_dir, tensor_parallel_size=config.tensor_parallel_size,
                gpu_memory_utilization=config.gpu_memory_utilization, **options) \
                if backend == "vllm" else generation.transformers_sampler(hf_dir, **options)
            score = rewards.reward_model_scorer(
                config.reward_model, trust_remote_code=config.trust_remote_code,
                batch_size=config.reward_batch_size, dtype=config.reward_dtype) \
                if config.reward_model else \
                rewards.reward_fn_scorer(config.reward_fn)
            for b in tqdm(todo, desc=f"rank {rank} batches", disable=rank != 0):
                span = slice(b * size, (b + 1) * size)
                with pairs_world.own_share():  # (a reward that is not a finite number)
                    write_part(part_path(folder, b),
                               sample_batch(prompts[span], messages[span], sample, score, config))
        if rank == 0:  # the others' batches (torchrun ends every process if one fails)
            batches = range(math.ceil(len(prompts) / size))
            pairs_world.wait_until(lambda: all(part_path(folder, b).is_file() for b in batches))
        return merge(folder, prompts, messages, config, say) if rank == 0 else None
