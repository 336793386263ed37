"""Answer files for the benchmarks the SimPO paper reports: AlpacaEval 2, Arena-Hard, MT-Bench.

Questions are the benchmark's own files, given by the user (nothing is downloaded); answers are
written in the exact layout each benchmark's judge reads:

* AlpacaEval 2: questions a JSON list (or JSONL) of ``{"instruction", "dataset"?}``; answers a
  JSON list of ``{"instruction", "output", "generator", "dataset"}``, in the questions' order.
* Arena-Hard, in the layout of the question file given (answers ``model_answer/<model>.jsonl``):
  arena-hard-auto up to ff46f0a (Nov 2024): ``question.jsonl`` rows ``{"question_id",
  "category", "turns": [{"content"}]}``; answers ``{"question_id", "answer_id", "model_id",
  "choices": [{"index": 0, "turns": [{"content": ...}]}], "tstamp", "conv_metadata"}`` (turns
  are dicts). Since 900183d ("reformat v0.1", Apr 2025) and v2.0: questions ``{"uid",
  "category", "cluster" or "subcategory", "prompt"}``; answers ``{"uid", "ans_id", "model",
  "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content":
  {"answer": ...}}], "tstamp", "metadata"}``. ``conv_metadata`` / ``metadata``: the length
  and markdown counts its show_result.py's style control reads, on single-turn answers as
  arena-hard-auto writes them (``judge_metadata``; token_len in ``ARENA_HARD_ENCODING``).
* MT-Bench (FastChat llm_judge): ``question.jsonl`` rows ``{"question_id", "category",
  "turns": [str, str]}``; answers ``model_answer/<model>.jsonl`` rows with
  ``"choices": [{"index": 0, "turns": [str, str]}]`` (turns are strings); the second turn is
  generated with the model's first answer in the conversation.

Sampling follows the SimPO authors' evaluation settings and each benchmark's generation script
(``SAMPLING``); every value can be overridden. An interrupted run resumes: questions already in
the answer file are skipped.
"""

from __future__ import annotations

import json
import time
import zlib
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

from megatron_simpo.distributed.files import jsonl_lines, write_text_atomically
from megatron_simpo.evaluation.judge_metadata import TokenCount, conv_metadata

Benchmark = Literal["alpaca_eval", "arena_hard", "mt_bench"]
BENCHMARKS: tuple[str, ...] = ("alpaca_eval", "arena_hard", "mt_bench")


@dataclass(frozen=True)
class Sampling:
    temperature: float
    """0 = greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 4096


class Reply(str):
    """A sampled reply's text (decoded without special tokens, stripped), which knows whether
    it ended: ``finished`` is False where it was cut at ``max_new_tokens`` or the model's
    context, before any stop token (a str, so wherever text goes, it goes)."""

    finished: bool

    def __new__(cls, text: str, finished: bool) -> "Reply":
        reply = super().__new__(cls, text)
        reply.finished = bool(finished)
        return reply


SAMPLING: dict[str, Sampling] = {
    # SimPO's AlpacaEval 2 configs (vLLM): temperature 0.9, top_p 1.0.
    "alpaca_eval": Sampling(temperature=0.9, top_p=1.0, max_new_tokens=4096),
    # Arena-Hard's gen_answer_config: temperature 0 (greedy), max_tokens 4096.
    "arena_hard": Sampling(temperature=0.0, max_new_tokens=4096),
    # FastChat's gen_model_answer: max_new_token 1024, temperature by category below.
    "mt_bench": Sampling(temperature=0.7, max_new_tokens=1024),
}
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                        "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
"""FastChat's temperature_config; other categories take 0.7, as FastChat does."""
ARENA_HARD_ENCODING = {"question_id": "cl100k_base", "uid": "o200k_base"}
"""Arena-Hard's token_len encoding by the question file's id field: gpt-3.5-turbo's up to
ff46f0a, gpt-4o's since 900183d (``tiktoken.encoding_for_model`` in its gen_answer.py)."""


class QuestionError(ValueError):
    """A question file that is not in its benchmark's format; the message names file and row."""


@dataclass(frozen=True)
class Question:
    key: str
    """The question's identity in the answer file (question_id; AlpacaEval: the instruction)."""
    turns: tuple[str, ...]
    category: str | None = None
    extra: tuple[tuple[str, object], ...] = ()
    """Fields copied to the answer (AlpacaEval's dataset)."""
    question_id: int | str | None = None
    """The question file's question_id (uid) as written there (its JSON type kept: MT-Bench's
    are numbers, Arena-Hard's hex strings, which may be all digits)."""
    id_field: str = "question_id"
    """"uid" for Arena-Hard questions in arena-hard-auto's layout since 900183d (answers in that
    layout too)."""


