"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine thread
    pools of two processes spinning against each other made every op ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Hermetic tests: the suite sees the built-ins only, not whatever plugin distributions the
# environment has installed (the dev venv installs examples/tokenmerge-plugin-example, whose
# grid_pool would join every listing, doctest and conformance run). The registry reads this
# variable when it first loads (and after each reset), not at import, so setting it here, before
# any test runs, is enough. Tests about entry points opt back in: monkeypatch.delenv(...) plus
# tokenmerge.registry.registry.reset() (tests/test_example_plugin.py), or a subprocess whose
# environment leaves the variable out (tests/test_registry.py).
os.environ["TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
