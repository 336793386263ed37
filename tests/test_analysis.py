"""tools/analyze_run.py: its figures equal numpy/scipy computed here, and it writes the plots."""

import json

import numpy as np
import pytest

from megatron_simpo.cli.analyze_run import main
from megatron_simpo.evaluation.analysis import ranks, spearman, summarize


def _fake_run(folder, seed=0, pairs=40):
    rng = np.random.default_rng(seed)
    metrics = []
    for iteration in range(1, 11):
        metrics.append({"iteration": iteration, "loss": 1.0 / iteration,
                        "rewards/accuracies": 0.5 + 0.04 * iteration,
                        "rewards/margins": 0.1 * iteration, "logps/chosen": -1.0,
                        "logps/rejected": -1.2 - 0.01 * iteration})
    for iteration in (0, 5, 10):
        metrics.append({"iteration": iteration, "eval/rewards/accuracies": 0.5,
                        "eval/rewards/margins": 0.01 * iteration, "eval/logps/chosen": -1.0,
                        "eval/logps/rejected": -1.1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    dumps = folder / "eval_dump"
    dumps.mkdir()
    tokens = rng.integers(5, 400, size=(pairs, 2))
    for iteration in (0, 5, 10):
        rows = []
        for pair in range(pairs):
            row = {"pair": pair}
            for k, side in enumerate(("chosen", "rejected")):
                mean = -1.0 - 0.1 * rng.random() - 0.001 * iteration * k
                row.update({f"{side}_tokens": int(tokens[pair, k]),
                            f"{side}_logp_mean": mean,
                            f"{side}_logp_sum": mean * int(tokens[pair, k]),
                            f"reward_{side}": 2.5 * mean})
            row["reward_margin"] = row["reward_chosen"] - row["reward_rejected"]
            rows.append(row)
        (dumps / f"iter_{iteration:07d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in reversed(rows)))
    return folder


def test_ranks_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=200)  # many ties
    y = x + rng.normal(size=200)
    assert np.array_equal(ranks(x), stats.rankdata(x))
    assert abs(spearman(x, y) - stats.spearmanr(x, y).statistic) <= 1e-12
    assert np.isnan(spearman(np.ones(5), np.arange(5)))


def test_summary_figures_equal_an_independent_computation(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    run = _fake_run(tmp_path / "run")
    summary = summarize(run)
    assert summary["train"]["rewards/margins"][-1] == [10, 1.0]
    assert [x for x, _ in summary["eval"]["rewards/accuracies"]] == [0, 5, 10]
    rows = {at: [json.loads(line) for line in
                 (run / "eval_dump" / f"iter_{at:07d}.jsonl").read_text().splitlines()]
            for at in (0, 5, 10)}
    last = rows[10]
    tokens = [r[f"{s}_tokens"] for r in last for s in ("chosen", "rejected")]
    for key, field in (("length_vs_mean_logp", "logp_mean"), ("length_vs_summed_logp", "logp_sum")):
        values = [r[f"{s}_{field}"] for r in last for s in ("chosen", "rejected")]
        assert abs(summary["length_correlation"][key]
                   - stats.spearmanr(tokens, values).statistic) <= 1e-12
    # Summed log-probs of lengths 5..400 follow the length; averages hardly do.
    assert summary["length_correlation"]["length_vs_summed_logp"] < -0.9
    assert abs(summary["length_correlation"]["length_vs_mean_logp"]) < 0.3
    margins = [r["reward_margin"] for r in last]
    assert abs(summary["margins"]["last"]["mean"] - np.mean(margins)) <= 1e-12
    assert abs(summary["margins"]["last"]["quantiles"]["0.5"] - np.median(margins)) <= 1e-12
    start = {r["pair"]: r["chosen_logp_sum"] for r in rows[0]}
    for at, kl in summary["kl_from_reference"]:
        expected = np.mean([r["chosen_logp_sum"] - start[r["pair"]] for r in rows[at]])
        assert abs(kl - expected) <= 1e-12
    assert summary["kl_from_reference"][0] == [0, 0.0]
    # Another model's dump as the reference (here iteration 5's): KL 0 at iteration 5.
    other = summarize(run, run / "eval_dump" / "iter_0000005.jsonl")
    assert other["kl_from_reference"][1] == [5, 0.0]
    assert other["kl_from_reference"][0][1] == -summary["kl_from_reference"][1][1]


def test_the_summary_is_strict_json():
    from megatron_simpo.evaluation.analysis import strict_json

    text = strict_json({"length_vs_mean_logp": float("nan"), "kl": [[4, float("-inf")], [5, 0.5]]})
    assert json.loads(text) == {"length_vs_mean_logp": None, "kl": [[4, None], [5, 0.5]]}


def test_the_tool_writes_plots_and_a_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    main([str(run)])
    out = run / "analysis"
    for name in ("training_curves.png", "margin_distribution.png", "length_correlation.png",
                 "kl_from_reference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    assert "values" not in summary["margins"]["last"] and summary["eval_dump_iterations"] == [0, 5, 10]
    assert "Spearman(length, average log-prob)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    (tmp_path / "short.jsonl").write_text(json.dumps({"pair": 0, "chosen_logp_sum": -1.0}) + "\n")
    with pytest.raises(SystemExit):  # a reference made on other pairs
        main([str(run), "--reference", str(tmp_path / "short.jsonl")])
    assert "has no pair 1 of the evaluation at iteration 0" in capsys.readouterr().err


def test_a_cut_off_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    """What kill -9 mid-write leaves: the last line cut; the analysis is that of the intact
    lines, and says it dropped one."""
    pytest.importorskip("matplotlib")
    intact = summarize(_fake_run(tmp_path / "intact"))
    run = _fake_run(tmp_path / "run")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + "\n" + '{"iteration": 11, "loss": 0.0')
    main([str(run)])
    out = capsys.readouterr().out
    assert f"warning: {path} line {len(lines) + 1} is cut off (not JSON: a write interrupted " \
           "by a kill); dropped" in out.splitlines()
    summary = summarize(run)
    assert summary["train"] == intact["train"] and summary["eval"] == intact["eval"]


def test_a_damaged_metrics_line_is_one_error_naming_file_and_line(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:15]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run)])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"analyze_run: error: {path} line 3 is not JSON (")
    lines[2] = json.dumps({"step": 3})  # JSON, but not a metrics row: also before the end
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit):
        main([str(run)])
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f'analyze_run: error: {path} line 3 is not a JSON object with an integer '
                    '"iteration"; the file is damaged: fix or remove that line')


