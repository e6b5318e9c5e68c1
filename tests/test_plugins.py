"""Plugin loading: broken plugins are recorded and isolated; strict mode re-raises; disabling skips.

Two styles: real entry points from a temporary ``*.dist-info`` on ``PYTHONPATH`` in a
subprocess (exactly what a broken third-party install looks like), and in-process
``register_plugin`` / ``unregister_plugin`` around a test (simonw/llm style).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from polymodal import hookimpl
from polymodal.cli import main
from polymodal.models import ModelSpec
from polymodal.registry import RegistryError
from polymodal.registry.loader import (
    PluginError,
    get_registry,
    plugin_records,
    register_plugin,
    reset,
    unregister_plugin,
)

BROKEN_MODULES = {
    "pm_bad_import": """
        raise ImportError("deliberately broken at import")
    """,
    "pm_bad_hook": """
        from polymodal import hookimpl

        @hookimpl
        def register_metrics(register):
            register("half-registered", lambda logits, labels: 0.0, doc="registered before the hook fails")
            raise RuntimeError("deliberately broken hook")
    """,
    "pm_dup": """
        import torch
        from polymodal import hookimpl

        class AnotherViT(torch.nn.Module):
            '''Claims a name the core already holds.'''

        @hookimpl
        def register_encoders(register):
            register("vit", AnotherViT)
    """,
}
ENTRY_POINTS = {"bad-import": "pm_bad_import", "bad-hook": "pm_bad_hook", "dup-encoder": "pm_dup"}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A folder with three broken plugin modules and the dist-info that publishes them."""
    site = tmp_path_factory.mktemp("site")
    for module, source in BROKEN_MODULES.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / "polymodal_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: polymodal-broken\nVersion: 0.1\n")
    lines = "".join(f"{name} = {module}\n" for name, module in ENTRY_POINTS.items())
    (info / "entry_points.txt").write_text(f"[polymodal]\n{lines}")
    return site


def _run(site: Path, *args: str, strict: bool = False, disable: str = "", code: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYMODAL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    if strict:
        env["POLYMODAL_STRICT_PLUGINS"] = "1"
    if disable:
        env["POLYMODAL_DISABLE_PLUGINS"] = disable
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "polymodal.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _lines(output: str) -> dict[str, str]:
    """``polymodal plugins`` output: plugin name -> its status line plus any error line."""
    found: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0]
            found[current] = line
        elif current and line.strip().startswith("error:"):
            found[current] += "\n" + line.strip()
    return found


# -- real entry points, in a subprocess ---------------------------------------------------------


def test_broken_entry_points_are_recorded_and_the_rest_loads(broken_site):
    result = _run(broken_site, "plugins")
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    assert "loaded" in rows["core"] and "loaded" in rows["vit"]
    assert "failed" in rows["bad-import"] and "ImportError: deliberately broken at import" in rows["bad-import"]
    assert "polymodal-broken" in rows["bad-import"]  # the distribution is named
    assert "failed" in rows["bad-hook"] and "RuntimeError: deliberately broken hook" in rows["bad-hook"]
    assert "failed" in rows["dup-encoder"]
    assert "duplicate encoder 'vit'" in rows["dup-encoder"]
    assert "'core'" in rows["dup-encoder"] and "'dup-encoder'" in rows["dup-encoder"]


