"""The CLI at its edges: a reader that leaves early, and a demo asked for a seed count it cannot give."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kd_trainer", *args], cwd=REPO, stderr=subprocess.PIPE, **kw)


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `kd-trainer plan ... | head -1`: the pipe closes before the plan is written.
    proc = _cli("plan", "recipes/ours_3stage.yaml", "--json", stdout=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_the_demo_refuses_a_seed_count_it_cannot_give_as_a_usage_error():
    proc = _cli("demo", "--seeds", "0", stdout=subprocess.DEVNULL)
    err = proc.stderr.read().decode()
    assert proc.wait() == 2, err
    assert "Traceback" not in err and "--seeds: invalid choice: 0" in err, err
