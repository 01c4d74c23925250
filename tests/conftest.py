"""Fixtures shared by the test modules (the temp-project and model helpers are plain modules:
tests/tiny.py, tests/dvc_project.py, tests/measure_helpers.py, tests/ablation_util.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture()
def one_thread():
    """Run the test's torch work on one thread (tiny models are slower with more on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
