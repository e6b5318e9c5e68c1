"""Hand-written caption tables for the shapes and digits in English, Russian, French and Chinese.

Nothing is translated at run time. Templates are *aligned*: id ``t`` of every language translates id ``t``
of English, the English datasets' ``TRAIN_TEMPLATES + HELDOUT_TEMPLATES`` (shapes 0–5, digits 0–11).
Each language keeps some ids for evaluation only (:data:`SHAPES_HELDOUT`, :data:`DIGITS_HELDOUT`):
English exactly the English datasets' held-out ones; the first of those is held out in every language
(a phrasing never trained), and each other language also holds out ids other languages train on.

Shapes slots: ``{colour}``, ``{kind}``, ``{where}``, words agreeing in gender with the kind's noun
(Russian ``{one}``, ``{placed}``, ``{visible}``; French ``{a}``, ``{one}``, ``{placed}``) and Russian
``{colour_gen}`` (genitive: "круг красного цвета"). French colours follow the noun and agree ("une
croix verte"); Chinese has no spaces or gender. Two objects are joined with the language's conjunction
(Chinese with a comma: "和" joins nouns, not clauses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.data import digits as _digits
from polymodal.data import shapes as _shapes

LANGUAGES: tuple[str, ...] = ("en", "ru", "fr", "zh")
"""Language codes (ISO 639-1) of the caption tables, in the order datasets list them."""

LANGUAGE_NAMES: dict[str, str] = {"en": "English", "ru": "русский", "fr": "français", "zh": "中文"}
"""Language code → the language's own name for itself."""


@dataclass(frozen=True)
class ShapesLexicon:
    """One language's words and templates for the shapes scenes, in the orders of ``shapes.py``.

    ``colours``: per colour, one form per gender of ``genders``, then the forms ``extra`` names; ``kinds``:
    ``(noun, gender)``; ``where``: per position, the caption's phrase; ``agree``: slot → one word per
    gender; ``templates``: ids 0–5; ``prompt``, ``name``: one colour × kind as prompt and class name.
    """

    colours: tuple[tuple[str, ...], ...]
    kinds: tuple[tuple[str, str], ...]
    where: tuple[str, ...]
    templates: tuple[str, ...]
    conjunction: str
    prompt: str
    name: str
    genders: tuple[str, ...] = ("-",)
    agree: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)

    def fill(self, template: str, colour: int, kind: int, position: int = 4) -> str:
        """``template`` (a string with this lexicon's slots) filled for one object, genders agreeing."""
        noun, gender = self.kinds[kind]
        g = self.genders.index(gender)
        forms = self.colours[colour]
        slots = {"colour": forms[g], "kind": noun, "where": self.where[position]}
        slots |= {slot: words[g] for slot, words in self.agree.items()}
        slots |= {slot: forms[i] for slot, i in self.extra.items()}
        return template.format(**slots)


# fmt: off
_RU_WHERE = (  # the 3×3 grid, row by row, as in shapes.POSITIONS
    "в левом верхнем углу", "вверху",   "в правом верхнем углу",
    "слева",                "в центре", "справа",
    "в левом нижнем углу",  "внизу",    "в правом нижнем углу",
)
_FR_WHERE = (
    "en haut à gauche", "en haut",   "en haut à droite",
    "à gauche",         "au centre", "à droite",
    "en bas à gauche",  "en bas",    "en bas à droite",
)
# fmt: on

