"""Fixtures shared by the tests (helpers live in helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_class_folder, write_suite


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "src")


@pytest.fixture
def small_suite(tmp_path) -> Path:
    return write_suite(tmp_path / "small.toml")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and inputs: one torch thread is as fast, and OpenMP spinning on a busy 2-core machine
    costs 10-80x. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
