"""benchmarks/train_speed.py --quick runs end to end and ends with the vitkit/timm ratio."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_train_speed_quick():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("vit_micro_patch7_28") for line in lines)
    assert any(line.startswith("vit_tiny_patch16_224") for line in lines)
    m = re.match(r"ratio vitkit/timm .*: ([0-9.]+)$", lines[-1])
    assert m, lines[-1]
    # Timing on a shared CI machine is noisy: this guards against a gross slowdown, the full run measures.
    assert float(m.group(1)) > 0.5
