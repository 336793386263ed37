"""``python -m megatron_simpo.cli.launch [torchrun options] -- <training flags>``: what
examples/train_simpo_llama3.sh runs; torchrun's agent in this process, with the house's way of
ending.

* **One process checks first.** The flags are parsed and validated, and every start-up check
  that needs no GPU of a rank runs here once (:func:`preflight`: the model source and the
  checkpoint to load, the world layout, the batch sizes, the ``--save`` folder, the data
  sources exist and are readable), before a rank starts: a mistake is one
  ``train_simpo: error: ...`` line and exit code 2.
* **A rank's one line stays one line.** The ranks run ``megatron_simpo.cli.train``; one that
  ends for a user's mistake (exit code 2) or a run that cannot go on (3) leaves its line in a
  folder of the launcher's (``flags.run_command``). The launcher prints one: rank 0's, else the
  first failed rank's (a mistake only one rank sees), and exits with that code; the agent's
  log lines and torchrun's failure report are held back. Any other failure (a traceback, a
  signal) is a bug or a crash: the held log lines and torchrun's report follow, exit code 1.
* **A free port by default.** A single-node run without ``--master-port`` (or ``MASTER_PORT``
  in the environment) rendezvouses on a port the system picks (torchrun's ``--standalone``),
  so two jobs on one machine do not collide on torchrun's 29500. Several nodes need a port
  they agree on: ``--master-port`` / ``MASTER_PORT`` (default 29500, as torchrun). A port
  given that is taken here is one line and exit code 2.
* **A signal to this process stops the run as one to a rank does.** The agent passes it on, the
  ranks save at their next step boundary, and this command exits 0; it waits for them up to an
  hour (:func:`wait_for_stopping_ranks`), not torchrun's 30 s. A rank's one line (a stop-save
  that failed) is passed on with its code; a second signal ends the ranks at once. A signal
  before training began (imports, tokenizing, loading) stops the ranks at once, with one line
  and exit code 0: there was nothing to save.
* Ranks started here ask the kernel to stop them when this process dies (``cli.train``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

# Light imports only: a Ctrl-C in the first seconds reaches main()'s handler, not torch's import.
from megatron_simpo.cli.flags import LAUNCHER_ERRORS, run_command, user_error
from megatron_simpo.distributed.lifecycle import StopRequests, stopped_before_training

if TYPE_CHECKING:
    from megatron_simpo.training.config import TrainConfig

TRAIN_MODULE = "megatron_simpo.cli.train"
SETUP_ERRORS = (ValueError, OSError, RuntimeError)
"""A start-up check's failure: the user's mistake (exit code 2), as ``cli.train`` reports it."""
RANK_VERDICTS = (2, 3)
"""Exit codes of a rank that has said why in one line (``cli.train``): passed on as they are."""
_STOP_EXITS = {-number: number for number in (signal.SIGTERM, signal.SIGINT)} | {
    128 + number: number for number in (signal.SIGTERM, signal.SIGINT)}
"""Exit code -> stop signal of a rank it ended: killed by it (-N), or ended by ``cli.train``
before training began (128 + N)."""
STOPPING_RANKS_WAIT = 3600
"""Seconds the agent waits for signalled ranks to save and stop (``wait_for_stopping_ranks``):
a step and a save of the largest runs, with room; a rank hung in a collective is still killed."""
_AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


USAGE = "python -m megatron_simpo.cli.launch [torchrun options] -- <training flags>"


def print_help() -> None:
    """The launcher's own help: its usage, what it adds to torchrun, and torchrun's options
    (training flags: ``--help`` after ``--``, or ``python -m megatron_simpo.cli.train --help``)."""
    from torch.distributed.run import get_args_parser

    lines = get_args_parser().format_help().splitlines()
    options = lines[lines.index("options:") + 1:]  # the script to run is this launcher's own
    print(f"usage: {USAGE}\n\n"
          "Checks the training flags, the model, the checkpoint to load, the world layout and\n"
          "the data once, then starts the training ranks (megatron_simpo.cli.train) under\n"
          "torchrun's agent: a mistake is one line and exit code 2; a stop signal saves and\n"
          "exits 0. Without --master-port (or MASTER_PORT) one node rendezvouses on a free\n"
          "port. Training flags: `-- --help`, or python -m megatron_simpo.cli.train --help.\n")
    print("\n".join(["torchrun options:", *options]))


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[torchrun options] -- <training flags>`` -> (torchrun options, training flags)."""
    argv = list(argv)
    if "--" not in argv:
        from megatron_simpo.cli.arguments import PROG

        user_error(PROG, f"launch: give torchrun's options, then --, then the training flags "
                         f"(usage: {USAGE}; --help says more)")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def check_data_readable(config: TrainConfig) -> None:
    """Every local data source can be read: a file's first byte, the first byte of each file of
    a save_to_disk folder (a Hub name is left to the ranks; that each exists, the config checked
    already). Raises OSError naming the flag and the path."""
    for flag, source in (("--train-data-path", config.data.train_data_path),
                         ("--valid-data-path", config.data.valid_data_path)):
        path = Path(source) if source else None
        if path is None or not path.exists():
            continue
        try:
            for file in ([path] if path.is_file() else
                         sorted(entry for entry in path.iterdir() if entry.is_file())):
                with file.open("rb") as handle:
                    handle.read(1)
        except OSError as error:
            raise OSError(f"{flag} {source}: cannot be read "
                          f"({error.strerror or type(error).__name__})") from None


