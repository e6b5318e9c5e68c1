"""A broken plugin never takes the CLI down (issue 14, "Nothing lost, nothing silent").

Each test installs fake distributions in process (a ``*.dist-info`` with ``entry_points.txt``
in a temporary folder on ``sys.path``, exactly what ``pip install`` leaves behind), runs the
loader or ``polymodal`` through click's runner with ``POLYMODAL_STRICT_PLUGINS`` unset, and
resets the loader afterwards so that later tests see the normal registry.
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import textwrap
import warnings

import click
import pytest
from click.testing import CliRunner

from polymodal import hookimpl
from polymodal.cli import main
from polymodal.registry import KINDS, hookspecs
from polymodal.registry.loader import (
    PluginError,
    get_registry,
    plugin_records,
    register_plugin,
    reset,
    unregister_plugin,
)

_numbers = itertools.count()


@pytest.fixture
def site(tmp_path, monkeypatch):
    """``install(dist, {entry_point: module_source})`` publishes plugins from a fake distribution.

    Strict mode and disabled plugins are unset; the loader is reset before and after the test.
    Returns the module names, in the order given.
    """
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("POLYMODAL_DISABLE_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules: list[str] = []

    def install(dist: str, plugins: dict[str, str]) -> list[str]:
        names = []
        for source in plugins.values():
            module = f"pm_isolation_{next(_numbers)}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            names.append(module)
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "".join(f"{ep} = {module}\n" for ep, module in zip(plugins, names, strict=True))
        (info / "entry_points.txt").write_text(f"[polymodal]\n{lines}")
        importlib.invalidate_caches()
        modules.extend(names)
        return names

    reset()
    yield install
    reset()
    for module in modules:
        sys.modules.pop(module, None)


def _record(name: str, source_part: str = ""):
    found = [r for r in plugin_records() if r.name == name and source_part in r.source]
    assert len(found) == 1, (name, plugin_records())
    return found[0]


SYS_EXIT_AT_IMPORT = """
    import sys
    sys.exit(3)
"""

SYS_EXIT_IN_HOOK = """
    import sys
    from polymodal import hookimpl

    @hookimpl
    def register_metrics(register):
        register("exit-metric", lambda logits, labels: 0.0, doc="registered before the hook exits")
        sys.exit("bye from a hook")
"""


# -- sys.exit() and other BaseExceptions --------------------------------------------------------


def test_a_plugin_calling_sys_exit_at_import_does_not_take_the_cli_down(site):
    site("exit-dist", {"exits": SYS_EXIT_AT_IMPORT})
    runner = CliRunner()
    helped = runner.invoke(main, ["--help"])
    assert helped.exit_code == 0, helped.output
    assert "train" in helped.output and "plugins" in helped.output
    listed = runner.invoke(main, ["list", "model"])
    assert listed.exit_code == 0, listed.output
    assert "vit-b16" in listed.output
    shown = runner.invoke(main, ["plugins"])
    assert shown.exit_code == 0, shown.output
    assert "exits" in shown.output and "failed" in shown.output and "SystemExit" in shown.output
    record = _record("exits")
    assert record.status == "failed" and "sys.exit(3)" in record.error and "exit-dist" in record.source
    assert _record("vit").status == "loaded"


def test_a_plugin_calling_sys_exit_in_a_hook_is_recorded_and_its_partial_work_removed(site):
    site("exit-dist", {"exits-late": SYS_EXIT_IN_HOOK})
    registry = get_registry()
    record = _record("exits-late")
    assert record.status == "failed" and "bye from a hook" in record.error
    assert ("metric", "exit-metric") not in registry
    assert "vit" in registry.names("model")
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0


def test_sys_exit_at_import_is_a_plugin_error_in_strict_mode(site, monkeypatch):
    site("exit-dist", {"exits": SYS_EXIT_AT_IMPORT})
    monkeypatch.setenv("POLYMODAL_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'exits'.*exit-dist.*SystemExit"):
        get_registry()
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS")
    assert "vit" in get_registry().names("model")  # a failed strict load leaves nothing half-loaded


def test_keyboard_interrupt_still_stops_loading(site):
    site("interrupt-dist", {"interrupts": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        get_registry()


# -- registered objects are checked against their kind ------------------------------------------

NOT_A_COMMAND = """
    from polymodal import hookimpl

    def hello():
        '''A plain function, not a click command.'''

    @hookimpl
    def register_commands(register):
        register("hello-plain", hello)
"""

NOT_A_MODEL_SPEC = """
    from polymodal import hookimpl

    @hookimpl
    def register_models(register):
        register("aaa-not-a-spec", {"model_class": "nothing"}, doc="A dict, not a ModelSpec.")
