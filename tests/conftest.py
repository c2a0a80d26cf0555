"""Shared test set-up: deterministic seeds, no network, the CPU as the device of every `auto` (subprocesses
inherit it), and CI's rule that a missing dependency fails rather than skips (require_deps.py)."""
import os
import random

import numpy as np
import pytest
import torch

from require_deps import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401 (hooks)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vitkit.train.resolve_device("auto") → the CPU even on a GPU host: the bit-identical resume check holds on the
# CPU, and a single-GPU host's DDP rank 1 would ask for cuda:1. GPU tests name their device.
os.environ.setdefault("VITKIT_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
