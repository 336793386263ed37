"""Our answer files as the judges' own code reads them: FastChat's MT-Bench loaders and data
check, alpaca-eval's loader, and every field arena-hard-auto's show_result.py (with and without
style control) reads; Arena-Hard's markdown counts against hand-counted answers."""

import json

import pytest

from megatron_simpo.evaluation.answers import read_questions, write_answers
from megatron_simpo.evaluation.judge_metadata import (CL100K_URL, count_markdown,
                                                      tiktoken_cache_file, token_counter)

MARKDOWN = """# Plan
Intro with **bold one** and __bold two__ and a #hashtag.
## Steps
1. first
2. second
   10. nested ordered
- dash item
* star item
  + plus item
### Code
```python
# not a header
- not a list
**not bold**
```
#### Four
####### seven hashes is no header
-not a list (no space)
**unclosed bold
"""
"""Hand count: h1 1, h2 1, h3 1, h4 1; ordered 3, unordered 3; ** 1, __ 1 (the fenced block's
lines count as nothing)."""


def _words(text):
    return len(text.split())


def test_markdown_counts_follow_arena_hard_rules():
    assert count_markdown(MARKDOWN) == {
        "header_count": {"h1": 1, "h2": 1, "h3": 1, "h4": 1, "h5": 0, "h6": 0},
        "list_count": {"ordered": 3, "unordered": 3},
        "bold_count": {"**": 1, "__": 1}}
    # Fenced text is removed by value, wherever it occurs (arena-hard-auto's rule).
    assert count_markdown("**x**\n```**x**```\n") == {
        "header_count": {f"h{k}": 0 for k in range(1, 7)},
        "list_count": {"ordered": 0, "unordered": 0}, "bold_count": {"**": 0, "__": 0}}
    # Without the fence, the same lines count.
    assert count_markdown("# a\n- b\n**c**\n")["header_count"]["h1"] == 1


def test_token_count_falls_back_to_the_models_tokenizer_and_says_so(tmp_path, monkeypatch):
    import hashlib

    import transformers

    from megatron_simpo.model.tiny import build_tokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    assert tiktoken_cache_file() == (tmp_path / "cache" /
                                     hashlib.sha1(CL100K_URL.encode()).hexdigest())
    build_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "cache").mkdir()
    tiktoken_cache_file().write_bytes(b"not the encoding")  # a damaged cache file is not used
    count, how = token_counter(tmp_path / "tok")
    assert "model's tokenizer" in how and "cl100k_base" in how
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Hello **world**, reverse abc."
    assert count(text) == len(reference(text, add_special_tokens=False)["input_ids"]) > 0


class Markdown:
    """A stand-in model answering in markdown (a different answer per question)."""

    def __call__(self, conversations, samplings, streams):
        return [MARKDOWN + f"\nAnswer to: {c[-1]['content']}" for c in conversations]


def test_arena_hard_file_has_every_field_show_result_reads(tmp_path):
    import pandas as pd

    ids = ["328c149ed45a41c0b9d3f14659e63599", "1f3c0e6a8b2d4e5f9a7b6c5d4e3f2a1b",
           "e7d6c5b4a3928170f6e5d4c3b2a19080"]  # Arena-Hard's: 32 hex digits
    rows = [{"question_id": qid, "category": "arena-hard-v0.1", "cluster": "c",
             "turns": [{"content": f"question {i}"}]} for i, qid in enumerate(ids)]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = read_questions("arena_hard", tmp_path / "question.jsonl")
    path = write_answers("arena_hard", questions, Markdown(), output=tmp_path / "arena-hard-v0.1",
                         model_id="simpo-tiny", overrides={}, count_tokens=_words,
                         say=lambda _: None)
    # show_result.py: answers keyed by the file's name; the average length per model.
    answers = {json.loads(line)["question_id"]: json.loads(line)
               for line in path.read_text().splitlines()}
    assert path.name == "simpo-tiny.jsonl" and set(answers) == {r["question_id"] for r in rows}
    for row in answers.values():
        turn = row["choices"][0]["turns"][0]
        assert "token_len" not in turn  # so show_result.py reads conv_metadata's
        assert type(row["conv_metadata"]["token_len"]) is int
        assert row["conv_metadata"]["token_len"] == _words(turn["content"])
    # Style control: pandas' reading of the file, metadata keyed by model_id and question_id.
    frame = pd.read_json(path, lines=True)
    assert "conv_metadata" in frame.columns and frame.model_id[0] == "simpo-tiny"
    metadata = frame[["question_id", "conv_metadata"]].set_index("question_id").to_dict("index")
    expected = {"header_count": 4, "list_count": 6, "bold_count": 2}
    for question in rows:
        conv = metadata[question["question_id"]]["conv_metadata"]
        for element, total in expected.items():  # each a dict of ints, summed by the fit
            assert all(type(v) is int for v in conv[element].values())
            assert sum(conv[element].values()) == total


