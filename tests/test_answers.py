"""Answer files for AlpacaEval 2, Arena-Hard and MT-Bench: each benchmark's schema, sampling
defaults, resuming, bad question files; greedy answers of a converted TP2 checkpoint equal
transformers' own generate, with exactly one BOS."""

import json

import pytest

from megatron_simpo.evaluation.answers import (MT_BENCH_TEMPERATURE, QuestionError, answer_path,
                                               read_questions, write_answers)

ALPACA = [{"instruction": "Name a colour.", "dataset": "helpful_base"},
          {"instruction": "Count to three.", "dataset": "oasst"},
          {"instruction": "Say hi."}]
ARENA = [{"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
          "turns": [{"content": f"arena question {i}"}]} for i in range(5)]
MT_BENCH = [{"question_id": 81 + i, "category": category,
             "turns": [f"first turn {i}", f"second turn {i}"]}
            for i, category in enumerate(["writing", "math", "stem", "roleplay", "other"])]


def _write(path, rows, as_list=False):
    path.write_text(json.dumps(rows) if as_list else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _words(text):
    return len(text.split())


class Recorder:
    """A stand-in model: answers name the conversation it saw; calls are recorded."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, conversations, samplings, streams):
        assert len(streams) == len(conversations)
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls.append((conversations, samplings))
        return [f"answer to {c[-1]['content']} after {len(c)} messages" for c in conversations]


def test_alpaca_eval_answers(tmp_path):
    questions = read_questions("alpaca_eval", _write(tmp_path / "q.json", ALPACA, as_list=True))
    model = Recorder()
    path = write_answers("alpaca_eval", questions, model, output=tmp_path / "out.json",
                         model_id="tiny-simpo", overrides={}, batch_size=2, say=lambda _: None)
    answers = json.loads(path.read_text())
    assert [set(a) for a in answers] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert [a["instruction"] for a in answers] == [q["instruction"] for q in ALPACA]
    assert [a["dataset"] for a in answers] == ["helpful_base", "oasst", "custom"]
    assert {a["generator"] for a in answers} == {"tiny-simpo"}
    assert answers[1]["output"] == "answer to Count to three. after 1 messages"
    # SimPO's AlpacaEval 2 sampling: temperature 0.9, top_p 1.0.
    assert {(s.temperature, s.top_p) for _, samplings in model.calls for s in samplings} == {(0.9, 1.0)}


def test_arena_hard_answers_have_dict_turns(tmp_path):
    questions = read_questions("arena_hard", _write(tmp_path / "question.jsonl", ARENA))
    model = Recorder()
    path = write_answers("arena_hard", questions, model, output=tmp_path / "arena",
                         model_id="m", overrides={"max_new_tokens": 64}, count_tokens=_words,
                         say=lambda _: None)
    assert path == tmp_path / "arena" / "model_answer" / "m.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in ARENA]
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp",
                            "conv_metadata"}
        text = row["choices"][0]["turns"][0]["content"]
        assert row["conv_metadata"]["token_len"] == _words(text)
        assert row["model_id"] == "m" and isinstance(row["tstamp"], float)
        [choice] = row["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 1
        assert set(choice["turns"][0]) == {"content"}
    assert len({r["answer_id"] for r in rows}) == 5
    # Greedy, with the override applied.
    assert {(s.temperature, s.max_new_tokens) for _, ss in model.calls for s in ss} == {(0.0, 64)}


def test_mt_bench_two_turns_with_the_first_answer_in_context(tmp_path):
    questions = read_questions("mt_bench", _write(tmp_path / "question.jsonl", MT_BENCH))
    model = Recorder()
    path = write_answers("mt_bench", questions, model, output=tmp_path / "mt_bench",
                         model_id="m", overrides={}, batch_size=5, say=lambda _: None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82, 83, 84, 85]  # ints stay ints
    for row, question in zip(rows, MT_BENCH):
        first, second = row["choices"][0]["turns"]
        assert isinstance(first, str) and isinstance(second, str)
        assert first == f"answer to {question['turns'][0]} after 1 messages"
        assert second == f"answer to {question['turns'][1]} after 3 messages"
    [(_, first_turn), (second_conversations, second_turn)] = model.calls
    # The second turn's context: question 1, the model's answer, question 2.
    assert [m["role"] for m in second_conversations[0]] == ["user", "assistant", "user"]
    assert second_conversations[0][1]["content"] == rows[0]["choices"][0]["turns"][0]
    # FastChat's temperatures by category (0.7 for a category it does not list).
    expected = [MT_BENCH_TEMPERATURE.get(q["category"], 0.7) for q in MT_BENCH]
    assert [s.temperature for s in first_turn] == [s.temperature for s in second_turn] == expected
    assert {s.max_new_tokens for s in first_turn} == {1024}


@pytest.mark.parametrize("benchmark, rows", [("alpaca_eval", ALPACA), ("arena_hard", ARENA),
                                             ("mt_bench", MT_BENCH)])
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, benchmark, rows):
    questions = read_questions(benchmark, _write(tmp_path / "q.jsonl", rows))
    output = tmp_path / ("out.json" if benchmark == "alpaca_eval" else "data")
    # MT-Bench calls the model twice per batch (two turns): stop after one batch either way.
    interrupted = Recorder(fail_after=2 if benchmark == "mt_bench" else 1)
    with pytest.raises(KeyboardInterrupt):
        write_answers(benchmark, questions, interrupted, output=output, model_id="m",
                      overrides={}, batch_size=2, count_tokens=_words, say=lambda _: None)
    model = Recorder()
    path = write_answers(benchmark, questions, model, output=output, model_id="m",
                         overrides={}, batch_size=2, count_tokens=_words, say=lambda _: None)
    asked = [c[0]["content"] for conversations, _ in model.calls for c in conversations
             if len(c) == 1]
    expected = [q.turns[0] for q in questions[2:]]
    assert asked == expected  # the first batch was not asked again
    if benchmark == "alpaca_eval":
        keys = [a["instruction"] for a in json.loads(path.read_text())]
    else:
        keys = [str(json.loads(line)["question_id"]) for line in path.read_text().splitlines()]
    assert keys == [q.key for q in questions]  # each once, in order


def test_a_resumed_run_samples_what_an_uninterrupted_one_did(tmp_path):
    """Sampled answers (MT-Bench's temperatures, two turns) of a real model on transformers:
    a run stopped after its first batch and resumed in a new generator (a new process) writes
    the same answers as one that was never stopped."""
    import torch
    import transformers

    from megatron_simpo.evaluation.generation import transformers_generator
    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "tiny", train_pairs=4, valid_pairs=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tiny["config"])).save_pretrained(tmp_path / "hf")
    transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"]).save_pretrained(tmp_path / "hf")
    questions = read_questions("mt_bench", _write(tmp_path / "q.jsonl", MT_BENCH))

    def generator():
        return transformers_generator(tmp_path / "hf", seed=5, dtype="float32",
                                      apply_chat_template=False)

    def answers(output, generate):
        return write_answers("mt_bench", questions, generate, output=output, model_id="m",
                             overrides={"max_new_tokens": 6}, batch_size=2, say=lambda _: None)

    def contents(path):
        return {row["question_id"]: row["choices"][0]["turns"]
                for row in map(json.loads, path.read_text().splitlines())}

    straight = contents(answers(tmp_path / "straight", generator()))
    generate, calls = generator(), []

    def stopped_after_a_batch(*args):
        calls.append(1)
        if len(calls) > 2:  # two turns of the first batch, then Ctrl-C
            raise KeyboardInterrupt
        return generate(*args)

    with pytest.raises(KeyboardInterrupt):
        answers(tmp_path / "resumed", stopped_after_a_batch)
    path = answer_path("mt_bench", tmp_path / "resumed", "m")
    assert len(contents(path)) == 2
    # A kill while the batch was being written: one of its two answers is there.
    path.write_text(path.read_text().splitlines(keepends=True)[0])
    assert contents(answers(tmp_path / "resumed", generator())) == straight
    assert len({turns[0] for turns in straight.values()}) == len(MT_BENCH)  # sampled, varied


def test_question_files_in_the_wrong_format_are_named(tmp_path):
    bad_arena = [dict(ARENA[0]), dict(ARENA[1], turns=["a plain string"])]
    with pytest.raises(QuestionError, match=r"q.jsonl:2: 'turns' must be a list of "
                                            r"\{\"content\": str\} \(Arena-Hard's format\)"):
        read_questions("arena_hard", _write(tmp_path / "q.jsonl", bad_arena))
    with pytest.raises(QuestionError, match=r"q.jsonl:1: 'turns' must be a list of strings"):
        read_questions("mt_bench", _write(tmp_path / "q.jsonl", ARENA))
    with pytest.raises(QuestionError, match=r"q.json item 1: needs a non-empty 'instruction'"):
        read_questions("alpaca_eval", _write(tmp_path / "q.json", [ALPACA[0], {"prompt": "x"}],
                                             as_list=True))
    with pytest.raises(QuestionError, match=r"q.jsonl:1: missing 'question_id'"):
        read_questions("mt_bench", _write(tmp_path / "q.jsonl", [{"turns": ["a"]}]))
    with pytest.raises(QuestionError, match=r"question 'q0' appears twice"):
        read_questions("arena_hard", _write(tmp_path / "q.jsonl", [ARENA[0], ARENA[0]]))


def test_greedy_answers_of_a_tp2_checkpoint_equal_transformers_generate(tmp_path, monkeypatch):
    """From a Megatron checkpoint at TP2 (exported inside the tool), batched and left-padded:
    the same tokens as transformers' generate on each prompt alone; prompts carry one BOS.
    Every answer carries Arena-Hard's conv_metadata, token_len by the model's tokenizer here
    (no tiktoken cache)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-tiktoken-cache"))
    import torch
    import transformers

    from megatron_simpo.cli import convert as cli
    from megatron_simpo.data.tokenization import encode_prompts
    from megatron_simpo.cli.generate_answers import main
    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "tiny", train_pairs=4, valid_pairs=2)
    config = transformers.AutoConfig.from_pretrained(tiny["config"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tokenizer.save_pretrained(tmp_path / "hf")
    cli.hf_to_megatron_main(["--hf-path", str(tmp_path / "hf"), "--save", str(tmp_path / "mg"),
                             "--tensor-parallel-size", "2"])
    questions = [{"question_id": i, "category": "x", "turns": [{"content": text}]} for i, text in
                 enumerate(["reverse abcdefgh", "hi", "reverse zyxwvuts and more words"])]
    _write(tmp_path / "question.jsonl", questions)
    main(["--benchmark", "arena_hard", "--questions", str(tmp_path / "question.jsonl"),
          "--output", str(tmp_path / "arena"), "--load", str(tmp_path / "mg"),
          "--hf-out", str(tmp_path / "exported"), "--backend", "transformers",
          "--max-new-tokens", "12", "--model-id", "tiny"])
    rows = [json.loads(line) for line in
            (tmp_path / "arena" / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported",
                                                                  dtype=torch.float32).eval()
    reference.generation_config = transformers.GenerationConfig()  # not the export's settings
    for row, question in zip(rows, questions):
        [ids] = encode_prompts(tokenizer, [[{"role": "user",
                                             "content": question["turns"][0]["content"]}]])
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                                dtype=torch.long),
                                 do_sample=False, repetition_penalty=1.0, max_new_tokens=12,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        assert row["choices"][0]["turns"][0]["content"] == expected
        metadata = row["conv_metadata"]
        assert metadata["token_len"] == len(tokenizer(expected, add_special_tokens=False)
                                            ["input_ids"])
        assert set(metadata) == {"token_len", "header_count", "list_count", "bold_count"}
    assert len({r["choices"][0]["turns"][0]["content"] for r in rows}) > 1  # not one constant


@pytest.mark.gpu
def test_vllm_backend_writes_greedy_answers(tmp_path):
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import transformers

    from megatron_simpo.cli.generate_answers import main
    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "tiny", train_pairs=4, valid_pairs=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tiny["config"])).save_pretrained(tmp_path / "hf")
    transformers.AutoTokenizer.from_pretrained(tiny["tokenizer"]).save_pretrained(tmp_path / "hf")
    _write(tmp_path / "question.jsonl", ARENA)
    main(["--benchmark", "arena_hard", "--questions", str(tmp_path / "question.jsonl"),
          "--output", str(tmp_path / "arena"), "--hf", str(tmp_path / "hf"), "--backend", "vllm",
          "--max-new-tokens", "8", "--model-id", "tiny"])
    rows = (tmp_path / "arena" / "model_answer" / "tiny.jsonl").read_text().splitlines()
    assert len(rows) == len(ARENA)


def test_a_line_cut_off_by_an_interruption_is_asked_again(tmp_path):
    questions = read_questions("arena_hard", _write(tmp_path / "question.jsonl", ARENA))
    write_answers("arena_hard", questions[:2], Recorder(), output=tmp_path / "data",
                  model_id="m", overrides={}, batch_size=2, count_tokens=_words,
                  say=lambda _: None)
    path = tmp_path / "data" / "model_answer" / "m.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"question_id": "q2", "answer_id": "ab')  # killed mid-line
    model = Recorder()
    write_answers("arena_hard", questions, model, output=tmp_path / "data", model_id="m",
                  overrides={}, batch_size=2, count_tokens=_words, say=lambda _: None)
    assert [c[0]["content"] for conversations, _ in model.calls for c in conversations] == \
        ["arena question 2", "arena question 3", "arena question 4"]
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == \
        ["q0", "q1", "q2", "q3", "q4"]
    # Cut between a whole record and its newline: kept, and the next answers start a line.
    path.write_text(whole.removesuffix("\n"))
    model = Recorder()
    write_answers("arena_hard", questions, model, output=tmp_path / "data", model_id="m",
                  overrides={}, batch_size=2, count_tokens=_words, say=lambda _: None)
    assert [c[0]["content"] for conversations, _ in model.calls for c in conversations] == \
        ["arena question 2", "arena question 3", "arena question 4"]
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == \
        ["q0", "q1", "q2", "q3", "q4"]
    # Cut inside a character (answers keep non-ASCII text as it is): the line is asked again.
    path.write_bytes(whole.encode() + '{"question_id": "q2", "answer": "\u00e9'.encode()[:-1])
    model = Recorder()
    write_answers("arena_hard", questions, model, output=tmp_path / "data", model_id="m",
                  overrides={}, batch_size=2, count_tokens=_words, say=lambda _: None)
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == \
        ["q0", "q1", "q2", "q3", "q4"]
    path.write_text("not json\n" + whole)
    with pytest.raises(QuestionError, match=r"m.jsonl:1: not valid JSON"):
        write_answers("arena_hard", questions, model, output=tmp_path / "data", model_id="m",
                      overrides={}, batch_size=2, count_tokens=_words, say=lambda _: None)


@pytest.mark.parametrize("case, message", [
    ("question", "q.jsonl:2: 'turns' must be a list of strings"),
    ("answer", "model_answer/m.jsonl:1: not an answer row (no 'question_id')"),
    ("output", "data: cannot make the folder"),
    ("settings", "model_answer/m.jsonl holds answers made with other settings (seed 0 -> 1; "
                 "temperature None -> 0.5): give the same ones to complete it"),
])
def test_data_errors_of_the_command_are_one_line_without_usage(tmp_path, capsys, monkeypatch,
                                                               case, message):
    from megatron_simpo.cli.generate_answers import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    rows = [MT_BENCH[0], dict(MT_BENCH[1], turns="one string")] if case == "question" else MT_BENCH
    _write(tmp_path / "q.jsonl", rows)
    output = tmp_path / "data"
    if case == "answer":  # an answer file a previous run did not write
        (output / "model_answer").mkdir(parents=True)
        (output / "model_answer" / "m.jsonl").write_text(json.dumps({"answer": "x"}) + "\n")
    if case == "output":  # --output names a file where a folder is needed
        output.write_text("a file")
    argv = ["--benchmark", "mt_bench", "--questions", "q.jsonl", "--output", str(output),
            "--hf", "hf", "--model-id", "m", "--backend", "transformers"]
    if case == "settings":  # a run stopped after its first answer, resumed with other sampling
        from megatron_simpo.evaluation import generation

        (output / "model_answer").mkdir(parents=True)
        answers = output / "model_answer" / "m.jsonl"
        answers.write_text(json.dumps({"question_id": 81, "choices": []}) + "\n")
        config = generation.AnswersConfig(benchmark="mt_bench", questions="q.jsonl",
                                          output=str(output), hf="hf", model_id="m")
        generation.keep_settings(answers, dict(
            model=str((tmp_path / "hf").resolve()), backend="transformers", seed=0,
            dtype="auto", apply_chat_template=True, **config.overrides))
        argv += ["--seed", "1", "--temperature", "0.5"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("generate_answers: error: ") and message in line
    assert "usage" not in line


def test_vllm_backend_where_vllm_is_missing_is_the_users_mistake(monkeypatch):
    import importlib.util

    from megatron_simpo.evaluation import generation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match=r"^--backend vllm needs the vllm package"):
        generation.pick_backend("vllm")
    assert generation.pick_backend("auto") == generation.pick_backend("transformers") == \
        "transformers"


def test_transformers_replies_stop_at_the_models_context(capsys):
    # vLLM's replies stop at the model's context; transformers' generate would go on past it
    # (a tiny model's 4,096 default new tokens on a short context). Each row stops at its own
    # room: a short prompt batched with a long one gets the reply it gets alone.
    import torch

    from megatron_simpo.evaluation.generation import _ContextRoom, _left_padded_generate
    from megatron_simpo.evaluation.answers import Sampling
    from tests.tiny import tiny_hf_config, tiny_hf_model

    model = tiny_hf_model(tiny_hf_config(max_position_embeddings=24))
    capsys.readouterr()

    def text(ids):  # up to the end of turn (99, also the padding)
        ids = ids.tolist()
        return " ".join(map(str, ids[:ids.index(99)] if 99 in ids else ids))

    class Ids:  # a tokenizer whose text is the token ids
        def batch_decode(self, rows, skip_special_tokens):
            return [text(row) for row in rows]

    room = _ContextRoom(model)
    assert room.limits([[5] * 4, [5] * 18], 6) == (6, None)  # room for all: as asked
    assert capsys.readouterr().err == ""
    prompts = [[7, 3, 9, 4], list(range(10, 28))]
    replies = _left_padded_generate((Ids(), model, torch.device("cpu"), 99, [99]), prompts,
                                    Sampling(temperature=0.0, max_new_tokens=4096), room)
    [line] = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("warning:")]  # said once
    assert line == ("warning: replies stop at the model's context of 24 positions (2 of 2 "
                    "prompts leave room for fewer than the 4096 new tokens asked)")
    for prompt, reply in zip(prompts, replies):
        alone = model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                               max_new_tokens=24 - len(prompt), pad_token_id=99,
                               eos_token_id=[99])
        assert reply == text(alone[0, len(prompt):])
    assert [len(reply.split()) for reply in replies] == [20, 6]  # (no end of turn here)
    assert [reply.finished for reply in replies] == [False, False]  # (padded after: by 99)
    assert room.limits([[5] * 30], 8) == (1, [1])  # a prompt past the context: one token


