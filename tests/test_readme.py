"""README.md cannot drift: every ```python block runs, every `polymodal …` command line parses.

Python blocks run in order, each in a fresh namespace (each must be complete, as a reader copies
it), in one empty temporary folder with a temporary ``POLYMODAL_CACHE``. The model folders that the
README's shell commands train to convergence (``runs/vit`` …, see :data:`FOLDERS`) are made there
first as new, untrained models of the same variant, so a block that loads one runs in seconds. A
block whose first line is :data:`SKIP_MARK` (with its reason) is compiled but not run; the README
has one: the judge block (it trains the digits judge, about a minute).

Command lines in ```bash and plain ``` blocks are resolved through :data:`polymodal.cli.main`
(groups, plugin families, sub-commands) and parsed by the command's own click parser with its
real options, without running it: an unknown option, a missing value, an extra or missing
argument, or a deprecated or unknown command fails the test. Synopsis brackets are expanded
(``[--seed S]`` → ``--seed S``; ``[--resume | --overwrite]`` and ``cpu|cuda`` → the first
alternative; ``...`` dropped). ``polymodal bench SUITE`` passes its options to the suite, so they
are checked against ``polymodal bench SUITE --help``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "# readme-test: skip"
"""First line of a Python block the test compiles but does not run; the reason follows it."""

FOLDERS: dict[str, tuple[str, dict[str, str]]] = {
    "runs/vit": ("vit", {}),
    "runs/clip": ("clip", {}),
    "runs/vqvae": ("vqvae", {}),
    "runs/imagebind": ("imagebind", {"clip": "runs/clip"}),
}
"""Folders the README's shell commands train (minutes each) that Python blocks load: made untrained."""

PLACEHOLDER_GROUPS = ("[FAMILY OPTIONS ...]",)
"""Synopsis groups that stand for options listed elsewhere (sample's family options, in the comment below it)."""


def blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number, body)`` of every fenced block of ``text``."""
    out, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```\s*(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), number + 1, []
        elif fence:
            out.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the block opened at line {start - 1} is never closed"
    return out


def python_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block, in order."""
    return [(line, body) for lang, line, body in blocks(README.read_text(encoding="utf-8")) if lang == "python"]


def command_lines() -> list[tuple[int, list[str]]]:
    """``(line, words)`` of every command in ```bash / ``` blocks, comments removed, shell continuations
    (a line ending in ``\\``) and synopsis continuation lines (``   [--x]``) joined to the command above."""
    out: list[tuple[int, list[str]]] = []
    for lang, start, body in blocks(README.read_text(encoding="utf-8")):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        lines: list[tuple[int, str]] = []
        for offset, line in enumerate(body.splitlines()):
            if lines and lines[-1][1].rstrip().endswith("\\"):
                lines[-1] = (lines[-1][0], lines[-1][1].rstrip()[:-1] + " " + line.strip())
            else:
                lines.append((offset, line))
        for offset, line in lines:
            text = line.strip()
            for group in PLACEHOLDER_GROUPS:
                text = text.replace(group, "")
            words = shlex.split(text, comments=True)
            if not words:
                continue
            if line[:1].isspace() and words[0].startswith("[") and out and out[-1][0] >= start:
                out[-1] = (out[-1][0], out[-1][1] + words)  # a synopsis continued on the next line
            else:
                out.append((start + offset, words))
    return out


def _words(segment: list[str]) -> list[str]:
    """A synopsis's words as one concrete command line: optional groups kept, the first of ``a | b``
    alternatives (and of ``cpu|cuda``) taken, ``...`` dropped."""
    out: list[str] = []
    depth, skipping = 0, False
    for word in segment:
        opens, closes = len(word) - len(word.lstrip("[")), len(word) - len(word.rstrip("]"))
        core = word.strip("[]")
        depth += opens
        if word == "|" and depth:  # the first alternative of a group is used
            skipping = True
        elif core and core != "..." and not skipping:
            out.append(core.split("|", 1)[0])
        depth -= closes
        if depth == 0:
            skipping = False
    return out


def commands() -> list[tuple[int, list[str]]]:
    """``(line, argv after 'polymodal')`` of every polymodal command line in the README (``a && b``,
    ``a ; b`` and, outside synopsis brackets, ``a | b`` are two commands); a launcher's ``-m polymodal
    ARGS`` (``torchrun … -m polymodal train …``) counts as ``polymodal ARGS``."""
    out = []
    for line, words in command_lines():
        segment: list[str] = []
        for word in [*words, "&&"]:
            depth = sum(w.count("[") - w.count("]") for w in segment)
            if word in ("&&", "||", ";") or (word == "|" and depth == 0):
                launched = [i for i in range(len(segment) - 1) if segment[i : i + 2] == ["-m", "polymodal"]]
                if segment[:1] == ["polymodal"]:
                    out.append((line, _words(segment[1:])))
                elif launched:
                    out.append((line, _words(segment[launched[0] + 2 :])))
                segment = []
            else:
                segment.append(word)
    return out


