"""Shared test setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dacnn.data.synthetic import write_fashion_mnist

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the repository
REPO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # the weights the project trained
RELEASED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "weights"  # LruNet's
# the weights search path a checkout uses (the Makefile sets the same), before any test module imports
os.environ.setdefault("DACNN_WEIGHTS", os.pathsep.join(
    str(p) for p in (REPO_WEIGHTS, RELEASED_WEIGHTS) if p.is_dir()))


@pytest.fixture(autouse=True, scope="session")
def _intra_op_threads():
    """One intra-op thread (``DACNN_TEST_THREADS`` to change): on a busy 2-core machine OpenMP
    barriers cost more than they save, and small test models gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DACNN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory) -> str:
    """A data root holding Fashion-MNIST: ``$DACNN_DATA`` or ``../shared/data`` when it has the real
    shards, else the project's synthetic Fashion-MNIST (:func:`dacnn.data.synthetic.write_fashion_mnist`
    with ``learnable``, official IDX files, 6,000 train / 10,000 test images as the real split) so the
    tests that train and evaluate run everywhere."""
    for root in (os.environ.get("DACNN_DATA"), SHARED_DATA):
        if root and (Path(root) / "fashion_mnist").is_dir():
            return str(root)
    root = tmp_path_factory.mktemp("synthetic-data")
    write_fashion_mnist(root / "fashion_mnist", "train", n=6000, seed=1, gz=False, learnable=True)
    write_fashion_mnist(root / "fashion_mnist", "test", n=10_000, seed=2, gz=False, learnable=True)
    return str(root)
