"""Helpers shared by converters that read Hugging Face transformers folders.

:func:`convert_hf_folder` is the converters' template: it reads and checks the folder, builds the
model, loads the renamed weights strictly, attaches the tokenizer and saves the model folder, so a
family's converter keeps only its config mapping and its key renaming. :func:`hf_converter` declares
the ``model_type`` a converter reads, so :mod:`polymodal.io.hub` picks it from a folder or a Hub
repository alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from polymodal.io.folders import LoadError, load_state_strict, read_json, read_state
from polymodal.io.output import check_output

M = TypeVar("M", bound=nn.Module)
State = dict[str, torch.Tensor]

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5", "flax_model.msgpack")
"""Checkpoint files a transformers folder may hold instead of ``model.safetensors``; none is read."""

HUB_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "generation_config.json",
)
"""What a transformers converter fetches from a Hub repository (``allow_patterns``): the config, the
safetensors weights and the tokenizer and processor files, never a pickle."""

F = TypeVar("F", bound=Callable[..., Any])


def hf_converter(model_type: str, *, files: tuple[str, ...] = HUB_FILES) -> Callable[[F], F]:
    """Declare which folders a converter reads, so ``polymodal.load("hf:ORG/NAME")``, ``polymodal.load(DIR)``
    and ``polymodal convert SRC DST`` (without ``--from``) pick it from the folder alone.

    ``model_type`` is what the folder says it holds (:func:`folder_model_type`: ``config.json``'s
    ``model_type``, or a diffusers folder's ``_class_name``); ``files`` are the Hub files fetched for it
    (``allow_patterns``; the default :data:`HUB_FILES`, a diffusers converter names its sub-folders' files).
    The converter is registered as usual (``register_converters``); this only sets ``hf_model_type`` and
    ``hf_files`` on it::

        @hf_converter("vit")
        def convert_hf_vit(src, dst=None): ...
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"hf_converter: model_type must be a non-empty string; got {model_type!r}")

    def declare(fn: F) -> F:
        fn.hf_model_type = model_type  # type: ignore[attr-defined]
        fn.hf_files = tuple(files)  # type: ignore[attr-defined]
        return fn

    return declare


def folder_model_type(src: str | Path) -> str | None:
    """What a transformers or diffusers folder says it holds: ``config.json``'s ``model_type``, else the
    ``_class_name`` of ``model_index.json`` (a diffusers pipeline) or of ``config.json`` (a diffusers
    model); None for a folder that says neither (a polymodal model folder, whose config names a ``family``,
    included)."""
    src = Path(src)
    config = _json_object(src / "config.json")
    if "family" in config:
        return None
    found = config.get("model_type") or _json_object(src / "model_index.json").get("_class_name")
    found = found or config.get("_class_name")
    return found if isinstance(found, str) and found else None


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_hf_config(src: Path, converter: str, model_type: str, label: str) -> dict[str, Any]:
    """``src/config.json`` as a dict whose ``model_type`` is ``model_type`` (or unset); else a LoadError."""
    path = src / "config.json"
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise LoadError(f"{path} is not a transformers config (expected a JSON object, got {type(hf).__name__})")
    if hf.get("model_type") not in (None, model_type):
        raise LoadError(
            f"{converter} reads {label} folders (config.json with model_type {model_type!r}); "
            f"{path} has {hf.get('model_type')!r}"
        )
    return hf


def safetensors_path(folder: Path, name: str, pickled: Iterable[str], converter: str) -> Path:
    """``folder/name``, the safetensors weights a converter reads; when it is missing and the folder holds one
    of the ``pickled`` files instead, a :class:`LoadError` names it (loading a pickle can run code)."""
    path = folder / name
    if not path.is_file():
        found = [p for p in pickled if (folder / p).is_file()]
        if found:
            raise LoadError(
                f"{converter} reads {path}, which is missing; {folder} has {found[0]}, which it does not "
                "unpickle (loading a pickle can run code): save the model again with "
                "save_pretrained(..., safe_serialization=True)"
            )
    return path


def read_hf_weights(src: Path, converter: str) -> State:
    """``src/model.safetensors``; a folder with only a pickled checkpoint is refused, naming the file."""
    return read_state(safetensors_path(src, "model.safetensors", PICKLED, converter))


IGNORED = (r"(^|\.)position_ids$",)
"""Source tensors every converter may leave unused (regular expressions searched in the key): buffers
transformers derives from the config (``position_ids``), never learnt weights."""


CAUSAL_MASK_BUFFERS = r"(^|\.)h\.\d+\.attn\.(masked_)?bias$"
"""GPT-2-style checkpoints (GPT-2, ImageGPT) saved by older transformers hold each layer's causal mask
(``h.<i>.attn.bias``) and masking value (``attn.masked_bias``) as tensors: buffers, not weights."""


class TrackedState(dict):
    """A source state dict that records which keys a converter's mapping reads (``[]`` and ``get``) in
    ``.read``, so the converter can refuse a checkpoint whose tensors it did not all use."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``dict.get``, recording the key as read."""
        self.read.add(key)
        return super().get(key, default)


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The weights file of a diffusers model folder (``save_pretrained`` with safe serialisation)."""

DIFFUSERS_PICKLED = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.ckpt")
"""diffusers' pickled weight files: named in the error, never loaded."""


def read_diffusers_folder(folder: Path, converter: str) -> tuple[dict[str, Any], Path]:
    """A diffusers model folder's ``config.json`` (a JSON object) and the path of its safetensors weights; a
    :class:`LoadError` names a pickled weights file found instead (loading a pickle can run code)."""
    cfg = read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise LoadError(f"{folder / 'config.json'} is not a diffusers config (expected a JSON object)")
    return cfg, safetensors_path(folder, DIFFUSERS_WEIGHTS, DIFFUSERS_PICKLED, converter)


def check_all_used(weights: State, used: Iterable[str], source: str, label: str, ignore: Iterable[str] = ()) -> None:
    """Raise a :class:`LoadError` naming every tensor of ``weights`` that is neither in ``used`` nor
    matched by a pattern of :data:`IGNORED` or ``ignore`` (a converter never drops a weight silently:
    a config asking for fewer layers than the file holds, or another architecture's extra head)."""
    patterns = [re.compile(p) for p in (*IGNORED, *ignore)]
    used = set(used)
    unused = sorted(k for k in weights if k not in used and not any(p.search(k) for p in patterns))
    if unused:
        shown = ", ".join(unused[:6]) + (f", … ({len(unused)} in all)" if len(unused) > 6 else "")
        raise LoadError(
            f"{source}: {len(unused)} unused tensor(s) the {label} conversion would drop: {shown}; "
            "does config.json ask for fewer layers than the weights hold, or are they another architecture's?"
        )


def convert_hf_folder(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    converter: str,
    model_type: str,
    label: str,
    build_model: Callable[[dict[str, Any], State, str], M],
    rename_state: Callable[[State, M], State],
    extras: Callable[[M, State, State], str] | None = None,
    tokenizer: Callable[[Path, M], bool] | None = None,
    ignore: tuple[str, ...] = (),
) -> M:
    """Convert the transformers folder ``src`` (``config.json`` + ``model.safetensors``) into a model;
    writes a model folder to ``dst`` (atomically, with ``model.save``) when given.

    ``converter`` is the converter's registered name (``"hf-vit"``), ``model_type`` the config's
    ``model_type``, ``label`` the architecture as messages name it (``"ViT"``). The family supplies:

    * ``build_model(hf, weights, source)``: the model for the config dict ``hf`` (``weights`` for
      what the config does not say, e.g. the number of classes); ``source`` names the config file
      for error messages;
    * ``rename_state(weights, model)``: the transformers state dict in the model's names; a missing
      source key (``KeyError``) is reported as a missing weight of the file;
    * ``extras(model, state, weights)``: optional; adds what is not a renamed weight to ``state`` or
      refuses what the model cannot express, and returns a note for the model card ('' for none);
    * ``tokenizer(src, model)``: optional; attaches the folder's tokenizer to the model and returns
      whether the folder had one (a ``ValueError`` is reported naming the folder);
    * ``ignore``: regular expressions (searched in the key) of source tensors the family leaves out on
      purpose (ViT's unused pooler, GPT-2's causal-mask buffers), besides :data:`IGNORED`.

    Every source tensor must be read by ``rename_state`` or ``extras`` (or be ignorable): an unused one
    is a :class:`LoadError` naming it (see :func:`check_all_used`). Source tensors of another dtype
    (float16, bfloat16) are cast to the model's, and the model card says so. The state is loaded strictly
    (missing, unexpected and mis-shaped keys fail together), and the model is returned in eval mode.
    Nothing is unpickled.
    """
    src = Path(src)
    if dst is not None:  # before any work: never write over a folder of other files (a model folder is replaced)
        check_output(dst, overwrite=True, flag="dst")
    hf = read_hf_config(src, converter, model_type, label)
    weights = TrackedState(read_hf_weights(src, converter))
    model = build_model(hf, weights, f"{converter} ({src / 'config.json'})")
    try:
        state = rename_state(weights, model)
    except KeyError as exc:
        raise LoadError(f"{src / 'model.safetensors'} lacks the {label} weight {exc.args[0]!r}") from exc
    note = extras(model, state, weights) if extras is not None else ""
    check_all_used(weights, weights.read, str(src / "model.safetensors"), label, ignore)
    own = model.state_dict()
    casts = sorted({f"{v.dtype} to {own[k].dtype}" for k, v in state.items() if k in own and v.dtype != own[k].dtype})
    if casts:  # a converted model computes in its own dtype; the card says what was cast
        note += f" (weights cast from {', '.join(c.replace('torch.', '') for c in casts)})"
    load_state_strict(model, state, f"{src} (converted from transformers {label})")
    if tokenizer is not None:
        try:
            if not tokenizer(src, model):
                note += " (no tokenizer files: the model takes token ids only)"
        except LoadError:
            raise
        except ValueError as exc:
            raise LoadError(f"{src}: {exc}") from exc
    model.eval()
    if dst is not None:
        model.save(
            dst,
            source=f"converted from the transformers {label} {_described(src)} with "
            f"`polymodal convert --from {converter}`{note}",
        )
    return model


def _described(src: Path) -> str:
    """How a model card names a converted folder: a Hugging Face Hub snapshot
    (``…/models--ORG--NAME/snapshots/COMMIT``) as its repository and commit, else ``folder NAME``."""
    storage = src.parent.parent
    if src.parent.name == "snapshots" and storage.name.startswith("models--"):
        repo = storage.name[len("models--") :].replace("--", "/")
        return f"model hf:{repo} (commit {src.name[:12]}, from the Hugging Face Hub)"
    return f"folder {src.name}"


ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}
"""transformers ``hidden_act`` names → the core MLP's activation names."""