SHAPES: dict[str, ShapesLexicon] = {
    "en": ShapesLexicon(
        colours=tuple((c,) for c in _shapes.COLOURS),
        kinds=tuple((k, "-") for k in _shapes.KINDS),
        where=tuple(_shapes.WHERE[p] for p in _shapes.POSITIONS),
        templates=_shapes.TRAIN_TEMPLATES + _shapes.HELDOUT_TEMPLATES,
        conjunction=" and ",
        prompt="a {colour} {kind}",
        name="{colour} {kind}",
    ),
    "ru": ShapesLexicon(
        genders=("m", "f", "n"),
        colours=(  # masculine, feminine, neuter, then the genitive masculine ("красного цвета")
            ("красный", "красная", "красное", "красного"),
            ("зелёный", "зелёная", "зелёное", "зелёного"),
            ("синий", "синяя", "синее", "синего"),
            ("жёлтый", "жёлтая", "жёлтое", "жёлтого"),
            ("пурпурный", "пурпурная", "пурпурное", "пурпурного"),
            ("голубой", "голубая", "голубое", "голубого"),
        ),
        kinds=(("квадрат", "m"), ("круг", "m"), ("треугольник", "m"), ("крест", "m")),
        where=_RU_WHERE,
        agree={
            "one": ("один", "одна", "одно"),
            "placed": ("расположенный", "расположенная", "расположенное"),
            "visible": ("виден", "видна", "видно"),
        },
        extra={"colour_gen": 3},
        templates=(
            "{colour} {kind} {where}",  # красный круг слева
            "{where} {colour} {kind}",  # слева красный круг
            "{one} {colour} {kind} {where}",  # один красный круг слева
            "{placed} {where} {colour} {kind}",  # расположенный слева красный круг
            "{where} находится {kind} {colour_gen} цвета",  # слева находится круг красного цвета
            "{where} {visible} {colour} {kind}",  # слева виден красный круг
        ),
        conjunction=" и ",
        prompt="{colour} {kind}",
        name="{colour} {kind}",
    ),
    "fr": ShapesLexicon(
        genders=("m", "f"),
        colours=(  # masculine, feminine
            ("rouge", "rouge"),
            ("vert", "verte"),
            ("bleu", "bleue"),
            ("jaune", "jaune"),
            ("magenta", "magenta"),
            ("cyan", "cyan"),
        ),
        kinds=(("carré", "m"), ("cercle", "m"), ("triangle", "m"), ("croix", "f")),
        where=_FR_WHERE,
        agree={"a": ("un", "une"), "one": ("un seul", "une seule"), "placed": ("placé", "placée")},
        templates=(
            "{a} {kind} {colour} {where}",  # un cercle rouge à gauche
            "{where}, {a} {kind} {colour}",  # à gauche, un cercle rouge
            "{one} {kind} {colour} {where}",  # un seul cercle rouge à gauche
            "{a} {kind} {colour} {placed} {where}",  # une croix rouge placée à gauche
            "il y a {a} {kind} {where} qui est {colour}",  # il y a un cercle à gauche qui est rouge
            "{where}, on voit {a} {kind} {colour}",  # à gauche, on voit un cercle rouge
        ),
        conjunction=" et ",
        prompt="{a} {kind} {colour}",
        name="{kind} {colour}",
    ),
    "zh": ShapesLexicon(
        colours=(("红色",), ("绿色",), ("蓝色",), ("黄色",), ("品红色",), ("青色",)),
        kinds=(("正方形", "-"), ("圆形", "-"), ("三角形", "-"), ("十字形", "-")),
        where=("左上方", "上方", "右上方", "左边", "中间", "右边", "左下方", "下方", "右下方"),
        templates=(
            "一个{colour}的{kind}在{where}",  # a red circle is on the left
            "{where}有一个{colour}的{kind}",  # on the left there is a red circle
            "一个{colour}{kind}在{where}",  # one red circle on the left
            "一个{colour}的{kind}放在{where}",  # a red circle placed on the left
            "{where}有一个{kind}，它是{colour}的",  # on the left there is a circle; it is red
            "在{where}可以看到一个{colour}的{kind}",  # on the left you can see a red circle
        ),
        conjunction="，",
        prompt="{colour}的{kind}",
        name="{colour}{kind}",
    ),
}
"""Language code → the shapes lexicon of that language."""

