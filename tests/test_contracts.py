"""Contract tests over EVERY registered component, so a new plugin is tested on arrival.

Models run at tiny size (``polymodal.testing.contracts.tiny``). The second half checks
that the checks themselves catch what they claim to, and that the strategies draw what
they promise.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from polymodal.config import config, field, in_range, one_of, to_json
from polymodal.models import ModelSpec, PolymodalModel
from polymodal.models.parts import part_fields
from polymodal.registry import get_registry
from polymodal.testing import components, contracts, strategies

REGISTRY = get_registry()
MODELS = REGISTRY.names("model")
ENTRIES = [(e.kind, e.name) for e in REGISTRY.entries()]
CONFIGS = components.registered_configs(REGISTRY)


def _entry(kind: str, name: str):
    registry = get_registry()
    if (kind, name) not in registry:
        pytest.skip(f"{kind} {name!r} was unregistered by another test")
    return registry.entry(kind, name)


# -- every model variant ------------------------------------------------------------------------


@pytest.mark.parametrize("check", contracts.MODEL_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", MODELS)
def test_model_contract(name, check):
    check(_entry("model", name).obj)


@pytest.mark.parametrize("name", MODELS)
def test_model_spec_is_coherent(name):
    components.check_spec(_entry("model", name).obj)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_variant_is_small(name):
    spec = contracts.tiny(_entry("model", name).obj)
    model = contracts.build(spec, use_tiny=False)
    assert sum(p.numel() for p in model.parameters()) <= contracts.MAX_PARAMS


COMPOSITES = [n for n in MODELS if part_fields(REGISTRY.get("model", n).config)]


def test_the_composite_families_name_their_parts_by_part_configs():
    families = {REGISTRY.get("model", n).model_class.family for n in COMPOSITES}
    assert {"dalle", "rudolph", "imagebind", "fromage", "flamingo", "pixel"} <= families


@pytest.mark.parametrize("name", COMPOSITES)
def test_composite_saves_each_part_once_in_its_own_folder(name):
    contracts.check_part_folders(_entry("model", name).obj)


# -- other kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REGISTRY.names("encoder"))
def test_encoder_builds_from_defaults_and_runs(name):
    components.check_encoder(_entry("encoder", name).obj)


@pytest.mark.parametrize("name", REGISTRY.names("attention_backend"))
def test_attention_backend_supports_answers(name):
    components.check_attention_backend(_entry("attention_backend", name).obj, name)


@pytest.mark.parametrize("name", REGISTRY.names("dataset"))
def test_dataset_entry_is_callable(name):
    components.check_dataset_entry(_entry("dataset", name).obj, name)


@pytest.mark.parametrize("kind,name", ENTRIES, ids=[f"{k}-{n}" for k, n in ENTRIES])
def test_component_has_doc(kind, name):
    components.check_component_doc(_entry(kind, name))


@pytest.mark.parametrize("label", list(CONFIGS))
def test_config_fields_have_docs(label):
    components.check_config_docs(CONFIGS[label])


@pytest.mark.parametrize("label", list(CONFIGS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_config_variants_round_trip_json(label, data):
    cls = CONFIGS[label]
    cfg = data.draw(strategies.configs(cls))
    contracts._config_round_trip(cfg, label)


# -- the checks catch what they claim to --------------------------------------------------------


@config
class ToyConfig:
    """A toy model's config."""

    dim: int = field(8, "Width.", check=in_range(1, 4096, integer=True))
    depth: int = field(3, "Layers.", check=in_range(1, 64, integer=True))
    flaw: str = field("none", "Which contract to break.", check=one_of("none", "coupled", "nan", "detached"))


class ToyModel(PolymodalModel):
    """A toy MLP that can be told to break one contract."""

    family = "contract-toy"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.layers = nn.Sequential(*[nn.Linear(config.dim, config.dim) for _ in range(config.depth)])

    def forward(self, x):
        y = self.layers(x)  # (B, D)
        if self.config.flaw == "coupled":
            y = y - y.mean(dim=0, keepdim=True)  # mixes the samples of a batch
        if self.config.flaw == "nan":
            y = y / 0.0 * 0.0
        return y

    def loss(self, batch):
        y = self(batch["x"])
        loss = y.pow(2).mean()
        return (loss.detach() if self.config.flaw == "detached" else loss), {"mean": y.detach().mean().item()}

    def example_inputs(self, batch_size=2, generator=None):
        return (torch.randn(batch_size, self.config.dim, generator=generator),)

    def example_batch(self, batch_size, generator=None):
        return {"x": self.example_inputs(batch_size, generator)[0]}


def _toy(flaw: str = "none") -> ModelSpec:
    return ModelSpec(ToyModel, ToyConfig(flaw=flaw), data="digits")


def test_a_sound_toy_passes_the_checks_that_need_no_registration():
    for check in (
        contracts.check_output_shapes,
        contracts.check_batch_independence,
        contracts.check_finite_outputs,
        contracts.check_config_json_round_trip,
        contracts.check_loss_backward,
    ):
        check(_toy())


def test_batch_coupling_is_caught():
    with pytest.raises(AssertionError, match="alone and in a batch"):
        contracts.check_batch_independence(_toy("coupled"))


def test_non_finite_outputs_are_caught():
    with pytest.raises(AssertionError, match="non-finite"):
        contracts.check_finite_outputs(_toy("nan"))


def test_missing_gradients_are_caught():
    with pytest.raises(AssertionError, match="does not require grad"):
        contracts.check_loss_backward(_toy("detached"))


