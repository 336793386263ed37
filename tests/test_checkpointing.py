"""Loading weights into a model: every tensor required, Transformer Engine's extra state optional,
non-finite weights named; saves that fail name the iteration, folder and the system's reason."""

import subprocess
from pathlib import Path

import pytest
import torch

from megatron_simpo.checkpoint.checkpointing import load_model_state
from tests.multiprocess import run_on_ranks


class _WithExtraState(torch.nn.Module):
    """Stands in for TE's attention core: an ``_extra_state`` in state_dict, no parameters."""

    def __init__(self):
        super().__init__()
        self.restored = None

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        self.restored = state


def _model():
    model = torch.nn.Module()
    model.linear = torch.nn.Linear(3, 2)
    model.core_attention = _WithExtraState()
    return model


def test_absent_extra_state_is_tolerated_and_weights_load():
    model, source = _model(), _model()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    assert "core_attention._extra_state" in model.state_dict()
    load_model_state(model, state, Path("ckpt"))
    assert torch.equal(model.linear.weight, source.linear.weight)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("linear.bias"), r"missing \['linear.bias'\]"),
    (lambda s: s.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
])
def test_missing_or_unexpected_weights_are_refused_by_name(change, message):
    state = dict(_model().state_dict())
    change(state)
    with pytest.raises(ValueError, match=r"ckpt does not fit the model: .*" + message):
        load_model_state(_model(), state, Path("ckpt"))


# ---- saves that fail, weights that are not finite ----------------------------------------------

def _tiny_model(tp: int = 1):
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import build_model
    from tests.tiny import tiny_hf_config

    config = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    runtime.initialize(parallel, seed=0, model_config=config)
    return build_model(config, parallel), config, lambda: build_model(config, parallel)


def _enospc(path: str):
    """What PyTorch's distributed checkpoint raises for a full disk on rank 0: a
    CheckpointException whose ``failures`` map rank -> (exception, traceback summary)."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(errno.ENOSPC, "No space left on device", path)
    except OSError as error:
        return CheckpointException("save failed", {0: _wrap_exception(error)})


def _save(rank, save: str, inject: bool, logged: list | None = None) -> str:
    """The save's error message; ``logged``: a list that collects what was logged meanwhile at
    warning level or above (the error is reported once: raised, not also logged)."""
    import logging

    from megatron.core import dist_checkpointing

    from megatron_simpo.checkpoint.checkpointing import CheckpointError, save_model_only

    model, config, _ = _tiny_model()
    real_save = dist_checkpointing.save

    def full_disk(state, path, *args, **kwargs):
        raise _enospc(f"{path}/__0_0.distcp")

    class Collect(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    dist_checkpointing.save = full_disk if inject else real_save
    try:
        save_model_only(save, 0, model, config)
    except CheckpointError as error:
        return str(error) if logged is None else (str(error), logged)
    finally:
        dist_checkpointing.save = real_save
        logging.getLogger().removeHandler(handler)
    return "saved"


def test_os_reason_reads_torch_per_rank_failures():
    from megatron_simpo.checkpoint.layout import os_reason

    error = _enospc("/ckpt/iter_0000002.partial/__0_0.distcp")
    assert os_reason(error) == "No space left on device: /ckpt/iter_0000002.partial/__0_0.distcp"
    try:  # as a cause, too
        raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert os_reason(wrapped) == os_reason(error)


def test_os_reason_reads_an_os_error_passed_on_as_text():
    """megatron-core's writer workers pass an OSError on as RuntimeError(f"Worker failure:
    {error}"), and PyTorch's gather of the ranks' failures drops its cause: the reason (a quota,
    a permission) is read from the text, not lost to "CheckpointException ranks:..."."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from megatron_simpo.checkpoint.layout import os_reason

    spelled = OSError(errno.EDQUOT, "Disk quota exceeded", "/ckpt/iter_0000002.partial/__1_0.distcp")
    try:
        raise RuntimeError(f"Worker failure: {spelled}")
    except RuntimeError as error:
        failure = CheckpointException("save failed", {1: _wrap_exception(error)})
    assert os_reason(failure) == "Disk quota exceeded: /ckpt/iter_0000002.partial/__1_0.distcp"
    assert os_reason(RuntimeError("Worker failure: [Errno 13] Permission denied")) == \
        "Permission denied"