SHAPES_HELDOUT: dict[str, tuple[int, ...]] = {"en": (4, 5), "ru": (3, 4), "fr": (2, 4), "zh": (1, 4)}
"""Language code → the shapes template ids held out for evaluation in that language (the rest train)."""

DIGIT_WORDS: dict[str, tuple[str, ...]] = {
    "en": _digits.DIGIT_WORDS,
    "ru": ("ноль", "один", "два", "три", "четыре", "пять", "шесть", "семь", "восемь", "девять"),
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
    "zh": ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九"),
}
"""Language code → the digit words, index = digit."""

DIGITS_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": _digits.TRAIN_TEMPLATES + _digits.HELDOUT_TEMPLATES,
    "ru": (
        "рукописная цифра {numeral}",
        "цифра {word}",
        "фотография числа {word}",
        "изображение 8×8 с цифрой {numeral}",
        "отсканированная цифра {numeral}",
        "число {numeral}, написанное от руки",
        "маленькая картинка с цифрой {word}",
        "это {word}",
        "рисунок цифры {word}",
        "кто-то написал число {numeral}",
        "{word} в низком разрешении",
        "рукописная цифра {word}",
    ),
    "fr": (
        "un {numeral} écrit à la main",
        "le chiffre {word}",
        "une photo du nombre {word}",
        "une image 8x8 d'un {numeral}",
        "un chiffre {numeral} numérisé",
        "le nombre {numeral} écrit à la main",
        "une petite image du chiffre {word}",
        "un {word}",
        "un dessin du chiffre {word}",
        "quelqu'un a écrit le nombre {numeral}",
        "un {word} en basse résolution",
        "le chiffre manuscrit {word}",
    ),
    "zh": (
        "手写的{numeral}",
        "数字{word}",
        "数字{word}的照片",
        "一张8×8的数字{numeral}图像",
        "扫描的数字{numeral}",
        "手写的数字{numeral}",
        "一张数字{word}的小图片",
        "这是{word}",
        "一幅数字{word}的画",
        "有人写下了数字{numeral}",
        "低分辨率的数字{word}",
        "手写的数字{word}",
    ),
}
"""Language code → the digits templates, aligned with English (ids 0–11); ``{numeral}`` is ``7``, ``{word}`` the word."""

DIGITS_HELDOUT = {"en": (8, 9, 10, 11), "ru": (1, 4, 8, 10), "fr": (2, 5, 8, 11), "zh": (3, 6, 8, 9)}
"""Language code → the digits template ids held out for evaluation in that language (the rest train)."""

DIGITS_PROMPT = {"en": "the digit {word}", "ru": "цифра {word}", "fr": "le chiffre {word}", "zh": "数字{word}"}
"""Language code → the evaluation prompt of one digit."""


def base_dataset(dataset: str) -> str:
    """``"shapes"`` or ``"digits"`` for a dataset name (``"shapes-multilingual"`` → ``"shapes"``)."""
    base = dataset.removesuffix("-multilingual")
    if base not in ("shapes", "digits"):
        raise ValueError(f"captions in several languages exist for shapes and digits only; got {dataset!r}")
    return base


def _language(language: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}; got {language!r}")
    return language


def template_ids(dataset: str, language: str, heldout: bool = False) -> tuple[int, ...]:
    """The template ids ``language`` trains on (``heldout=False``) or keeps for evaluation (``True``)."""
    fam = base_dataset(dataset)
    held = (SHAPES_HELDOUT if fam == "shapes" else DIGITS_HELDOUT)[_language(language)]
    if heldout:
        return held
    total = len(SHAPES[language].templates if fam == "shapes" else DIGITS_TEMPLATES[language])
    return tuple(t for t in range(total) if t not in held)


