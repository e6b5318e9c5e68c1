"""The options a family's ``sample_to_folder`` takes, declared by the family.

Every generative model has ``sample_to_folder(out, n=8, prompt=None, seed=0, **options)``.
What it accepts in ``options`` differs by family (guidance for DALL·E, an image to complete
for iGPT, nothing for a VQ-VAE), so the model class declares it::

    from polymodal.generation.options import TOKEN_SAMPLING, SampleOption

    class MyModel(PolymodalModel):
        sample_options = (*TOKEN_SAMPLING,
                          SampleOption("cfg_scale", "--cfg", "Classifier-free guidance scale."))

``polymodal sample DIR`` builds its command-line options from the declaration of DIR's family
(``polymodal sample DIR --help`` lists them); nothing family-specific is written in the CLI.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TYPES = ("float", "int", "text", "file", "files", "pair", "folder", "switch")
"""Value types an option may declare: numbers, free text, an existing file, one or more existing files
(``"files"``: the flag repeated, passed as a tuple of paths), two existing files after one flag (``"pair"``:
``--interpolate A.png B.png``, a tuple of two paths), an existing folder, or a switch."""


@dataclass(frozen=True)
class SampleOption:
    """One keyword of a family's ``sample_to_folder`` and the command-line flag that sets it.

    ``type`` is one of :data:`TYPES`. A ``"switch"`` takes no value on the command line: giving
    the flag passes ``value`` as the keyword (``--no-cache`` passes ``use_cache=False``).
    """

    keyword: str
    flag: str
    help: str
    type: str = "float"
    value: Any = True

    def __post_init__(self) -> None:
        if not self.keyword.isidentifier() or keyword.iskeyword(self.keyword):
            raise ValueError(f"SampleOption keyword must be a Python identifier; got {self.keyword!r}")
        if not self.flag.startswith("--") or len(self.flag) < 3 or " " in self.flag:
            raise ValueError(f"SampleOption flag must look like '--name'; got {self.flag!r}")
        if self.type not in TYPES:
            raise ValueError(f"SampleOption type must be one of {', '.join(TYPES)}; got {self.type!r}")


TEMPERATURE = SampleOption("temperature", "--temperature", "Softmax temperature (finite, > 0).")
TOP_K = SampleOption("top_k", "--top-k", "Sample among the k most likely tokens.", type="int")
TOP_P = SampleOption("top_p", "--top-p", "Nucleus sampling mass in (0, 1].")
NO_CACHE = SampleOption(
    "use_cache", "--no-cache", "Recompute the whole sequence each step (no KV cache).", type="switch", value=False
)
COMPLETE = SampleOption("complete", "--complete", "Complete the bottom half of this image.", type="file")

TOKEN_SAMPLING: tuple[SampleOption, ...] = (TEMPERATURE, TOP_K, TOP_P, NO_CACHE)
"""The options of every family that samples tokens with :func:`polymodal.generation.sampling.generate`."""


def sample_options(model_class: type) -> tuple[SampleOption, ...]:
    """The options ``model_class`` declares in ``sample_options`` (none when it declares nothing)."""
    declared = tuple(getattr(model_class, "sample_options", ()))
    bad = [o for o in declared if not isinstance(o, SampleOption)]
    if bad:
        raise ValueError(f"{model_class.__name__}.sample_options must hold SampleOption objects; got {bad[0]!r}")
    return declared


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a number > 0"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
}
"""Keyword → (test, what it must be) of the token-sampling values (temperature 0 is not greedy: pass greedy)."""


def check_sample_values(values: Mapping[str, Any], options: Iterable[SampleOption] = TOKEN_SAMPLING) -> None:
    """Raise a ValueError naming the first of ``values`` outside its range (:data:`VALUE_RULES`).

    Unset values (None) and keywords without a rule pass. A keyword declared in ``options`` is
    named by its flag too (``--temperature (temperature) must be …``), as the command line shows it.
    """
    flags = {o.keyword: o.flag for o in options}
    for key, value in values.items():
        rule = VALUE_RULES.get(key)
        if rule is None or value is None or rule[0](value):
            continue
        name = f"{flags[key]} ({key})" if key in flags else key
        finite = " (infinity and NaN are refused)" if _number(value) and not math.isfinite(value) else ""
        raise ValueError(f"{name} must be {rule[1]}, got {value!r}{finite}")


def keywords(options: tuple[SampleOption, ...]) -> tuple[str, ...]:
    """The ``sample_to_folder`` keywords of ``options``, in order."""
    return tuple(o.keyword for o in options)


__all__ = [
    "COMPLETE",
    "NO_CACHE",
    "TEMPERATURE",
    "TOKEN_SAMPLING",
    "TOP_K",
    "TOP_P",
    "TYPES",
    "VALUE_RULES",
    "SampleOption",
    "check_sample_values",
    "keywords",
    "sample_options",
]
