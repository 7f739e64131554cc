"""Shared test setup."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _intra_op_threads():
    """One intra-op thread (``DACNN_TEST_THREADS`` to change): on a busy 2-core machine OpenMP
    barriers cost more than they save, and small test models gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DACNN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
