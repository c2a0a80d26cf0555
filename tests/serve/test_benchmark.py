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
    out = serve.main(["--quick", "--seconds", "0.5", "--precision", "int8"])  # int8: every oneDNN build has it
    rows = out["rows"]
    picked = out["precision"]["vit_mini_patch7_28"]["precision"]
    assert picked == "int8"  # plain-same runs the plain endpoint at the precision vitkit runs at
    assert [(r["server"], r["clients"]) for r in rows] == [(s, n) for n in (1, 8) for s in ("vitkit", "plain",
                                                                                              "plain-same")]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["req_s"] > 0 for r in rows)
    assert all(r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in rows)
    assert all(r["mean_batch"] >= 1 and r["peak_mb"] > 0 and r["rss_start_mb"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert f"vitkit serve runs at precision {picked}" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("ratio vitkit/plain at 8 clients") and f"batching alone (vs plain-same at {picked})" in last
