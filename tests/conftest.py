"""Test-session plumbing: a private cache folder for the session, Ctrl-C's SIGINT handled as in
an interactive shell, and the reused ranks of tests/multiprocess.py that hold leftover threads
end with their module, so an idle world does not keep them polling while other modules run
(lean worlds go on serving)."""

import atexit
import os
import shutil
import signal
import tempfile

import pytest

from tests import multiprocess

# Tokenized-data caches (megatron_simpo.data.cache's default place) and datasets' own cache go
# to a folder of this test session, never to the user's ~/.cache; ranks spawned later inherit it.
_CACHE_HOME = tempfile.mkdtemp(prefix="megatron-simpo-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)

# A session started in the background by a non-interactive shell (`pytest ... &` in a script or
# a subshell) inherits SIGINT ignored, as does every process it starts: the Ctrl-C tests (a
# command, a converter, a rank sent SIGINT) would then see it ignored, as Python and these
# commands rightly leave it. The session takes Python's own handling back; the processes it
# starts get SIGINT's default again (a handler, unlike SIG_IGN, does not survive exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Subprocesses (the launcher, console scripts, benchmarks) import the tree under test, whatever
# other copy of the package an environment has installed (e.g. an editable install elsewhere).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])


@pytest.fixture(autouse=True, scope="module")
def _close_busy_worlds_after_module():
    yield
    multiprocess.close_busy_worlds()
