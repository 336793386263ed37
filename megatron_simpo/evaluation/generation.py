"""Generating benchmark answers from a trained model: ``megatron-simpo-generate-answers``.

The model is a Hugging Face folder, or a Megatron checkpoint (any TP/PP) exported to one with
the project's converter first. Prompts are rendered exactly as training rendered them
(``data.encode_prompts``: the chat template's BOS and no other), so evaluation never sees a
double BOS or another template. Backends: vLLM when installed and a GPU is present (its own
tensor parallelism; ``vllm_backend``), else Hugging Face transformers (batched, left padding;
CPU or GPU); both sample with the benchmark's settings only, never the model's
generation_config.
Samplers (``Sample``: several seeded samples per prompt) serve on-policy pairs (``pairs_run``).
The answer files and sampling defaults are ``answers.py``'s; the options are
:class:`AnswersConfig`'s, and :func:`generate_answers` is the command.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from megatron_simpo.evaluation.answers import (ARENA_HARD_ENCODING, Benchmark, Reply, Sampling,
                                               answer_key, answer_path, answered,
                                               read_questions, stream_seed, write_answers)
from megatron_simpo.evaluation import settings_record
from megatron_simpo.evaluation.judge_metadata import token_counter
from megatron_simpo.evaluation.vllm_backend import vllm_generator
from megatron_simpo.convert.export_marker import check_replaceable


def _groups(samplings: list[Sampling]) -> dict[Sampling, list[int]]:
    groups: dict[Sampling, list[int]] = {}
    for index, sampling in enumerate(samplings):
        groups.setdefault(sampling, []).append(index)
    return groups


def _causal_lm(hf_dir: str | Path, dtype: str):
    """(tokenizer, model in eval mode, device, pad id, stop ids) of a Hugging Face folder. Its
    generation_config keeps only the stop and pad ids (not a release's top_k or repetition
    penalty, nor transformers' default top_k 50): greedy is the argmax, sampling temperature and
    top-p only, as vLLM's ``SamplingParams`` (the SimPO authors' sampler) make them."""
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=getattr(torch, dtype)).to(device).eval()
    configured = model.generation_config.eos_token_id
    stops = sorted({*(configured if isinstance(configured, list) else [configured]),
                    tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id, eos_token_id=stops,
        pad_token_id=pad, top_k=0, repetition_penalty=1.0)
    return tokenizer, model, device, pad, stops


def _left_padded_generate(loaded, ids: list[list[int]], sampling: Sampling,
                          room: "_ContextRoom", *, continuation: bool = False) -> list[Reply]:
    """One ``generate`` call on prompts left-padded to one length (every prompt ends at the
    same column), each reply within the model's context (``room``); the replies decoded
    without special tokens, stripped, each finished where a stop token is among its own
    tokens (a row stopped by its room is padded after: not finished). ``continuation``
    (prompts without a chat template, whose text training joins to the reply's): the reply's
    text exactly as it continues the prompt's, unstripped (``_continuations``)."""
    import torch

    tokenizer, model, device, pad, stops = loaded
    longest = max(len(i) for i in ids)
    tokens = torch.full((len(ids), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, prompt in enumerate(ids):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    options = dict(do_sample=False) if sampling.temperature == 0 else dict(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    new_tokens, rows = room.limits(ids, sampling.max_new_tokens)
    if rows is not None:  # a row with less room stops there (the others go on)
        from transformers import StoppingCriteria, StoppingCriteriaList

        limits = torch.tensor(rows, device=device)

        class RoomLeft(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return limits <= input_ids.shape[1] - longest

        options["stopping_criteria"] = StoppingCriteriaList([RoomLeft()])
    with torch.no_grad():
        out = model.generate(input_ids=tokens.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new_tokens, pad_token_id=pad,
                             eos_token_id=stops, **options)
    texts = tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)
    texts = _continuations(tokenizer, ids, out[:, longest:].tolist(), texts) if continuation \
        else [text.strip() for text in texts]
    own = rows or [new_tokens] * len(ids)  # each row's own tokens: at most its limit
    return [Reply(text, any(t in stops for t in out[i, longest:longest + own[i]].tolist()))
            for i, text in enumerate(texts)]


def _continuations(tokenizer, prompts: list[list[int]], replies: list[list[int]],
                   alone: list[str]) -> list[str]:
    """Each reply's text as it continues its prompt's: decode(prompt + reply) after
    decode(prompt) (a SentencePiece reply decoded alone loses its first space), else the reply
    decoded alone (``alone``); never stripped."""
    starts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    fulls = tokenizer.batch_decode([p + r for p, r in zip(prompts, replies)],
                                   skip_special_tokens=True)
    return [full[len(start):] if full.startswith(start) else text
            for start, full, text in zip(starts, fulls, alone)]


class _ContextRoom:
    """Each reply stops at the model's context (``max_position_embeddings``), as vLLM's do
    (transformers' ``generate`` would go on past it); said once, when it shortens a reply."""

    def __init__(self, model):
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.said = False

    def limits(self, ids: list[list[int]], wanted: int) -> tuple[int, list[int] | None]:
        """(``max_new_tokens`` of the call, each row's own limit: None when all have room)."""
        import sys

        if self.context is None:
            return wanted, None
        rows = [max(1, min(wanted, self.context - len(prompt))) for prompt in ids]
        if min(rows) == wanted:
            return wanted, None
        if not self.said:
            self.said = True
            print(f"warning: replies stop at the model's context of {self.context} positions "
                  f"({sum(r < wanted for r in rows)} of {len(rows)} prompts leave room for "
                  f"fewer than the {wanted} new tokens asked)", file=sys.stderr, flush=True)
        return max(rows), rows


def transformers_generator(hf_dir: str | Path, *, seed: int, dtype: str,
                           apply_chat_template: bool):
    """``answers.Generate`` on ``transformers``: one ``generate`` call per sampling setting
    in the batch, prompts left-padded, each after ``torch.manual_seed`` from the run's seed and
    the stream of its first question (a resumed run's batches are the uninterrupted run's:
    the same samples); replies stop at the model's context."""
    import torch

    from megatron_simpo.data.tokenization import encode_prompts

    loaded = _causal_lm(hf_dir, dtype)
    room = _ContextRoom(loaded[1])

    def generate(conversations, samplings, streams):
        ids = encode_prompts(loaded[0], conversations, apply_chat_template=apply_chat_template)
        replies: list[str] = [""] * len(ids)
        for sampling, members in _groups(samplings).items():
            torch.manual_seed(stream_seed(seed, streams[members[0]]))
            texts = _left_padded_generate(loaded, [ids[i] for i in members], sampling, room)
            for i, text in zip(members, texts):
                replies[i] = text
        return replies

    return generate


Sample = Callable[[list[list[dict]], Sampling, tuple[int, ...]], list[list[str]]]
"""(conversations, sampling, seeds) -> for each conversation, one reply per seed (``Reply``s:
the samplers here say whether each ended)."""


def transformers_sampler(hf_dir: str | Path, *, dtype: str, apply_chat_template: bool) -> Sample:
    """``Sample`` on ``transformers``: sample k of every prompt in the batch comes from one
    ``generate`` call after ``torch.manual_seed(seeds[k])`` (prompts left-padded), so the same
    prompts, batch and seeds give the same samples; replies stop at the model's context.
    Without a chat template, replies are their prompts' exact continuations (training joins
    the two texts)."""
    import torch

    from megatron_simpo.data.tokenization import encode_prompts, uses_chat_template

    loaded = _causal_lm(hf_dir, dtype)
    room = _ContextRoom(loaded[1])
    continuation = not uses_chat_template(loaded[0], apply_chat_template)

    def sample(conversations, sampling, seeds):
        ids = encode_prompts(loaded[0], conversations, apply_chat_template=apply_chat_template)
        by_seed = []
        for seed in seeds:
            torch.manual_seed(seed)
            by_seed.append(_left_padded_generate(loaded, ids, sampling, room,
                                                 continuation=continuation))
        return [list(replies) for replies in zip(*by_seed)]

    return sample


DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
"""--dtype values both backends take (torch's names; vLLM's spellings)."""


def check_sampling(dtype: str, temperature: float | None, top_p: float | None) -> None:
    """The model dtype and the sampling settings of a command that generates, checked before
    any model loads (a NaN would pass a plain comparison; top-p above 1 is no nucleus)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if temperature is not None and not 0 <= temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


def check_model_source(hf: str | None, load: str | None, hf_out: str | None) -> None:
    """The model flags of a command that generates: one of --hf and --load, and --hf-out (with
    --load) new, empty or an earlier export, which the export replaces."""
    if (hf is None) == (load is None):
        raise ValueError("give one of --hf and --load")
    if hf_out and not load:
        raise ValueError("--hf-out goes with --load (it is where the checkpoint is exported)")
    if hf_out:
        check_replaceable(hf_out, "--hf-out")


def model_folder(stack: contextlib.ExitStack, *, hf: str | None, load: str | None,
                 hf_out: str | None) -> Path:
    """The Hugging Face folder to generate with: ``hf``, or the Megatron checkpoint ``load``
    exported through the converter to ``hf_out`` (default: a temporary folder that ``stack``
    removes)."""
    from megatron_simpo.convert.conversion import ExportConfig, export_hf

    if not load:
        return Path(hf)
    out = hf_out or stack.enter_context(tempfile.TemporaryDirectory(prefix="export-hf-"))
    hf_dir = export_hf(ExportConfig(load=load, save=str(out), force=True)).path
    print(f"> exported {load} to {hf_dir}")
    return Path(hf_dir)


def pick_backend(name: str) -> str:
    """auto: vLLM where it is installed and a GPU is present, else transformers; vllm asked for
    where it is not installed is the user's mistake (one line)."""
    import importlib.util

    installed = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not installed:
        raise ValueError("--backend vllm needs the vllm package (pip install vllm; on a CUDA "
                         "machine), or --backend transformers")
    if name != "auto":
        return name
    import torch

    return "vllm" if installed and torch.cuda.is_available() else "transformers"


@dataclass(frozen=True)
class AnswersConfig:
    """``megatron-simpo-generate-answers``: one benchmark's answer file from one model."""

    benchmark: Benchmark
    """the benchmark whose questions and answer format are used"""
    questions: str
    """the benchmark's question file (AlpacaEval: JSON list or JSONL with instruction;
    Arena-Hard, MT-Bench: question.jsonl)"""
    output: str
    """AlpacaEval: the answers' JSON file; Arena-Hard / MT-Bench: the benchmark's data folder
    (answers go to model_answer/<model-id>.jsonl)"""
    hf: str | None = None
    """a Hugging Face model folder (this or --load)"""
    load: str | None = None
    """a Megatron checkpoint (save folder or iter_ folder; this or --hf)"""
    hf_out: str | None = None
    """with --load: keep the exported HF folder here (default: a temporary folder, removed at
    the end)"""
    model_id: str | None = None
    """the name in the answers (default: the model folder's name)"""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """auto: vLLM where it is installed and a GPU is present, else transformers"""
    temperature: float | None = None
    """override"""
    top_p: float | None = None
    """override"""
    max_new_tokens: int | None = None
    """override"""
    seed: int = 0
    """the sampling seed"""
    batch_size: int = 8
    """questions per generate call"""
    tensor_parallel_size: int = 1
    """vLLM only"""
    apply_chat_template: bool = True
    """the model was trained with --no-apply-chat-template: questions are encoded as plain text
    with the tokenizer's special tokens"""
    dtype: str = "auto"
    """model dtype (auto: bf16 on a GPU, fp32 on CPU for transformers; the checkpoint's for
    vLLM)"""

    def __post_init__(self) -> None:
        check_model_source(self.hf, self.load, self.hf_out)
        for flag, value in (("--batch-size", self.batch_size),
                            ("--max-new-tokens", self.max_new_tokens),
                            ("--tensor-parallel-size", self.tensor_parallel_size)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1")
        check_sampling(self.dtype, self.temperature, self.top_p)

    @property
    def overrides(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens)


def keep_settings(answers: Path, settings: dict) -> None:
    """Record what makes ``answers`` (the model, backend, seed, sampling) beside it, in
    ``<file>.settings.json``; a resume that would complete the file with other settings is
    refused, naming each difference (files written before this record are not checked)."""
    record = answers.with_name(answers.name + ".settings.json")
    if answers.is_file() and record.is_file():
        differ = settings_record.differences(record, settings,
                                             start_over=f"{answers} and {record}")
        if differ:
            raise ValueError(f"{answers} holds answers made with other settings "
                             f"({'; '.join(differ)}): give the same ones to complete it, or "
                             "another --output or --model-id")
    settings_record.write(record, settings)


def generate_answers(config: AnswersConfig) -> Path:
    """Write (or complete) the answer file; every input is checked before any model loads
    (ValueError naming the flag or file)."""
    backend = pick_backend(config.backend)
    if backend == "transformers" and config.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size is vLLM's: the transformers backend runs on one "
                         "device")
    questions = read_questions(config.benchmark, config.questions)
    if config.hf and not (Path(config.hf) / "config.json").is_file():
        raise ValueError(f"--hf {config.hf}: no config.json (not a Hugging Face model folder)")
    model_id = config.model_id or Path(config.load or config.hf).resolve().name
    # An unreadable answer file, or a folder for it that cannot be made, is found before any
    # model is loaded.
    answers = answer_path(config.benchmark, config.output, model_id)
    try:
        answers.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output {config.output}: cannot make the folder {answers.parent} "
                         f"({error.strerror or error})") from None
    answered(config.benchmark, answers, answer_key(questions))
    model = settings_record.model_identity(config.hf, config.load)  # --load: its iteration now
    keep_settings(answers, dict(
        model=model, backend=backend, seed=config.seed, dtype=config.dtype,
        apply_chat_template=config.apply_chat_template, **config.overrides,
        # transformers samples per batch: another batch size, other samples (vLLM: per request)
        **({"batch_size": config.batch_size} if backend == "transformers" else {})))
    with contextlib.ExitStack() as stack:
        hf_dir = model_folder(stack, hf=config.hf, load=model if config.load else None,
                              hf_out=config.hf_out)
        options = dict(seed=config.seed, dtype=config.dtype,
                       apply_chat_template=config.apply_chat_template)
        if backend == "vllm":
            generate = vllm_generator(hf_dir, tensor_parallel_size=config.tensor_parallel_size,
                                      **options)
        else:
            generate = transformers_generator(hf_dir, **options)
        count_tokens = None
        if config.benchmark == "arena_hard":
            count_tokens, how = token_counter(hf_dir, ARENA_HARD_ENCODING[answer_key(questions)])
            print(f"> Arena-Hard token_len: {how}")
        path = write_answers(config.benchmark, questions, generate, output=config.output,
                             model_id=model_id, overrides=config.overrides,
                             batch_size=config.batch_size, count_tokens=count_tokens)
    print(f"> wrote {path} ({backend}, model id {model_id})")
    return path