def test_shrink_config_lowers_size_fields_when_there_is_no_tiny_config():
    assert not hasattr(ToyModel, "tiny_config")
    small = contracts.tiny(_toy()).config
    assert (small.dim, small.depth, small.flaw) == (8, 1, "none")
    vit_b16 = get_registry().get("model", "vit-b16").config if ("model", "vit-b16") in get_registry() else None
    if vit_b16 is not None:
        shrunk = contracts.shrink_config(vit_b16)
        assert (shrunk.encoder.dim, shrunk.encoder.depth, shrunk.encoder.block.heads) == (16, 1, 2)


def test_config_without_docs_is_caught():
    @attrs.frozen
    class Undocumented:
        size: int = 3

    with pytest.raises(AssertionError, match="size"):
        components.check_config_docs(Undocumented)


def test_encoder_with_wrong_output_is_caught():
    class Flat(nn.Module):
        """Returns (B, D) instead of tokens."""

        config_class = ToyConfig

        def __init__(self, cfg):
            super().__init__()
            self.out_dim = cfg.dim

        def forward(self, x):
            return x

        def example_inputs(self, batch_size=2):
            return (torch.randn(batch_size, self.out_dim),)

    with pytest.raises(AssertionError, match=r"expected \(B, N, D\)"):
        components.check_encoder(Flat)


def test_backend_with_a_bad_answer_is_caught():
    from polymodal.attention import MathBackend

    class Shy(MathBackend):
        name = "shy"

        def supports(self, spec):
            return False

    with pytest.raises(AssertionError, match="None or a reason"):
        components.check_attention_backend(Shy())


# -- strategies ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(strategies.image_batches(channels=st.sampled_from([1, 3]), size=8, max_batch=4))
def test_image_batches(images):
    b, c, h, w = images.shape
    assert 1 <= b <= 4 and c in (1, 3) and h == w == 8
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() < 1


@settings(max_examples=25, deadline=None)
@given(strategies.token_batches(vocab=11, max_len=7))
def test_token_batches(ids):
    assert ids.dtype == torch.long and 1 <= ids.shape[1] <= 7
    assert ids.min() >= 0 and ids.max() < 11


@settings(max_examples=60, deadline=None)
@given(strategies.attention_inputs())
def test_attention_inputs_are_valid_calls(call):
    from polymodal.attention import attention

    kind = call.pop("kind")
    q = call["q"]
    out = attention(**call, backend="math")
    assert out.shape == q.shape and torch.isfinite(out).all(), kind


@settings(max_examples=40, deadline=None)
@given(strategies.configs(ToyConfig, fields={"dim": st.sampled_from([4, 8])}))
def test_configs_are_valid_and_use_validators(cfg):
    assert cfg.dim in (4, 8) and 1 <= cfg.depth <= 64 and cfg.flaw in ("none", "coupled", "nan", "detached")
    assert ToyConfig(**attrs.asdict(cfg)) == cfg
    to_json(cfg)


def test_configs_vary_fields():
    seen = set()

    @settings(max_examples=60, deadline=None)
    @given(strategies.configs(ToyConfig))
    def draw(cfg):
        seen.add((cfg.depth != 3, cfg.flaw))

    draw()
    assert (True, "none") in seen or (True, "nan") in seen
    assert len({flaw for _, flaw in seen}) > 1


# -- declared interfaces (polymodal.models.interfaces) ------------------------------------------


@pytest.mark.parametrize("name", [n for n in MODELS if getattr(REGISTRY.get("model", n).model_class, "implements", ())])
def test_declared_interfaces_hold(name):
    components.check_implements(_entry("model", name).obj)


def test_the_part_families_declare_their_interfaces():
    from polymodal.models import interfaces

    declared = {p for n in MODELS for p in REGISTRY.get("model", n).model_class.implements}
    assert {
        interfaces.CausalLM,
        interfaces.ImageTokenizer,
        interfaces.ImageEncoder,
        interfaces.TextEncoder,
        interfaces.LatentAutoencoder,
    } <= declared


def test_a_model_missing_a_declared_member_fails():
    from polymodal.models.interfaces import CausalLM, require

    class HeadlessLM(ToyModel):
        """Claims to be a language model but has no ``logits``."""

        implements = (CausalLM,)
        tokenizer, vocab_size, dim, max_len, stack = None, 8, 8, 16, nn.Identity()

        def token_embeddings(self, ids):
            return torch.zeros(*ids.shape, 8)

        def run(self, embeds, **kwargs):
            return embeds

    spec = ModelSpec(HeadlessLM, ToyConfig(), data="digits")
    with pytest.raises(AssertionError, match="declares it implements CausalLM but lacks logits"):
        components.check_implements(spec)
    with pytest.raises(ValueError, match=r"Part\.lm: expected a language model .* got a HeadlessLM .*lacking logits$"):
        require(spec.build(), CausalLM, what="Part.lm")
    HeadlessLM.logits = lambda self, hidden: hidden
    components.check_implements(spec)


def test_require_names_members_missing_inside_a_nested_part():
    from polymodal.models.interfaces import ImageEncoder, require

    class Tower(nn.Module):
        def check(self, pixels):
            pass

    class Clipish:
        visual, prepare, encode_image = Tower(), staticmethod(lambda x: x), staticmethod(lambda x: x)

    with pytest.raises(ValueError, match=r"lacking visual\.encoder$"):
        require(Clipish(), ImageEncoder, what="vision")
    Clipish.visual.encoder = nn.Identity()
    assert require(Clipish(), ImageEncoder, what="vision") is not None


@pytest.mark.parametrize("name", COMPOSITES)
def test_composite_with_parts_of_another_size_saves_and_loads_back(name):
    contracts.check_nondefault_parts(_entry("model", name).obj)