def test_a_reply_knows_whether_it_ended():
    """A reply is finished where a stop token is among its own tokens, not where it was cut
    at max_new_tokens (the padding after a finished row is not read as its end)."""
    import types

    import torch

    from megatron_simpo.evaluation.answers import Sampling
    from megatron_simpo.evaluation.generation import _ContextRoom, _left_padded_generate

    class Decode:
        def batch_decode(self, rows, skip_special_tokens):
            return [" ".join(str(t) for t in row.tolist() if t not in (98, 99)) for row in rows]

    class Fixed:  # generate: row 0 ends (98, then padding), row 1 is cut after 3 tokens
        config = types.SimpleNamespace()

        def generate(self, input_ids, **_):
            return torch.cat([input_ids, torch.tensor([[5, 98, 99], [5, 6, 7]])], 1)

    replies = _left_padded_generate((Decode(), Fixed(), torch.device("cpu"), 99, [98, 99]),
                                    [[1, 2], [3]], Sampling(0.0, max_new_tokens=3),
                                    _ContextRoom(Fixed()))
    assert replies == ["5", "5 6 7"] and [r.finished for r in replies] == [True, False]


def test_a_settings_record_compares_what_it_holds(tmp_path):
    from megatron_simpo.evaluation import settings_record

    record = tmp_path / "a.jsonl.settings.json"
    settings_record.write(record, {"seed": 0, "temperature": None})  # kept before batch_size
    assert settings_record.differences(record, {"seed": 0, "temperature": None,
                                                "batch_size": 8}, start_over="a") == []
    assert settings_record.differences(record, {"seed": 1, "temperature": None,
                                                "batch_size": 8}, start_over="a") == ["seed 0 -> 1"]


