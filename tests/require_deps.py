"""pytest hooks (loaded by tests/conftest.py): with VITKIT_REQUIRE_DEPS=1 (CI), a test or module skipped by
pytest.importorskip — a dependency missing or too old — fails instead, so CI cannot pass by skipping what it
must run. Skips for a documented reason (no GPU, no compiler) stay skips. Kept free of torch so it loads fast."""
import os

import pytest

ENV = "VITKIT_REQUIRE_DEPS"


def _importorskip_reason(report) -> str:
    """The message of a skip that pytest.importorskip raised, or ''."""
    if not report.skipped or hasattr(report, "wasxfail") or not isinstance(report.longrepr, tuple):
        return ""
    msg = str(report.longrepr[2])
    # importorskip's two messages: "could not import 'x': ..." and "module 'x' has __version__ ..., required is: ..."
    return msg if "could not import" in msg or "required is:" in msg else ""


def _require(report) -> None:
    if os.environ.get(ENV, "") in ("", "0"):
        return
    msg = _importorskip_reason(report)
    if msg:
        report.outcome = "failed"
        why = msg.removeprefix("Skipped: ")
        report.longrepr = (f"{ENV} is set, so a missing dependency fails instead of skipping: {why}; install the "
                           "test environment with `make install` (pip install -e '.[dev]' -c constraints.txt)")


def missing(what: str, why: str) -> None:
    """A dependency that is not a Python module (a system program such as chromium) is missing: skip with `why`,
    or fail where VITKIT_REQUIRE_DEPS is set, as importorskip's skips do."""
    if os.environ.get(ENV, "") not in ("", "0"):
        pytest.fail(f"{ENV} is set, so a missing dependency fails instead of skipping: {what} ({why})")
    pytest.skip(f"{what} is missing: {why}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _require(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _require(report)
    return report
