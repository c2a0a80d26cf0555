"""benchmarks/serve.py --quick, run once so the script cannot rot: both servers start, answer every request, and
the report has its rows and the ratio line last. The figures are not judged (they depend on the machine's load)."""
import os
import sys

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, BENCH)  # benchmarks/common.py


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_benchmark_quick(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_benchmark", os.path.join(BENCH, "serve.py"))
    serve = importlib.util.module_from_spec(spec)  # by path: `import serve` would find this test package
    spec.loader.exec_module(serve)
    out = serve.main(["--quick", "--no-fast", "--seconds", "0.5"])
    rows = out["rows"]
    assert [(r["server"], r["clients"]) for r in rows] == [("vitkit", 1), ("plain", 1), ("vitkit", 8), ("plain", 8)]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["req_s"] > 0 for r in rows)
    assert all(r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in rows)
    assert all(r["mean_batch"] >= 1 and r["peak_mb"] > 0 for r in rows)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio vitkit/plain at 8 clients")
