"""Stop signals in one process: a second signal of either kind ends it at once (the agent
passes a second Ctrl-C on as SIGTERM), and the checkpoint writer's helper process survives a
stop signal and dies with its rank. The launcher's end-to-end cases are in test_launcher.py."""

import signal
import subprocess
import sys
import textwrap

import pytest

STOPPING = textwrap.dedent("""
    import os, signal, sys, time
    from megatron_simpo.distributed import lifecycle
    lifecycle._REPEAT_WINDOW_S = {window}
    with lifecycle.StopRequests() as requests:
        for number in {signals}:
            os.kill(os.getpid(), number)
            time.sleep({pause})
        print("still running; noted", signal.Signals(requests.received).name, flush=True)
""")


def _stopping(signals, pause: float, window: float = 0.5) -> subprocess.CompletedProcess:
    code = STOPPING.format(window=window, signals=[int(s) for s in signals], pause=pause)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_a_first_signal_is_noted_and_repeats_within_the_window_are_one_event():
    done = _stopping([signal.SIGINT, signal.SIGTERM, signal.SIGINT], pause=0.0, window=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running; noted SIGINT"
    assert done.stderr.count("received SIGINT; saving and stopping") == 1


@pytest.mark.parametrize("first,second,ending", [
    (signal.SIGINT, signal.SIGTERM, -signal.SIGTERM),  # Ctrl-C twice, through torchrun's agent
    (signal.SIGTERM, signal.SIGINT, -signal.SIGINT),  # an uncaught KeyboardInterrupt
    (signal.SIGTERM, signal.SIGTERM, -signal.SIGTERM),
])
def test_a_second_stop_signal_of_either_kind_ends_the_process(first, second, ending):
    done = _stopping([first, second], pause=0.7)
    assert done.returncode == ending, done.stderr
    assert "still running" not in done.stdout
    if second == signal.SIGINT:
        assert "KeyboardInterrupt" in done.stderr


BLOCKED = textwrap.dedent("""
    import datetime
    import torch.distributed as dist
    from megatron_simpo.distributed import lifecycle
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=120))
    with lifecycle.StopRequests():
        print("blocked", flush=True)
        store.get("never set")  # waits in C++, as a collective whose peer is gone
""")


def _signal_a_blocked_rank(script: str, pauses: list[float]) -> tuple[int, str, float]:
    """Start ``script`` (a rank blocked where no Python handler runs), send SIGTERM after each
    pause; (exit status, stderr, seconds from the last signal to the end)."""
    import time

    rank = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "blocked"
        for pause in pauses:
            time.sleep(pause)
            started = time.monotonic()
            rank.send_signal(signal.SIGTERM)
        _, err = rank.communicate(timeout=60)
    finally:
        rank.kill()
    return rank.returncode, err, time.monotonic() - started


def test_a_second_signal_ends_a_rank_blocked_where_no_python_handler_runs():
    """A hung collective (a peer hung or gone) is when a user signals twice: the second signal
    must end the rank although its main thread never returns to Python."""
    code, err, took = _signal_a_blocked_rank(BLOCKED, [0, 2.5])
    assert code == 128 + signal.SIGTERM, err
    assert took < 10
    assert "> rank 0: SIGTERM again while blocked; ending now" in err


WRITER = textwrap.dedent("""
    import os, signal, time
    from megatron_simpo.checkpoint import writer_process
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    queue = writer_process.keep_through_stop_signals()
    getter = getattr(filesystem_async, "get_write_results_queue", None) or \\
        filesystem_async._get_write_results_queue
    assert getter() is queue and writer_process.keep_through_stop_signals() is queue
    manager = queue._manager._process.pid
    os.kill(manager, signal.SIGTERM)
    os.kill(manager, signal.SIGINT)
    time.sleep(0.5)
    queue.put("written")
    print(manager, queue.get(timeout=10), flush=True)
    time.sleep(600)
""")


def test_the_writers_queue_survives_a_stop_signal_and_dies_with_its_rank():
    """Megatron-Core's checkpoint writer reports each save through this queue; a stop signal to
    the rank's process group (torchrun's agent, scancel) must leave it working."""
    import psutil

    rank = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = rank.stdout.readline().split()
        assert line[1:] == ["written"], rank.stderr.read() if not line else line
        manager = psutil.Process(int(line[0]))
        assert manager.is_running()
    finally:
        rank.kill()
        rank.communicate(timeout=30)
    manager.wait(timeout=10)  # PR_SET_PDEATHSIG: it never outlives the rank
    assert not psutil.pid_exists(manager.pid) or manager.status() == psutil.STATUS_ZOMBIE


FORKED = textwrap.dedent("""
    import os, signal, sys, time
    from megatron_simpo.distributed import lifecycle
    with lifecycle.StopRequests() as requests:
        child = os.fork()
        if child == 0:  # a checkpoint writer: the signal is its rank's
            time.sleep(1.0)
            os._exit(0)
        os.kill(child, signal.SIGTERM)
        time.sleep(0.2)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        time.sleep(3)
        print("writer", os.waitstatus_to_exitcode(status), "rank noted", requests.received,
              flush=True)
""")


def test_a_process_forked_by_a_rank_leaves_stop_signals_to_the_rank():
    """Megatron-Core's checkpoint writers are forked from the rank during a save; a signal to the
    rank's process group reaches them too: they finish their writes, say nothing, and the rank's
    watch does not take their signals for its own."""
    done = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["writer", "0", "rank", "noted", "None"]
    assert "received" not in done.stderr and "again" not in done.stderr, done.stderr


BEFORE_TRAINING = textwrap.dedent("""
    import os, signal, sys, time
    from megatron_simpo.distributed import lifecycle
    requests = lifecycle.StopRequests(before_training=True)
    began = []
    requests._when_training_begins = lambda: began.append(True)
    with requests:
        try:  # setup: the first signal ends it at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            print("setup went on", flush=True)
        except lifecycle.StoppedBeforeTraining as stopped:
            print("setup stopped", signal.Signals(stopped.number).name, flush=True)
        requests.received, requests._raised = None, False
        try:  # the handler runs inside a weakref callback, where Python drops what it raises
            import weakref

            class Module:
                pass

            module = Module()

            def dropped(reference):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)

            reference = weakref.ref(module, dropped)
            del module
            time.sleep(5)
            print("setup went on", flush=True)
        except lifecycle.StoppedBeforeTraining as stopped:
            print("raised again", signal.Signals(stopped.number).name, flush=True)
        requests.received, requests._raised = None, False
        try:  # a signal setup swallows (except BaseException: pass): training_begins stops
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            except BaseException:
                pass
            print("noted", signal.Signals(requests.received).name, flush=True)
            requests.training_begins()
        except lifecycle.StoppedBeforeTraining as stopped:
            print("training_begins stopped", signal.Signals(stopped.number).name, began,
                  flush=True)
        requests.received, requests._received_at = None, 0.0
        requests.training_begins()
        os.kill(os.getpid(), signal.SIGTERM)  # from here on: noted, saved at the next boundary
        time.sleep(0.2)
        print("training noted", signal.Signals(requests.received).name, began, requests.began,
              flush=True)
        requests.received, requests._received_at = None, 0.0
        requests.training_ended()
        os.kill(os.getpid(), signal.SIGINT)  # after the last step and save: noted
        time.sleep(0.2)
        print("finishing noted", signal.Signals(requests.received).name, flush=True)
""")


def test_before_training_a_first_signal_ends_setup_and_after_it_is_noted():
    done = subprocess.run([sys.executable, "-c", BEFORE_TRAINING], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["setup stopped SIGTERM", "raised again SIGINT",
                                        "noted SIGINT", "training_begins stopped SIGINT []",
                                        "training noted SIGTERM [True] True",
                                        "finishing noted SIGINT"]
    assert done.stderr.splitlines() == [  # (and no "Exception ignored" from the callback)
        "> rank 0: received SIGTERM; stopping (training has not begun)",
        "> rank 0: received SIGINT; stopping (training has not begun)",
        "> rank 0: received SIGINT; stopping (training has not begun)",
        "> rank 0: received SIGTERM; saving and stopping at the next step boundary",
        "> rank 0: received SIGINT; the run is finishing"]


AGREEING = textwrap.dedent("""
    import os, sys, time
    import megatron_simpo.cli.train as train
    rank = int(sys.argv[1])
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=sys.argv[2])

    def setup(argv, stop_requests):  # rank 0 still sets up; rank 1 waits in the agreement
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=2)
        try:
            if rank == 0:
                time.sleep(60)
            print("agreeing", flush=True)
            stop_requests.training_begins()
            print("training began", flush=True)
        finally:
            dist.destroy_process_group()

    train._prepare_and_run = setup
    train.main([])
""")


def test_a_signal_while_peers_agree_that_training_begins_stops_every_rank_cleanly():
    """The agent signals every rank; one still sets up (it stops at once and leaves), another
    waits in the agreement, which fails for the peer's exit: that rank stops cleanly too (it
    had received the signal), with no traceback."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ranks = [subprocess.Popen([sys.executable, "-c", AGREEING, str(rank), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        assert ranks[1].stdout.readline().strip() == "agreeing"
        time.sleep(0.5)
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        ends = [rank.communicate(timeout=60) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (out, err) in zip(ranks, ends):
        assert rank.returncode == 0, err
        assert "Traceback" not in err and "training began" not in out.splitlines(), err
    assert ends[0][0].strip() == ("> stopped by SIGTERM before training began: nothing to save; "
                                  "the same command starts again")


def test_exit_options_are_agreed_at_a_boundary_and_the_duration_counts_from_the_start():
    # (one process: the agreement is the value itself)
    from megatron_simpo.distributed import lifecycle

    requests = lifecycle.StopRequests(before_training=True)  # the command's start
    requests._started -= 90.0  # 1.5 min of setup (imports, tokenizing, loading)
    requests.limit(exit_duration_in_mins=2.0, exit_interval=4)  # the flags, read later
    assert [requests.reason(i) for i in (1, 2, 3, 4)] == [None, None, None,
                                                          "--exit-interval reached"]
    requests._started -= 30.0
    assert requests.reason(5) == "--exit-duration-in-mins reached"
    requests.received = signal.SIGTERM
    assert requests.reason(8) == "a stop signal (SIGTERM/SIGINT) arrived"


BLOCKED_IN_SETUP = BLOCKED.replace("lifecycle.StopRequests()",
                                   "lifecycle.StopRequests(before_training=True)")


def test_a_first_signal_ends_a_rank_blocked_before_training():
    """Before training there is nothing to save: one signal ends a rank blocked in a set-up
    collective (a peer still tokenizing) after a grace period, not when the peer arrives
    (minutes, on a large dataset)."""
    code, err, took = _signal_a_blocked_rank(BLOCKED_IN_SETUP, [0])
    assert code == 128 + signal.SIGTERM, err
    assert took < 20
    assert "> rank 0: SIGTERM while blocked before training; ending now" in err