"""


def test_a_command_that_is_not_a_click_command_is_refused(site):
    site("bad-command-dist", {"bad-command": NOT_A_COMMAND})
    runner = CliRunner()
    helped = runner.invoke(main, ["--help"])
    assert helped.exit_code == 0, helped.output
    assert "train" in helped.output and "hello-plain" not in helped.output
    record = _record("bad-command")
    assert record.status == "failed"
    assert "command 'hello-plain'" in record.error and "click.Command" in record.error and "function" in record.error
    assert "click.Command" in runner.invoke(main, ["plugins"]).output
    assert ("command", "hello-plain") not in get_registry()


def test_a_model_that_is_not_a_model_spec_is_refused_and_eval_still_works(site, tmp_path):
    from polymodal.testing.contracts import tiny

    site("bad-model-dist", {"bad-model": NOT_A_MODEL_SPEC})
    record = _record("bad-model")
    assert record.status == "failed"
    assert "model 'aaa-not-a-spec'" in record.error and "polymodal.models.ModelSpec" in record.error
    assert "dict" in record.error
    assert ("model", "aaa-not-a-spec") not in get_registry()
    folder = tmp_path / "vit"
    tiny("vit").build().save(folder)
    result = CliRunner().invoke(main, ["eval", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.output)["accuracy"] <= 1.0
    listed = CliRunner().invoke(main, ["list"])
    assert listed.exit_code == 0 and "aaa-not-a-spec" not in listed.output


def test_a_refused_object_is_a_plugin_error_in_strict_mode(site, monkeypatch):
    site("bad-model-dist", {"bad-model": NOT_A_MODEL_SPEC})
    monkeypatch.setenv("POLYMODAL_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'bad-model'.*polymodal.models.ModelSpec"):
        get_registry()


def _good_and_bad() -> dict[str, tuple[object, object]]:
    """Per kind: an object the kind accepts and one it refuses."""
    import torch

    from polymodal.attention import MathBackend
    from polymodal.data.tokenizers import ByteTokenizer
    from polymodal.io.export import Exporter
    from polymodal.models import ModelSpec
    from polymodal.plugins.vit import ViTClassifier, ViTConfig

    class Frames(torch.nn.Module):
        """A stand-in encoder class."""

    @click.command("isolation-hello")
    def hello():
        """Say hello."""

    def fn(*args, **kwargs):
        """A callable."""

    return {
        "encoder": (Frames, Frames()),  # the class, not an instance
        "tokenizer": (ByteTokenizer, ByteTokenizer()),
        "fusion": (Frames, "concat"),
        "objective": (fn, 3.0),
        "token_sampler": (fn, "greedy"),
        "diffusion_sampler": (fn, "ddpm"),
        "attention_backend": (MathBackend(), MathBackend),  # an instance, not the class
        "dataset": (fn, {"train": []}),
        "model": (ModelSpec(ViTClassifier, ViTConfig()), ViTClassifier),
        "converter": (fn, None),
        "metric": (fn, 0.5),
        "command": (hello, hello.callback),
        "exporter": (Exporter("vit", "isolation", fn), fn),  # an Exporter, not the function it wraps
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_accepts_its_objects_and_refuses_others(kind, monkeypatch):
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS", raising=False)
    good, bad = _good_and_bad()[kind]
    hook = next(h for h, k in hookspecs.HOOK_KINDS.items() if k == kind)

    def plugin_with(obj, label):
        class Plugin:
            """Registers one object of one kind."""

        def hook_impl(self, register):
            register(f"isolation-{label}-{kind.replace('_', '-')}", obj)

        hook_impl.__name__ = hook
        setattr(Plugin, hook, hookimpl(hook_impl))
        return Plugin()

    try:
        assert register_plugin(plugin_with(good, "good"), "isolation-good").status == "loaded"
        record = register_plugin(plugin_with(bad, "bad"), "isolation-bad")
        assert record.status == "failed", record
        assert f"{kind} 'isolation-bad-" in record.error and "expected" in record.error
        assert str(hookspecs.ACCEPTS[kind]) in record.error
    finally:
        unregister_plugin("isolation-good")
        unregister_plugin("isolation-bad")


def test_every_kind_declares_what_it_accepts():
    assert set(hookspecs.ACCEPTS) == set(KINDS)
    for kind, accepts in hookspecs.ACCEPTS.items():
        assert str(accepts), kind
        if accepts.type_path:  # the named class exists once its module is imported
            module, _, name = accepts.type_path.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type), (kind, accepts.type_path)


def test_the_cli_ignores_a_non_command_put_in_the_registry_directly(monkeypatch):
    registry = get_registry()
    registry.add("command", "isolation-raw", lambda: None, plugin="isolation-raw")
    try:
        result = CliRunner().invoke(main, ["--help"])
        assert result.exit_code == 0, result.output
        assert "isolation-raw" not in result.output
    finally:
        registry.remove("command", "isolation-raw")


# -- built-ins load first and cannot be shadowed ------------------------------------------------

SHADOW_VIT = """
    from polymodal import hookimpl
    from polymodal.models import ModelSpec
    from polymodal.plugins.vit import ViTClassifier, ViTConfig

    @hookimpl
    def register_models(register):
        register("vit", ModelSpec(ViTClassifier, ViTConfig(), doc="An impostor."))
        register("vit-impostor", ModelSpec(ViTClassifier, ViTConfig(), doc="An impostor."))
