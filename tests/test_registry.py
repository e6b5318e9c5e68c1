"""Registry unit tests: names, duplicates, removal, unknown kinds and names."""

from __future__ import annotations

import pytest

from polymodal.registry import KINDS, Entry, Registry, RegistryError


def thing():
    """A registered thing."""


def other():
    """Another thing."""


@pytest.fixture
def registry() -> Registry:
    r = Registry()
    r.add("model", "vit", thing, plugin="vit")
    r.add("model", "vit-s16", thing, plugin="vit")
    r.add("encoder", "vit", other, plugin="core")
    return r


def test_every_kind_starts_empty():
    r = Registry()
    for kind in KINDS:
        assert r.names(kind) == []
    assert list(r.entries()) == []


def test_add_and_get(registry):
    entry = registry.entry("model", "vit")
    assert isinstance(entry, Entry)
    assert (entry.kind, entry.name, entry.obj, entry.plugin) == ("model", "vit", thing, "vit")
    assert registry.get("encoder", "vit") is other
    assert ("model", "vit") in registry and ("model", "nope") not in registry and ("nokind", "vit") not in registry


def test_doc_defaults_to_the_first_docstring_line_and_can_be_given():
    r = Registry()
    assert r.add("metric", "a", thing).doc == "A registered thing."
    assert r.add("metric", "b", thing, doc="Given.").doc == "Given."
    assert r.add("metric", "c", object()).doc  # object's own docstring


@pytest.mark.parametrize("name", ["ViT", "Vit-S16", "_vit", "-vit", "vit s16", "", "vít", "vit/s16"])
def test_names_must_be_lowercase_identifiers(name):
    with pytest.raises(RegistryError, match="invalid") as info:
        Registry().add("model", name, thing, plugin="mine")
    assert "mine" in str(info.value)


def test_non_string_names_are_refused():
    with pytest.raises(RegistryError):
        Registry().add("model", 3, thing)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["vit", "vit-s16", "vit_b16", "vit.tiny", "0x", "a"])
def test_valid_names(name):
    assert Registry().add("model", name, thing).name == name


def test_duplicate_names_both_plugins(registry):
    with pytest.raises(RegistryError) as info:
        registry.add("model", "vit", other, plugin="my-plugin")
    message = str(info.value)
    assert "duplicate model 'vit'" in message
    assert "'vit'" in message and "'my-plugin'" in message
    assert registry.get("model", "vit") is thing  # the first registration stays


def test_same_name_in_different_kinds_is_fine(registry):
    assert {e.kind for e in registry.find("vit")} == {"model", "encoder"}
    assert registry.find("nothing") == []


def test_unknown_kind(registry):
    for call in (
        lambda: registry.get("modle", "vit"),
        lambda: registry.add("modle", "x", thing),
        lambda: registry.names("modle"),
        lambda: list(registry.entries("modle")),
        lambda: registry.remove("modle", "x"),
    ):
        with pytest.raises(RegistryError, match="unknown registry kind 'modle'") as info:
            call()
        assert "model" in str(info.value)  # lists the kinds


def test_unknown_name_suggests_close_matches(registry):
    with pytest.raises(RegistryError) as info:
        registry.get("model", "vit-s61")
    message = str(info.value)
    assert "unknown model 'vit-s61'" in message and "did you mean 'vit-s16'" in message
    assert "known: vit, vit-s16" in message


def test_unknown_name_without_close_matches_lists_the_known(registry):
    with pytest.raises(RegistryError) as info:
        registry.get("model", "diffusion")
    assert "did you mean" not in str(info.value) and "vit-s16" in str(info.value)
    with pytest.raises(RegistryError, match="none registered"):
        registry.get("token_sampler", "greedy")


def test_registry_error_is_a_key_error_with_a_plain_message(registry):
    with pytest.raises(KeyError) as info:
        registry.get("model", "nope")
    assert not str(info.value).startswith(("'", '"'))


def test_remove_one_entry(registry):
    version = registry.version
    registry.remove("model", "vit")
    assert ("model", "vit") not in registry and ("encoder", "vit") in registry
    assert registry.version > version
    registry.remove("model", "vit")  # removing twice is harmless
    registry.add("model", "vit", other, plugin="new")  # and the name is free again
    assert registry.get("model", "vit") is other


def test_remove_plugin(registry):
    registry.remove_plugin("vit")
    assert registry.names("model") == [] and registry.names("encoder") == ["vit"]
    registry.remove_plugin("not-a-plugin")
    assert registry.names("encoder") == ["vit"]


def test_version_bumps_on_every_change():
    r = Registry()
    versions = [r.version]
    r.add("metric", "a", thing)
    versions.append(r.version)
    r.remove("metric", "a")
    versions.append(r.version)
    r.add("metric", "b", thing, plugin="p")
    r.remove_plugin("p")
    versions.append(r.version)
    assert versions == sorted(set(versions))


def test_names_and_entries_are_sorted(registry):
    registry.add("model", "alpha", thing)
    assert registry.names("model") == ["alpha", "vit", "vit-s16"]
    assert [e.name for e in registry.entries("model")] == ["alpha", "vit", "vit-s16"]
    kinds = [e.kind for e in registry.entries()]
    assert kinds == sorted(kinds, key=KINDS.index)


def test_process_registry_has_the_builtins():
    import polymodal

    assert polymodal.registry.entry("encoder", "vit").plugin == "core"
    assert "math" in polymodal.registry.names("attention_backend")
    assert polymodal.registry.entry("model", "vit").plugin == "vit"


def test_register_variants_registers_every_variant_under_its_name():
    from polymodal.registry import register_variants

    calls = []
    register_variants(lambda name, obj, doc="": calls.append((name, obj)), {"a": thing, "b": other})
    assert calls == [("a", thing), ("b", other)]
    with pytest.raises(ValueError, match="mapping of variant name to ModelSpec; got list"):
        register_variants(lambda *a, **k: None, [thing])


def test_every_family_registers_exactly_its_variants():
    import importlib

    import polymodal

    for family in (
        "clip",
        "dalle",
        "dino",
        "flamingo",
        "fromage",
        "igpt",
        "imagebind",
        "lm",
        "pixel",
        "rudolph",
        "vit",
        "vqvae",
    ):
        variants = importlib.import_module(f"polymodal.plugins.{family}").VARIANTS
        registered = {e.name: e.obj for e in polymodal.registry.entries("model") if e.plugin == family}
        assert registered == variants, family