def test_mt_bench_files_pass_fastchats_loaders_and_data_check(tmp_path):
    common = pytest.importorskip("fastchat.llm_judge.common",
                                 reason="fschat[llm_judge] is in the eval-test extra")
    categories = ["writing", "math", "reasoning", "coding", "stem"]
    rows = [{"question_id": 81 + i, "category": c, "turns": [f"q{i} one", f"q{i} two"]}
            for i, c in enumerate(categories)]
    data = tmp_path / "mt_bench"
    data.mkdir()
    (data / "question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = read_questions("mt_bench", data / "question.jsonl")
    write_answers("mt_bench", questions, Markdown(), output=data, model_id="simpo-tiny",
                  overrides={}, say=lambda _: None)
    # Reference answers (gpt-4's in FastChat) share the answer format: written the same way.
    write_answers("mt_bench", questions, Markdown(), output=data / "reference",
                  model_id="gpt-4", overrides={}, say=lambda _: None)
    loaded = common.load_questions(str(data / "question.jsonl"), None, None)
    model_answers = common.load_model_answers(str(data / "model_answer"))
    ref_answers = common.load_model_answers(str(data / "reference" / "model_answer"))
    judges = {"default": common.Judge("gpt-4", {}),
              "math": common.Judge("gpt-4", {}, ref_based=True),
              "default-mt": common.Judge("gpt-4", {}, multi_turn=True),
              "math-mt": common.Judge("gpt-4", {}, ref_based=True, multi_turn=True)}
    common.check_data(loaded, model_answers, ref_answers, ["simpo-tiny"], judges)
    assert any(q["category"] in common.NEED_REF_CATS for q in loaded)
    for question in loaded:
        answer = model_answers["simpo-tiny"][question["question_id"]]
        assert [type(t) for t in answer["choices"][0]["turns"]] == [str, str]
    with pytest.raises(AssertionError, match="Missing model"):  # the check can fail
        common.check_data(loaded, model_answers, ref_answers, ["other"], judges)


def test_alpaca_eval_file_loads_with_alpaca_evals_loader(tmp_path):
    utils = pytest.importorskip("alpaca_eval.utils", reason="alpaca-eval is in the eval-test extra")
    rows = [{"instruction": "Name a colour.", "dataset": "helpful_base"},
            {"instruction": "Count to three.", "dataset": "oasst"}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    questions = read_questions("alpaca_eval", tmp_path / "q.json")
    path = write_answers("alpaca_eval", questions, Markdown(), output=tmp_path / "out.json",
                         model_id="simpo-tiny", overrides={}, say=lambda _: None)
    frame = utils.load_or_convert_to_dataframe(path)
    assert {"instruction", "output", "generator", "dataset"} <= set(frame.columns)
    assert frame["instruction"].tolist() == [r["instruction"] for r in rows]
    assert set(frame["generator"]) == {"simpo-tiny"}
    assert frame["dataset"].tolist() == ["helpful_base", "oasst"]
    assert all(out.startswith("# Plan") for out in frame["output"])


def test_question_ids_keep_their_json_type(tmp_path):
    """An all-digit string id stays a string (Arena-Hard's hex ids can be all digits), a number
    stays a number (MT-Bench's): the judges match answers to questions by equality."""
    rows = [{"question_id": "0123", "turns": [{"content": "a"}]},
            {"question_id": 81, "turns": [{"content": "b"}]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = read_questions("arena_hard", tmp_path / "q.jsonl")
    path = write_answers("arena_hard", questions, Markdown(), output=tmp_path, model_id="m",
                         overrides={}, count_tokens=_words, say=lambda _: None)
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == \
        ["0123", 81]
