"""Text tokenizers: UTF-8 bytes, and byte-level BPE through Hugging Face's ``tokenizers``.

Both share one API (and satisfy :class:`polymodal.models.interfaces.Tokenizer`)::

    tok = ByteTokenizer()
    ids = tok.encode("a cat", max_length=16, truncate=True)   # [bos, 97, 32, ..., eos]
    batch, mask = tok.encode_batch(["a cat", "a dog"], context_length=16)  # (2, 16), (2, 16)
    tok.decode(ids)                                           # "a cat"

Truncation always keeps the end-of-text token, so models that pool at the ``eos``
position (CLIP) still find it; a text longer than the limit without ``truncate=True``
raises a ``ValueError`` naming its length and the limit. ``mask`` is True for real
tokens (the convention of :func:`polymodal.attention.attention`'s ``key_padding``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CONFIG_FILE = "polymodal_tokenizer.json"
"""The small JSON file that records a tokenizer's type and options inside a folder."""

DEFAULT_BPE_SPECIALS: dict[str, str] = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}
"""Role → token string of the special tokens :meth:`BPETokenizer.train` adds by default."""

# Spellings tried, in order, for each role when a tokenizer.json written elsewhere is loaded.
_ROLE_CANDIDATES = {
    "bos": ("<|startoftext|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>"),
    "eos": ("<|endoftext|>", "</s>", "<eos>", "[SEP]"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|endoftext|>"),
}


class _TextTokenizer:
    """Shared encode/encode_batch/decode logic; subclasses turn text into ids and back."""

    vocab_size: int
    special_tokens: dict[str, int]

    def __init__(self, add_bos: bool = True, add_eos: bool = True) -> None:
        self.add_bos, self.add_eos = add_bos, add_eos

    # subclasses implement these two
    def _text_to_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def _ids_to_text(self, ids: list[int], skip_special: bool) -> str:
        raise NotImplementedError

    def _cut(self, body: list[int], room: int) -> list[int]:
        """The first ``room`` ids of ``body`` (subclasses may back off to a character boundary)."""
        return body[:room]

    def encode(
        self,
        text: str,
        max_length: int | None = None,
        truncate: bool = False,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Ids of ``text`` with ``bos``/``eos`` (tokenizer defaults unless given).

        With ``max_length``, a longer result raises ``ValueError`` unless ``truncate``; truncation
        cuts the text and keeps the ``bos`` and ``eos`` tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        bos = [self.special_tokens["bos"]] if (self.add_bos if add_bos is None else add_bos) else []
        eos = [self.special_tokens["eos"]] if (self.add_eos if add_eos is None else add_eos) else []
        body = self._text_to_ids(text)
        total = len(bos) + len(body) + len(eos)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
            if total > max_length:
                if not truncate:
                    raise ValueError(
                        f"text encodes to {total} tokens, longer than the limit of {max_length}; "
                        "pass truncate=True to cut it (the end-of-text token is kept)"
                    )
                room = max_length - len(bos) - len(eos)
                if room < 0:
                    raise ValueError(
                        f"max_length {max_length} leaves no room for the {len(bos) + len(eos)} special tokens"
                    )
                body = self._cut(body, room)
        return bos + body + eos

    def encode_batch(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Encode and pad ``texts`` to ``context_length`` (longest text when None).

        Returns ``(ids, mask)``: LongTensor (B, L) padded with ``pad``, and bool (B, L) True
        for real tokens. ``kwargs`` (``add_bos``, ``add_eos``) go to :meth:`encode`.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t, context_length, truncate, **kwargs) for t in texts]
        length = context_length if context_length is not None else max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), self.special_tokens["pad"], dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | Tensor, skip_special: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D tensor); special tokens are dropped unless ``skip_special=False``."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects one sequence (N,), got shape {tuple(ids.shape)}; use decode_batch")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        if skip_special:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        return self._ids_to_text(ids, skip_special)

    def decode_batch(self, ids: Tensor | Sequence[Sequence[int]], skip_special: bool = True) -> list[str]:
        """Texts of a batch of sequences (B, L)."""
        return [self.decode(row, skip_special) for row in ids]