def _resolve(argv: list[str]) -> tuple[click.Command, click.Context, list[str], str]:
    """The command ``argv`` names (through groups), a context for it and its own arguments."""
    from polymodal.cli import main

    command: click.Command = main
    # the group's own settings (help_option_names): click caches each command's help option from the first
    # context it sees, so a bare context here would leave `polymodal bench -h` unknown for later tests
    ctx = click.Context(main, info_name="polymodal", resilient_parsing=True, **main.context_settings)
    args, path = list(argv), "polymodal"
    while isinstance(command, click.Group):
        assert args, f"`{path}` needs a command"
        name = args.pop(0)
        listed = command.list_commands(ctx)
        sub = command.get_command(ctx, name)
        assert sub is not None, f"`{path} {name}`: no such command; {path} has {', '.join(listed)}"
        assert name in listed, f"`{path} {name}` is a deprecated name; the README should use the current one"
        path = f"{path} {name}"
        command = sub
        settings = {**command.context_settings, "resilient_parsing": isinstance(command, click.Group)}
        ctx = click.Context(command, info_name=path, parent=ctx, **settings)
    return command, ctx, args, path


def _suite_flags(suite: str) -> set[str]:
    """The long options ``polymodal bench SUITE --help`` lists."""
    from polymodal.cli import main

    result = CliRunner().invoke(main, ["bench", suite, "--help"])
    assert result.exit_code == 0, f"`polymodal bench {suite} --help` failed: {result.output}"
    return set(re.findall(r"(--[a-z][\w-]*)", result.output))


def check_command(argv: list[str]) -> None:
    """Parse ``polymodal ARGV`` with the command's real options, without running it."""
    command, ctx, args, path = _resolve(argv)
    parser = command.make_parser(ctx)
    try:
        opts, rest, _ = parser.parse_args(args=list(args))
    except click.UsageError as exc:
        raise AssertionError(f"`{path}`: {exc.format_message()}") from None
    if path == "polymodal bench":
        suite = opts.get("suite")
        assert suite in ("attention", "models", "compare", "table"), f"`{path}`: unknown suite {suite!r}"
        unknown = {w.split("=", 1)[0] for w in rest if w.startswith("--")} - _suite_flags(suite)
        assert not unknown, f"`{path} {suite}` has no option(s) {', '.join(sorted(unknown))}"
        return
    assert not rest, f"`{path}`: unexpected argument(s) {rest}"
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument) and param.required:
            given = opts.get(param.name)
            assert isinstance(given, (str, list, tuple)) and given, (
                f"`{path}`: the argument {param.human_readable_name} is missing"
            )


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """An empty working folder and cache for the README's Python blocks, with :data:`FOLDERS` made."""
    import polymodal

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / ".cache"))
    for folder, (variant, parts) in FOLDERS.items():
        polymodal.create(variant, **parts).save(folder)
    return tmp_path


def test_readme_has_python_blocks_and_commands():
    assert len(python_blocks()) >= 8
    assert len(commands()) >= 40
    assert ["train", "vit"] in [argv for _, argv in commands()]


def test_every_python_block_runs(readme_folder):
    for line, code in python_blocks():
        compiled = compile(code, f"README.md:{line}", "exec")
        if code.lstrip().startswith(SKIP_MARK):
            reason = code.lstrip()[len(SKIP_MARK) :].splitlines()[0].strip()
            assert reason, f"README.md:{line}: {SKIP_MARK} needs a reason after it"
            continue
        assert Path.cwd() == readme_folder
        try:
            exec(compiled, {"__name__": f"readme_{line}"})
        except Exception as exc:
            raise AssertionError(f"README.md:{line}: the Python block fails: {type(exc).__name__}: {exc}") from exc


def test_every_command_line_parses():
    failures = []
    for line, argv in commands():
        try:
            check_command(argv)
        except AssertionError as exc:
            failures.append(f"README.md:{line}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "vit", "--stepz", "3"], "No such option"),
        (["trian", "vit"], "no such command"),
        (["export", "a"], "OUT is missing"),
        (["convert", "a", "b", "c"], "unexpected argument"),
        (["train", "vit", "--steps"], "requires an argument"),
        (["bench", "attention", "--quik"], "no option"),
    ],
)
def test_the_command_check_catches_drift(argv, message):
    with pytest.raises(AssertionError, match=message):
        check_command(argv)


def test_synopsis_words_become_one_concrete_line():
    words = shlex.split(
        "train MODEL [--data NAME|DIR] [--set k=v ...] [--steps N | --epochs N] [--resume | --overwrite]"
    )
    assert _words(words) == ["train", "MODEL", "--data", "NAME", "--set", "k=v", "--steps", "N", "--resume"]
    assert _words(["--device", "cpu|cuda"]) == ["--device", "cpu"]


def test_python_blocks_are_run_with_the_skip_mark_only_where_stated():
    skipped = [line for line, code in python_blocks() if code.lstrip().startswith(SKIP_MARK)]
    assert len(skipped) <= 1, f"README.md: more Python blocks skipped than the judge's: lines {skipped}"