def _read_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) of a JSON list or a JSON-lines file."""
    if not path.is_file():
        raise QuestionError(f"{path}: no such question file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return [(f"{path} item {i}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as error:
            raise QuestionError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    rows = []
    for number, line in jsonl_lines(text):
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise QuestionError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def read_questions(benchmark: str, path: str | Path) -> list[Question]:
    """The questions of a benchmark's question file, checked against its format."""
    questions = []
    for where, row in _read_rows(Path(path)):
        if not isinstance(row, dict):
            raise QuestionError(f"{where}: a question must be a JSON object")
        if benchmark == "alpaca_eval":
            if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise QuestionError(f"{where}: needs a non-empty 'instruction' string")
            questions.append(Question(row["instruction"], (row["instruction"],),
                                      extra=(("dataset", row.get("dataset", "custom")),)))
            continue
        if benchmark == "arena_hard" and "uid" in row and "question_id" not in row:
            questions.append(_uid_question(where, row))
        elif "question_id" not in row:
            raise QuestionError(f"{where}: missing 'question_id'" + (
                " (or 'uid' and 'prompt': arena-hard-auto's layout since its v0.1 reformat)"
                if benchmark == "arena_hard" else ""))
        else:
            questions.append(_turns_question(benchmark, where, row))
        if questions[-1].id_field != questions[0].id_field:
            raise QuestionError(f"{where}: a question with '{questions[-1].id_field}' after "
                                f"ones with '{questions[0].id_field}': one arena-hard-auto "
                                "layout per file")
    keys = [q.key for q in questions]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise QuestionError(f"{path}: question {duplicate!r} appears twice")
    return questions


def _uid_question(where: str, row: dict) -> Question:
    """An Arena-Hard question in arena-hard-auto's layout since 900183d: uid, prompt."""
    if not isinstance(row.get("prompt"), str):
        raise QuestionError(f"{where}: 'prompt' must be a string (Arena-Hard's format since "
                            "arena-hard-auto's v0.1 reformat: uid, category, prompt)")
    return Question(str(row["uid"]), (row["prompt"],), row.get("category"),
                    question_id=row["uid"], id_field="uid")


def _turns_question(benchmark: str, where: str, row: dict) -> Question:
    """An MT-Bench question, or an Arena-Hard one in arena-hard-auto's layout up to ff46f0a."""
    turns = row.get("turns")
    if benchmark == "arena_hard":
        ok = isinstance(turns, list) and turns and all(
            isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns)
        if not ok:
            raise QuestionError(f"{where}: 'turns' must be a list of {{\"content\": str}} "
                                "(Arena-Hard's format)")
        turns = [t["content"] for t in turns]
    elif not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise QuestionError(f"{where}: 'turns' must be a list of strings (MT-Bench's format)")
    return Question(str(row["question_id"]), tuple(turns), row.get("category"),
                    question_id=row["question_id"])


def answer_key(questions: list[Question]) -> str:
    """The field that names an answer's question: the question file's id field."""
    return questions[0].id_field if questions else "question_id"


def sampling_for(benchmark: str, question: Question, overrides: dict) -> Sampling:
    """The benchmark's sampling for this question, with the user's overrides."""
    sampling = SAMPLING[benchmark]
    if benchmark == "mt_bench":
        sampling = replace(sampling, temperature=MT_BENCH_TEMPERATURE.get(
            question.category or "", sampling.temperature))
    return replace(sampling, **{k: v for k, v in overrides.items() if v is not None})


def answer_path(benchmark: str, output: str | Path, model_id: str) -> Path:
    """AlpacaEval: the JSON file ``output``; Arena-Hard / MT-Bench: ``output/model_answer/
    <model_id>.jsonl`` (the folder layout their judges read)."""
    output = Path(output)
    return output if benchmark == "alpaca_eval" else output / "model_answer" / f"{model_id}.jsonl"


