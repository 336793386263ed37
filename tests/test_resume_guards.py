"""What a resume must not trust or accept silently: damaged optimizer state or common state, a
changed Adam, MoE objective or reference model, and a --save folder holding another run."""

import io
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from tests.multiprocess import run_on_ranks
from tests.test_train import _argv, _error_lines, _main_in_rank, _metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_simpo.model.tiny import write_default

    return write_default(tmp_path_factory.mktemp("tiny"), train_pairs=64, valid_pairs=8, seed=7)


def _train_spying_adam(rank, argv):
    """Train; the (betas, eps) of every param group at each step."""
    from megatron_simpo.checkpoint.optimizer_state import torch_optimizers
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training import loop

    seen, real = [], loop.train_step

    def spy(models, optimizer, *args, **kwargs):
        seen.append(sorted({(tuple(group["betas"]), group["eps"])
                            for inner in torch_optimizers(optimizer)
                            for group in inner.param_groups}))
        return real(models, optimizer, *args, **kwargs)

    loop.train_step = spy
    try:
        loop.run(parse_args([str(a) for a in argv]))
    finally:
        loop.train_step = real
    return seen


@pytest.fixture(scope="module")
def saved_run(tiny, tmp_path_factory):
    """A 4-iteration bf16 run on one rank (distributed optimizer: fp32 main weights beside the
    bf16 ones) saved at iterations 2 and 4."""
    save = tmp_path_factory.mktemp("guards") / "run"
    run_on_ranks(1, _train_spying_adam, _argv(tiny, train_iters=4, save=save, save_interval=2,
                                              bf16=True))
    return save


