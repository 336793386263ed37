"""DPO, IPO and R-DPO from precomputed reference log-probs: the stored values are the online
reference pass's, and a file from other data or another reference model is refused."""

import json

import pytest

from tests.multiprocess import run_on_ranks
from tests.test_train import _argv, _main_in_rank, _train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny default, a reference checkpoint (a short SimPO run) and its log-probs computed
    at TP2 on 2 ranks."""
    from megatron_simpo.model.tiny import write_default

    root = tmp_path_factory.mktemp("reference")
    tiny = write_default(root / "tiny", train_pairs=96, valid_pairs=16, seed=5)
    run_on_ranks(1, _train, _argv(tiny, train_iters=3, save=root / "sft"))
    logps = root / "reference.pt"
    argv = _argv(tiny, train_iters=4, algorithm="dpo", pretrained_checkpoint=root / "sft",
                 tensor_model_parallel_size=2, reference_logps=logps)
    [(code, out, err), _] = run_on_ranks(2, _compute_in_rank, argv)
    assert code == 0, err
    assert f"> saved reference log-probs of 112 pairs from {root / 'sft' / 'iter_0000003'}" in out
    return tiny, root / "sft", logps


def _compute_in_rank(rank, argv):
    """(exit code, stdout, stderr) of the command in this rank."""
    import contextlib
    import io

    from megatron_simpo.cli.reference_logps import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("algorithm", ["dpo", "ipo", "rdpo"])
def test_precomputed_reference_trains_as_the_online_reference(setup, algorithm):
    tiny, sft, logps = setup
    common = dict(train_iters=3, eval_interval=3, algorithm=algorithm,
                  pretrained_checkpoint=sft, pipeline_model_parallel_size=2)
    online_losses, online_evals = run_on_ranks(2, _train, _argv(tiny, **common))[0]
    losses, evals = run_on_ranks(2, _train, _argv(tiny, reference_logps=logps, **common))[0]
    # The same reference sums up to fp32 round-off (the passes pad the pairs differently):
    # 1e-5 relative to values that reach 30 (IPO's squared loss).
    assert losses == pytest.approx(online_losses, abs=1e-5, rel=1e-5)
    assert [at for at, _ in evals] == [at for at, _ in online_evals] == [0, 3]
    for (at, metrics), (_, online) in zip(evals, online_evals):
        assert metrics.keys() == online.keys()
        for name, value in online.items():
            # At 0 the policy is the reference: every reward is 0 up to round-off, so whether
            # chosen > rejected is a coin flip; the margins themselves agree.
            if not (at == 0 and name.endswith("accuracies")):
                assert abs(metrics[name] - value) <= 1e-5 * max(1.0, abs(value)), (at, name)


def test_reference_logps_from_other_data_or_another_model_are_refused(setup, tmp_path):
    tiny, sft, logps = setup
    argv = _argv(tiny, train_iters=2, algorithm="dpo", pretrained_checkpoint=sft,
                 reference_logps=logps)
    # A validation pair the file does not hold.
    rows = tiny["valid"].read_text().splitlines()
    other = json.loads(rows[0])
    other["chosen"] += "x"
    valid = tmp_path / "valid.jsonl"
    valid.write_text("\n".join([json.dumps(other)] + rows[1:]) + "\n")
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv + ["--valid-data-path", str(valid)])
    assert code == 2
    assert (f"train_simpo: error: --reference-logps {logps} has no log-probs for 1 of 16 "
            "validation pairs (first: pair 0)") in err
    # Another reference model.
    run_on_ranks(1, _train, _argv(tiny, train_iters=1, save=tmp_path / "other"))
    argv_other = [str(tmp_path / "other") if a == str(sft) else a for a in argv]
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv_other)
    assert code == 2
    assert (f"--reference-logps {logps} was computed from {sft / 'iter_0000003'}, not from "
            f"--pretrained-checkpoint {tmp_path / 'other' / 'iter_0000001'}") in err
    # Not such a file.
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a file of log-probs")
    argv_garbage = [str(garbage) if a == str(logps) else a for a in argv]
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv_garbage)
    assert code == 2 and f"--reference-logps {garbage}: not a reference log-probs file" in err


def test_reference_logps_go_with_reference_algorithms_only(setup):
    from megatron_simpo.cli.arguments import build_parser, config_from_namespace

    tiny, sft, logps = setup
    with pytest.raises(ValueError, match="--reference-logps applies to --algorithm dpo, ipo, "
                                         "rdpo, not simpo"):
        config_from_namespace(build_parser().parse_args(
            _argv(tiny, train_iters=1, pretrained_checkpoint=sft, reference_logps=logps)))


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(setup, tmp_path):
    tiny, sft, _ = setup
    (tmp_path / "a-file").write_text("")
    for output, expected in [
            (tmp_path, f"--reference-logps {tmp_path} is a folder: give the file to write"),
            (tmp_path / "a-file" / "ref.pt", f"--reference-logps "
             f"{tmp_path / 'a-file' / 'ref.pt'} cannot be written ({tmp_path / 'a-file'} is a "
             "file, not a folder)"),
            (tmp_path / "a-file" / "sub" / "ref.pt", f"--reference-logps "
             f"{tmp_path / 'a-file' / 'sub' / 'ref.pt'} cannot be written (Not a directory)")]:
        argv = _argv(tiny, train_iters=1, algorithm="dpo", pretrained_checkpoint=sft,
                     reference_logps=output)
        code, out, err = _compute_in_rank(0, argv)  # in this process: no rank is started
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"compute_reference_logps: error: {expected}"), err


class _Custom:
    """Pickled by torch.save, refused by torch.load(weights_only=True)."""


@pytest.mark.parametrize("write", [
    lambda path: path.write_text(json.dumps({"chosen": [-1.0]})),  # a JSON file
    lambda path: path.write_bytes(b"\x00\x01 not a zip"),
    lambda path: __import__("torch").save({"x": _Custom()}, path),  # pickle with code
    lambda path: __import__("torch").save({"format": "other"}, path),
])
def test_a_file_that_is_not_reference_logps_is_one_line_naming_it(tmp_path, write):
    from megatron_simpo.data.config import DataError
    from megatron_simpo.training.reference_logps import FORMAT, ReferenceLogps

    path = tmp_path / "logps.json"
    write(path)
    with pytest.raises(DataError) as info:
        ReferenceLogps.load(path)
    [line] = str(info.value).splitlines()
    assert line.startswith(f"--reference-logps {path}: not a reference log-probs file (")
    assert "weights_only" not in line
    assert line.endswith("megatron-simpo-reference-logps writes)") or line.endswith(
        f"'other', expected {FORMAT}, written by megatron-simpo-reference-logps)")


def _command_reference_sums(rank, hf_config, hf_state, batch, chunk):
    """Per-sequence log-prob sums of the reference model the reference-logps command builds
    (``run_setup.build_reference_from_config``), its checkpoint loader given the HF weights."""
    import types

    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training import run_setup
    from megatron_simpo.training.step import sequence_logp_sums

    config = ModelConfig.from_hf_config(hf_config)
    parallel = ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    weights = hf_to_megatron(hf_state, config, config.padded_vocab_size(1))
    settings = types.SimpleNamespace(logprob_chunk_size=chunk, parallel=parallel, bf16=False,
                                     transformer_impl="local", fp8=None,
                                     data=types.SimpleNamespace(seq_length=batch.tokens.shape[1]))
    saved = run_setup._load_pretrained
    run_setup._load_pretrained = lambda source: lambda model: load_rank_state(
        model, weights, config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    try:
        model, head = run_setup.build_reference_from_config(
            settings, types.SimpleNamespace(config=config))
        return sequence_logp_sums(model, [batch], head)[0]
    finally:
        run_setup._load_pretrained = saved


@pytest.mark.parametrize("chunk", [8, 0])
def test_the_commands_reference_caps_gemma2_logits_as_transformers_does(chunk):
    """Gemma-2's final-logit soft-capping: the memory-lean head (which scores hidden states
    itself) must cap as the full-logit model does; the sums equal transformers' (fp32)."""
    import torch

    from megatron_simpo.data.collate import TokenizedPair, collate_pairs
    from tests.test_step import _sequence_logps
    from tests.tiny import tiny_hf_config, tiny_hf_model

    hf_config = tiny_hf_config("gemma2")
    model = tiny_hf_model(hf_config, seed=3)
    g = torch.Generator().manual_seed(0)

    def ids(low, high):
        length = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, hf_config["vocab_size"], (length,), generator=g).tolist()

    batch = collate_pairs([TokenizedPair(ids(1, 6), ids(1, 12), ids(1, 12)) for _ in range(4)],
                          24)
    with torch.no_grad():
        expected, _ = _sequence_logps(model, batch)
    [sums] = run_on_ranks(1, _command_reference_sums, hf_config, model.state_dict(), batch, chunk)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-5)


