"""``scripts/gpu_check.sh`` (``make gpu``): it parses, and its dry run goes through every phase on a CPU.

The dry run is the same script with tiny sizes in Triton's interpreter, so what can go wrong in a GPU
session short of the GPU itself (a typo in a phase, a flag a command no longer takes, a summary that
hides a failure) shows here first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
PHASES = ["nvidia-smi", "info", "pytest", "tune", "info-tuned", "attention-d32", "attention-d16", "softmax",
          "log_softmax", "attention-varlen", "attention-decode", "attention-flex", "attention-modifiers"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_script(*arguments, out: Path, timeout: float, **environment) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **environment}
    env.pop("FLASH_SOFTMAX_CONFIG_TABLE", None)
    return subprocess.run(["bash", str(SCRIPT), *arguments], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, errors="replace", timeout=timeout)


def summary(out: Path) -> dict[str, str]:
    """Phase -> status, from ``summary.txt``."""
    lines = (out / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line.split()[1] for line in lines[2:] if line.split() and line.split()[0] in PHASES}


def test_the_script_parses_and_explains_itself(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    shown = run_script("--help", out=tmp_path, timeout=30)
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "summary.txt" in shown.stdout
    wrong = run_script("--fast", out=tmp_path, timeout=30)
    assert wrong.returncode == 2 and "unknown argument '--fast'" in wrong.stderr


def test_make_gpu_runs_the_script():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    planned = subprocess.run([make, "-n", "gpu", "OUT=somewhere"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert planned.returncode == 0 and "OUT=somewhere" in planned.stdout and "scripts/gpu_check.sh" in planned.stdout


def test_phases_past_the_budget_are_recorded_and_fail_the_run(tmp_path):
    done = run_script("--dry-run", out=tmp_path, timeout=60, GPU_CHECK_SECONDS="25")
    assert done.returncode == 1
    statuses = summary(tmp_path)
    assert statuses["info"] == statuses["pytest"] == statuses["tune"] == statuses["softmax"] == "no-time"
    assert "phase(s) not ok" in (tmp_path / "summary.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script itself runs, at full size")
def test_the_dry_run_goes_through_every_phase(tmp_path):
    done = run_script("--dry-run", out=tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    statuses = summary(tmp_path)
    assert set(statuses) == set(PHASES)
    for phase, status in statuses.items():
        # No GPU tools here, and tune --dry-run writes no table for info-tuned to read.
        assert status == ("skipped" if phase in ("nvidia-smi", "info-tuned") else "ok"), (phase, status)
    assert "config table" in (tmp_path / "info.txt").read_text()
    assert list(tmp_path.glob("pytest-shard*.xml")) and "passed" in (tmp_path / "pytest.txt").read_text()
    assert "candidates" in (tmp_path / "tune.txt").read_text()
    for bench, csv in (("attention-d32", "attention.csv"), ("softmax", "softmax.csv"),
                       ("log_softmax", "log_softmax.csv"), ("attention-varlen", "attention_varlen.csv"),
                       ("attention-decode", "attention_decode.csv"), ("attention-flex", "attention.csv"),
                       ("attention-modifiers", "attention.csv")):
        rows = (tmp_path / "bench" / bench / csv).read_text().splitlines()
        assert len(rows) > 1 and all(row.endswith(",ok") for row in rows[1:]), (bench, rows)