def _copy_at(saved_run: Path, folder: Path, iteration: int) -> Path:
    """A copy of the run whose tracker names ``iteration``."""
    shutil.copytree(saved_run, folder)
    (folder / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return folder


def _stored_bytes(checkpoint: Path, fqn: str) -> tuple[Path, int, int]:
    """(file, offset, length) of the raw values of tensor ``fqn`` in a dist checkpoint (torch's
    FileSystemWriter stores each tensor as a torch.save archive at an offset of a .distcp)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    [info] = [info for index, info in metadata.storage_data.items() if index.fqn == fqn]
    path = checkpoint / info.relative_path
    with path.open("rb") as handle:
        handle.seek(info.offset)
        chunk = handle.read(info.length)
    archive = zipfile.ZipFile(io.BytesIO(chunk))
    member = archive.getinfo(next(n for n in archive.namelist() if n.endswith("data/0")))
    name_length, extra_length = struct.unpack(
        "<HH", chunk[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    return path, info.offset + start, member.file_size


def _poison(checkpoint: Path, fqn: str) -> None:
    """The first value of stored fp32 tensor ``fqn`` becomes NaN (its archive's CRC is not
    checked by torch.load: the shard loads)."""
    path, offset, _ = _stored_bytes(checkpoint, fqn)
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))


WEIGHT = "embedding.word_embeddings.weight"


@pytest.mark.parametrize("state", ["param", "exp_avg_sq"])
def test_non_finite_optimizer_state_is_refused_by_name(tiny, saved_run, tmp_path, state):
    """A NaN in the optimizer's saved main weight (the distributed optimizer writes it into
    the model's weights when it loads) or in an Adam moment: the file's checksum no longer
    matches its save's, which is refused naming the file; in a checkpoint without checksums
    (saved before they were recorded) the loaded state is refused naming the tensor, exit code
    2 (before, it trained NaN and blamed the data)."""
    from megatron_simpo.checkpoint.checksums import MANIFEST_FILE

    run = _copy_at(saved_run, tmp_path / "run", 2)
    shard, _, _ = _stored_bytes(run / "iter_0000002", f"optimizer.state.{state}.{WEIGHT}")
    _poison(run / "iter_0000002", f"optimizer.state.{state}.{WEIGHT}")
    argv = _argv(tiny, train_iters=4, load=run, save=tmp_path / "elsewhere", bf16=True)
    [(code, out, err)] = run_on_ranks(1, _main_in_rank, argv)
    assert code == 2, err
    assert _error_lines(err) == [
        f"train_simpo: error: checkpoint {run / 'iter_0000002'}: {shard.name} (its bytes changed "
        "since it was saved: CRC-32 differs); a damaged copy, refusing to load it"]
    (run / "iter_0000002" / MANIFEST_FILE).unlink()
    [(code, out, err)] = run_on_ranks(1, _main_in_rank, argv)
    what = "main weight" if state == "param" else state
    assert code == 2, err
    assert _error_lines(err) == [
        f"train_simpo: error: checkpoint {run / 'iter_0000002'}: tensor {WEIGHT} (the optimizer's "
        f"{what}) holds NaN/inf values (a damaged shard or a diverged run); refusing to load it"]


def test_a_damaged_common_state_is_refused_before_it_is_trusted(tiny, saved_run, tmp_path):
    """One byte changed in common.pt (train state, consumed samples, RNG): torch.load does not
    check the archive's CRCs and loaded it; the resume is refused naming the file."""
    run = _copy_at(saved_run, tmp_path / "run", 2)
    common = run / "iter_0000002" / "common.pt"
    if not common.is_file():
        pytest.skip("this megatron-core keeps the common state in the shards")
    raw = bytearray(common.read_bytes())
    with zipfile.ZipFile(common) as archive:
        member = archive.getinfo(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    name_length, extra_length = struct.unpack(
        "<HH", raw[member.header_offset + 26:member.header_offset + 30])
    raw[member.header_offset + 30 + name_length + extra_length + member.file_size // 2] ^= 1
    common.write_bytes(bytes(raw))
    argv = _argv(tiny, train_iters=4, load=run, bf16=True)
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv)
    assert code == 2, err
    [line] = _error_lines(err)
    assert line.startswith(f"train_simpo: error: cannot read checkpoint {run / 'iter_0000002'}: "
                           "common.pt (damaged: ")
    assert line.endswith("data.pkl fails its checksum)")


def test_adam_settings_on_resume_are_refused_or_applied(tiny, saved_run, tmp_path):
    """Loading the optimizer state restores the checkpoint's betas and eps, so another
    --adam-beta2 used to be ignored: now refused without a flag; with
    --override-opt-param-scheduler the resumed steps run with the command line's, and the next
    checkpoint records them."""
    from megatron_simpo.checkpoint import checkpointing

    run = _copy_at(saved_run, tmp_path / "run", 2)
    shutil.rmtree(run / "iter_0000004")
    flags = dict(train_iters=4, load=run, save=run, adam_beta2="0.95", adam_eps="1e-6",
                 bf16=True)
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, _argv(tiny, **flags))
    assert code == 2, err
    assert _error_lines(err) == [
        f"train_simpo: error: --load {run / 'iter_0000002'} contradicts the command line: "
        "--adam-beta2 0.999 -> 0.95, --adam-eps 1e-08 -> 1e-06 (give "
        "--override-opt-param-scheduler to train on the command line's learning-rate schedule, "
        "or --use-checkpoint-opt-param-scheduler to keep the checkpoint's)"]
    seen = run_on_ranks(1, _train_spying_adam,
                        _argv(tiny, override_opt_param_scheduler=True, **flags))[0]
    assert seen == [[((0.9, 0.95), 1e-6)]] * 2
    schedule = checkpointing.read_train_state(run / "iter_0000004").settings["schedule"]
    assert (schedule["adam_beta1"], schedule["adam_beta2"], schedule["adam_eps"]) == \
        (0.9, 0.95, 1e-6)


def test_a_resume_into_a_folder_holding_another_run(tiny, saved_run, tmp_path):
    """--load A --save B, B holding another run: refused (its metrics and checkpoints would
    mix with this run's); with --overwrite, B starts afresh from the resumed iteration."""
    other = _copy_at(saved_run, tmp_path / "other", 4)
    argv = _argv(tiny, train_iters=4, load=saved_run / "iter_0000002", save=other, bf16=True)
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv)
    assert code == 2, err
    assert _error_lines(err) == [
        f"train_simpo: error: --save {other} already holds another run ({other / 'latest_'}"
        f"checkpointed_iteration.txt, {other / 'metrics.jsonl'}, {other / 'iter_0000002'}, ...)"
        f", and this one resumes from {saved_run / 'iter_0000002'}: save into that run's "
        "folder or an empty one, or give --overwrite to replace it"]
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv + ["--overwrite"])
    assert code == 0, err
    assert sorted(p.name for p in other.glob("iter_*")) == ["iter_0000004"]
    rows = _metrics(other)
    assert [row["iteration"] for row in rows if "loss" in row] == [3, 4]
    assert min(row["iteration"] for row in rows) == 2  # the resumed run's evaluation at 2
    original = {row["iteration"]: row["loss"] for row in _metrics(saved_run) if "loss" in row}
    for row in rows:
        if "loss" in row:
            assert row["loss"] == pytest.approx(original[row["iteration"]], rel=1e-5)


