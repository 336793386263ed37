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


# Arena-Hard in arena-hard-auto's layout since 900183d ("reformat v0.1", Apr 2025) and v2.0.
UIDS = ["2edbb5f36f5b42be", "0253f09025cc40cd", "9f3c0e6a8b2d4e5f"]  # v2.0's: 16 hex digits
SMALL = """# Title
Text with **one** and **two**, __three__ and ** not bold **x.
2. ordered
	- tab-indented unordered
+ plus
```
# fenced header
1. fenced list
```
##\tTab header
####### not a header
"""
"""Hand count by arena-hard-auto's rules: h1 1, h2 1; ordered 1, unordered 2; ** 3 ("** not
bold **" is a span too: the rule asks only for no * and no newline inside), __ 1; the fenced
lines are removed before counting."""
SMALL_COUNTS = {"header_count": {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0},
                "list_count": {"ordered": 1, "unordered": 2},
                "bold_count": {"**": 3, "__": 1}}


class Small:
    def __call__(self, conversations, samplings, streams):
        return [SMALL + f"\nAnswer to: {c[-1]['content']}" for c in conversations]


def _uid_questions(tmp_path, category="hard_prompt"):
    rows = [{"uid": uid, "category": category, "subcategory": "coding",
             "prompt": f"prompt {i}\u2028with a line separator"} for i, uid in enumerate(UIDS)]
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return rows, path


def test_new_arena_hard_layout_is_answered_in_gen_answers_schema(tmp_path):
    """Questions {uid, category, subcategory, prompt} give answers {uid, ans_id, model,
    messages, tstamp, metadata} (gen_answer.py's keys, in its order), metadata in the order
    show_result.py's style features take it, its counts those of the hand count."""
    rows, questions_file = _uid_questions(tmp_path)
    questions = read_questions("arena_hard", questions_file)
    path = write_answers("arena_hard", questions, Small(), output=tmp_path / "arena-hard-v2.0",
                         model_id="simpo-tiny", overrides={}, count_tokens=_words,
                         say=lambda _: None)
    assert path == tmp_path / "arena-hard-v2.0" / "model_answer" / "simpo-tiny.jsonl"
    answers = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    assert [a["uid"] for a in answers] == UIDS
    for answer, question in zip(answers, rows):
        assert list(answer) == ["uid", "ans_id", "model", "messages", "tstamp", "metadata"]
        assert answer["model"] == "simpo-tiny" and type(answer["tstamp"]) is float
        assert isinstance(answer["ans_id"], str) and answer["ans_id"]
        text = SMALL + f"\nAnswer to: {question['prompt']}"
        assert answer["messages"] == [{"role": "user", "content": question["prompt"]},
                                      {"role": "assistant", "content": {"answer": text}}]
        assert list(answer["metadata"]) == ["token_len", "header_count", "list_count",
                                            "bold_count"]
        assert answer["metadata"] == {"token_len": _words(text), **SMALL_COUNTS}
    assert len({a["ans_id"] for a in answers}) == len(UIDS)


def test_new_arena_hard_files_have_what_gen_judgment_and_show_result_read(tmp_path):
    """What arena-hard-auto (not packaged) reads, restated: answers by uid per file name
    (load_model_answers), the answer text at messages[-1].content.answer (gen_judgment.py), and
    for --control-features the metadata by model and uid from pandas' reading of the file, each
    feature an int or a dict summed, length first (show_result.py)."""
    import pandas as pd

    _, questions_file = _uid_questions(tmp_path)
    questions = read_questions("arena_hard", questions_file)
    path = write_answers("arena_hard", questions, Small(), output=tmp_path, model_id="simpo-tiny",
                         overrides={}, count_tokens=_words, say=lambda _: None)
    with open(path, encoding="utf-8") as lines:  # as load_model_answers iterates the file
        by_uid = {row["uid"]: row for row in map(json.loads, lines)}
    assert set(by_uid) == set(UIDS)
    assert all(row["messages"][-1]["content"]["answer"].startswith("# Title")
               for row in by_uid.values())
    frame = pd.read_json(path, lines=True)
    style = {frame.iloc[0]["model"]: frame.set_index("uid")["metadata"].to_dict()}
    for uid in UIDS:
        metadata = style["simpo-tiny"][uid]
        features = [v if isinstance(v, int) else sum(v.values()) for v in metadata.values()]
        assert features == [by_uid[uid]["metadata"]["token_len"], 2, 3, 4]