def preflight(config: TrainConfig, world_size: int | None) -> None:
    """The ranks' start-up checks (``run_setup.prepare``) for a world of ``world_size`` ranks
    (None: elastic, not known yet; the ranks check it), and the data sources."""
    from megatron_simpo.training.run_setup import prepare

    saved = os.environ.get("WORLD_SIZE")
    if world_size is not None:
        os.environ["WORLD_SIZE"] = str(world_size)  # prepare() reads the world from it
    try:
        prepare(config)
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved
    check_data_readable(config)


def world_size_of(args) -> int | None:
    """Ranks in the world torchrun's ``args`` start; None when elastic or set by the machine."""
    from torch.distributed.run import parse_min_max_nnodes

    low, high = parse_min_max_nnodes(args.nnodes)
    try:
        per_node = int(args.nproc_per_node)
    except ValueError:  # "gpu", "auto", ...: the ranks check the layout
        return None
    return low * per_node if low == high else None


def choose_rendezvous(args) -> None:
    """A single-node world without a port of the user's rendezvouses on a free one."""
    from torch.distributed.run import parse_min_max_nnodes

    if args.master_port is None and os.environ.get("MASTER_PORT"):
        args.master_port = int(os.environ["MASTER_PORT"])
    _, high = parse_min_max_nnodes(args.nnodes)
    if (high == 1 and args.master_port is None and args.rdzv_backend == "static"
            and not args.rdzv_endpoint):
        args.standalone = True


def check_master_port(args) -> None:
    """The port the user gave is free here, on the node that hosts the rendezvous (node rank
    0 of a static rendezvous). Raises PortInUse."""
    import socket

    from megatron_simpo.distributed.runtime import PortInUse, port_in_use_message

    if args.standalone or args.rdzv_backend != "static" or args.node_rank != 0:
        return
    port = int(args.master_port or 29500)  # torchrun's default
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store does
        try:
            sock.bind(("", port))
        except OSError:
            raise PortInUse(port_in_use_message(port)) from None


class _HeldBack(logging.Handler):
    """Keeps the agent's log records until the run's end tells whether they are news."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _agent_logs_held():
    """The agent's log records, held (not printed) while the block runs."""
    held = _HeldBack()
    loggers = [logging.getLogger(name) for name in _AGENT_LOGGERS]
    for logger in loggers:
        logger.addHandler(held)
        logger.propagate = False
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeHandler(held)
            logger.propagate = True


def _deciding_failure(failure) -> tuple[int | None, object]:
    """(rank, ProcessFailure) that says how the run ended: a rank that said why in one line
    (exit code 2 or 3), else one that ended itself on a stop signal before training (128 + N;
    not -N, which may be the agent ending a peer), else torchrun's first. Its first is the
    earliest to the second, and on a tie the lowest rank: often a rank that only lost its peer
    (exit code 1) while the one that said why ended alongside."""
    if failure is None:
        return None, None
    for wanted in (RANK_VERDICTS, [code for code in _STOP_EXITS if code > 0]):
        for rank, found in sorted(failure.failures.items()):
            if found.exitcode in wanted:
                return rank, found
    return failure.get_first_failure()


def _rank_verdict(folder: str, first_rank: int | None) -> tuple[int, str] | None:
    """The exit code and line rank 0 left in ``folder`` (``run_command`` under the launcher),
    else those of the first rank that failed, else any rank's; None if none did."""
    verdicts = {}
    for name in os.listdir(folder):
        if name.startswith("rank") and name.endswith(".txt"):
            code, _, line = (Path(folder) / name).read_text().partition("\n")
            if code.isdigit():  # (written whole: flags.run_command)
                verdicts[int(name[4:-4])] = (int(code), line.strip())
    for rank in (0, first_rank, *sorted(verdicts)):
        if rank in verdicts and verdicts[rank][1]:
            return verdicts[rank]
    return None


