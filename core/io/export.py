"""Exporting model folders: to another library's format (``polymodal export DIR OUT --to hf``) and as
weights only (``polymodal export DIR OUT --weights-only``, the folder without its training checkpoint).

An :class:`Exporter` (registry kind ``exporter``) writes one family's model into a new folder in a target
format; :func:`export_folder` picks it by the folder's family and the target, checks the output and
writes it atomically. :func:`invert_state` turns a converter's transformers → polymodal key map around,
so an exporter reuses its family's converter instead of a second table, and :func:`config_differences`
lists the settings a round trip through the target's config would lose (an exporter refuses those).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import torch

from polymodal.io.folders import FORMAT, LoadError, load_model, read_json, replace_folder, save_state
from polymodal.io.output import CHECKPOINT, OutputError, check_output, folder_kind, output_folder, output_lock

State = dict[str, torch.Tensor]

MARK = "polymodal_export"
"""The key an exported transformers ``config.json`` carries (the source family and format): a folder with
it was written by :func:`export_folder`, so ``--overwrite`` may replace it."""


NEEDS_TRANSFORMERS = "exporting to transformers needs the transformers package (pip install transformers)"
"""The message of the :class:`ExportError` an exporter raises when transformers is not installed."""


class ExportError(ValueError):
    """A model that the target format cannot express; the message names the setting."""


@dataclass(frozen=True)
class Exporter:
    """Writes a model of ``family`` in the format ``to`` (``"hf"``: a transformers folder).

    ``write(model, folder)`` fills the new, empty ``folder`` (it is swapped into place afterwards) and
    raises :class:`ExportError` naming a setting the format cannot express; ``label`` says what is
    written (``"transformers ViTForImageClassification"``).
    """

    family: str
    to: str
    write: Callable[[Any, Path], None]
    label: str = ""


def exporter_for(family: str, to: str) -> Exporter:
    """The registered exporter of ``family`` to ``to``; an :class:`ExportError` lists the available ones."""
    from polymodal.registry import get_registry

    found = [e.obj for e in get_registry().entries("exporter")]
    for exporter in found:
        if exporter.family == family and exporter.to == to:
            return exporter
    offered = ", ".join(sorted(f"{e.family} → {e.to}" for e in found)) or "none"
    raise ExportError(f"no exporter writes a {family!r} model folder as {to!r}; installed exporters: {offered}")


def _check_target(out: Path, overwrite: bool) -> None:
    """``out`` must be new or empty, or (with ``overwrite``) a folder an earlier export wrote."""
    absolute = Path(os.path.abspath(out.expanduser()))
    kind, detail = folder_kind(absolute)
    if kind in ("missing", "empty"):
        check_output(absolute, flag="OUT")  # the current folder, a path under a file, permissions
        return
    header = read_json(absolute / "config.json") if (absolute / "config.json").is_file() else None
    if kind == "other" and isinstance(header, dict) and MARK in header:
        if not overwrite:
            raise OutputError(f"OUT {out} already holds an exported model; pass --overwrite to replace it")
        here = Path.cwd().resolve()
        if absolute.resolve() == here or absolute.resolve() in here.parents:
            raise OutputError(f"OUT {out} is the current folder or a folder above it; name a folder of its own")
        return
    held = {"model": f"a polymodal {detail} model folder", "run": "a polymodal training checkpoint"}.get(kind, detail)
    raise OutputError(
        f"OUT {out} is not a folder an export wrote (it holds {held}); exporting there would delete what it "
        "holds, so choose a new or empty folder (--overwrite only replaces an earlier export)"
    )


def _model_family(src: Path) -> str:
    """The family of the model folder ``src``; a :class:`LoadError` says what ``src`` is instead."""
    kind, detail = folder_kind(src)
    if kind != "model":
        what = {"missing": "does not exist", "empty": "is empty", "run": "holds only a training checkpoint"}
        raise LoadError(f"DIR {src} is not a polymodal model folder ({what.get(kind, f'it holds {detail}')})")
    return str(detail)


def _same_or_nested(src: Path, out: Path) -> None:
    a, b = Path(os.path.abspath(src)).resolve(), Path(os.path.abspath(out.expanduser())).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise OutputError(f"OUT {out} is the model folder {src}, or inside it or around it; choose a separate folder")


def export_folder(src: str | Path, out: str | Path, *, to: str = "hf", overwrite: bool = False) -> Path:
    """Export the model folder ``src`` as ``to`` (``"hf"``) into the new folder ``out``; returns ``out``.

    The model is loaded strictly (:func:`polymodal.io.load_model`) and written by its family's
    :class:`Exporter`; ``out`` is checked and locked first and filled atomically (built aside, then swapped
    in). ``out`` must be new or empty, or, with ``overwrite``, the folder of an earlier export.
    """
    src, out = Path(src), Path(out)
    exporter = exporter_for(_model_family(src), to)  # before loading: a family without one fails at once
    _same_or_nested(src, out)
    _check_target(out, overwrite)
    model = load_model(src)
    with output_lock(out, flag="OUT"):
        _check_target(out, overwrite)
        replace_folder(out, lambda tmp: exporter.write(model, tmp))
    return out


def export_weights_only(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the model folder ``src`` to ``out`` without its training checkpoint (``checkpoint/``: the
    optimiser state, several times the weights); returns ``out``.

    ``src`` must be a polymodal model folder; ``out`` is guarded as ``polymodal train --out`` is (new, empty,
    or with ``overwrite`` a model folder) and written atomically. The copy loads as the original does.
    """
    src, out = Path(src), Path(out)
    family = _model_family(src)
    _same_or_nested(src, out)

    def fill(tmp: Path) -> None:
        for entry in sorted(src.iterdir()):
            if entry.name == CHECKPOINT or entry.name.startswith("."):  # swap leftovers, locks
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, ignore=shutil.ignore_patterns(".*"))
            else:
                shutil.copy2(entry, tmp / entry.name)

    with output_folder(out, family=family, overwrite=overwrite, flag="OUT"):
        replace_folder(out, fill)
    return out


