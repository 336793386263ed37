"""Chat templates and tokenization: preference rows to token ids, truncated to length.

A row's prompt and responses (strings, or lists of {role, content} messages) are rendered with
the tokenizer's chat template; the response tokens are what the template adds after the
generation prompt. The prompt loses tokens on the left (``--max-prompt-length``), the responses
on the right (``--seq-length``). ``encode_prompts`` is shared with generation for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_simpo.data.collate import TokenizedPair
from megatron_simpo.data.config import DataConfig, DataError
from megatron_simpo.data.sources import TEMPLATE_COLUMNS
from megatron_simpo.distributed.files import first_line, joined_lines


def _messages(value, where: str, column: str, roles: tuple[str, ...] = ()) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if column == "prompt" else \
               [{"role": "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                       for m in value):
        # (an assistant turn that calls tools has no text: content null beside its tool_calls)
        if any(m["content"] is None and not m.get("tool_calls") for m in value):
            raise DataError(f"{where}: column {column!r} has a message whose content is null")
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


def prompt_messages(value, where: str, roles: tuple[str, ...]) -> list[dict]:
    """A prompt (a string, or {role, content} messages) as the messages training renders: a
    string is one user message; roles must be among ``roles`` (``known_roles``); an empty
    prompt raises DataError naming ``where``. On-policy sampling reads prompts through this."""
    messages = _messages(value, where, "prompt", roles)
    if not any(str(m["content"]).strip() for m in messages):
        raise DataError(f"{where}: empty prompt")
    return messages


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
    answer and ``<|eot_id|>``); without a chat template prompt + response is encoded as one
    text with the tokenizer's special tokens (one BOS, also where the text carries it), the
    response is what follows the prompt's tokens (where a token merges across the boundary, it
    goes to the response, as in TRL), and EOS is appended unless the text ends with it. A
    prompt cut on the left keeps its BOS.
    """
    has_template = uses_chat_template(tokenizer, config.apply_chat_template)
    roles = known_roles(tokenizer)
    prompts, fulls = [], []
    options = [template_options(row, row["source"]) for row in rows]
    asking = next((row["source"] for row, o in zip(rows, options) if o), None)
    if asking is not None and not has_template:
        raise DataError(f"{asking}: its {' and '.join(TEMPLATE_COLUMNS)} go to the chat "
                        "template, which is not applied here (--no-apply-chat-template, or a "
                        "tokenizer without one)")
    for row in rows:
        where = row["source"]
        prompt = prompt_messages(row["prompt"], where, roles)
        responses = [_response_messages(prompt, row[c], where, c) for c in ("chosen", "rejected")]
        prompts.append(prompt)
        if has_template:
            fulls.extend(prompt + r for r in responses)
        else:  # the prompt's text and the response's, tokenized as one text (as TRL does)
            fulls.extend(plain_text(prompt, where) + plain_text(r, where, joiner="")
                         for r in responses)
    if not rows:
        return []
    # One batched call per kind: the template is rendered far faster than row by row.
    prompt_ids = encode_prompts(tokenizer, prompts, apply_chat_template=has_template,
                                sources=[row["source"] for row in rows], options=options)
    if has_template:
        fulls = render(tokenizer, fulls, [o for o in options for _ in range(2)],
                       [row["source"] for row in rows for _ in range(2)])
        full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    else:
        eos = tokenizer.eos_token_id
        full_ids = [ids + [eos] if eos is not None and ids[-1:] != [eos] else ids
                    for ids in _one_bos(tokenizer, tokenizer(fulls, add_special_tokens=True)
                                        ["input_ids"])]
    records = []
    for index, row in enumerate(rows):
        prompt = prompt_ids[index]
        pair_ids = full_ids[2 * index:2 * index + 2]
        if has_template:
            for column, full in zip(("chosen", "rejected"), pair_ids):
                if full[:len(prompt)] != prompt:
                    raise DataError(f"{row['source']}: the chat template does not render the "
                                     f"prompt as a prefix of the conversation; cannot find the "
                                     f"{column} response tokens")
        else:  # the response starts where the texts' tokens part (a merge across the boundary)
            prompt = prompt[:min(_common_prefix(prompt, full) for full in pair_ids)]
            if not prompt:
                raise DataError(f"{row['source']}: the prompt's tokens merge with the "
                                 "response's; no prompt token is left")
        answers = [full[len(prompt):] for full in pair_ids]
        kept_prompt = _keep_end(prompt, config.max_prompt_length, tokenizer.bos_token_id)
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


def plain_text(messages: list[dict], where: str = "", joiner: str = "\n") -> str:
    """Messages as text without a chat template (roles dropped); content must be text."""
    if any(not isinstance(m["content"], str) for m in messages):
        raise DataError(f"{where}: a message's content is not text; without a chat template "
                        "only string contents can be encoded")
    return joiner.join(m["content"] for m in messages)