def test_a_loader_message_listing_every_key_is_cut_to_one_short_line(tmp_path):
    """Megatron's loader names a missing key with every key there is (5,955 characters for a
    tiny MoE model): the error line keeps its start and says how much was left out."""
    from megatron_simpo.checkpoint.layout import REASON_LENGTH, shard_reason

    keys = [f"decoder.layers.{i}.mlp.experts.weight{i}" for i in range(200)]
    message = f'"optimizer.state.param.router.weight from model not in state dict: {keys}"'
    (tmp_path / "metadata.json").write_text("{}")
    torch.save({}, tmp_path / "common.pt")  # sound files: the loader's message is the reason
    reason = shard_reason(tmp_path, KeyError(message))
    start = f"KeyError: {KeyError(message)}"[:len("KeyError: ") + REASON_LENGTH]
    assert reason == f"{start} ... ({len(str(KeyError(message))) - REASON_LENGTH} more characters)"
    assert shard_reason(tmp_path, KeyError("short")) == "KeyError: 'short'"


def test_a_save_on_a_full_disk_names_iteration_folder_and_reason(tmp_path):
    save = tmp_path / "run"
    [message] = run_on_ranks(1, _save, str(save), True)
    assert message == (f"cannot save iteration 0 to {save}: No space left on device: "
                       f"{save / 'iter_0000000.partial'}/__0_0.distcp; nothing was published")
    assert not list(save.glob("iter_*"))


