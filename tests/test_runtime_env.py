"""`import vitkit` chooses how PyTorch's OpenMP threads wait (a short spin: src/vitkit/__init__.py) only where the
user chose nothing: an OMP_WAIT_POLICY or GOMP_SPINCOUNT of theirs is kept as it is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _env_after_import(**given) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env.update(given, PYTHONPATH=SRC)
    code = f"import os, json, vitkit; print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("given,want", [
    ({}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None}),
    ({"GOMP_SPINCOUNT": "50000"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "50000", "KMP_BLOCKTIME": "1"}),
])
def test_import_sets_a_short_spin_only_where_the_user_chose_nothing(given, want):
    assert _env_after_import(**given) == want