def template_texts(dataset: str, language: str, heldout: bool = False) -> list[str]:
    """The strings of :func:`template_ids` (fill them with :func:`caption_for`, not ``str.format``)."""
    ids = template_ids(dataset, language, heldout)  # checks both names first
    table = SHAPES[language].templates if base_dataset(dataset) == "shapes" else DIGITS_TEMPLATES[language]
    return [table[t] for t in ids]


def heldout_pairs(dataset: str) -> list[tuple[int, str]]:
    """Every evaluation-only ``(template id, language)`` pair of ``dataset``."""
    return [(t, lang) for lang in LANGUAGES for t in template_ids(dataset, lang, heldout=True)]


def _index(value: int | str, names: tuple[str, ...], what: str) -> int:
    index = (names.index(value) if value in names else -1) if isinstance(value, str) else int(value)
    if not 0 <= index < len(names):
        raise ValueError(f"unknown {what} {value!r}: an index below {len(names)} or one of {', '.join(names)}")
    return index


def shapes_caption(language: str, template: int, objects: list[tuple[int, int, int]]) -> str:
    """A scene's caption: template id ``template`` filled per ``(colour, kind, position)``, joined."""
    lex = SHAPES[_language(language)]
    return _scene(lex, lex.templates[template], objects)


def unplaced_caption(language: str, objects: list[tuple[int, int, int]]) -> str:
    """A scene's caption that names its objects but not where they are: each ``(colour, kind, position)`` in the
    language's short phrasing (its ``prompt``, "a red circle", "красный круг"), joined."""
    lex = SHAPES[_language(language)]
    return _scene(lex, lex.prompt, objects)


def _scene(lex: ShapesLexicon, template: str, objects: list[tuple[int, int, int]]) -> str:
    """``template`` filled per ``(colour, kind, position)`` object (a template without ``{where}`` drops the
    position), joined by the language's conjunction."""
    return lex.conjunction.join(lex.fill(template, c, k, p) for c, k, p in objects)


def digit_caption(language: str, template: int, label: int) -> str:
    """Template id ``template`` of ``language`` filled for digit ``label``."""
    word = DIGIT_WORDS[_language(language)][label]
    return DIGITS_TEMPLATES[language][template].format(numeral=str(label), word=word)


def caption_for(dataset: str, language: str, template: int, **attributes: int | str) -> str:
    """A caption in ``language`` from aligned template id ``template``.

    Shapes: ``colour``, ``kind`` (indices or English names) and ``position`` (index or English position
    name, default ``"center"``). Digits: ``label``.
    """
    if base_dataset(dataset) == "digits":
        return digit_caption(language, template, _index(attributes["label"], _digits.DIGIT_WORDS, "digit"))
    c = _index(attributes["colour"], tuple(_shapes.COLOURS), "colour")
    k = _index(attributes["kind"], _shapes.KINDS, "kind")
    p = _index(attributes.get("position", "center"), _shapes.POSITIONS, "position")
    return shapes_caption(language, template, [(c, k, p)])


def class_names(dataset: str, language: str) -> list[str]:
    """Class names in ``language``, index = label (shapes: ``colour * len(KINDS) + kind``)."""
    if base_dataset(dataset) == "digits":
        return list(DIGIT_WORDS[_language(language)])
    lex = SHAPES[_language(language)]
    return [lex.fill(lex.name, c, k) for c in range(len(lex.colours)) for k in range(len(lex.kinds))]


def evaluation_prompts(dataset: str, language: str) -> list[str]:
    """One prompt per class in ``language``, index = label: "a red circle", "красный круг",
    "un cercle rouge", "红色的圆形" (one-object shapes scenes); "the digit seven", "цифра семь" …"""
    if base_dataset(dataset) == "digits":
        return [DIGITS_PROMPT[_language(language)].format(word=w) for w in DIGIT_WORDS[language]]
    lex = SHAPES[_language(language)]
    return [lex.fill(lex.prompt, c, k) for c in range(len(lex.colours)) for k in range(len(lex.kinds))]