def test_a_save_on_a_real_full_filesystem_names_the_reason(tmp_path):
    """A 64 KiB tmpfs: the model (about 200 KiB) does not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        [(message, logged)] = run_on_ranks(1, _save, str(disk / "run"), False, [])
        assert logged == []  # Megatron's writer logs the failure: held back
        assert message.startswith(f"cannot save iteration 0 to {disk / 'run'}: No space left on "
                                  "device")
        assert message.endswith("; nothing was published")
        assert not list((disk / "run").glob("iter_*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _load_poisoned(rank, save: str, poison_rank: int) -> str:
    from megatron_simpo.checkpoint.checkpointing import (CheckpointError, find_checkpoint,
                                                         load_checkpoint, save_model_only)

    model, config, build_again = _tiny_model(tp=2)
    if rank == poison_rank:  # one element of one rank's shard
        with torch.no_grad():
            model.decoder.layers[1].mlp.linear_fc2.weight[0, -1] = float("inf")
    save_model_only(save, 0, model, config)
    fresh = build_again()
    try:
        load_checkpoint(find_checkpoint(save), fresh, model_config=config)
    except CheckpointError as error:
        return str(error)
    return "loaded"


@pytest.mark.parametrize("poison_rank", [1, 2])  # 2: nobody (a clean checkpoint loads)
def test_a_non_finite_weight_is_named_on_every_rank_after_load(tmp_path, poison_rank):
    save = tmp_path / f"poisoned{poison_rank}"
    results = run_on_ranks(2, _load_poisoned, str(save), poison_rank)
    if poison_rank == 2:
        assert results == ["loaded", "loaded"]
        return
    expected = (f"checkpoint {save / 'iter_0000000'}: tensor decoder.layers.1.mlp.linear_fc2."
                "weight holds NaN/inf values (a damaged shard or a diverged run); refusing to "
                "load it")
    assert results == [expected, expected]


def test_a_tracker_naming_a_removed_iteration_says_what_is_left(tmp_path):
    from megatron_simpo.checkpoint.layout import TRACKER_FILE, find_checkpoint

    for iteration in (2, 4):
        (tmp_path / f"iter_{iteration:07d}").mkdir()
        (tmp_path / f"iter_{iteration:07d}" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006").mkdir()  # removed by hand, or cut short
    (tmp_path / TRACKER_FILE).write_text("6")
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path)
    assert str(error.value) == (
        f"--load {tmp_path}: {TRACKER_FILE} names iteration 6 but {tmp_path}/iter_0000006 is "
        f"missing or incomplete; the latest complete iterations there are 2, 4: give --load "
        f"{tmp_path}/iter_0000004, or write the one to resume from into {tmp_path}/{TRACKER_FILE}")
    (tmp_path / TRACKER_FILE).unlink()  # or no tracker at all
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path)
    assert str(error.value).endswith(f"(no {TRACKER_FILE} and not an iter_NNNNNNN folder); the "
                                     "latest complete iterations there are 2, 4: give --load "
                                     f"{tmp_path}/iter_0000004, or write the one to resume from "
                                     f"into {tmp_path}/{TRACKER_FILE}")
    (tmp_path / TRACKER_FILE).write_text("6")
    for iteration in (2, 4):
        (tmp_path / f"iter_{iteration:07d}" / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path)
    assert str(error.value).endswith(
        "; no complete iteration is left there (to start from the beginning, drop --load; where "
        f"it is also --save, removing {TRACKER_FILE} does the same)")
    (tmp_path / "iter_0000002" / "metadata.json").write_text("{}")  # one: said in the singular
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path)
    assert str(error.value).endswith(f"; the complete iteration there is 2: give --load "
                                     f"{tmp_path}/iter_0000002, or write the one to resume from "
                                     f"into {tmp_path}/{TRACKER_FILE}")


def test_a_load_that_is_missing_or_a_file_is_one_line_naming_it(tmp_path):
    from megatron_simpo.checkpoint.layout import TRACKER_FILE, find_checkpoint

    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path / "absent", "--pretrained-checkpoint")
    assert str(error.value) == f"--pretrained-checkpoint {tmp_path / 'absent'}: does not exist"
    (tmp_path / TRACKER_FILE).write_text("2")
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path / TRACKER_FILE)
    assert str(error.value) == (f"--load {tmp_path / TRACKER_FILE}: is the tracker file: give "
                                f"its folder, --load {tmp_path}")
    (tmp_path / "weights.pt").write_text("")
    with pytest.raises(FileNotFoundError) as error:
        find_checkpoint(tmp_path / "weights.pt")
    assert str(error.value) == (f"--load {tmp_path / 'weights.pt'}: is a file, not a checkpoint "
                                "folder (a save folder or an iter_NNNNNNN folder)")


def test_only_the_folders_of_unfinished_saves_are_removed(tmp_path):
    from megatron_simpo.checkpoint.layout import remove_interrupted_saves

    (tmp_path / "iter_0000005.partial" / "weights").mkdir(parents=True)  # a save cut short
    (tmp_path / "iter_notes.partial").write_text("a user's file")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "iter_0000006.partial").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "iter_0000007.partial").write_text("not a folder a save makes")
    assert remove_interrupted_saves(tmp_path) == [tmp_path / "iter_0000005.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere", "iter_0000006.partial", "iter_0000007.partial", "iter_notes.partial"]


def _load_after(rank, save: str, damage: str) -> tuple[list[str], str]:
    """Save a TP=2 model, damage one file as ``damage`` says (on rank 0, once every rank has
    saved), load: (the files the manifest lists, the load's error or "loaded")."""
    import json as json_module

    import torch.distributed as dist

    from megatron_simpo.checkpoint.checkpointing import (CheckpointError, load_checkpoint,
                                                         save_model_only)
    from megatron_simpo.checkpoint.checksums import MANIFEST_FILE

    model, config, build_again = _tiny_model(tp=2)
    folder = save_model_only(save, 0, model, config)
    listed = sorted(json_module.loads((folder / MANIFEST_FILE).read_text())["files"])
    dist.barrier()  # every rank has read it
    shard = folder / "__1_0.distcp"  # rank 1's (the other rank checks it when loading)
    if rank == 0:
        if damage == "byte":
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 2] ^= 0x10
            shard.write_bytes(bytes(raw))
        elif damage == "cut":
            shard.write_bytes(shard.read_bytes()[:-7])
        elif damage == "manifest":
            (folder / MANIFEST_FILE).write_text("{")
        elif damage == "no manifest":
            (folder / MANIFEST_FILE).unlink()
    dist.barrier()
    from megatron_simpo.checkpoint import checksums

    real = checksums.read_manifest
    if damage == "unseen on rank 1" and rank == 1:  # another node's view: no manifest
        checksums.read_manifest = lambda checkpoint: None
    try:
        load_checkpoint(folder, build_again(), model_config=config)
    except CheckpointError as error:
        return listed, str(error)
    finally:
        checksums.read_manifest = real
    return listed, "loaded"


