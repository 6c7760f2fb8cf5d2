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