def test_new_arena_hard_layout_resumes_and_is_never_mixed_with_the_old(tmp_path):
    from megatron_simpo.evaluation.answers import QuestionError

    _, questions_file = _uid_questions(tmp_path)
    questions = read_questions("arena_hard", questions_file)
    calls = []

    class Counting(Small):
        def __call__(self, conversations, samplings, streams):
            calls.append(len(conversations))
            return super().__call__(conversations, samplings, streams)

    options = dict(output=tmp_path / "data", model_id="m", overrides={}, batch_size=2,
                   count_tokens=_words, say=lambda _: None)
    path = write_answers("arena_hard", questions[:2], Counting(), **options)
    write_answers("arena_hard", questions, Counting(), **options)
    assert calls == [2, 1]  # the first batch was not asked again
    assert [json.loads(line)["uid"] for line in path.read_text().split("\n") if line] == UIDS
    # The old layout's answers under the new layout's questions: refused, naming the file.
    old = read_questions("arena_hard", _write_old(tmp_path / "old.jsonl"))
    write_answers("arena_hard", old, Small(), **dict(options, output=tmp_path / "old"))
    with pytest.raises(QuestionError, match=r"old/model_answer/m.jsonl:1: not an answer row "
                                            r"\(no 'uid'\)"):
        write_answers("arena_hard", questions, Small(), **dict(options, output=tmp_path / "old"))
    # A question file of both layouts, and a new-layout row without its prompt.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(_write_old(tmp_path / "o.jsonl").read_text() +
                     json.dumps({"uid": "ab", "prompt": "x"}) + "\n")
    with pytest.raises(QuestionError, match=r"mixed.jsonl:2: a question with 'uid' after ones "
                                            r"with 'question_id': one arena-hard-auto layout"):
        read_questions("arena_hard", mixed)
    mixed.write_text(json.dumps({"uid": "ab", "category": "hard_prompt"}) + "\n")
    with pytest.raises(QuestionError, match=r"mixed.jsonl:1: 'prompt' must be a string"):
        read_questions("arena_hard", mixed)


def _write_old(path):
    path.write_text(json.dumps({"question_id": "q0", "category": "arena-hard-v0.1",
                                "turns": [{"content": "old question"}]}) + "\n")
    return path


def test_token_len_encodings_are_the_ones_arena_hard_auto_names(tmp_path, monkeypatch):
    """gpt-3.5-turbo's encoding for the old layout, gpt-4o's for the new (the models
    arena-hard-auto's gen_answer.py names), each file's URL and SHA-256 those tiktoken itself
    loads it with; offline, the model's tokenizer counts and the description names the
    encoding that is missing."""
    import hashlib

    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken_ext import openai_public

    from megatron_simpo.evaluation.answers import ARENA_HARD_ENCODING
    from megatron_simpo.evaluation.judge_metadata import ENCODINGS, encoding_url
    from megatron_simpo.model.tiny import build_tokenizer

    assert ARENA_HARD_ENCODING == {
        "question_id": tiktoken.encoding_name_for_model("gpt-3.5-turbo"),
        "uid": tiktoken.encoding_name_for_model("gpt-4o")}
    loaded = {}

    def recording(url, expected_hash=None):
        loaded["file"] = (url, expected_hash)
        raise RuntimeError("nothing is fetched")

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", recording)
    for encoding, (model, sha256) in ENCODINGS.items():
        assert tiktoken.encoding_name_for_model(model) == encoding
        with pytest.raises(RuntimeError):
            getattr(openai_public, encoding)()
        assert loaded["file"] == (encoding_url(encoding), sha256)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    assert tiktoken_cache_file("o200k_base") == tmp_path / "cache" / hashlib.sha1(
        encoding_url("o200k_base").encode()).hexdigest()
    build_tokenizer().save_pretrained(tmp_path / "tok")
    count, how = token_counter(tmp_path / "tok", "o200k_base")
    assert "model's tokenizer" in how and "o200k_base" in how
    assert count("**hello**") == 9  # the tiny tokenizer is character-level


def test_the_command_answers_new_layout_questions_counting_for_gpt_4o(tmp_path, monkeypatch,
                                                                     capsys):
    """generate-answers on the new layout: the new schema, token_len asked of gpt-4o's encoding
    (offline here: the model's tokenizer counts, and the log says o200k_base is missing)."""
    import torch
    import transformers

    from megatron_simpo.cli.generate_answers import main
    from megatron_simpo.model.tiny import write_default

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))
    tiny = write_default(tmp_path / "tiny", train_pairs=4, valid_pairs=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tiny["config"])).save_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tokenizer.save_pretrained(tmp_path / "hf")
    _, questions_file = _uid_questions(tmp_path)
    main(["--benchmark", "arena_hard", "--questions", str(questions_file), "--output",
          str(tmp_path / "arena-hard-v2.0"), "--hf", str(tmp_path / "hf"), "--backend",
          "transformers", "--max-new-tokens", "6", "--model-id", "tiny"])
    [said] = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith("> Arena-Hard token_len:")]
    assert "tiktoken's o200k_base is not in the local cache" in said
    path = tmp_path / "arena-hard-v2.0" / "model_answer" / "tiny.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    assert [r["uid"] for r in rows] == UIDS and {r["model"] for r in rows} == {"tiny"}
    for row in rows:
        answer = row["messages"][-1]["content"]["answer"]
        assert row["metadata"]["token_len"] == len(tokenizer(answer, add_special_tokens=False)
                                                   ["input_ids"])