class ByteTokenizer(_TextTokenizer):
    """UTF-8 bytes as ids 0–255, then the special tokens (``bos``, ``eos``, ``pad``, extras) from 256.

    Round-trips any text exactly; no training, no files. Truncation backs off to a
    character boundary so a multi-byte character is never cut in half. Decoding ids that
    are not valid UTF-8 (e.g. from a sampler) shows U+FFFD for the broken bytes.
    """

    def __init__(
        self, specials: Sequence[str] = ("bos", "eos", "pad"), *, add_bos: bool = True, add_eos: bool = True
    ) -> None:
        super().__init__(add_bos, add_eos)
        specials = tuple(specials)
        missing = [s for s in ("bos", "eos", "pad") if s not in specials]
        if missing or len(set(specials)) != len(specials):
            raise ValueError(f"specials must be distinct names including bos, eos and pad; got {specials!r}")
        self.specials = specials
        self.special_tokens = {name: 256 + i for i, name in enumerate(specials)}
        self.vocab_size = 256 + len(specials)

    def _text_to_ids(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _ids_to_text(self, ids: list[int], skip_special: bool) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _cut(self, body: list[int], room: int) -> list[int]:
        while 0 < room < len(body) and (body[room] & 0xC0) == 0x80:  # a UTF-8 continuation byte
            room -= 1
        return body[:room]

    def save(self, directory: str | Path) -> Path:
        """Write ``polymodal_tokenizer.json`` into ``directory``; returns its path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        data = {"type": "bytes", "specials": list(self.specials), "add_bos": self.add_bos, "add_eos": self.add_eos}
        (path / CONFIG_FILE).write_text(json.dumps(data, indent=2))
        return path / CONFIG_FILE

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        """The tokenizer :meth:`save` wrote into ``directory``."""
        data = _read_config(directory, "bytes")
        return cls(data["specials"], add_bos=data["add_bos"], add_eos=data["add_eos"])


CJK_CHARACTER = "[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]"
"""One CJK ideograph (unified, extension A–F, compatibility), CJK symbol or full-width form: the characters
:meth:`BPETokenizer.train` isolates as words of their own by default."""


class BPETokenizer(_TextTokenizer):
    """Byte-level BPE (GPT-2/CLIP style) backed by a ``tokenizers.Tokenizer``.

    ``BPETokenizer()`` with no tokenizer is the merge-free byte-level model (256 byte
    tokens + specials); :meth:`train` learns merges from local text; :meth:`from_file`
    reads any ``tokenizer.json``. ``specials`` maps roles (``bos``, ``eos``, ``pad``) to token
    strings; when None the usual spellings are looked up, and ``bos``/``pad`` fall back to
    ``eos`` (GPT-2 has only ``<|endoftext|>``). Special-token strings inside user text are
    encoded as plain text, never as control tokens.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        specials: Mapping[str, str] | None = None,
        *,
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> None:
        super().__init__(add_bos, add_eos)
        if tokenizer is None:
            tokenizer = _empty_byte_bpe(dict(specials or DEFAULT_BPE_SPECIALS))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.specials = _resolve_specials(tokenizer, specials)
        self.special_tokens = {role: tokenizer.token_to_id(tok) for role, tok in self.specials.items()}

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _ids_to_text(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        specials: Mapping[str, str] | None = None,
        *,
        min_frequency: int = 2,
        add_bos: bool = True,
        add_eos: bool = True,
        isolate_cjk: bool = True,
    ) -> BPETokenizer:
        """Learn a byte-level BPE of ``vocab_size`` ids (specials included) from ``texts``.

        ``isolate_cjk``: every CJK ideograph and CJK punctuation mark is its own word before the byte-level
        split, as BERT's basic tokenizer does; without it an unspaced Chinese sentence is one word whose merges
        swallow whole phrases, so a new word order shares no token with the training text. A corpus without
        CJK characters trains the same tokenizer either way."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        specials = dict(specials or DEFAULT_BPE_SPECIALS)
        strings = list(dict.fromkeys(specials.values()))
        if vocab_size < 256 + len(strings):
            raise ValueError(
                f"vocab_size must be at least {256 + len(strings)} (256 bytes + specials), got {vocab_size}"
            )
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CJK_CHARACTER), "isolated"), byte_level])
            if isolate_cjk
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=strings,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, specials, add_bos=add_bos, add_eos=add_eos)

    @classmethod
    def from_file(cls, path: str | Path, specials: Mapping[str, str] | None = None, **kwargs: Any) -> BPETokenizer:
        """Load a ``tokenizer.json`` written by the ``tokenizers`` library (or :meth:`save`)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions for unreadable files
            raise ValueError(f"cannot read tokenizer file {path}: not valid tokenizer JSON ({exc})") from None
        return cls(tokenizer, specials, **kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``polymodal_tokenizer.json`` into ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        data = {"type": "bpe", "specials": self.specials, "add_bos": self.add_bos, "add_eos": self.add_eos}
        (path / CONFIG_FILE).write_text(json.dumps(data, indent=2))
        return path / "tokenizer.json"

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        """The tokenizer in ``directory`` (``polymodal_tokenizer.json`` optional)."""
        path = Path(directory)
        if not (path / CONFIG_FILE).exists():
            return cls.from_file(path / "tokenizer.json")
        data = _read_config(path, "bpe")
        return cls.from_file(
            path / "tokenizer.json", data["specials"], add_bos=data["add_bos"], add_eos=data["add_eos"]
        )


def load_tokenizer(directory: str | Path) -> ByteTokenizer | BPETokenizer:
    """Whichever tokenizer was saved in ``directory`` (a bare ``tokenizer.json`` loads as BPE)."""
    path = Path(directory)
    if (path / CONFIG_FILE).exists():
        kind = _read_json(path / CONFIG_FILE).get("type")
        if kind == "bytes":
            return ByteTokenizer.load(path)
        if kind == "bpe":
            return BPETokenizer.load(path)
        raise ValueError(f"{path / CONFIG_FILE}: unknown tokenizer type {kind!r}; expected 'bytes' or 'bpe'")
    if (path / "tokenizer.json").exists():
        return BPETokenizer.from_file(path / "tokenizer.json")
    raise FileNotFoundError(f"no {CONFIG_FILE} or tokenizer.json in {path}")


def _read_config(directory: str | Path, kind: str) -> dict[str, Any]:
    """The saved options of a ``kind`` tokenizer; a missing file or another type raises."""
    file = Path(directory) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    data = _read_json(file)
    if data.get("type") != kind:
        raise ValueError(f"{file} holds a {data.get('type')!r} tokenizer, expected {kind!r}")
    missing = [key for key in ("specials", "add_bos", "add_eos") if key not in data]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)} (written by an older or another program?)")
    return data