def wait_for_stopping_ranks(args) -> None:
    """A signal to this process (Slurm's ``scancel``, Ctrl-C) reaches the agent, which passes it
    to the ranks; they save at their next step boundary and exit 0. torchrun kills them
    ``--shutdown-timeout`` seconds later (default 30), often mid-save: unless the user gives
    one (the flag, ``PET_SHUTDOWN_TIMEOUT`` or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), the agent
    waits up to :data:`STOPPING_RANKS_WAIT` here. A second signal ends the ranks at once."""
    if (getattr(args, "shutdown_timeout", 0) is None
            and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ):
        args.shutdown_timeout = STOPPING_RANKS_WAIT


def _all_ranks_finished(folder: str, args) -> bool:
    """Whether every rank of this node left its ``local<LOCAL_RANK>.done``
    (``flags.note_finished``)."""
    from torch.distributed.run import determine_local_world_size

    done = [name for name in os.listdir(folder) if name.endswith(".done")]
    return len(done) == determine_local_world_size(args.nproc_per_node)


def start_ranks(args) -> int:
    """Run torchrun's agent on ``args``; the exit code this command ends with."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from megatron_simpo.cli.arguments import PROG

    with tempfile.TemporaryDirectory(prefix="megatron-simpo-launch-") as folder, \
            _agent_logs_held() as held:
        os.environ[LAUNCHER_ERRORS] = folder  # the ranks inherit it
        signalled = None
        try:
            run(args)
            failure = None
        except ChildFailedError as error:
            failure = error
        except SignalException as error:  # passed on to the ranks, which have ended since
            failure, signalled = None, error
        finally:
            os.environ.pop(LAUNCHER_ERRORS, None)
        if signalled is not None and _all_ranks_finished(folder, args):
            return 0  # they saved and stopped (or had nothing to save yet), and said so
        first_rank, first = _deciding_failure(failure)
        verdict = _rank_verdict(folder, first_rank)
        began = any(name.endswith(".began") for name in os.listdir(folder))
    if signalled is not None:
        if verdict is not None:  # e.g. the stop-save failed for a full disk: that, once
            print(verdict[1], file=sys.stderr, flush=True)
            return verdict[0]
        if not began:  # ranks ended during setup, some before they could say so
            print(stopped_before_training(signalled.sigval), flush=True)
            return 0
        for record in held.records:
            logging.getLogger("torch").handle(record)
        print(f"{PROG}: launch: {signalled.sigval.name} arrived and the ranks ended before "
              "they had saved (a second stop signal, or the agent's shutdown timeout, ends them "
              "at once); the next start resumes from the latest complete checkpoint",
              file=sys.stderr, flush=True)
        return 1
    if not began and first is not None and first.exitcode in _STOP_EXITS:
        # A stop signal that reached a rank (not this process) before training began: the
        # agent ended the others; nothing to save.
        print(stopped_before_training(_STOP_EXITS[first.exitcode]), flush=True)
        return 0
    if first is not None and (first.exitcode in RANK_VERDICTS or verdict is not None):
        # the ranks' one line, said once (a rank that only lost its peer may have ended first)
        if verdict is not None:
            print(verdict[1], file=sys.stderr, flush=True)
            return verdict[0]
        return first.exitcode
    for record in held.records:  # news: a crash, a signal, or warnings of a run that ended well
        logging.getLogger("torch").handle(record)
    if failure is not None:
        print(failure.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """A stop signal during the checks (before a rank starts) ends this command with the
    ranks' line for it and exit code 0; from then on, torchrun's agent passes signals on."""
    stop_requests = StopRequests(before_training=True, announce=False)
    try:
        with stop_requests:
            args = _checked(sys.argv[1:] if argv is None else argv)
    except BaseException as error:
        number = stop_requests.setup_stop(error)
        if not number:
            raise
        print(stopped_before_training(number), flush=True)
        raise SystemExit(0) from None
    raise SystemExit(start_ranks(args))


def _checked(argv: Sequence[str]):
    """torchrun's arguments for the command line ``argv``, once every check has passed."""
    from torch.distributed.run import parse_args as parse_torchrun_args

    from megatron_simpo.cli.arguments import PROG, parse_args

    argv = list(argv)
    if {"-h", "--help"} & set(argv[:argv.index("--")] if "--" in argv else argv):
        print_help()
        raise SystemExit(0)
    torchrun_argv, train_argv = split_command(argv)
    config = parse_args(train_argv)
    args = parse_torchrun_args([*torchrun_argv, "-m", TRAIN_MODULE, *train_argv])
    choose_rendezvous(args)
    run_command(PROG, lambda: (check_master_port(args), preflight(config, world_size_of(args))),
                errors={SETUP_ERRORS: 2})
    wait_for_stopping_ranks(args)
    return args


if __name__ == "__main__":
    main()