def _fingerprinted(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text(json.dumps({"weights": text}))
    (folder / "metadata.json").write_text("{}")
    return folder


def test_resume_rules_on_the_reference_model_and_mixture_of_experts(tiny, tmp_path):
    """A DPO run's reference is recorded by its checkpoint's fingerprint: a resume with another
    --pretrained-checkpoint is refused, the same one (under another path) accepted. The MoE
    load-balancing coefficient and capacity factor are part of the objective; a frozen router
    changes which tensors the optimizer state holds."""
    from megatron_simpo.checkpoint.layout import TrainState
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.resume import (ResumeError, check_resume,
                                                command_line_schedule, reference_record,
                                                settings_record)

    first, other = _fingerprinted(tmp_path / "sft1", "a"), _fingerprinted(tmp_path / "sft2", "b")
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    dpo = parse_args(_argv(tiny, train_iters=8, load=tmp_path, algorithm="dpo",
                           pretrained_checkpoint=first))
    saved = TrainState(4, 32, None, settings_record(dpo, 8, command_line_schedule(dpo, 8),
                                                    reference=reference_record(dpo, first)))
    assert check_resume(dpo, saved, tmp_path, reference=reference_record(dpo, moved)) == []
    with pytest.raises(ResumeError) as error:
        check_resume(dpo, saved, tmp_path, reference=reference_record(dpo, other))
    assert str(error.value) == (
        f"--load {tmp_path} contradicts the command line: --pretrained-checkpoint {first} -> "
        f"{other} (the reference model: its weights differ, and a run compares with one "
        "reference; resume with the run's)")
    simpo = parse_args(_argv(tiny, train_iters=8, load=tmp_path))
    saved = TrainState(4, 32, None, settings_record(simpo, 8, command_line_schedule(simpo, 8),
                                                    reference=reference_record(simpo, first)))
    assert saved.settings["reference"] is None  # SimPO compares with no reference
    for flags, expected in [
            (dict(moe_aux_loss_coeff="0.01"), "--moe-aux-loss-coeff 0 -> 0.01 (a run optimises "
             "one objective"),
            (dict(moe_expert_capacity_factor="1.5"), "--moe-expert-capacity-factor None -> 1.5 "
             "(a run optimises one objective"),
            (dict(freeze_moe_router=True), "--freeze-moe-router off -> on (the checkpoint's "
             "optimizer state is laid out for the first")]:
        with pytest.raises(ResumeError) as error:
            check_resume(parse_args(_argv(tiny, train_iters=8, load=tmp_path, **flags)), saved,
                         tmp_path)
        assert str(error.value).startswith(f"--load {tmp_path} contradicts the command line: "
                                           f"{expected}"), str(error.value)


def test_a_link_to_an_iteration_of_save_resumes_in_save(tiny, saved_run, tmp_path):
    """--load given as a link to one of --save's iterations is that run going on in its own
    folder: --overwrite keeps its iterations up to the resumed one (it deleted them all, the
    loaded one too, as another run's folder), and its metrics."""
    run = _copy_at(saved_run, tmp_path / "run", 4)
    link = tmp_path / "best"
    link.symlink_to(run / "iter_0000002")
    rows_before = [row for row in _metrics(run) if row["iteration"] <= 2 and "loss" in row]
    argv = _argv(tiny, train_iters=4, load=link, save=run, overwrite=True, bf16=True)
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv)
    assert code == 0, err
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    rows = [row for row in _metrics(run) if "loss" in row]
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert rows[:2] == rows_before


def _stopped_by_a_signal_at(rank, argv, at: int):
    """``train.main`` as a user runs it, with SIGTERM received at iteration ``at``."""
    import signal

    from megatron_simpo.distributed import lifecycle

    real = lifecycle.StopRequests.reason

    def reason(self, iteration):
        if iteration == at:
            self.received = signal.SIGTERM
        return real(self, iteration)

    lifecycle.StopRequests.reason = reason
    try:
        return _main_in_rank(rank, argv)
    finally:
        lifecycle.StopRequests.reason = real


def test_a_stop_without_save_logs_the_steps_since_the_last_row(tiny):
    """SIGTERM at iteration 3 with --log-interval 10 and no --save: the stop prints the row of
    steps 1-3 (it was lost: rows were flushed only before a save)."""
    argv = _argv(tiny, train_iters=8, log_interval=10)
    [(code, out, err)] = run_on_ranks(1, _stopped_by_a_signal_at, argv, 3)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith(" iteration ")]
    assert len(lines) == 1 and lines[0].startswith(" iteration        3/       8 |"), out


def test_a_record_without_adam_settings_is_checked_against_the_loaded_ones(
        tiny, saved_run, tmp_path):
    """A checkpoint saved before Adam's settings were recorded (no checksums either): the
    loaded optimizer's betas and eps stand in for the record, so another --adam-beta2 is
    refused, not silently replaced by the checkpoint's."""
    from megatron_simpo.checkpoint.checksums import MANIFEST_FILE

    run = _copy_at(saved_run, tmp_path / "run", 2)
    shutil.rmtree(run / "iter_0000004")
    folder = run / "iter_0000002"
    common = folder / "common.pt"
    if not common.is_file():
        pytest.skip("this megatron-core keeps the common state in the shards")
    import torch

    state = torch.load(common, weights_only=False)
    schedule = state["train_state"]["run_settings"]["schedule"]
    for name in ("adam_beta1", "adam_beta2", "adam_eps"):
        del schedule[name]
    torch.save(state, common)
    (folder / MANIFEST_FILE).unlink()
    argv = _argv(tiny, train_iters=4, load=run, save=run, adam_beta2="0.95", bf16=True)
    [(code, _, err)] = run_on_ranks(1, _main_in_rank, argv)
    assert code == 2, err
    assert _error_lines(err) == [
        f"train_simpo: error: --load {folder} contradicts the command line: --adam-beta2 0.999 "
        "-> 0.95 (give --override-opt-param-scheduler to train on the command line's "
        "learning-rate schedule, or --use-checkpoint-opt-param-scheduler to keep the "
        "checkpoint's)"]