def _one_bos(tokenizer, encoded: list[list[int]]) -> list[list[int]]:
    """Encodings with special tokens whose text began with the BOS token already: the added
    BOS dropped (one BOS, never two)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return encoded
    return [ids[1:] if ids[:2] == [bos, bos] else ids for ids in encoded]


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _keep_end(prompt: list[int], limit: int, bos: int | None) -> list[int]:
    """The prompt's last ``limit`` tokens; a leading BOS is kept (the model never sees a
    sequence without its start token)."""
    if len(prompt) <= limit:
        return prompt
    if bos is not None and limit >= 2 and prompt[0] == bos:
        return [bos] + prompt[len(prompt) - (limit - 1):]
    return prompt[-limit:]


SYSTEM_ROLES = ("native", "folds", "refuses")
_SYSTEM_PROBE = ("SYSTEM-PROBE", "USER-PROBE")


def system_role(tokenizer) -> tuple[str, str]:
    """How the chat template treats a system message, found by rendering a probe: ("native",
    ""), ("folds", "") when it renders as the first user turn prefixed by the system text and a
    blank line (Gemma-3's template, which has no system role), or ("refuses", the template's
    own message) when rendering raises (Gemma-2's: "System role not supported")."""
    system, user = _SYSTEM_PROBE
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja2's TemplateError, or whatever the template raises
        return "refuses", str(error).strip().splitlines()[0] if str(error).strip() else \
            type(error).__name__
    folded = tokenizer.apply_chat_template([{"role": "user", "content": f"{system}\n\n{user}"}],
                                           add_generation_prompt=True, tokenize=False)
    return ("folds" if with_system == folded else "native"), ""


def check_system_messages(tokenizer, conversations: list[list[dict]],
                          sources: list[str] | None = None, tokenizer_path=None) -> list[str]:
    """System messages follow the template's own rule, nothing is rewritten: where the template
    refuses them (it would raise), one line naming the first such row (``sources[i]``, else
    "prompt i"); where it folds them into the first user turn, the returned note says so."""
    with_system = [i for i, messages in enumerate(conversations)
                   if any(m.get("role") == "system" for m in messages)]
    if not with_system or getattr(tokenizer, "chat_template", None) is None:
        return []
    rule, reason = system_role(tokenizer)
    if rule == "refuses":
        index = with_system[0]
        where = sources[index] if sources else f"prompt {index}"
        of = f" of {tokenizer_path}" if tokenizer_path else ""
        raise DataError(f"{where}: the chat template{of} refuses a system message ({reason}; "
                        f"{len(with_system)} prompt(s) have one): drop the system messages or "
                        "fold them into the first user turn")
    return system_role_note(tokenizer, tokenizer_path or "the tokenizer") if rule == "folds" else []


def system_role_note(tokenizer, tokenizer_path) -> list[str]:
    """The one-line note for a template that folds system messages into the first user turn
    (its own rule, kept), or none."""
    if getattr(tokenizer, "chat_template", None) is None or system_role(tokenizer)[0] != "folds":
        return []
    return [f"note: the chat template of {tokenizer_path} has no system role: a system message "
            "is folded into the first user turn (the template's own rule, e.g. Gemma-3's)"]


def uses_chat_template(tokenizer, apply_chat_template: bool = True) -> bool:
    """Whether prompts are rendered with a chat template: asked for, and the tokenizer has one."""
    return apply_chat_template and getattr(tokenizer, "chat_template", None) is not None


def template_options(row: dict, where: str) -> dict:
    """The chat template's keyword arguments a row asks for, as TRL's trainers pass them: its
    ``tools`` (tool schemas: a list of JSON objects, or its JSON text; an empty list is none)
    and its ``chat_template_kwargs`` (an object, e.g. ``{"enable_thinking": false}``)."""
    found = {}
    for column, kind in zip(TEMPLATE_COLUMNS, (list, dict)):
        value = row.get(column)
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else None
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: column {column!r} is not JSON ({error.msg})") from None
        if value in (None, [], {}):
            continue
        if not isinstance(value, kind) or kind is list and not all(isinstance(t, dict)
                                                                   for t in value):
            raise DataError(f"{where}: column {column!r} must be "
                            + ("a list of tool schemas (JSON objects)" if kind is list
                               else "a JSON object of the chat template's arguments"))
        found[column] = value
    options = dict(found.get("chat_template_kwargs", {}))
    clash = sorted(set(options) & _TEMPLATE_ARGUMENTS)
    if clash:
        raise DataError(f"{where}: column 'chat_template_kwargs' sets {', '.join(clash)}, "
                        "which tokenization decides")
    if "tools" in found:
        options["tools"] = found["tools"]
    return options


_TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tools", "tokenize",
                                 "add_generation_prompt", "return_assistant_tokens_mask",
                                 "continue_final_message", "return_dict", "return_tensors",
                                 "padding", "truncation", "max_length", "chat_template"})
