"""benchmarks/train_speed.py --quick runs end to end: a row per model with positive speeds, the vitkit/timm ratio
last. The ratio itself is not judged (timing on a shared machine is noise); the full run measures."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"(\S+) +batch +\d+ +vitkit +([0-9.]+) img/s +timm +([0-9.]+) img/s +ratio ([0-9.]+)")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_train_speed_quick():
    pytest.importorskip("timm")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    rows = [m.groups() for m in map(ROW.match, lines) if m]
    assert [r[0] for r in rows] == ["vit_micro_patch7_28", "vit_tiny_patch16_224"], proc.stdout
    assert all(float(v) > 0 for r in rows for v in r[1:])
    assert re.match(r"ratio vitkit/timm \(geometric mean over 2 models\): [0-9.]+$", lines[-1]), lines[-1]
