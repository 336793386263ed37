"""Rewards for on-policy pairs: a reward model (``--reward-model``) or a function (``--reward-fn``).

* A reward model is a Hugging Face sequence-classification model with one output
  (``num_labels`` 1: the reward is its logit), or one whose remote code (e.g.
  RLHFlow/ArmoRM-Llama3-8B-v0.1) returns an output carrying ``score``. It is applied as the SimPO
  authors' ``reward_model_annotate.py`` applies ArmoRM: its own tokenizer's chat template
  renders ``prompt messages + [{"role": "assistant", "content": response}]`` (no generation
  prompt, the template's own special tokens only), in the model's own dtype (on a GPU bfloat16
  where that is float32, as the authors load ArmoRM: ``reward_dtype``). Sequences are
  sorted by length and batched with right padding in the model's ``pad_token_id``; a sequence
  that ends in that id (or any, when the model has none) is scored alone, so batching never
  changes which token the model pools.
* Remote code runs only with ``--trust-remote-code``: it executes the model repository's
  Python. Which kind a model is comes from its ``config.json`` alone (read without running
  anything), before any weights load.
* A reward function is ``module:function`` (importable) or ``path/to/file.py:function``, called
  as ``function(prompt, response) -> float`` with the prompt as the source holds it (a string,
  or a list of messages) and the sampled response (a string): verifiable rewards.

``Score``: (prompts as the source holds them, their messages, responses) -> one reward each.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
from pathlib import Path
from typing import Callable

from megatron_simpo.distributed.files import first_line, joined_lines

Score = Callable[[list[object], list[list[dict]], list[str]], list[float]]


def check_reward_model(path: str, trust_remote_code: bool) -> bool:
    """Whether the model at ``path`` runs remote code (only allowed with ``trust_remote_code``);
    raises ValueError naming the flag for anything that is not a one-output sequence
    classifier. Reads ``config.json`` only (no code runs, no weights load)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as error:
        reason = first_line(error)
        raise ValueError(f"--reward-model {path}: cannot read its config.json ({reason})") from None
    architectures = config.get("architectures") or []
    remote = (config.get("auto_map") or {}).get("AutoModelForSequenceClassification")
    if remote:
        if not trust_remote_code:
            raise ValueError(f"--reward-model {path}: its sequence classifier is the model "
                             f"repository's own code ({remote}); it runs only with "
                             "--trust-remote-code")
        return True
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        kind = ", ".join(architectures) or "model without architectures"
        raise ValueError(f"--reward-model {path}: a {kind}, not a sequence-classification reward "
                         "model (architectures ending in ForSequenceClassification, or remote "
                         "code for AutoModelForSequenceClassification with --trust-remote-code)")
    labels = len(config.get("id2label") or {0: "", 1: ""})  # transformers' default is 2
    if labels != 1:
        raise ValueError(f"--reward-model {path}: a classifier with {labels} outputs; a reward "
                         "model has one (num_labels 1)")
    return False


_DOCSTRING_GONE = re.compile(r"cannot import name '(\w+_INPUTS_DOCSTRING)' from "
                             r"'(transformers\.[\w.]+)'")


def load_remote_code(path: str) -> type:
    """The remote-code reward model's class, its code imported before any weights load (it runs:
    --trust-remote-code). A docstring constant transformers no longer has (``*_INPUTS_DOCSTRING``:
    ArmoRM decorates its forward with LLAMA_INPUTS_DOCSTRING, gone from transformers 5) is given
    as empty text, which changes nothing the model computes; any other failure to import is one
    line naming the flag (it was a traceback once the policy had loaded)."""
    import transformers
    from transformers import PretrainedConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config, _ = PretrainedConfig.get_config_dict(path)
    reference = config["auto_map"]["AutoModelForSequenceClassification"]
    while True:
        try:
            return get_class_from_dynamic_module(reference, path)
        except Exception as error:  # ImportError, SyntaxError, whatever its top level raises
            gone = _DOCSTRING_GONE.search(str(error)) if isinstance(error, ImportError) else None
            module = importlib.import_module(gone.group(2)) if gone else None
            if module is None or hasattr(module, gone.group(1)):
                reason = first_line(error)
                raise ValueError(f"--reward-model {path}: its code ({reference}) does not load "
                                 f"with transformers {transformers.__version__} ({reason})") \
                    from None
            setattr(module, gone.group(1), "")


def _last_token_is_pad(ids: list[int], pad: int | None) -> bool:
    return pad is None or ids[-1] == pad


def length_batches(ids: list[list[int]], batch_size: int, pad: int | None) -> list[list[int]]:
    """Indices of ``ids`` in batches of similar length (sorted, longest first); sequences that
    cannot be padded without changing their pooled token go alone."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    alone = [[i] for i in order if _last_token_is_pad(ids[i], pad)]
    rest = [i for i in order if not _last_token_is_pad(ids[i], pad)]
    return [rest[s:s + batch_size] for s in range(0, len(rest), batch_size)] + alone


def _reward_tokenizer(path: str, trust_remote_code: bool):
    """The reward model's tokenizer; one that cannot be loaded, or has no chat template, is
    refused in one line naming the flag."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # its lines joined: one line, every hint kept
        reason = joined_lines(error)
        raise ValueError(f"--reward-model {path}: cannot load its tokenizer "
                         f"({reason})") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--reward-model {path}: its tokenizer has no chat template (the reward "
                         "is computed on the rendered conversation)")
    return tokenizer


