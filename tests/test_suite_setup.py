"""The suite's own rules: `auto` is the CPU under VITKIT_DEVICE (set by conftest.py), and with
VITKIT_REQUIRE_DEPS=1 (CI) a test skipped by a missing import fails while a documented skip stays a skip."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from vitkit.train import resolve_device, setup_distributed

TESTS = Path(__file__).resolve().parent


def test_auto_device_follows_vitkit_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert os.environ["VITKIT_DEVICE"] == "cpu"  # conftest.py's, inherited by every subprocess test
    assert resolve_device("auto") == resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert setup_distributed("auto").device == torch.device("cpu")
    monkeypatch.setenv("VITKIT_DEVICE", "meta")
    assert resolve_device("auto") == torch.device("meta")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit device wins over the variable
    monkeypatch.delenv("VITKIT_DEVICE")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)


CASES = {
    "test_inside.py": """
import pytest

def test_missing_module():
    pytest.importorskip("vitkit_no_such_module")

def test_too_old():
    pytest.importorskip("pytest", minversion="999")

def test_no_gpu():
    pytest.skip("no CUDA device here")

def test_runs():
    pass
""",
    "test_module_level.py": """
import pytest
pytest.importorskip("vitkit_no_such_module_either")

def test_never_collected():
    pass
""",
}


def _run(tmp_path, require):
    for name, text in CASES.items():
        (tmp_path / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(TESTS), VITKIT_REQUIRE_DEPS=require)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "require_deps", "-p", "no:cacheprovider", "-q",
                           "-rfEs", "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_ci_fails_on_a_missing_dependency_and_keeps_documented_skips(tmp_path):
    p = _run(tmp_path, "1")
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 1 and "2 failed, 1 passed, 1 skipped, 1 error" in last, p.stdout
    assert "VITKIT_REQUIRE_DEPS is set" in p.stdout and "could not import 'vitkit_no_such_module'" in p.stdout
    assert "required is: '999'" in p.stdout and "no CUDA device here" in p.stdout  # the documented skip stays

    p = _run(tmp_path, "")
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 0 and "1 passed, 4 skipped" in last, p.stdout
