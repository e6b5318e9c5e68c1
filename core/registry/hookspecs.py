"""pluggy hook specifications: registration only.

Every hook takes one argument, ``register``, a callback ``register(name, obj, doc="")``
that adds ``obj`` to the registry under the hook's kind; an object of the wrong type for the
kind (see :data:`ACCEPTS`, declared with each hook) fails the plugin. A plugin is any module
(or object) with functions decorated by :data:`polymodal.hookimpl`, published in the
``polymodal`` entry-point group of its distribution::

    [project.entry-points.polymodal]
    mine = "my_package.plugin"

Hooks run once at start-up; nothing here is called on a forward path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import pluggy

PROJECT = "polymodal"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., object]

HOOK_KINDS: dict[str, str] = {}
"""Each registration hook → the registry kind its ``register`` callback fills, in declaration order.

Filled by :func:`registers`: a hookspec declares its kind, and the registry's kinds
(:data:`KINDS`) are read from here, so a new kind is one new hookspec.
"""

DEPRECATED_HOOKS: dict[str, str] = {}
"""Old hook name → the hook that replaced it; an old name still registers, with a DeprecationWarning."""


@dataclass(frozen=True)
class Accepts:
    """What a kind's ``register`` callback accepts: ``"callable"``, ``"class"`` (any class), or an
    ``"instance"``/``"subclass"`` of the class at ``type_path``.

    The class is named by its dotted path and looked up in ``sys.modules``, never imported: a
    class whose module is not imported yet has no instances or subclasses, so the registry,
    the bottom layer, can name ``polymodal.models.ModelSpec`` without depending on the layers above.
    """

    form: str
    type_path: str = ""

    def __str__(self) -> str:
        return {
            "callable": "a callable",
            "class": "a class",
            "instance": f"a {self.type_path} instance",
            "subclass": f"a subclass of {self.type_path}",
        }[self.form]

    def accepts(self, obj: object) -> bool:
        """Whether ``obj`` is what this kind holds."""
        if self.form == "callable":
            return callable(obj)
        if self.form == "class":
            return isinstance(obj, type)
        module, _, name = self.type_path.rpartition(".")
        cls = getattr(sys.modules.get(module), name, None)
        if not isinstance(cls, type):  # not imported: nothing can be an instance or a subclass of it
            return False
        if self.form == "instance":
            return isinstance(obj, cls)
        return isinstance(obj, type) and issubclass(obj, cls)


def describe(obj: object) -> str:
    """A short phrase for what ``obj`` is, for error messages: ``class Foo``, ``a function``, ``a dict``."""
    if isinstance(obj, type):
        return f"class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__qualname__}"


ACCEPTS: dict[str, Accepts] = {}
"""Each registry kind → what its ``register`` callback accepts (declared by :func:`registers`)."""


def registers(kind: str, accepts: Accepts | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a function as the hookspec that fills registry kind ``kind`` (one kind per hook),
    whose ``register`` callback takes only objects that ``accepts`` (plugins' other objects fail them)."""

    def mark(spec: Callable[..., None]) -> Callable[..., None]:
        if kind in HOOK_KINDS.values():
            raise ValueError(f"registry kind {kind!r} already has a hook; {spec.__name__} cannot fill it too")
        HOOK_KINDS[spec.__name__] = kind
        if accepts is not None:
            ACCEPTS[kind] = accepts
        return hookspec(spec)

    return mark


def deprecated_alias(old: str, new: str) -> Callable[..., None]:
    """A hookspec called ``old`` that fills ``new``'s kind and warns plugins that still implement it."""

    def spec(register: Register) -> None:
        pass

    spec.__name__ = spec.__qualname__ = old
    spec.__doc__ = f"Deprecated: implement :func:`{new}` instead (``{old}`` goes in the next release)."
    DEPRECATED_HOOKS[old] = new
    warning = DeprecationWarning(f"the polymodal hook {old!r} is deprecated; rename it {new!r}")
    return hookspec(warn_on_impl=warning)(spec)


