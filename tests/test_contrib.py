"""The tutorial plugin distribution (contrib/polymodal-example) installs, loads, trains and evaluates.

It is installed offline into a temporary target folder, exactly as a user would install
a third-party plugin, and driven through the ``polymodal`` CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from polymodal.testing import contracts

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = ROOT / "contrib" / "polymodal-example"


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYMODAL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["POLYMODAL_STRICT_PLUGINS"] = "1"  # the example must load cleanly
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add contention beside the test runner
    return env


def _polymodal(target: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "polymodal.cli", *args],
        env=_env(target),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"polymodal {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The contrib distribution pip-installed (offline, no deps) into a temporary target."""
    tmp = tmp_path_factory.mktemp("contrib")
    source, target = tmp / "src", tmp / "target"
    # Build from a copy, so the build leaves no build/ or *.egg-info in the source tree.
    shutil.copytree(CONTRIB, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"offline install of {CONTRIB.name} failed:\n{result.stdout}\n{result.stderr}")
    assert (target / "polymodal_example" / "__init__.py").is_file()
    assert list(target.glob("polymodal_example-*.dist-info/entry_points.txt"))
    return target


def test_the_distribution_declares_a_polymodal_entry_point():
    meta = tomllib.loads((CONTRIB / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["polymodal"] == {"example": "polymodal_example"}
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert (CONTRIB / "README.md").read_text().lower().count("tutorial") >= 1


def test_the_plugin_is_small_and_composes_registered_parts():
    source = (CONTRIB / "polymodal_example" / "__init__.py").read_text()
    assert len(source.splitlines()) < 100
    assert 'registry.get("encoder"' in source  # the trunk comes from the registry
    assert "polymodal.plugins" not in source  # and never from another plugin's module


def test_it_is_listed_as_loaded(installed, tmp_path):
    out = _polymodal(installed, "plugins", cwd=tmp_path).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "example" in rows, out
    assert "loaded" in rows["example"] and "polymodal-example" in rows["example"]
    assert "loaded" in rows["vit"] and "loaded" in rows["core"]
    models = _polymodal(installed, "list", "model", cwd=tmp_path).stdout
    assert any(line.split()[:3] == ["model", "example-meanpool", "example"] for line in models.splitlines()), models


def test_it_trains_and_evaluates_through_the_cli(installed, tmp_path):
    out = tmp_path / "run"
    trained = _polymodal(
        installed, "train", "example-meanpool", "--steps", "20", "--out", str(out), "--no-progress", cwd=tmp_path
    ).stdout
    assert "accuracy:" in trained and f"saved model folder: {out}" in trained
    header = json.loads((out / "config.json").read_text())
    assert header["family"] == "example-meanpool" and header["config"]["encoder"]["cls_token"] is False
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and 0.0 <= metrics["accuracy"] <= 1.0
    evaluated = json.loads(_polymodal(installed, "eval", str(out), "--json", cwd=tmp_path).stdout)
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"])
    assert evaluated["accuracy"] > 0.2  # 20 steps already beat chance (0.1) on the digits


def test_the_contract_tests_pick_it_up_on_arrival(installed, tmp_path):
    """The core's contract suite runs over the new plugin with no change to the suite."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "tests" / "test_contracts.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "example-meanpool",
            "--rootdir",
            str(ROOT),
        ],
        env=_env(installed),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= len(contracts.MODEL_CHECKS), result.stdout[-2000:]
    assert "skipped" not in result.stdout, result.stdout[-2000:]
