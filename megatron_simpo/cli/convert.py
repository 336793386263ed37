"""Command lines of the two converters: console scripts ``megatron-simpo-convert-hf-to-megatron``
and ``megatron-simpo-convert-megatron-to-hf`` (and the thin callers in tools/). Each parses its
config (``convert.conversion``; the flags are generated from it) and calls one library function.
"""

from __future__ import annotations

import sys

from megatron_simpo.convert.conversion import (ConversionError, ExportConfig, ImportConfig,
                                               export_hf, import_hf)
from megatron_simpo.cli.flags import USER_ERRORS, Command, Section, run_command, user_error
from megatron_simpo.model.hf_config import GEMMA3_MULTIMODAL, SUPPORTED_ARCHITECTURES

IMPORT = Command("convert_hf_to_megatron",
                 "Hugging Face checkpoint -> Megatron distributed checkpoint for training. "
                 f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)} (and the text "
                 f"model of a {GEMMA3_MULTIMODAL}, exported back as Gemma3ForCausalLM).",
                 (Section("conversion", ImportConfig, key="config", fields=(
                     "hf_path", "save", "tensor_parallel_size", "pipeline_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size", "dtype",
                     "force", "allow_non_finite")),))
EXPORT = Command("convert_megatron_to_hf", "Megatron checkpoint (any TP/PP) -> Hugging Face folder",
                 (Section("conversion", ExportConfig, key="config", fields=(
                     "load", "save", "iteration", "dtype", "max_shard_size", "force",
                     "allow_non_finite")),))
# A bad input, a non-empty --save or a failed rank: one line, exit code 2.
_ERRORS = {(*USER_ERRORS, KeyError, FileExistsError, ConversionError): 2}


def hf_to_megatron_main(argv=None, *, run_on_ranks=None) -> None:
    """``run_on_ranks(world_size, fn, *args)`` starts the ranks: fresh processes
    (:func:`megatron_simpo.launch.run_on_ranks`) unless a caller that keeps ranks passes its own."""
    config = IMPORT.parse(argv)["config"]
    done = run_command(IMPORT.prog, lambda: import_hf(config, run_on_ranks=run_on_ranks),
                       errors=_ERRORS)
    ep = config.expert_model_parallel_size
    print(f"saved {done.path} (TP={config.tensor_parallel_size}, "
          f"PP={config.pipeline_parallel_size}, {f'EP={ep}, ' if ep > 1 else ''}"
          f"{done.dtype}: {done.why})")


def megatron_to_hf_main(argv=None, *, run_on_ranks=None) -> None:
    """``run_on_ranks`` as for :func:`hf_to_megatron_main`."""
    config = EXPORT.parse(argv)["config"]
    done = run_command(EXPORT.prog, lambda: export_hf(config, run_on_ranks=run_on_ranks),
                       errors=_ERRORS)
    print(f"saved {done.path} ({done.dtype}: {done.why})")


COMMANDS = {"hf-to-megatron": hf_to_megatron_main, "megatron-to-hf": megatron_to_hf_main}


def main(argv=None) -> None:
    """``python -m megatron_simpo.cli.convert hf-to-megatron|megatron-to-hf ...``; a missing or
    unknown subcommand is one line, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: python -m megatron_simpo.cli.convert {{{','.join(COMMANDS)}}} ... "
              "(each direction's flags: its --help)")
        return
    if not argv or argv[0] not in COMMANDS:
        given = f"got {argv[0]!r}" if argv else "none given"
        user_error("convert", f"the first argument is the direction, one of "
                              f"{', '.join(COMMANDS)} ({given})")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