"""``apply_chat_template``'s own arguments: not a row's to set."""


def render(tokenizer, conversations: list[list[dict]], options: list[dict] | None = None,
           sources: list[str] | None = None, **kwargs) -> list[str]:
    """``apply_chat_template(..., tokenize=False)`` of each conversation with its row's
    ``options`` (:func:`template_options`): those without any in one batched call (far faster
    than one by one). A template that renders a row's tools as if there were none (it has no
    tool support) is refused: the prompt would silently lack them. A template that raises for a
    conversation (its own check, e.g. roles that must alternate) is refused naming the row
    (``sources[i]``), not a traceback."""
    options = options or [{}] * len(conversations)
    plain = [i for i, o in enumerate(options) if not o]
    texts: list = [None] * len(conversations)

    def where(i: int) -> str:
        return sources[i] if sources else f"conversation {i}"

    def one(i: int, **more) -> str:
        try:
            return tokenizer.apply_chat_template(conversations[i], tokenize=False, **kwargs,
                                                 **more)
        except Exception as error:  # jinja2's TemplateError, or whatever the template raises
            reason = first_line(error)
            raise DataError(f"{where(i)}: the chat template refuses this conversation "
                            f"({reason})") from None

    if plain:
        try:
            batch = tokenizer.apply_chat_template([conversations[i] for i in plain],
                                                  tokenize=False, **kwargs)
        except Exception:
            batch = [one(i) for i in plain]  # the row it refuses, named (or the error again)
            raise
        for i, text in zip(plain, batch):
            texts[i] = text
    for i, o in enumerate(options):
        if o:
            texts[i] = one(i, **o)
            if "tools" in o and texts[i] == one(i, **{k: v for k, v in o.items()
                                                     if k != "tools"}):
                raise DataError(f"{where(i)}: the tokenizer's chat template renders no tools: "
                                "the row's 'tools' would be left out of its prompt")
    return texts


def encode_prompts(tokenizer, conversations: list[list[dict]], *,
                   apply_chat_template: bool = True,
                   sources: list[str] | None = None,
                   options: list[dict] | None = None) -> list[list[int]]:
    """Token ids of prompts exactly as training sees them: the chat template with the
    generation prompt, encoded without adding special tokens again (the template's BOS is the
    only one); without a template (none, or not applied), the messages' text with the
    tokenizer's special tokens. Generation for evaluation uses this too, so it never differs
    from training. System messages follow the template's own rule (``check_system_messages``:
    refused in one line naming the row, ``sources[i]``, where the template refuses them).
    ``options``: each conversation's template arguments (:func:`template_options`)."""
    if uses_chat_template(tokenizer, apply_chat_template):
        check_system_messages(tokenizer, conversations, sources)
        rendered = render(tokenizer, conversations, options, sources,
                          add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    texts = [plain_text(messages, sources[i] if sources else f"prompt {i}")
             for i, messages in enumerate(conversations)]
    return _one_bos(tokenizer, tokenizer(texts, add_special_tokens=True)["input_ids"])


def check_tokenizer(tokenizer, tokenizer_path, config: DataConfig,
                     vocab_size: int | None) -> list[str]:
    """Refuse a tokenizer larger than the model's vocabulary; warn (once, returned) when the
    chat template is asked for and the tokenizer has none."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise DataError(f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens, more than the "
                        f"model's vocabulary ({vocab_size}); give the model's own tokenizer "
                        "(--tokenizer)")
    if config.apply_chat_template and getattr(tokenizer, "chat_template", None) is not None:
        return system_role_note(tokenizer, tokenizer_path)
    if config.apply_chat_template:
        return [f"warning: tokenizer {tokenizer_path} has no chat template: pairs are tokenized "
                "as plain text, roles dropped; give --no-apply-chat-template if the columns are "
                "formatted already, or use a tokenizer with a chat template"]
    return []


def identical_pair_error(source: str, config: DataConfig) -> DataError:
    return DataError(f"{source}: chosen and rejected are the same tokens (after truncation to "
                     f"--seq-length {config.seq_length}); such a pair teaches nothing "
                     "(--identical-pairs drop skips them)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "tekken.json")
"""What a Hugging Face tokenizer folder holds at least one of (or a ``*.tiktoken`` file)."""


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from its folder (or Hub name); one line (:class:`DataError`)
    when it cannot be loaded."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not (any((folder / name).is_file() for name in TOKENIZER_FILES)
                                or any(folder.glob("*.tiktoken"))):
        raise DataError(f"cannot load tokenizer from {path}: the folder holds none of "
                        f"{', '.join(TOKENIZER_FILES)}, *.tiktoken")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:  # its lines joined: one line, every hint kept
        reason = joined_lines(error)
        raise DataError(f"cannot load tokenizer from {path}: "
                        f"{reason}") from error

