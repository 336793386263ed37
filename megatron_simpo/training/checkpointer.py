"""A run's checkpoints: the resumed state from --load, and saves to --save (every
--save-interval iterations, at the end, and when the run stops early)."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from megatron_simpo.checkpoint import checkpointing, writer_process
from megatron_simpo.checkpoint.optimizer_state import loaded_adam
from megatron_simpo.training.components import TrainingComponents
from megatron_simpo.training.config import TrainConfig
from megatron_simpo.training.guards import finite_everywhere, parameters
from megatron_simpo.training.metrics import at_interval
from megatron_simpo.training.optimizer import finish_param_sync, override_loaded_schedule
from megatron_simpo.training.resume import (check_resume, effective_schedule, reference_record,
                                            settings_record)
from megatron_simpo.training.run_setup import ModelSource, resumes_in_save
from megatron_simpo.training.training_data import TrainingData


class RunFailed(RuntimeError):
    """The run cannot go on for a reason the user must act on (one line, exit code 3)."""


class Checkpointer:
    """Loads the resumed state and saves the run's weights, optimizer and position."""

    def __init__(self, config: TrainConfig, source: ModelSource, parts: TrainingComponents,
                 data: TrainingData, total_iters: int, rank: int,
                 say: Callable[[str | None], None]):
        self.config, self.source, self.parts, self.data = config, source, parts, data
        self.total_iters, self.rank, self.say = total_iters, rank, say
        if config.save:  # the stop-save must survive the stop signal (checkpoint.writer_process)
            writer_process.keep_through_stop_signals()

    def resume(self) -> checkpointing.TrainState:
        """The state of --load (weights, optimizer, schedule loaded; its data checked), or
        iteration 0; clears what --overwrite replaces in --save. Every rank."""
        state = checkpointing.TrainState(0, 0)
        resume_from = self.source.resume_from
        self.continues_in_save = resumes_in_save(self.config, self.source)
        reference = reference_record(self.config, self.source.weights_from)  # read once
        saved = None
        if resume_from is not None:
            saved = checkpointing.read_train_state(resume_from)
            self.say(self.data.check_resume(saved, self.config, resume_from))
            state = checkpointing.load_checkpoint(
                resume_from, self.parts.model.module, self.parts.optimizer,
                self.parts.scheduler, model_config=self.source.config)
            if saved.settings is not None:  # a record from before Adam's settings were in it:
                for name, value in loaded_adam(self.parts.optimizer).items():  # as loaded
                    saved.settings["schedule"].setdefault(name, value)
            for note in check_resume(self.config, saved, resume_from, self.total_iters,
                                     reference=reference):
                self.say(note)
            if self.config.optimizer.override_opt_param_scheduler:
                override_loaded_schedule(self.parts.optimizer, self.parts.scheduler,
                                         self.config.optimizer)
            self.say(f"> resumed from {resume_from} at iteration {state.iteration}")
        elif self.config.load:  # run_setup.first_start_in_save
            self.say(f"> --load {self.config.load}: no checkpoint there yet; the run starts "
                     "from the beginning")
        # What the next checkpoints record of this run (training.resume).
        self.settings = settings_record(self.config, self.total_iters,
                                        effective_schedule(self.config, saved, self.total_iters),
                                        reference=reference)
        if self.config.save and self.rank == 0:
            for left in checkpointing.remove_interrupted_saves(self.config.save):
                self.say(f"> removed {left}: a save that never finished (its run ended "
                         "mid-save)")
            if self.config.overwrite:  # all of it where the resumed run is another folder's
                checkpointing.remove_iterations_after(
                    self.config.save, state.iteration if self.continues_in_save else 0)
        dist.barrier()
        return state

    def resume_hint(self) -> str:
        """Where a run that failed goes on from: this run's latest checkpoint, the one it
        resumed from, or the start."""
        latest = None
        if self.config.save:
            try:
                latest = checkpointing.find_checkpoint(self.config.save)
            except (FileNotFoundError, ValueError):
                pass
        if latest is not None:
            return f"then resume from {latest} (--load {self.config.save})"
        if self.source.resume_from is not None:
            return f"then resume from {self.source.resume_from} again (no newer checkpoint)"
        return "then start again (this run saved no checkpoint)"

    def due(self, iteration: int, stopping: bool) -> bool:
        """At the interval, at the end, and when the run stops early (with --save)."""
        return bool(self.config.save) and (
            stopping or at_interval(iteration, self.config.save_interval, self.total_iters))

    def save(self, iteration: int, consumed: int, updated: bool) -> None:
        """Save iteration ``iteration``; ``updated``: whether any step has updated the weights
        (before that, the start point is all there is, and nothing is saved)."""
        parts, source = self.parts, self.source
        if not updated:
            self.say(f"> no checkpoint at iteration {iteration}: no step has updated the "
                     "weights yet")
            return
        finish_param_sync([parts.model])
        if not finite_everywhere(parameters([parts.model])):
            raise RunFailed(f"refusing to save iteration {iteration}: the weights hold NaN/inf "
                            f"values; the last checkpoint in {self.config.save} stays the latest")
        source_dir = source.weights_from or source.resume_from
        source_assets = checkpointing.checkpoint_assets(source_dir) if source_dir else {}
        path = checkpointing.save_checkpoint(
            self.config.save, checkpointing.TrainState(iteration, consumed, self.data.fingerprint,
                                                     self.settings),
            parts.model.module, parts.optimizer, parts.scheduler, source.config,
            assets={**source_assets, "tokenizer": source.tokenizer_path})
        self.say(f"> saved checkpoint {path}")