def answered(benchmark: str, path: Path, key: str = "question_id") -> dict[str, dict]:
    """The answers already in ``path`` by question key (resuming an interrupted run); ``key``:
    the field naming the question (:func:`answer_key`)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if benchmark == "alpaca_eval":  # replaced atomically: whole or absent
        try:
            return {row["instruction"]: row for row in json.loads(data.decode("utf-8"))}
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
            raise QuestionError(f"{path}: not an AlpacaEval answer list; move it away or give "
                                "another --output") from None
    lines = [line for line in data.split(b"\n") if line.strip()]
    rows, kept = [], []
    for number, line in enumerate(lines, start=1):
        try:  # (a cut can fall inside a character: bytes until a line is whole)
            text = line.decode("utf-8")
            rows.append(json.loads(text))
            kept.append(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number < len(lines):
                raise QuestionError(f"{path}:{number}: not valid JSON; move the file away or "
                                    "give another --output") from None
            # The run was stopped while writing its last line: dropped, it is asked again.
    if len(kept) < len(lines) or not data.endswith(b"\n"):
        # Whole lines only, each ended (the next answers are appended after them): a last line
        # cut before its newline would take the next answer onto it.
        write_text_atomically(path, "".join(line + "\n" for line in kept))
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or key not in row:
            raise QuestionError(f"{path}:{number}: not an answer row (no '{key}'); move the "
                                "file away or give another --output")
    return {str(row[key]): row for row in rows}


def answer_record(benchmark: str, question: Question, outputs: list[str], model_id: str,
                  count_tokens: TokenCount | None = None) -> dict:
    """One answer in the benchmark's format (``count_tokens``: Arena-Hard's token_len)."""
    if benchmark == "alpaca_eval":
        return {"instruction": question.key, "output": outputs[0], "generator": model_id,
                **dict(question.extra)}
    if benchmark == "arena_hard" and len(outputs) == 1 and count_tokens is None:
        raise ValueError("Arena-Hard answers carry token_len: give count_tokens "
                         "(judge_metadata.token_counter)")
    if question.id_field == "uid":  # arena-hard-auto's gen_answer.py since 900183d
        return {"uid": question.question_id, "ans_id": uuid.uuid4().hex, "model": model_id,
                "messages": [{"role": "user", "content": question.turns[0]},
                             {"role": "assistant", "content": {"answer": outputs[0]}}],
                "tstamp": time.time(), "metadata": conv_metadata(outputs[0], count_tokens)}
    turns = [{"content": o} for o in outputs] if benchmark == "arena_hard" else list(outputs)
    record = {"question_id": question.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
              "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}
    if benchmark == "arena_hard" and len(outputs) == 1:
        record["conv_metadata"] = conv_metadata(outputs[0], count_tokens)
    return record


Generate = Callable[[list[list[dict]], list[Sampling], list[int]], list[str]]
"""(conversations, their sampling, their streams) -> the model's next assistant message for
each. A stream (:func:`stream_of`) names a question's turn: a generator seeds its sampling
from the streams, so a resumed run samples what an uninterrupted one did."""


def stream_of(question: Question, turn: int) -> int:
    """A number for ``question``'s turn ``turn``: the same in every run (not Python's hash,
    which is salted per process)."""
    return zlib.crc32(f"{question.key}\0{turn}".encode("utf-8"))


def stream_seed(seed: int, stream: int) -> int:
    """The sampling seed of a batch (or a request) from the run's seed and its stream."""
    return (seed * 4_294_967_311 + stream) % 2**63


def write_answers(benchmark: str, questions: list[Question], generate: Generate, *,
                  output: str | Path, model_id: str, overrides: dict, batch_size: int = 8,
                  count_tokens: TokenCount | None = None,
                  say: Callable[[str], None] = print) -> Path:
    """Answer every question not yet in the answer file, in batches of ``batch_size``
    consecutive questions; the file is updated after each batch (atomically for AlpacaEval's
    JSON list, by appended lines for the others), so an interruption loses at most one batch.
    A batch is answered whole or asked again whole (its answers of a cut batch are dropped):
    a generator may sample per batch, so a resumed run asks exactly the batches an
    uninterrupted one asked. ``count_tokens``: Arena-Hard's ``token_len`` (needed for
    arena_hard)."""
    path = answer_path(benchmark, output, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = answered(benchmark, path, answer_key(questions))
    batches = [questions[start:start + batch_size]
               for start in range(0, len(questions), batch_size)]
    cut = [q.key for batch in batches if 0 < sum(q.key in done for q in batch) < len(batch)
           for q in batch if q.key in done]
    if cut:
        for key in cut:
            del done[key]
        _rewrite(benchmark, path, done, questions)
        say(f"> {benchmark}: {len(cut)} answer(s) of a batch the last run did not finish are "
            "asked again with their batch")
    batches = [batch for batch in batches if not all(q.key in done for q in batch)]
    todo = sum(map(len, batches))
    say(f"> {benchmark}: {len(questions)} questions, {len(questions) - todo} already "
        f"answered in {path}, {todo} to go")
    answered_now = 0
    for batch in batches:
        samplings = [sampling_for(benchmark, q, overrides) for q in batch]
        conversations = [[] for _ in batch]
        outputs = [[] for _ in batch]
        for turn in range(max(len(q.turns) for q in batch)):
            live = [i for i, q in enumerate(batch) if turn < len(q.turns)]
            for i in live:
                conversations[i].append({"role": "user", "content": batch[i].turns[turn]})
            replies = generate([list(conversations[i]) for i in live],
                               [samplings[i] for i in live],
                               [stream_of(batch[i], turn) for i in live])
            for i, reply in zip(live, replies):
                conversations[i].append({"role": "assistant", "content": reply})
                outputs[i].append(reply)
        records = [answer_record(benchmark, q, o, model_id, count_tokens)
                   for q, o in zip(batch, outputs)]
        if benchmark == "alpaca_eval":
            done.update((r["instruction"], r) for r in records)
            _rewrite(benchmark, path, done, questions)
        else:
            with path.open("a", encoding="utf-8") as out:  # one write: the batch whole
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        answered_now += len(batch)
        say(f"> {benchmark}: {answered_now}/{todo} answered")
    return path


def _rewrite(benchmark: str, path: Path, done: dict[str, dict],
             questions: list[Question]) -> None:
    """The answer file with the answers ``done`` only (atomically): AlpacaEval's list in the
    questions' order, the others' lines in the order they were written."""
    if benchmark == "alpaca_eval":
        text = json.dumps([done[q.key] for q in questions if q.key in done], indent=1,
                          ensure_ascii=False)
    else:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in done.values())
    write_text_atomically(path, text)