def test_skipped_analyses_are_named_with_the_reason(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    main([str(run)])
    assert "> skipped" not in capsys.readouterr().out  # everything there: nothing skipped
    (run / "eval_dump" / "iter_0000000.jsonl").unlink()
    main([str(run)])
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("> skipped")] == [
        "> skipped: KL from the reference (no iteration-0 dump to take the reference from, the "
        "first is iteration 5; give --reference)"]
    for dump in (run / "eval_dump").iterdir():
        dump.unlink()
    path = run / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                            if "eval/" not in line))
    main([str(run)])
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("> skipped")] == [
        "> skipped: held-out curves (no evaluation in metrics.jsonl)",
        "> skipped: margin distribution, length correlation, KL from the reference (no "
        "--eval-dump in this run)"]
    assert json.loads((run / "analysis" / "summary.json").read_text())["skipped"][1].startswith(
        "margin distribution")
    # The first analysis's figures of what is skipped now are gone, not left beside this one.
    assert sorted(p.name for p in (run / "analysis").iterdir()) == ["summary.json",
                                                                    "training_curves.png"]


def test_what_cannot_be_analysed_or_written_is_one_line_before_any_work(tmp_path, capsys):
    """A --reference that is not there, a metrics.jsonl without rows, an --output that is a file
    or under one: one line naming it, exit code 2, nothing written."""
    run = _fake_run(tmp_path / "run")
    (tmp_path / "a-file").write_text("")
    cases = [
        ([str(run), "--reference", str(tmp_path / "nope.jsonl")],
         f"--reference {tmp_path / 'nope.jsonl'} does not exist"),
        ([str(run), "--output", str(tmp_path / "a-file")],
         f"--output {tmp_path / 'a-file'} is a file, not a folder"),
        ([str(run), "--output", str(tmp_path / "a-file" / "analysis")],
         f"--output {tmp_path / 'a-file' / 'analysis'} cannot be written (Not a directory)"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"analyze_run: error: {expected}"), line
    assert not (run / "analysis").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit):
        main([str(empty)])
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"analyze_run: error: {empty / 'metrics.jsonl'} has no rows: the run logged "
                    "nothing yet")


def test_an_undefined_length_correlation_is_said_and_not_plotted(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    last = run / "eval_dump" / "iter_0000010.jsonl"
    rows = [json.loads(line) for line in last.read_text().splitlines()]
    last.write_text("".join(json.dumps({**row, "chosen_tokens": 7, "rejected_tokens": 7}) + "\n"
                            for row in rows))
    main([str(run)])
    assert "> length correlations: undefined, every held-out response has the same length" in \
        capsys.readouterr().out.splitlines()
    out = run / "analysis"
    assert (out / "margin_distribution.png").is_file()
    assert not (out / "length_correlation.png").exists()


@pytest.mark.parametrize("reader", ["metrics", "dump"])
def test_metrics_and_dump_lines_end_at_newlines_only(tmp_path, reader):
    """Rows holding U+2028, U+2029 or U+0085 raw (JSON keeps them in strings; str.splitlines()
    would end a line there) and CRLF line ends are read as the rows written."""
    from megatron_simpo.checkpoint.metrics_file import read_metrics_file
    from megatron_simpo.evaluation.analysis import read_dump

    rows = [{"iteration": i, "note": f"a{c}b"} for i, c in enumerate("\u2028\u2029\u0085", 1)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n\n",
                    encoding="utf-8", newline="")
    if reader == "metrics":
        found, warning = read_metrics_file(path)
        assert [row for _, row in found] == rows and warning is None
    else:
        assert read_dump(path) == rows
