"""The hookspecs are the plugin reference: each documented with a valid example, each mapped to a kind."""

from __future__ import annotations

import inspect
import re
import textwrap

import pytest

from polymodal.registry import KINDS, hookspecs


def _specs() -> dict[str, object]:
    """The current hookspecs (deprecated aliases left out: they point at a current one)."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, marker) and name not in hookspecs.DEPRECATED_HOOKS
    }


SPECS = _specs()


def _examples(doc: str) -> list[str]:
    """Every literal block introduced by ``::`` in a docstring, dedented."""
    lines = inspect.cleandoc(doc).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(block)).strip("\n"))
        else:
            i += 1
    return [b for b in blocks if b.strip()]


def test_there_are_hookspecs():
    assert len(SPECS) >= 10


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_registration_only(name):
    assert name.startswith("register_")
    assert list(inspect.signature(SPECS[name]).parameters) == ["register"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_docstring_has_an_example_plugin(name):
    doc = SPECS[name].__doc__ or ""
    assert "Example" in doc and "@hookimpl" in doc, f"{name}'s docstring needs an 'Example::' with a @hookimpl"
    examples = _examples(doc)
    assert any("@hookimpl" in e and f"def {name}(register)" in e for e in examples), (
        f"{name}'s example should implement `def {name}(register)`"
    )


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_examples_compile(name):
    for example in _examples(SPECS[name].__doc__ or ""):
        compile(example, f"<{name} docstring example>", "exec")


def test_module_docstring_example_is_valid_toml_or_python():
    blocks = _examples(hookspecs.__doc__ or "")
    assert blocks, "the module docstring shows how to publish a plugin"
    assert any(re.search(r"\[project\.entry-points\.polymodal\]", b) for b in blocks)


def test_hook_kinds_cover_every_hookspec_and_name_real_kinds():
    assert set(hookspecs.HOOK_KINDS) == set(SPECS)
    assert set(hookspecs.HOOK_KINDS.values()) <= set(KINDS)
    assert len(set(hookspecs.HOOK_KINDS.values())) == len(hookspecs.HOOK_KINDS)


def test_every_registry_kind_has_a_hook():
    assert set(KINDS) == set(hookspecs.HOOK_KINDS.values())


def test_the_kinds_are_read_from_the_hookspecs(monkeypatch):
    """A new kind is one new hookspec: ``registers`` records it, and KINDS is the hooks' kinds in order."""
    from polymodal.registry import table

    assert table.KINDS is KINDS == tuple(hookspecs.HOOK_KINDS.values())
    monkeypatch.setattr(hookspecs, "HOOK_KINDS", dict(hookspecs.HOOK_KINDS))

    @hookspecs.registers("noise_schedule")
    def register_noise_schedules(register):
        """Noise schedules."""

    assert hookspecs.HOOK_KINDS["register_noise_schedules"] == "noise_schedule"
    assert hasattr(register_noise_schedules, f"{hookspecs.PROJECT}_spec")
    with pytest.raises(ValueError, match="'noise_schedule' already has a hook"):
        hookspecs.registers("noise_schedule")(lambda register: None)


def test_the_sampler_kind_is_now_token_sampler():
    assert "token_sampler" in KINDS and "sampler" not in KINDS
    assert hookspecs.HOOK_KINDS["register_token_samplers"] == "token_sampler"
    assert hookspecs.DEPRECATED_HOOKS == {"register_samplers": "register_token_samplers"}


def _run_example(name: str) -> list[tuple[str, object]]:
    """Execute a hookspec's example and call its hook implementation with a collecting ``register``."""
    registered: list[tuple[str, object]] = []
    for example in _examples(SPECS[name].__doc__ or ""):
        namespace: dict[str, object] = {"__name__": f"example_{name}"}
        exec(compile(example, f"<{name} docstring example>", "exec"), namespace)
        impl = namespace.get(name)
        if callable(impl):
            impl(register=lambda entry, obj, doc="": registered.append((entry, obj)))
    return registered


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_examples_run_and_register_valid_names(name):
    from polymodal.registry import Registry

    registered = _run_example(name)
    assert registered, f"{name}'s example registers nothing"
    scratch = Registry()
    for entry, obj in registered:  # lowercase names, and a doc for `polymodal list`
        assert scratch.add(hookspecs.HOOK_KINDS[name], entry, obj, plugin="example").doc


def test_encoder_example_passes_the_encoder_contract():
    from polymodal.testing import components

    for _, encoder_class in _run_example("register_encoders"):
        components.check_encoder(encoder_class)


def test_dataset_example_builds_a_dataset():
    from polymodal.data import Dataset

    for _, load in _run_example("register_datasets"):
        data = load()
        assert isinstance(data, Dataset) and len(data.train) and data.meta["num_classes"] == 10