# -- helpers for exporters to transformers -------------------------------------------------------------


def config_differences(ours: Any, back: Any, ignore: Iterable[str] = (), prefix: str = "") -> list[str]:
    """``"path: ours vs back"`` for every config field (nested ones by dotted path) where ``ours`` and the
    config a converter makes of the export (``back``) differ: what the target format cannot express.
    Fields in ``ignore`` (dotted paths, or names that match at any depth) are training-only or re-derived;
    fields marked ``runtime`` (gradient checkpointing) do not change the function and are never compared."""
    ignore = set(ignore)
    found = []
    for f in attrs.fields(type(ours)):
        path = prefix + f.name
        if path in ignore or f.name in ignore or f.metadata.get("runtime"):  # runtime: how it runs, not what
            continue
        a, b = getattr(ours, f.name), getattr(back, f.name)
        if attrs.has(type(a)) and type(a) is type(b):
            found += config_differences(a, b, ignore, path + ".")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12)):
            found.append(f"{path}={a!r} (the export would read back as {b!r})")
    return found


def refuse_differences(label: str, config_name: str, differences: list[str]) -> None:
    """Raise an :class:`ExportError` naming every setting in ``differences`` (nothing when empty)."""
    if differences:
        raise ExportError(
            f"cannot export to {label}: it has no counterpart for {config_name}."
            + f"; {config_name}.".join(differences)
        )


def invert_state(
    forward: Callable[[State], State], target: dict[str, tuple[int, ...]], ours: State, label: str
) -> State:
    """The state dict with the keys and shapes of ``target`` that ``forward`` (a converter's
    transformers → polymodal renaming) maps to ``ours``: the converter's key map run backwards.

    ``forward`` is run once on index tensors (every element of ``target`` numbered), so renames, fused
    q/k/v, transposes and reshapes are all inverted without a second table. Every tensor of ``ours`` must
    be produced and every element of ``target`` covered, else an :class:`ExportError` names the keys.
    """
    index, offset = {}, 0
    for key, shape in target.items():
        n = math.prod(shape)
        index[key] = torch.arange(offset, offset + n, dtype=torch.int64).reshape(shape)
        offset += n
    mapped = forward(index)
    dropped = sorted(set(ours) - set(mapped))
    if dropped:
        raise ExportError(f"the {label} export would drop the weight(s) {', '.join(dropped[:6])}")
    extra = sorted(set(mapped) - set(ours))
    if extra:
        raise ExportError(f"the {label} export needs weight(s) the model lacks: {', '.join(extra[:6])}")
    dtypes = {v.dtype for v in ours.values()}
    if len(dtypes) != 1:
        raise ExportError(f"the {label} export needs one dtype for all weights; got {sorted(map(str, dtypes))}")
    flat = torch.zeros(offset, dtype=dtypes.pop())
    covered = torch.zeros(offset, dtype=torch.bool)
    for key, idx in mapped.items():
        value = ours[key].detach().cpu()
        if tuple(idx.shape) != tuple(value.shape):
            raise ExportError(f"the {label} export maps {key} {tuple(value.shape)} to shape {tuple(idx.shape)}")
        flat[idx.reshape(-1)] = value.reshape(-1)
        covered[idx.reshape(-1)] = True
    missing = [k for k, idx in index.items() if not bool(covered[idx.reshape(-1)].all())]
    if missing:
        raise ExportError(f"the {label} export leaves the weight(s) {', '.join(missing[:6])} unset")
    return {k: flat[idx.reshape(-1)].reshape(idx.shape).clone() for k, idx in index.items()}