@registers("encoder", Accepts("subclass", "torch.nn.Module"))
def register_encoders(register: Register) -> None:
    """Register encoder classes (``nn.Module`` subclasses with a ``config_class``).

    An encoder builds from ``config_class()`` defaults, sets ``out_dim`` and maps
    ``example_inputs(batch_size, generator)`` to tokens (B, N, out_dim); the contract
    tests in ``polymodal.testing`` check exactly that.

    Example::

        import torch
        from polymodal import hookimpl
        from polymodal.config import config, field, in_range

        @config
        class FramesConfig:
            '''Log-mel frames to tokens.'''
            mels: int = field(80, "Mel bins per frame.", check=in_range(1, 512, integer=True))
            dim: int = field(64, "Token width.", check=in_range(1, 4096, integer=True))

        class FramesEncoder(torch.nn.Module):
            '''(B, T, mels) log-mel frames → (B, T, dim) tokens.'''
            config_class = FramesConfig

            def __init__(self, cfg=None):
                super().__init__()
                self.cfg = cfg or FramesConfig()
                self.out_dim = self.cfg.dim
                self.proj = torch.nn.Linear(self.cfg.mels, self.cfg.dim)

            def forward(self, frames):
                return self.proj(frames)  # (B, T, dim)

            def example_inputs(self, batch_size=2, generator=None):
                return (torch.randn(batch_size, 16, self.cfg.mels, generator=generator),)

        @hookimpl
        def register_encoders(register):
            register("frames", FramesEncoder)
    """


@registers("tokenizer", Accepts("class"))
def register_tokenizers(register: Register) -> None:
    """Register tokenizer classes (text or image; see :class:`polymodal.models.interfaces.Tokenizer`).

    Example::

        from polymodal import hookimpl
        from polymodal.data.tokenizers import ByteTokenizer

        class UpperByteTokenizer(ByteTokenizer):
            '''Bytes of the upper-cased text.'''
            def encode(self, text, *args, **kwargs):
                return super().encode(text.upper(), *args, **kwargs)

        @hookimpl
        def register_tokenizers(register):
            register("upper-bytes", UpperByteTokenizer)
    """


@registers("fusion", Accepts("subclass", "torch.nn.Module"))
def register_fusions(register: Register) -> None:
    """Register fusion modules that join two streams (concatenation, cross-attention, adapters).

    Example::

        import torch
        from polymodal import hookimpl

        class SumFusion(torch.nn.Module):
            '''Adds a pooled context vector to every token.'''
            def forward(self, x, context):
                return x + context.mean(dim=1, keepdim=True)

        @hookimpl
        def register_fusions(register):
            register("sum", SumFusion)
    """


@registers("objective", Accepts("callable"))
def register_objectives(register: Register) -> None:
    """Register objectives: callables returning ``(loss, metrics_dict)``.

    Example::

        import torch.nn.functional as F
        from polymodal import hookimpl

        def l1_objective(prediction, target):
            '''Mean absolute error.'''
            loss = F.l1_loss(prediction, target)
            return loss, {"l1": loss.item()}

        @hookimpl
        def register_objectives(register):
            register("l1", l1_objective)
    """


@registers("token_sampler", Accepts("callable"))
def register_token_samplers(register: Register) -> None:
    """Register token samplers: functions that choose the next token of a sequence,
    ``(logits (B, V), generator=None, **kw) -> ids (B,)`` (greedy, temperature, top-k, top-p …).

    Diffusion samplers, which step a noisy image, are not token samplers.

    Example::

        import torch
        from polymodal import hookimpl

        def argmax_sampler(logits, generator=None):
            '''Always the most likely token.'''
            return logits.argmax(dim=-1)

        @hookimpl
        def register_token_samplers(register):
            register("argmax", argmax_sampler)
    """


register_samplers = deprecated_alias("register_samplers", "register_token_samplers")


@registers("diffusion_sampler", Accepts("callable"))
def register_diffusion_samplers(register: Register) -> None:
    """Register diffusion samplers: classes (or factories) ``(schedule, cfg) -> sampler`` that step a
    noisy image ``x_t → x_{t_prev}`` from one model output (DDPM, DDIM …), built by
    ``polymodal.diffusion.make_sampler(schedule, SamplerConfig(name=...))``.

    A sampler has ``timesteps`` (S,) int64, descending, ``previous(t) -> int`` and
    ``step(output, t, x_t, generator=None) -> StepOutput(prev, x0)``. Token samplers are another kind.

    Example::

        from polymodal import hookimpl

        def ddim_25(schedule, cfg):
            '''DDIM over 25 respaced steps, whatever the config asks.'''
            from polymodal.diffusion import make_sampler

            return make_sampler(schedule, cfg, name="ddim", steps=min(25, schedule.T))

        @hookimpl
        def register_diffusion_samplers(register):
            register("ddim-25", ddim_25)
    """