def test_everything_else_still_works_beside_broken_plugins(broken_site):
    code = textwrap.dedent("""
        import polymodal
        from polymodal.testing import contracts
        r = polymodal.registry
        assert "vit" in r.names("model"), r.names("model")
        assert r.entry("encoder", "vit").plugin == "core"            # not replaced by the duplicate
        assert "half-registered" not in r.names("metric")             # a failed plugin leaves nothing behind
        assert not [e for e in r.entries() if e.plugin in ("bad-import", "bad-hook", "dup-encoder")]
        contracts.check_output_shapes("vit")
        print("ok")
    """)
    result = _run(broken_site, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
    listing = _run(broken_site, "list", "metric")
    assert listing.returncode == 0 and "accuracy" in listing.stdout and "half-registered" not in listing.stdout


def test_strict_mode_re_raises_the_first_failure(broken_site):
    result = _run(broken_site, "plugins", strict=True)
    assert result.returncode != 0
    assert "PluginError" in result.stderr and "'bad-hook'" in result.stderr
    assert "deliberately broken hook" in result.stderr


def test_disabled_plugins_are_skipped_even_in_strict_mode(broken_site):
    result = _run(broken_site, "plugins", strict=True, disable="bad-import, bad-hook,dup-encoder")
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    for name in ENTRY_POINTS:
        assert "disabled" in rows[name] and "error" not in rows[name]
    assert "loaded" in rows["vit"] and "loaded" in rows["core"]


# -- in process: register around a test, then unregister ---------------------------------------


class ExtraPlugin:
    """A well-behaved plugin object: a model variant, a metric and a CLI command."""

    @hookimpl
    def register_models(self, register):
        from polymodal.plugins.vit import ViTClassifier, ViTConfig

        register("test-extra-vit", ModelSpec(ViTClassifier, ViTConfig(), doc="A test-only ViT variant."))

    @hookimpl
    def register_metrics(self, register):
        register("test-extra-metric", lambda logits, labels: 1.0, doc="Always one.")

    @hookimpl
    def register_commands(self, register):
        @click.command("test-extra-hello")
        def hello():
            """Say hello."""
            click.echo("hello from a plugin")

        register("test-extra-hello", hello)


class HalfBrokenPlugin:
    """Registers one metric, then its next hook raises."""

    @hookimpl
    def register_metrics(self, register):
        register("test-half-metric", lambda logits, labels: 0.0, doc="Left behind?")

    @hookimpl
    def register_models(self, register):
        raise ValueError("this hook is broken on purpose")


class DuplicatePlugin:
    """Claims the ViT plugin's model name."""

    @hookimpl
    def register_models(self, register):
        from polymodal.plugins.vit import ViTClassifier, ViTConfig

        register("vit", ModelSpec(ViTClassifier, ViTConfig()))


class MisspeltPlugin:
    """Means ``register_models`` but spells it ``register_modles``: without a check it would load and do nothing."""

    @hookimpl
    def register_metrics(self, register):
        register("test-misspelt-metric", lambda logits, labels: 0.0, doc="Must not stay behind.")

    @hookimpl
    def register_modles(self, register):
        from polymodal.plugins.vit import ViTClassifier, ViTConfig

        register("test-misspelt-vit", ModelSpec(ViTClassifier, ViTConfig()))


class OldSamplerPlugin:
    """Implements the pre-rename hook ``register_samplers``."""

    @hookimpl
    def register_samplers(self, register):
        register("test-old-argmax", lambda logits, generator=None: logits.argmax(-1), doc="Arg-max.")


@pytest.fixture
def registered():
    """Register plugin objects for one test, and unregister them afterwards whatever happens."""
    names: list[str] = []

    def add(plugin, name):
        names.append(name)
        return register_plugin(plugin, name)

    yield add
    for name in names:
        unregister_plugin(name)


def test_register_and_unregister_a_plugin_object(registered):
    record = registered(ExtraPlugin(), "test-extra")
    assert record.status == "loaded" and record.registered == 3
    registry = get_registry()
    assert registry.entry("model", "test-extra-vit").plugin == "test-extra"
    runner = CliRunner()
    assert "test-extra-vit" in runner.invoke(main, ["list", "model"]).output
    assert "hello from a plugin" in runner.invoke(main, ["test-extra", "test-extra-hello"]).output
    plugins = runner.invoke(main, ["plugins"]).output
    assert "test-extra" in plugins and "loaded" in plugins
    unregister_plugin("test-extra")
    assert ("model", "test-extra-vit") not in registry and ("metric", "test-extra-metric") not in registry
    assert all(r.name != "test-extra" for r in plugin_records())
    assert "vit" in registry.names("model")


def test_a_failing_hook_is_recorded_and_its_partial_work_removed(registered, monkeypatch):
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS", raising=False)
    record = registered(HalfBrokenPlugin(), "test-half")
    assert record.status == "failed"
    assert "ValueError: this hook is broken on purpose" in record.error
    assert ("metric", "test-half-metric") not in get_registry()
    assert any(r.name == "test-half" and r.status == "failed" for r in plugin_records())
    assert "this hook is broken on purpose" in CliRunner().invoke(main, ["plugins"]).output
    assert "vit" in get_registry().names("model")


def test_a_failing_hook_raises_in_strict_mode(registered, monkeypatch):
    monkeypatch.setenv("POLYMODAL_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="test-half.*this hook is broken on purpose"):
        registered(HalfBrokenPlugin(), "test-half")
    assert ("metric", "test-half-metric") not in get_registry()


def test_a_duplicate_name_names_both_plugins(registered, monkeypatch):
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS", raising=False)
    record = registered(DuplicatePlugin(), "test-dup")
    assert record.status == "failed"
    assert "duplicate model 'vit'" in record.error
    assert "plugin 'vit'" in record.error and "plugin 'test-dup'" in record.error
    assert get_registry().entry("model", "vit").plugin == "vit"


def test_a_misspelt_hook_fails_the_plugin_with_a_suggestion(registered, monkeypatch):
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS", raising=False)
    record = registered(MisspeltPlugin(), "test-misspelt")
    assert record.status == "failed"
    assert "unknown hook 'register_modles'" in record.error and "did you mean 'register_models'" in record.error
    assert ("metric", "test-misspelt-metric") not in get_registry()
    assert "unknown hook 'register_modles'" in CliRunner().invoke(main, ["plugins"]).output


def test_a_misspelt_hook_raises_in_strict_mode(registered, monkeypatch):
    monkeypatch.setenv("POLYMODAL_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="test-misspelt.*unknown hook 'register_modles'.*'register_models'"):
        registered(MisspeltPlugin(), "test-misspelt")
    assert ("metric", "test-misspelt-metric") not in get_registry()


def test_the_old_sampler_hook_still_registers_token_samplers_with_a_warning(registered, monkeypatch):
    monkeypatch.setenv("POLYMODAL_STRICT_PLUGINS", "1")
    with pytest.warns(
        DeprecationWarning, match="'register_samplers' is deprecated; rename it 'register_token_samplers'"
    ):
        record = registered(OldSamplerPlugin(), "test-old-sampler")
    assert record.status == "loaded"
    assert get_registry().entry("token_sampler", "test-old-argmax").plugin == "test-old-sampler"


def test_an_unknown_name_suggests_close_matches():
    with pytest.raises(RegistryError, match="did you mean 'vit'"):
        get_registry().get("model", "vti")
    result = CliRunner().invoke(main, ["info", "vit-s61"])
    assert result.exit_code != 0 and "did you mean" in result.output and "vit-s16" in result.output


@pytest.fixture
def fresh_loader():
    """Reload plugins from entry points before and after a test that changes the environment."""
    reset()
    yield
    reset()


def test_disable_in_process(fresh_loader, monkeypatch):
    monkeypatch.setenv("POLYMODAL_DISABLE_PLUGINS", "vit")
    registry = get_registry()
    assert "vit" not in registry.names("model") and "vit" in registry.names("encoder")
    assert any(r.name == "vit" and r.status == "disabled" for r in plugin_records())
    monkeypatch.delenv("POLYMODAL_DISABLE_PLUGINS")
    reset()
    assert "vit" in get_registry().names("model")