def _read_json(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; unreadable text, bad JSON or another JSON value raises a ValueError naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object; got a JSON {type(data).__name__}")
    return data


def _empty_byte_bpe(specials: dict[str, str]) -> Any:
    """A byte-level BPE with the 256 byte tokens, no merges, and ``specials`` added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in dict.fromkeys(specials.values())])
    return tok


def _resolve_specials(tokenizer: Any, specials: Mapping[str, str] | None) -> dict[str, str]:
    """Role → token string, checked against the vocabulary (see :class:`BPETokenizer`)."""
    if specials is not None:
        if "eos" not in specials:
            raise ValueError(f"specials must name at least eos; got roles {sorted(specials)}")
        eos = specials["eos"]
        out = {"bos": specials.get("bos", eos), "eos": eos, "pad": specials.get("pad", eos), **specials}
        for role, tok in out.items():
            if tokenizer.token_to_id(tok) is None:
                raise ValueError(f"special token {tok!r} ({role}) is not in the tokenizer's vocabulary")
        return out
    found = {
        role: next((t for t in cands if tokenizer.token_to_id(t) is not None), None)
        for role, cands in _ROLE_CANDIDATES.items()
    }
    if found["eos"] is None:
        raise ValueError(
            f"no end-of-text token found (tried {', '.join(_ROLE_CANDIDATES['eos'])}); pass specials={{'eos': ...}}"
        )
    return {role: tok or found["eos"] for role, tok in found.items()}


__all__ = ["BPETokenizer", "ByteTokenizer", "CONFIG_FILE", "DEFAULT_BPE_SPECIALS", "load_tokenizer"]
