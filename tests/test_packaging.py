"""Packaging: every package folder is listed in pyproject.toml, and every entry point imports."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]


def _package_folders() -> dict[str, Path]:
    """Dotted import name -> folder, for every folder with an ``__init__.py`` under a mapped root."""
    found = {}
    for package, folder in PACKAGE_DIR.items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            found[".".join([package, *rel.parts])] = init.parent
    return found


FOLDERS = _package_folders()


def test_the_roots_are_mapped():
    assert PACKAGE_DIR == {"polymodal": "core", "polymodal.plugins": "plugins"}


@pytest.mark.parametrize("package", sorted(FOLDERS))
def test_every_package_folder_is_listed(package):
    assert package in SETUPTOOLS["packages"], (
        f"{FOLDERS[package].relative_to(ROOT)} has an __init__.py but {package!r} is not in "
        "[tool.setuptools] packages of pyproject.toml, so a wheel would leave it out"
    )


@pytest.mark.parametrize("package", SETUPTOOLS["packages"])
def test_every_listed_package_exists_and_imports(package):
    assert package in FOLDERS, f"pyproject.toml lists {package!r} but there is no such folder"
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == FOLDERS[package].resolve()


ENTRY_POINTS = PYPROJECT["project"]["entry-points"]["polymodal"]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_plugin_entry_points_import_and_implement_hooks(name):
    from polymodal.registry import hookspecs

    target = ENTRY_POINTS[name]
    module_name, _, attr = target.partition(":")
    plugin = importlib.import_module(module_name)
    if attr:
        plugin = getattr(plugin, attr)
    impls = [h for h in hookspecs.HOOK_KINDS if hasattr(getattr(plugin, h, None), f"{hookspecs.PROJECT}_impl")]
    assert impls, f"entry point {name} = {target} implements no polymodal hook"


def test_builtin_plugins_are_published_through_entry_points():
    assert ENTRY_POINTS.get("core") == "polymodal.builtin"
    for init in (ROOT / "plugins").glob("*/__init__.py"):
        family = init.parent.name
        assert ENTRY_POINTS.get(family) == f"polymodal.plugins.{family}", (
            f"plugins/{family} is not published as entry point {family!r} in pyproject.toml"
        )


def test_entry_points_are_lowercase_names():
    from polymodal.registry.table import _NAME

    assert all(_NAME.match(name) for name in ENTRY_POINTS)


@pytest.mark.parametrize("name,target", sorted(PYPROJECT["project"].get("scripts", {}).items()))
def test_console_scripts_resolve(name, target):
    module_name, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr))


def test_installed_metadata_matches_pyproject():
    from importlib.metadata import entry_points

    installed = {ep.name: ep.value for ep in entry_points(group="polymodal") if ep.dist and ep.dist.name == "polymodal"}
    if not installed:
        pytest.skip("polymodal is not installed with metadata (running from a bare source tree)")
    assert installed == ENTRY_POINTS, "reinstall (pip install -e .) after changing entry points in pyproject.toml"


def test_py_typed_is_shipped():
    assert "py.typed" in SETUPTOOLS.get("package-data", {}).get("polymodal", [])
    assert (ROOT / "core" / "py.typed").is_file()