"""


def test_a_third_party_entry_point_named_like_a_built_in_is_refused(site):
    site("impostor-dist", {"vit": SHADOW_VIT})
    registry = get_registry()
    assert registry.entry("model", "vit").doc != "An impostor."
    assert "vit-impostor" not in registry.names("model")
    assert _record("vit", "[polymodal]").status == "loaded"
    refused = _record("vit", "impostor-dist")
    assert refused.status == "failed"
    assert "impostor-dist" in refused.error and "polymodal" in refused.error and "built-in" in refused.error
    shown = CliRunner().invoke(main, ["plugins"]).output
    assert "impostor-dist" in shown and "built-in" in shown


def test_a_plugin_sorting_before_a_built_in_cannot_take_its_names(site):
    site("early-dist", {"aaa": SHADOW_VIT})
    registry = get_registry()
    assert _record("vit").status == "loaded"
    assert registry.entry("model", "vit").plugin == "vit"
    assert registry.entry("model", "vit").doc != "An impostor."
    record = _record("aaa")
    assert record.status == "failed"
    assert "duplicate model 'vit'" in record.error
    assert "plugin 'vit'" in record.error and "plugin 'aaa'" in record.error
    assert "early-dist" in record.error and "polymodal" in record.error  # both distributions
    assert "vit-impostor" not in registry.names("model")  # only the newcomer fails, and wholly


def test_built_ins_load_before_every_third_party_plugin(site):
    site("early-dist", {"aaa": "x = 1\n"})
    names = [r.name for r in plugin_records()]
    assert names[0] == "core"
    assert names.index("aaa") > max(names.index(n) for n in ("vit", "clip", "dino", "pixel"))


def test_a_component_clash_between_two_third_party_plugins_fails_only_the_later(site):
    first = """
        from polymodal import hookimpl

        @hookimpl
        def register_metrics(register):
            register("isolation-shared", lambda logits, labels: 1.0, doc="The first.")
    """
    site("first-dist", {"first": first})
    site("second-dist", {"second": first.replace("The first.", "The second.")})
    registry = get_registry()
    assert registry.entry("metric", "isolation-shared").plugin == "first"
    record = _record("second")
    assert record.status == "failed"
    assert "plugin 'first'" in record.error and "first-dist" in record.error
    assert "plugin 'second'" in record.error and "second-dist" in record.error


# -- POLYMODAL_DISABLE_PLUGINS -------------------------------------------------------------------


def test_disabling_an_unknown_plugin_warns_and_lists_the_known_ones(site, monkeypatch):
    monkeypatch.setenv("POLYMODAL_DISABLE_PLUGINS", "vti,dino")
    with pytest.warns(UserWarning, match="POLYMODAL_DISABLE_PLUGINS.*'vti'") as caught:
        registry = get_registry()
    message = str(caught[0].message)
    assert "did you mean 'vit'" in message and "core" in message and "dino" in message
    assert "dino" not in {e.plugin for e in registry.entries()}
    assert _record("dino").status == "disabled"


def test_disabling_known_plugins_does_not_warn(site, monkeypatch):
    monkeypatch.setenv("POLYMODAL_DISABLE_PLUGINS", "dino")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_registry()


def test_every_plugin_failure_is_shown_by_the_plugins_command(site):
    site(
        "broken-dist",
        {"exits": SYS_EXIT_AT_IMPORT, "bad-command": NOT_A_COMMAND, "bad-model": NOT_A_MODEL_SPEC},
    )
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    for name in ("exits", "bad-command", "bad-model"):
        line = next(line for line in result.output.splitlines() if line.startswith(name + " "))
        assert "failed" in line and "broken-dist" in line
    assert result.output.count("error:") >= 3


def test_every_hookspec_example_registers_what_its_kind_accepts():
    """The plugin reference (each hookspec's ``Example::``) never shows an object the loader would refuse."""
    for hook, kind in hookspecs.HOOK_KINDS.items():
        doc = textwrap.dedent((getattr(hookspecs, hook).__doc__ or "").split("Example::", 1)[1])
        registered: list[object] = []
        namespace: dict[str, object] = {"__name__": f"example_{hook}"}
        exec(compile(doc, f"<{hook} example>", "exec"), namespace)
        namespace[hook](register=lambda name, obj, doc="", found=registered: found.append(obj))
        assert registered, hook
        for obj in registered:
            assert hookspecs.ACCEPTS[kind].accepts(obj), (hook, obj)


def test_a_plugin_object_reusing_a_loaded_plugins_name_fails_alone(monkeypatch):
    monkeypatch.delenv("POLYMODAL_STRICT_PLUGINS", raising=False)

    class Again:
        """Registers a metric under a plugin name that is taken."""

        @hookimpl
        def register_metrics(self, register):
            register("isolation-again", lambda logits, labels: 0.0)

    record = register_plugin(Again(), "vit")
    try:
        assert record.status == "failed" and "already registered" in record.error
        registry = get_registry()
        assert registry.entry("model", "vit").plugin == "vit"  # the loaded plugin keeps everything
        assert ("metric", "isolation-again") not in registry
    finally:
        reset()  # forget the failed record; the next access loads the normal registry