@registers("attention_backend", Accepts("instance", "polymodal.attention.Backend"))
def register_attention_backends(register: Register) -> None:
    """Register attention backends (:class:`polymodal.attention.Backend` instances).

    Example::

        from polymodal import hookimpl
        from polymodal.attention import MathBackend

        class MyBackend(MathBackend):
            '''The reference math, under another name.'''
            name = "mine"
            priority = 0  # never preferred by ``auto`` over the built-ins

        @hookimpl
        def register_attention_backends(register):
            register("mine", MyBackend())
    """


@registers("dataset", Accepts("callable"))
def register_datasets(register: Register) -> None:
    """Register datasets: callables ``(root=None, **options) -> polymodal.data.Dataset``.

    Example::

        import torch
        from polymodal import hookimpl
        from polymodal.data import Dataset, Split

        def noise(root=None, seed=0):
            '''Random 8×8 images with random labels.'''
            g = torch.Generator().manual_seed(seed)
            def split(n):
                return Split({"image": torch.rand(n, 1, 8, 8, generator=g),
                              "label": torch.randint(0, 10, (n,), generator=g)})
            return Dataset("noise", split(64), split(16),
                           meta={"num_classes": 10, "image_size": 8, "channels": 1})

        @hookimpl
        def register_datasets(register):
            register("noise", noise)
    """


@registers("model", Accepts("instance", "polymodal.models.ModelSpec"))
def register_models(register: Register) -> None:
    """Register model variants (:class:`polymodal.models.ModelSpec`), timm style.

    Example::

        from polymodal import hookimpl
        from polymodal.models import ModelSpec
        from polymodal.registry import get_registry

        @hookimpl
        def register_models(register):
            vit = get_registry().get("model", "vit")  # a registered family's variant, widened
            wide = vit.make_config(**{"encoder.block.dim": 256, "encoder.block.heads": 8})
            register("vit-wide", ModelSpec(vit.model_class, wide, data="digits"))
    """


@registers("converter", Accepts("callable"))
def register_converters(register: Register) -> None:
    """Register checkpoint converters: ``convert(src_dir, dst_dir) -> model``.

    ``polymodal convert --from NAME SRC DST`` calls the one registered as ``NAME``.
    Converters read safetensors; they never unpickle user files.

    Example::

        from polymodal import hookimpl

        def convert_mine(src, dst):
            '''My format to a polymodal model folder.'''
            ...

        @hookimpl
        def register_converters(register):
            register("mine", convert_mine)
    """


@registers("exporter", Accepts("instance", "polymodal.io.export.Exporter"))
def register_exporters(register: Register) -> None:
    """Register exporters (:class:`polymodal.io.export.Exporter` instances): each writes one family's
    model folder in another format.

    ``polymodal export DIR OUT --to FORMAT`` picks the exporter whose ``family`` is DIR's and whose
    ``to`` is FORMAT (``hf``: a folder transformers' ``from_pretrained`` loads). ``write(model, folder)``
    fills a new, empty folder, which is then swapped into place; a setting the format cannot express
    raises :class:`polymodal.io.export.ExportError` naming it.

    Example::

        import json
        from polymodal import hookimpl
        from polymodal.io.export import Exporter

        def write_summary(model, folder):
            '''The model's config as plain JSON.'''
            (folder / "summary.json").write_text(json.dumps(model.config_dict()))

        @hookimpl
        def register_exporters(register):
            register("vit-summary", Exporter("vit", "summary", write_summary, "a JSON summary"))
    """


@registers("metric", Accepts("callable"))
def register_metrics(register: Register) -> None:
    """Register metrics: callables ``(predictions, targets) -> float``.

    Example::

        from polymodal import hookimpl

        def top1(logits, labels):
            '''Fraction of rows whose arg-max is the label.'''
            return (logits.argmax(-1) == labels).float().mean().item()

        @hookimpl
        def register_metrics(register):
            register("top1", top1)
    """


@registers("command", Accepts("instance", "click.Command"))
def register_commands(register: Register) -> None:
    """Register extra ``polymodal`` CLI commands (``click.Command`` objects).

    A plugin's commands are grouped under its name: the example below runs as
    ``polymodal mine hello`` when the plugin's entry point is ``mine``. The registered name
    must be unique among all plugins' commands; it is also the command's deprecated
    top-level name (``polymodal hello``), kept for one release.

    Example::

        import click
        from polymodal import hookimpl

        @click.command("hello")
        def hello():
            '''Say hello.'''
            click.echo("hello")

        @hookimpl
        def register_commands(register):
            register("hello", hello)
    """


KINDS: tuple[str, ...] = tuple(HOOK_KINDS.values())
"""Every kind of component the registry holds, one per registration hook, in declaration order."""