def _flip_a_sum_byte(path):
    """One bit of one stored log-prob changed in place (the archive's CRC no longer agrees)."""
    import torch

    sums = torch.load(path, weights_only=True)["sums"]
    data = bytearray(path.read_bytes())
    at = data.find(sums[len(sums) // 2].numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))


def _resave(change):
    def write(path):
        import torch

        saved = torch.load(path, weights_only=True)
        change(saved)
        torch.save(saved, path)
    return write


@pytest.mark.parametrize("damage, message", [
    (_flip_a_sum_byte, r"damaged \(\S+/data/\d+ fails its checksum\)"),
    (_resave(lambda saved: saved["sums"].__setitem__((5, 1), float("nan"))),
     r"pair row 5 holds a non-finite log-prob \(\[-?[\d.]+, nan\]\)"),
    (_resave(lambda saved: saved["keys"].pop()),
     r"damaged \(expected \[n, 2\] float64 sums for n keys\)"),
])
def test_a_damaged_reference_logps_file_is_refused_before_it_is_trusted(setup, tmp_path, damage,
                                                                        message):
    """torch.load checks no CRC: a changed byte of a stored sum loads as another log-prob."""
    import shutil

    import torch

    from megatron_simpo.data.config import DataError
    from megatron_simpo.training.reference_logps import ReferenceLogps

    _, _, logps = setup
    path = tmp_path / "reference.pt"
    shutil.copyfile(logps, path)
    good = torch.load(path, weights_only=True)["sums"]
    damage(path)
    if damage is _flip_a_sum_byte:  # what loading it unchecked would give: other log-probs
        assert not torch.equal(torch.load(path, weights_only=True)["sums"], good)
    with pytest.raises(DataError, match=rf"^--reference-logps {path}: {message}; recompute it "
                                        "with megatron-simpo-reference-logps$"):
        ReferenceLogps.load(path)
