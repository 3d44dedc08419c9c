"""bench/rebalance.py's command line: sizes of no host are refused before any work (they
ended in a ZeroDivisionError traceback after the small snapshots had been solved)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("option", ["--hosts", "--small-hosts"])
def test_no_hosts_is_a_usage_error(option: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "rebalance.py"), option, "0"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        f"argument {option}: '0' is not a whole number of at least 1")
