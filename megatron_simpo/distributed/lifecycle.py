"""Stopping a run cleanly: signals (Slurm preemption, time limits, Ctrl-C), a wall-clock budget,
an iteration interval, and ranks that do not outlive their launcher.

A signal reaches one rank, or all of them at slightly different moments. Each rank only notes
it; at the next step boundary the ranks agree (one all-reduce of a small flag over the world)
and all of them save a checkpoint, flush their metrics and exit 0 together. A second stop signal
(SIGTERM or SIGINT, whichever came first), more than 2 s after the first, ends the process at
once, as it would without this module: torchrun's agent passes a second Ctrl-C on as SIGTERM.
Signals within 2 s of the first are one event (a dying parent signals once per thread; scancel
signals a rank and its agent, which passes the signal on); a rank blocked in a collective that
never finishes ends too (:class:`_SecondSignalWatch`).

Before training begins (``before_training``: the command's imports, its checks, tokenizing,
building the model, loading a checkpoint) there is nothing to save: the first stop signal ends
setup at once with :class:`StoppedBeforeTraining`, which the command reports as a clean stop.
Nothing heavy is imported at the top: a checkpoint writer's helper process imports this module
to start.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import time

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_REPEAT_WINDOW_S = 2.0
_GRACE_S = 2.0
"""After a second stop signal, how long the main thread has to end the process itself."""
_SETUP_GRACE_S = 10.0
"""The same after a first one before training (nothing to save)."""
# Reasons by priority: the largest code any rank reports wins (all-reduce MAX).
_REASONS = {1: "--exit-interval reached", 2: "--exit-duration-in-mins reached",
            3: "a stop signal (SIGTERM/SIGINT) arrived"}


class StoppedBeforeTraining(BaseException):
    """A stop signal arrived before training began: nothing to save. A BaseException, as
    KeyboardInterrupt, so that no ``except Exception`` of the setup code takes it for an error
    of its own; ``finally`` blocks still run (a half-built cache entry is removed)."""

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number


class StopRequests:
    """Context manager: while active, SIGTERM/SIGINT are noted instead of ending the process.

    Args:
        exit_duration_in_mins: stop once the run has lasted this long (None: no limit).
        exit_interval: stop at the first iteration that is a multiple of this (None: never).
        before_training: until :meth:`training_begins`, the first stop signal raises
            :class:`StoppedBeforeTraining` in the main thread at once. Where Python drops what
            a handler raises (the handler ran inside a weakref callback or ``__del__``: an
            "unraisable" exception), it is raised again at the next moment the main thread
            runs Python; a setup that swallows it otherwise stops at :meth:`training_begins`.
        when_training_begins: called by :meth:`training_begins` (the launcher's marker).
        announce: print a line for a first signal (a rank's ``> rank R: received ...``).

    The ``--exit-duration-in-mins`` clock starts at construction: the command's start, setup
    included, as Megatron-LM counts it.
    """

    def __init__(self, exit_duration_in_mins: float | None = None,
                 exit_interval: int | None = None, *, before_training: bool = False,
                 when_training_begins=None, announce: bool = True):
        self.exit_duration_in_mins = exit_duration_in_mins
        self.exit_interval = exit_interval
        self.before_training = before_training
        self._agree = before_training  # training_begins is a collective
        self.began = False
        """Whether training has begun (:meth:`training_begins` returned)."""
        self.finishing = False
        """Set by :meth:`training_ended`: the last step and save are done."""
        self.announce = announce
        self._when_training_begins = when_training_begins
        self.received: int | None = None
        self._raised = False  # StoppedBeforeTraining is on its way (not dropped)
        self._received_at = 0.0
        self._started = time.monotonic()
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopRequests":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous_unraisable = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            for number in _SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
            self._watch = _SecondSignalWatch(self)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        if getattr(self, "_previous_unraisable", None) is not None:
            sys.unraisablehook, self._previous_unraisable = self._previous_unraisable, None
        if getattr(self, "_watch", None) is not None:
            self._watch.close()
            self._watch = None

    def _note(self, number: int, frame) -> None:
        if os.getpid() != self._pid:
            # A process forked meanwhile (Megatron-Core's checkpoint writers): the signal is
            # its rank's to act on, which finishes the save and stops.
            return
        now = time.monotonic()
        if self.received is not None and self.before_training and not self._raised:
            self._raised = True  # (_unraisable: Python dropped the first raise)
            raise StoppedBeforeTraining(self.received)
        if self.received is not None:
            # One event can deliver several: a parent-death signal arrives once per thread of a
            # dying multi-threaded parent; scancel signals a rank and its agent, which passes
            # the signal on. A repeat within a moment is that, not a second ask.
            if now - self._received_at < _REPEAT_WINDOW_S:
                return
            self.__exit__()  # asked twice (SIGTERM or SIGINT): end now, as without this handler
            if number == signal.SIGINT and signal.getsignal(number) is signal.default_int_handler:
                raise KeyboardInterrupt
            os.kill(os.getpid(), number)
            return
        self.received, self._received_at = number, now
        rank, name = os.environ.get("RANK", "0"), signal.Signals(number).name
        if self.announce:
            _say(f"> rank {rank}: received {name}; " + (
                "stopping (training has not begun)" if self.before_training else
                "the run is finishing" if self.finishing else
                "saving and stopping at the next step boundary"))
        if self.before_training:
            self._raised = True
            raise StoppedBeforeTraining(number)

    def _unraisable(self, unraisable) -> None:
        """``sys.unraisablehook``: a StoppedBeforeTraining that Python dropped is raised again,
        once the callback that dropped it has returned: the signal is sent to the main thread
        again a moment later (within the repeat window); anything else goes to the previous
        hook."""
        if isinstance(unraisable.exc_value, StoppedBeforeTraining) and os.getpid() == self._pid:
            import threading

            self._raised = False
            again = threading.Timer(0.05, signal.pthread_kill,
                                    (threading.main_thread().ident, self.received))
            again.daemon = True
            again.start()
            return
        self._previous_unraisable(unraisable)

    def setup_stop(self, error: BaseException) -> int | None:
        """The stop signal that ended setup with ``error`` (this exception, or what a peer's
        exit left a collective to raise), or None: not a stop, or training had begun. A
        KeyboardInterrupt is Ctrl-C that came before the handler."""
        if self.began:
            return None
        return signal.SIGINT if isinstance(error, KeyboardInterrupt) else self.received

    def limit(self, exit_duration_in_mins: float | None, exit_interval: int | None) -> None:
        """Set the exit options once the flags are read (the duration counts from
        construction)."""
        self.exit_duration_in_mins, self.exit_interval = exit_duration_in_mins, exit_interval

    def training_begins(self) -> None:
        """From here on a first stop signal is noted (saved at the next step boundary). A
        collective with ``before_training``: if any rank has received a stop signal, every rank
        raises :class:`StoppedBeforeTraining`. Until it returns, :attr:`began` stays False: a
        collective that fails because a peer stopped first ends setup like the signal."""
        if self._agree:
            from megatron_simpo.distributed.runtime import max_over_world  # torch: not at top

            self.before_training = False  # a signal during the collective is noted, for the step
            number = max_over_world(self.received or 0)
            if number:
                self.before_training, self.received = True, self.received or number
                raise StoppedBeforeTraining(number)
            if self._when_training_begins is not None:
                self._when_training_begins()
        self.began = True

    def training_ended(self) -> None:
        """The last step (and its save) is done: a first signal from here on is only noted."""
        self.finishing = True

    def reason(self, iteration: int) -> str | None:
        """Agreed on by every rank (a collective: call on all ranks at the same boundary)."""
        code = 0
        if self.exit_interval and iteration % self.exit_interval == 0:
            code = 1
        if (self.exit_duration_in_mins is not None
                and time.monotonic() - self._started >= 60.0 * self.exit_duration_in_mins):
            code = 2
        if self.received is not None:
            code = 3
        from megatron_simpo.distributed.runtime import max_over_world  # torch: not at the top

        return _REASONS.get(max_over_world(code))


def _say(line: str) -> None:
    """``line`` on stderr in one write: the ranks that a signal reaches at once share the
    terminal, and print()'s text and newline, written apart, interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def stopped_before_training(number: int) -> str:
    """The line a run stopped by signal ``number`` before training began ends with."""
    return (f"> stopped by {signal.Signals(number).name} before training began: nothing to "
            "save; the same command starts again")


class _SecondSignalWatch:
    """Ends the process on a second stop signal also while its main thread is blocked inside a
    collective that never finishes (a peer hung or gone), where no Python signal handler runs.

    Python's C-level handler writes each signal's number to a wakeup fd at once; a thread
    reading it ends the process (exit status 128 + the signal) when, ``_GRACE_S`` after a
    signal that came more than ``_REPEAT_WINDOW_S`` after the first, the process has not ended
    through :meth:`StopRequests._note` in the main thread. Before training (``requests``'
    ``before_training``: nothing to save) the first signal does so after ``_SETUP_GRACE_S``: a
    rank waiting in a set-up collective for a peer still tokenizing would otherwise wait for it.
    """

    def __init__(self, requests: "StopRequests | None" = None):
        import socket
        import threading

        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        _forget_wakeup_fd_in_forks()
        self._first: float | None = None
        self._requests, self._closed = requests, False
        threading.Thread(target=self._watch, name="stop-signal-watch", daemon=True).start()

    def _in_setup(self) -> bool:
        return (not self._closed and self._requests is not None
                and self._requests.before_training)

    def _watch(self) -> None:
        with self._reader:
            while True:
                try:
                    numbers = self._reader.recv(64)
                except OSError:
                    return
                if not numbers:  # closed
                    return
                for number in numbers:
                    if number not in _SIGNALS:
                        continue
                    now = time.monotonic()
                    if self._first is None:
                        self._first = now
                        if self._in_setup():
                            time.sleep(_SETUP_GRACE_S)  # the main thread ends it, if it can
                            if self._in_setup():
                                _say(f"> rank {os.environ.get('RANK', '0')}: "
                                     f"{signal.Signals(number).name} while blocked before "
                                     "training; ending now")
                                os._exit(128 + number)
                    elif now - self._first >= _REPEAT_WINDOW_S:
                        time.sleep(_GRACE_S)  # the main thread ends the process, if it can
                        _say(f"> rank {os.environ.get('RANK', '0')}: "
                             f"{signal.Signals(number).name} again while blocked; ending now")
                        os._exit(128 + number)

    def close(self) -> None:
        self._closed = True
        signal.set_wakeup_fd(self._previous_fd)
        self._writer.close()  # the thread reads the end and returns


@functools.cache  # once per process
def _forget_wakeup_fd_in_forks() -> None:
    """A forked process (a checkpoint writer) does not report its signals to its rank's watch:
    they are not the rank's."""
    os.register_at_fork(after_in_child=lambda: signal.set_wakeup_fd(-1))


def die_with_parent(number: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask the kernel to send ``number`` to this process when its parent (torchrun's agent)
    dies, so ranks never train on unattended after a ``kill -9`` of the launcher. A parent
    already gone (this process re-parented to init, or away from ``parent``, the pid it was
    started by: a subreaper may adopt it) sends it at once. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, number)
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):  # already gone
        os.kill(os.getpid(), number)


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""How gloo's collectives fail when a peer process has ended."""


def lost_a_peer_that_said_why(error: BaseException, folder: str | None, own: str,
                              interrupted: type[BaseException], wait: float = 3.0) -> bool:
    """Under the launcher (``folder``: where ranks leave their one line, ``own``: this rank's
    file there): ``error`` is a collective failing because a peer ended (a lost connection,
    torch's ``DistError``), and another rank left its line (a mistake it saw, e.g. a file only
    its node lacks) within ``wait`` seconds, or before ``interrupted`` (the agent's SIGTERM for
    that peer's failure) arrived."""
    dist = sys.modules.get("torch.distributed")  # (not imported: no collective failed)
    if not folder or not (isinstance(error, getattr(dist, "DistError", ()))
                          or any(text in str(error) for text in _PEER_GONE)):
        return False

    def said() -> bool:
        return any(name.startswith("rank") and name.endswith(".txt") and name != own
                   for name in os.listdir(folder))

    deadline = time.monotonic() + wait
    try:
        while not said() and time.monotonic() < deadline:
            time.sleep(0.05)
    except interrupted:
        pass
    return said()
