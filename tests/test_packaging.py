"""The package installs like one: a wheel works outside the checkout; one version source; the
files a user expects are there."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("acnet-*.whl")
    return path


def test_wheel_holds_the_package_and_its_type_marker(wheel):
    import acnet

    names = zipfile.ZipFile(wheel).namelist()
    assert "acnet/py.typed" in names and "acnet/block.py" in names
    assert f"acnet-{acnet.__version__}.dist-info/METADATA" in names
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)


def test_wheel_installed_elsewhere_works_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", str(site), str(wheel)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = f"""
import torch, acnet
from torch import nn
assert acnet.__file__.startswith({str(site)!r}), acnet.__file__
m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
c = acnet.convert(m)
d = acnet.deploy(c.eval())
x = torch.randn(2, 3, 8, 8)
assert (d(x) - m(x)).abs().max() < 1e-5
print("ok", acnet.__version__)
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-m", "acnet", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "reproduce" in cli.stdout


def test_one_version_source_and_the_files_a_user_expects():
    import acnet

    assert acnet.__version__ == "0.3.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "acnet._version.__version__" in pyproject
    assert f"## {acnet.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    assert f"version: {acnet.__version__}" in (ROOT / "CITATION.cff").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "src/acnet/py.typed").is_file()
