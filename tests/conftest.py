"""Test-session plumbing: the reused ranks of tests/multiprocess.py end with each module, so
an idle world does not keep its leftover threads polling while other modules run."""

import pytest

from tests import multiprocess


@pytest.fixture(autouse=True, scope="module")
def _close_worlds_after_module():
    yield
    multiprocess.close_worlds()
