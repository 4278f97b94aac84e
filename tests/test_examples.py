"""Every script in examples/ runs with no arguments from another folder and succeeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.py")
                  if not p.name.startswith("_"))


def test_there_are_examples_of_each_workflow():
    names = {p.stem for p in EXAMPLES}
    assert {"own_training_loop", "timm_model", "finetune", "export_int8", "detection"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script, tmp_path):
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "data:" in proc.stdout or "steps of" in proc.stdout
