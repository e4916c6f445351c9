"""pytest glue: a `metrics` fixture whose dict is stored per test, and summary.json
(MIMO_INTEROP_SUMMARY) with every test's outcome, duration, metrics and failure text."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

_results = []


@pytest.fixture
def metrics(request):
    m = {}
    request.node.user_properties.append(("metrics", m))
    return m


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        props = dict(report.user_properties)
        outcome = report.outcome
        if hasattr(report, "wasxfail"):  # pytest reports an expected failure as "skipped"
            outcome = "xpassed" if report.passed else "xfailed"
        _results.append({
            "test": report.nodeid,
            "outcome": outcome,
            "seconds": round(report.duration, 3),
            "metrics": props.get("metrics", {}),
            "failure": str(report.longrepr)[-4000:] if report.failed else None,
        })


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MIMO_INTEROP_SUMMARY")
    if not path:
        return
    import compressed_tensors
    import torch
    import transformers
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "compressed-tensors": compressed_tensors.__version__},
        "passed": sum(r["outcome"] == "passed" for r in _results),
        "failed": sum(r["outcome"] == "failed" for r in _results),
        "skipped": sum(r["outcome"] == "skipped" for r in _results),
        "xfailed": sum(r["outcome"] == "xfailed" for r in _results),
        "xpassed": sum(r["outcome"] == "xpassed" for r in _results),
        "tests": _results,
    }
    Path(path).write_text(json.dumps(summary, indent=2, default=str) + "\n")