def hf_shapes(
    transformers: Any, architecture: str, hf_config: Any, ignore: Iterable[str] = ()
) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the ``model.safetensors`` that ``transformers.<architecture>(hf_config)``'s
    ``save_pretrained`` writes, without the tensors matched by the regular expressions in ``ignore``
    (buffers, tied weights). The model is built on the meta device (no memory, no initialisation).

    ``transformers`` is the module, imported by the exporter (the core never imports it): transformers 5
    renames some modules, and saves (and the converters read) the names files have always had.
    """
    import re

    from polymodal.io.hf import IGNORED

    patterns = [re.compile(p) for p in (*IGNORED, *ignore)]
    with torch.device("meta"):
        module = getattr(transformers, architecture)(hf_config)
    state = module.state_dict()
    revert = getattr(getattr(transformers, "modeling_utils", None), "revert_weight_conversion", None)
    if revert is not None:  # transformers 4 has none: the module's names are the file's
        state = revert(module, state)
    return {k: tuple(v.shape) for k, v in state.items() if not any(p.search(k) for p in patterns)}


def hf_activation(act: str, field_name: str) -> str:
    """The transformers ``hidden_act`` of the core activation ``act`` (the inverse of
    :data:`polymodal.io.hf.ACTIVATIONS`; ``gelu_tanh`` → ``gelu_pytorch_tanh``, the same function);
    an :class:`ExportError` names ``field_name`` for one transformers lacks (``swiglu``)."""
    from polymodal.io.hf import ACTIVATIONS

    theirs = {ours: name for name, ours in ACTIVATIONS.items()}  # the last transformers name of each wins
    if act not in theirs:
        raise ExportError(f"cannot export to transformers: {field_name}={act!r} has no transformers activation")
    return theirs[act]


def write_hf_folder(folder: Path, hf_config: Any, state: State, *, family: str, card: str) -> None:
    """Write ``config.json`` (``hf_config``, marked with :data:`MARK`) and ``model.safetensors`` as
    ``save_pretrained`` does, and a ``README.md`` saying where the weights came from."""
    hf_config.save_pretrained(folder)
    header = read_json(folder / "config.json")
    header[MARK] = {"family": family, "format": FORMAT}
    (folder / "config.json").write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    save_state(folder / "model.safetensors", state, {"format": "pt"})
    (folder / "README.md").write_text(card)


def write_hf_image_processor(model: Any, folder: Path, processor_type: str) -> bool:
    """Write ``preprocessor_config.json``: a transformers image processor (``processor_type``, e.g.
    ``ViTImageProcessor``) that prepares images as :meth:`polymodal.models.PolymodalModel.preprocess` does
    (bilinear resize to the model's size, 0–255 → [0, 1], the family's mean and std when it has them).
    Returns False (writing nothing) for a model without an :meth:`image_spec`."""
    spec = model.image_spec() if hasattr(model, "image_spec") else None
    if spec is None:
        return False
    c = spec.channels
    config = {
        "image_processor_type": processor_type,
        "do_resize": True,
        "size": {"height": spec.size, "width": spec.size},
        "resample": 2,  # PIL.Image.BILINEAR
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": bool(spec.mean),
        "image_mean": list(spec.mean) or [0.0] * c,
        "image_std": list(spec.std) or [1.0] * c,
        "do_convert_rgb": c == 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def write_hf_tokenizer(tokenizer: Any, folder: Path, max_length: int, *, add_eos: bool | None = None) -> bool:
    """Write a byte-level BPE tokenizer (:class:`polymodal.data.tokenizers.BPETokenizer`) as transformers
    reads one: ``tokenizer.json`` and a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast`` and the
    special tokens. A post-processor adds the start and end tokens as the tokenizer does (``add_eos``
    overrides the end token: a language model's prompt has none), so ``tokenizer(text)`` gives the ids
    the model was trained on. Returns False (writing nothing) for no tokenizer or another kind (bytes)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from polymodal.data.tokenizers import BPETokenizer

    if not isinstance(tokenizer, BPETokenizer):
        return False
    tok = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    specials = tokenizer.specials
    ends = [
        r for r, on in (("bos", tokenizer.add_bos), ("eos", tokenizer.add_eos if add_eos is None else add_eos)) if on
    ]
    if ends:
        template = " ".join([specials["bos"]] * ("bos" in ends) + ["$A"] + [specials["eos"]] * ("eos" in ends))
        used = {specials[r]: tokenizer.special_tokens[r] for r in ends}
        tok.post_processor = TemplateProcessing(single=template, special_tokens=list(used.items()))
    tok.save(str(folder / "tokenizer.json"))
    names = {f"{role}_token": text for role, text in specials.items() if role in ("bos", "eos", "pad")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **names}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


__all__ = [
    "MARK",
    "ExportError",
    "Exporter",
    "config_differences",
    "export_folder",
    "export_weights_only",
    "exporter_for",
    "hf_activation",
    "hf_shapes",
    "invert_state",
    "refuse_differences",
    "NEEDS_TRANSFORMERS",
    "write_hf_folder",
    "write_hf_image_processor",
    "write_hf_tokenizer",
]