def activation(hf: dict, source: str, default: str = "gelu") -> str:
    """The core activation for a config's ``hidden_act``; unsupported ones raise naming ``source``."""
    act = hf.get("hidden_act", default)
    if act not in ACTIVATIONS:
        raise LoadError(f"{source}: unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def mlp_ratio_for(dim: int, hidden: int, source: str = "converter") -> float:
    """The ``mlp_ratio`` whose MLP width ``int(dim * ratio)`` is exactly ``hidden``.

    ``hidden / dim`` alone can land one ulp low (``int(11 * (30 / 11)) == 29``), so step it up.
    """
    for name, value in (("hidden_size", dim), ("intermediate_size", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoadError(f"{source}: {name} must be a positive integer; got {value!r}")
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def square_side(hf: dict, key: str, default: int, source: str = "converter") -> int:
    """``image_size``/``patch_size`` as one int (transformers also accepts a square [h, w] pair)."""
    value = hf.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise LoadError(f"{source} supports square {key} only; got {value!r}")
        value = value[0]
    return value


def gpt2_state(src: dict, depth: int, stack: str, *, norm_bias: bool = True) -> dict:
    """A transformers GPT-2-style decoder (GPT-2, ImageGPT) renamed into core names.

    ``src`` is the transformers state dict (with or without the ``transformer.`` prefix);
    ``stack`` is the model's attribute holding the core :class:`~polymodal.nn.TransformerStack`
    (``"stack."``, ``"blocks."``). Conv1D weights, stored (in, out), are transposed into
    ``nn.Linear``'s (out, in); ``c_attn`` is the fused query/key/value projection. Norm biases
    are read when ``norm_bias`` (ImageGPT's RMS-style norms have none).
    """
    prefix = "transformer." if any(k.startswith("transformer.") for k in src) else ""

    def get(key: str):
        return src[prefix + key]

    out = {
        "token_embed.weight": get("wte.weight"),
        "pos_embed.weight": get("wpe.weight").unsqueeze(0),  # (1, N, D)
        f"{stack}norm.weight": get("ln_f.weight"),
    }
    if norm_bias:
        out[f"{stack}norm.bias"] = get("ln_f.bias")
    for i in range(depth):
        theirs_block, ours_block = f"h.{i}.", f"{stack}blocks.{i}."
        for ours, theirs in {"norm1": "ln_1", "norm2": "ln_2"}.items():
            out[ours_block + ours + ".weight"] = get(theirs_block + theirs + ".weight")
            if norm_bias:
                out[ours_block + ours + ".bias"] = get(theirs_block + theirs + ".bias")
        for ours, theirs in {
            "attn.qkv": "attn.c_attn",
            "attn.proj": "attn.c_proj",
            "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj",
        }.items():
            out[ours_block + ours + ".weight"] = get(theirs_block + theirs + ".weight").t().contiguous()  # (out, in)
            out[ours_block + ours + ".bias"] = get(theirs_block + theirs + ".bias")
    return out


def t5_stack_state(src: dict, depth: int, stack: str, *, prefix: str = "encoder.", source: str = "T5") -> dict:
    """A transformers T5 (T5, T5 v1.1, mT5) stack renamed into core names: the encoder, or the decoder
    (``prefix="decoder."``, whose blocks also cross-attend: ``cross_attention=True``, causal buckets).

    ``src`` is the transformers state dict; ``prefix`` the T5 stack's; ``stack`` the model's attribute
    holding the :class:`~polymodal.nn.TransformerStack` (``"stack."``), built with ``norm="rmsnorm"``, no
    biases, ``attn_scale=1.0``, ``position_bias="t5"`` and ``act`` ``"relu"`` (``wi``) or a gated one
    (``wi_0`` is the gate, ``wi_1`` the linear branch: mT5's ``gated-gelu`` is ``"geglu_tanh"``). The token
    table (``shared.weight``) is the caller's. Separate q, k, v become the fused ``qkv`` (and k, v the
    cross-attention's ``kv``); a model whose ``num_heads * d_kv`` differs from ``d_model`` (mT5-small:
    6 × 64 vs 512) is refused: the core's head width is ``dim // heads``.
    """

    def get(key: str):
        return src[prefix + key]

    def attention(ours: str, theirs: str, fused: str) -> None:
        q, k, v = (get(f"{theirs}.{n}.weight") for n in "qkv")  # (inner, D) each
        if q.shape[0] != q.shape[1]:
            raise LoadError(
                f"{source}: num_heads * d_kv must equal d_model (the core's head width is dim // heads); "
                f"got q of shape {tuple(q.shape)}"
            )
        if fused == "qkv":
            out[ours + "qkv.weight"] = torch.cat([q, k, v])  # (3 D, D)
        else:
            out[ours + "q.weight"], out[ours + "kv.weight"] = q, torch.cat([k, v])  # (D, D), (2 D, C)
        out[ours + "proj.weight"] = get(f"{theirs}.o.weight")

    out = {
        f"{stack}norm.weight": get("final_layer_norm.weight"),
        f"{stack}relative_bias.embedding.weight": get("block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    }
    for i in range(depth):
        theirs, ours = f"block.{i}.layer.", f"{stack}blocks.{i}."
        attention(ours + "attn.", f"{theirs}0.SelfAttention", "qkv")
        out[ours + "norm1.weight"] = get(f"{theirs}0.layer_norm.weight")
        cross = prefix + f"{theirs}1.EncDecAttention.q.weight" in src
        if cross:
            attention(ours + "cross_attn.", f"{theirs}1.EncDecAttention", "kv")
            out[ours + "norm_cross.weight"] = get(f"{theirs}1.layer_norm.weight")
        out[ours + "norm2.weight"] = get(f"{theirs}{1 + cross}.layer_norm.weight")
        ff = f"{theirs}{1 + cross}.DenseReluDense."
        if prefix + ff + "wi_0.weight" in src:  # gated: act(wi_0 x) * wi_1 x
            out[ours + "mlp.gate.weight"] = get(ff + "wi_0.weight")
            out[ours + "mlp.fc1.weight"] = get(ff + "wi_1.weight")
        else:
            out[ours + "mlp.fc1.weight"] = get(ff + "wi.weight")
        out[ours + "mlp.fc2.weight"] = get(ff + "wo.weight")
    return out


def unsupported(model: str, option: str, value: Any, allowed: Any, source: str) -> ValueError:
    """The error for a reference config option that ``model`` cannot express: names the option, the value given
    and what is supported (``source``: the folder or config it came from)."""
    return ValueError(f"{source}: the {model} cannot express {option}={value!r} (supported: {allowed})")


def check_diffusers_class(
    cfg: dict, class_name: str, fixed: dict[str, tuple], *, converter: str, model: str, source: str
) -> None:
    """Refuse a diffusers ``config.json`` of another ``_class_name`` (naming ``converter``), or one whose option in
    ``fixed`` (option → the values ``model`` expresses, diffusers' default first) holds anything else."""
    name = cfg.get("_class_name", class_name)
    if name != class_name:
        raise ValueError(f"{source}: {converter} reads {class_name} folders; config.json has _class_name {name!r}")
    for option, allowed in fixed.items():
        value = cfg.get(option, allowed[0])
        if value not in allowed:
            raise unsupported(model, option, value, ", ".join(map(repr, allowed)), source)


def mapped_state(
    weights: TrackedState, module: nn.Module, mapper: Callable[..., dict], path: Path | str, class_name: str
) -> dict[str, torch.Tensor]:
    """``mapper(weights, module)``: a reference's weights under ``module``'s names, cast to its dtypes. A weight the
    mapper asks for that ``path`` lacks, or one of ``path``'s it leaves unread, is a LoadError naming it."""
    try:
        state = mapper(weights, module)
    except KeyError as exc:
        raise LoadError(f"{path} lacks the {class_name} weight {exc.args[0]!r}") from exc
    check_all_used(weights, weights.read, str(path), class_name)
    own = module.state_dict()
    return {k: v.to(own[k].dtype) for k, v in state.items()}