LINE_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"
"""What str.splitlines() ends a line at besides \\n and \\r: inside a JSON string they stay text
(json.dumps(ensure_ascii=False) writes the first three raw)."""


@pytest.mark.parametrize("benchmark", ["alpaca_eval", "arena_hard", "mt_bench"])
def test_questions_holding_unicode_line_breaks_are_read_whole(tmp_path, benchmark):
    texts = [f"before{c}after" for c in LINE_BREAKS]
    if benchmark == "alpaca_eval":
        rows = [{"instruction": t} for t in texts]
    elif benchmark == "arena_hard":
        rows = [{"question_id": f"q{i}", "turns": [{"content": t}]} for i, t in enumerate(texts)]
    else:
        rows = [{"question_id": i, "turns": [t, t + "?"]} for i, t in enumerate(texts)]
    path = tmp_path / "q.jsonl"
    # Raw characters, a Windows line end and a blank line (JSON escapes only the controls).
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n",
                    encoding="utf-8", newline="")
    assert "\u2028" in path.read_text(encoding="utf-8")
    questions = read_questions(benchmark, path)
    assert [q.turns[0] for q in questions] == texts
    # Answers holding them resume as the questions they answer.
    output = tmp_path / ("out.json" if benchmark == "alpaca_eval" else "data")

    class Echo:
        def __call__(self, conversations, samplings, streams):
            return [c[-1]["content"] + LINE_BREAKS for c in conversations]

    write_answers(benchmark, questions[:4], Echo(), output=output, model_id="m", overrides={},
                  batch_size=2, count_tokens=_words, say=lambda _: None)
    model = Recorder()
    write_answers(benchmark, questions, model, output=output, model_id="m", overrides={},
                  batch_size=2, count_tokens=_words, say=lambda _: None)
    assert [c[0]["content"] for conversations, _ in model.calls for c in conversations
            if len(c) == 1] == texts[4:]
