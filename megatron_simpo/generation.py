"""Generating benchmark answers from a trained model: ``megatron-simpo-generate-answers``.

The model is a Hugging Face folder, or a Megatron checkpoint (any TP/PP) exported to one with
the project's converter first. Prompts are rendered exactly as training rendered them
(``data.encode_prompts``: the chat template's BOS and no other), so evaluation never sees a
double BOS or another template. Backends: vLLM when installed and a GPU is present (its own
tensor parallelism), else Hugging Face transformers (batched, left padding; CPU or GPU).
The answer files and sampling defaults are ``answers.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from megatron_simpo.answers import (BENCHMARKS, SAMPLING, QuestionError, Sampling, answer_path,
                                    answered, read_questions, write_answers)


def _groups(samplings: list[Sampling]) -> dict[Sampling, list[int]]:
    groups: dict[Sampling, list[int]] = {}
    for index, sampling in enumerate(samplings):
        groups.setdefault(sampling, []).append(index)
    return groups


def transformers_generator(hf_dir: str | Path, *, seed: int = 0, dtype: str = "auto",
                           apply_chat_template: bool = True):
    """``answers.Generate`` on ``transformers``: one ``generate`` call per sampling setting
    in the batch, prompts left-padded."""
    import torch
    import transformers

    from megatron_simpo.data import encode_prompts

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
    torch.manual_seed(seed)

    def generate(conversations, samplings):
        ids = encode_prompts(tokenizer, conversations,
                             apply_chat_template=apply_chat_template)
        replies: list[str] = [""] * len(ids)
        for sampling, members in _groups(samplings).items():
            longest = max(len(ids[i]) for i in members)
            tokens = torch.full((len(members), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(members), longest), dtype=torch.long)
            for row, i in enumerate(members):  # left padding: every prompt ends at the same column
                tokens[row, longest - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, longest - len(ids[i]):] = 1
            options = dict(do_sample=False) if sampling.temperature == 0 else dict(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            with torch.no_grad():
                out = model.generate(input_ids=tokens.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=sampling.max_new_tokens, pad_token_id=pad,
                                     eos_token_id=stops, **options)
            texts = tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)
            for i, text in zip(members, texts):
                replies[i] = text.strip()
        return replies

    return generate


def vllm_generator(hf_dir: str | Path, *, seed: int = 0, tensor_parallel_size: int = 1,
                   dtype: str = "auto", apply_chat_template: bool = True):
    """``answers.Generate`` on vLLM, from our token ids (vLLM never re-renders the prompt)."""
    import transformers
    from vllm import LLM, SamplingParams

    from megatron_simpo.data import encode_prompts

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    llm = LLM(model=str(hf_dir), tensor_parallel_size=tensor_parallel_size, seed=seed,
              dtype=dtype)

    def generate(conversations, samplings):
        ids = encode_prompts(tokenizer, conversations,
                             apply_chat_template=apply_chat_template)
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                 max_tokens=s.max_new_tokens) for s in samplings]
        outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params)
        return [o.outputs[0].text.strip() for o in outputs]

    return generate


def pick_backend(name: str) -> str:
    """auto: vLLM where it is installed and a GPU is present, else transformers."""
    if name != "auto":
        return name
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else \
        "transformers"


@contextlib.contextmanager
def _environment_kept(*names: str):
    """The converter hides GPUs from its process (conversion is CPU work): keep them visible
    for the generation that follows in this one."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def export_checkpoint(load: str | Path, out: Path) -> Path:
    """A Megatron checkpoint (save folder or iter_ folder, any TP/PP) as an HF folder."""
    from megatron_simpo.convert.cli import megatron_to_hf_main

    with _environment_kept("CUDA_VISIBLE_DEVICES"):
        megatron_to_hf_main(["--load", str(load), "--save", str(out), "--force"])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_answers",
        description="Answer files for AlpacaEval 2, Arena-Hard and MT-Bench from a trained model")
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    parser.add_argument("--questions", required=True,
                        help="the benchmark's question file (AlpacaEval: JSON list or JSONL "
                             "with instruction; Arena-Hard, MT-Bench: question.jsonl)")
    parser.add_argument("--output", required=True,
                        help="AlpacaEval: the answers' JSON file; Arena-Hard / MT-Bench: the "
                             "benchmark's data folder (answers go to model_answer/<model-id>.jsonl)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", help="a Hugging Face model folder")
    model.add_argument("--load", help="a Megatron checkpoint (save folder or iter_ folder)")
    parser.add_argument("--hf-out", help="with --load: keep the exported HF folder here "
                                         "(default: a temporary folder, removed at the end)")
    parser.add_argument("--model-id", help="the name in the answers (default: the model "
                                           "folder's name)")
    parser.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    parser.add_argument("--temperature", type=float,
                        help="override (defaults: " + ", ".join(
                            f"{b} {s.temperature}" for b, s in SAMPLING.items())
                        + " with FastChat's per-category values)")
    parser.add_argument("--top-p", type=float, help="override (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, help="override (defaults: " + ", ".join(
        f"{b} {s.max_new_tokens}" for b, s in SAMPLING.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    parser.add_argument("--no-apply-chat-template", dest="apply_chat_template",
                        action="store_false",
                        help="the model was trained with --no-apply-chat-template: questions are "
                             "encoded as plain text with the tokenizer's special tokens")
    parser.add_argument("--dtype", default="auto",
                        help="model dtype (auto: bf16 on a GPU, fp32 on CPU for transformers; "
                             "the checkpoint's for vLLM)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens",
                                                            args.max_new_tokens or 1),
                        ("--tensor-parallel-size", args.tensor_parallel_size)):
        if value < 1:
            parser.error(f"{flag} must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        parser.error("--temperature must be >= 0")
    backend = pick_backend(args.backend)
    if backend == "transformers" and args.tensor_parallel_size != 1:
        parser.error("--tensor-parallel-size is vLLM's: the transformers backend runs on one "
                     "device")
    if args.hf_out and not args.load:
        parser.error("--hf-out goes with --load (it is where the checkpoint is exported)")
    try:
        questions = read_questions(args.benchmark, args.questions)
    except QuestionError as error:
        parser.error(str(error))
    if args.hf and not (Path(args.hf) / "config.json").is_file():
        parser.error(f"--hf {args.hf}: no config.json (not a Hugging Face model folder)")
    model_id = args.model_id or Path(args.load or args.hf).resolve().name
    try:  # an unreadable answer file is found before any model is loaded
        answered(args.benchmark, answer_path(args.benchmark, args.output, model_id))
    except QuestionError as error:
        parser.error(str(error))
    with contextlib.ExitStack() as stack:
        if args.load:
            out = Path(args.hf_out) if args.hf_out else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="answers-hf-")))
            hf_dir = export_checkpoint(args.load, out)
        else:
            hf_dir = Path(args.hf)
        if backend == "vllm":
            generate = vllm_generator(hf_dir, seed=args.seed, dtype=args.dtype,
                                      tensor_parallel_size=args.tensor_parallel_size,
                                      apply_chat_template=args.apply_chat_template)
        else:
            generate = transformers_generator(hf_dir, seed=args.seed, dtype=args.dtype,
                                              apply_chat_template=args.apply_chat_template)
        overrides = dict(temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens)
        path = write_answers(args.benchmark, questions, generate, output=args.output,
                             model_id=model_id, overrides=overrides, batch_size=args.batch_size)
    print(f"> wrote {path} ({backend}, model id {model_id})")


if __name__ == "__main__":
    sys.exit(main())