@pytest.mark.parametrize("damage", ["none", "byte", "cut", "manifest", "no manifest",
                                    "unseen on rank 1"])
def test_every_saved_file_is_checked_against_its_checksum_before_a_load(tmp_path, damage):
    """Each save records the size and CRC-32 of every file (each rank its own shards, rank 0
    the shared ones) in checksums.json; a load checks them first, the files shared out over
    the ranks: one changed byte or a cut file is named the same on every rank, a damaged
    manifest is named, a checkpoint saved before checksums were kept loads unchecked; a rank
    that does not see the manifest the others see ends with them (it skipped their
    collectives and both waited forever)."""
    save = tmp_path / damage.replace(" ", "_")
    results = run_on_ranks(2, _load_after, str(save), damage, timeout=120)
    listed = results[0][0]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "metadata.json",
            "model_config.json"} <= set(listed)
    folder = save / "iter_0000000"
    expected = {
        "none": "loaded", "no manifest": "loaded",
        "byte": f"checkpoint {folder}: __1_0.distcp (its bytes changed since it was saved: "
                "CRC-32 differs); a damaged copy, refusing to load it",
        "manifest": f"cannot read checkpoint {folder}: checksums.json (damaged: Expecting "
                    "property name enclosed in double quotes: line 1 column 2 (char 1))",
        "unseen on rank 1": f"cannot read checkpoint {folder}: checksums.json (missing here, "
                            "present on another rank's file system)"}
    if damage == "cut":
        size = (folder / "__1_0.distcp").stat().st_size
        expected["cut"] = (f"checkpoint {folder}: __1_0.distcp ({size} bytes, {size + 7} when "
                           "saved); a damaged copy, refusing to load it")
    assert [message for _, message in results] == [expected[damage]] * 2


def _save_with_a_full_disk_at(rank, save: str, step: str) -> str:
    """A TP=2 save whose ``step`` fails on rank 0 for a full disk: "manifest" (checksums.json,
    written after the shards) or "publish" (the tracker, when the folder is published)."""
    import errno

    from megatron_simpo.checkpoint import checkpointing, checksums
    from megatron_simpo.checkpoint.checkpointing import CheckpointError, save_model_only

    model, config, _ = _tiny_model(tp=2)
    module, name = ((checksums, "write_manifest") if step == "manifest"
                    else (checkpointing, "write_tracker"))
    real = getattr(module, name)

    def full(folder, _):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"{step}.tmp"))

    setattr(module, name, full)
    try:
        save_model_only(save, 0, model, config)
    except CheckpointError as error:
        return str(error)
    finally:
        setattr(module, name, real)
    return "saved"


def test_a_manifest_that_cannot_be_written_fails_the_save_on_every_rank(tmp_path):
    """Rank 0 writes checksums.json after the shards: its failure is agreed on by every rank
    (the others waited for it at a barrier) and nothing is published."""
    save = tmp_path / "run"
    messages = run_on_ranks(2, _save_with_a_full_disk_at, str(save), "manifest", timeout=120)
    assert messages[0].startswith(f"cannot save iteration 0 to {save}: No space left on device")
    assert messages[1] == (f"cannot save iteration 0 to {save}: rank 0 failed to write; "
                           "nothing was published")
    assert not list(save.glob("iter_*"))


def test_a_publish_that_fails_ends_the_save_on_every_rank(tmp_path):
    """Rank 0 publishes (renames the folder, writes the tracker) while the others wait: its
    failure was a traceback there and a collateral one on the others (exit code 1); now every
    rank ends with one line."""
    save = tmp_path / "run"
    messages = run_on_ranks(2, _save_with_a_full_disk_at, str(save), "publish", timeout=120)
    assert messages[0] == (f"cannot publish iteration 0 in {save}: No space left on device: "
                           f"{save / 'publish.tmp'}; nothing was published")
    assert messages[1] == (f"cannot publish iteration 0 in {save}: rank 0 failed to publish; "
                           "nothing was published")