def check_reward_template(path: str, trust_remote_code: bool, prompts: list[tuple]) -> None:
    """Before any model loads: the reward model's chat template renders the prompts (each
    ``(prompt as the source holds it, its source row)``) with a response; one whose template
    refuses a system message, or a prompt's conversation, is refused naming the first such row
    (``check_system_messages``, ``render``)."""
    from megatron_simpo.data.tokenization import check_system_messages, prompt_messages, render

    tokenizer = _reward_tokenizer(path, trust_remote_code)
    conversations = [prompt_messages(p, where, ()) for p, where in prompts]
    sources = [where for _, where in prompts]
    check_system_messages(tokenizer, conversations, sources,
                          tokenizer_path=f"--reward-model {path}")
    render(tokenizer, [c + [{"role": "assistant", "content": "x"}] for c in conversations],
           sources=[f"{where} (--reward-model {path})" for where in sources])


def reward_dtype(path: str, name: str, on_gpu: bool):
    """The reward model's dtype: ``name`` (--reward-dtype, torch's names), or for auto its own
    (its config's), except float32 (or none said) on a GPU: bfloat16, as the authors' script
    loads ArmoRM, whose config says float32 (half the memory beside vLLM, and their scores)."""
    import torch
    from transformers import PretrainedConfig

    if name != "auto":
        return getattr(torch, name)
    config, _ = PretrainedConfig.get_config_dict(path)
    own = config.get("dtype") or config.get("torch_dtype")
    return torch.bfloat16 if on_gpu and own in (None, "float32") else "auto"


def reward_model_scorer(path: str, *, trust_remote_code: bool, batch_size: int,
                        dtype: str = "auto") -> Score:
    """``Score`` from a reward model (module docstring) in ``reward_dtype``; the model loads on
    the GPU if any."""
    import torch
    import transformers

    from megatron_simpo.data.tokenization import check_system_messages

    if check_reward_model(path, trust_remote_code):
        load_remote_code(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _reward_tokenizer(path, trust_remote_code)
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, dtype=reward_dtype(path, dtype, device.type == "cuda"),
            trust_remote_code=trust_remote_code).to(device).eval()
    except (OSError, ValueError) as error:  # no weights, a damaged file: one line
        reason = joined_lines(error)
        raise ValueError(f"--reward-model {path}: cannot load its weights "
                         f"({reason})") from None
    pad = model.config.pad_token_id

    def score(prompts, conversations, responses):
        check_system_messages(tokenizer, conversations, tokenizer_path=f"--reward-model {path}")
        texts = tokenizer.apply_chat_template(
            [messages + [{"role": "assistant", "content": response}]
             for messages, response in zip(conversations, responses)], tokenize=False)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        rewards = [0.0] * len(ids)
        for members in length_batches(ids, batch_size, pad):
            longest = max(len(ids[i]) for i in members)
            tokens = torch.full((len(members), longest), pad if pad is not None else 0,
                                dtype=torch.long)
            mask = torch.zeros_like(tokens)
            for row, i in enumerate(members):
                tokens[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            with torch.no_grad():
                output = model(input_ids=tokens.to(device), attention_mask=mask.to(device))
            value = getattr(output, "score", None)
            value = output.logits[:, 0] if value is None else value
            for i, reward in zip(members, value.float().reshape(len(members), -1)[:, 0].tolist()):
                rewards[i] = reward
        return rewards

    return score


def load_reward_fn(spec: str) -> Callable[[object, str], float]:
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    module_name, colon, name = spec.rpartition(":")
    if not colon or not module_name or not name:
        raise ValueError(f"--reward-fn {spec}: give module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise ValueError(f"--reward-fn {spec}: {module_name} does not exist")
            found = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as error:
        raise ValueError(f"--reward-fn {spec}: cannot import {module_name} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward-fn {spec}: {module_name} has no function {name}")
    try:  # (a traceback at the first batch, once the model had loaded and sampled)
        inspect.signature(function).bind("prompt", "response")
    except TypeError as error:
        raise ValueError(f"--reward-fn {spec}: {name} is called as {name}(prompt, response), "
                         f"which it does not take ({error})") from None
    except ValueError:  # no signature to read (a builtin): it is called as it is
        pass
    return function


def reward_fn_scorer(spec: str) -> Score:
    """``Score`` from a reward function, called once per (prompt, response)."""
    function = load_reward_fn(spec)

    def score(prompts, conversations, responses):
        return [function(prompt, response) for prompt, response in zip(prompts, responses)]

    return score


def _real(value) -> float | None:
    """``value`` as a float where it is a real number of any kind (Python's or numpy's, or a
    one-element array or tensor of one), else None; a boolean is no reward."""
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        try:
            value = value.item()  # numpy scalars and arrays, torch tensors, of one element
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def checked_rewards(values: list, where: list[tuple]) -> list[float]:
    """Rewards as floats; anything that is not a finite real number is refused naming the
    prompt and sample (``where``: each value's prompt, with ``source`` and ``prompt_id``, and
    its sample index)."""
    out = []
    for (prompt, sample), value in zip(where, values):
        number = _real(value)
        if number is None or not math.isfinite(number):
            raise ValueError(f"reward {value!r} for {prompt.source} (prompt_id "
                             f"{prompt.prompt_id}) sample {sample}: rewards must be "
                             "finite numbers")
        out.append(number)
    return out
