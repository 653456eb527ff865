"""The docs against the code: every option a README or docs shell block gives a ``cubcam`` subcommand exists in that
subcommand's ``--help``, so a renamed flag cannot leave the docs behind."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import pytest

from cubcam.train.cli import run

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SUBCOMMANDS = ("fit", "validate", "test", "predict", "explain", "evaluate", "demo", "configs")
COMMAND = re.compile(r"(?:^|[\s/])cubcam\s+(" + "|".join(SUBCOMMANDS) + r")\b(.*)")
OPTION = re.compile(r"(?<![\w-])(--[A-Za-z][\w.-]*)")


def shell_lines() -> list[tuple[str, str, str]]:
    """(page, subcommand, the rest of the line) of every ``cubcam <subcommand>`` in a bash block."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                match = COMMAND.search(line.split("#", 1)[0])
                if match:
                    found.append((page.name, match.group(1), match.group(2)))
    return found


def help_text(*argv: str) -> str:
    """What ``cubcam <argv>`` prints (its help: it exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        run(list(argv))
    assert exited.value.code in (0, None), argv
    return out.getvalue()


@functools.cache
def known_options() -> dict[str, set[str]]:
    helps = {sub: help_text(sub, "--help") for sub in ("fit", "explain", "evaluate", "demo", "configs")}
    # A subclass's own arguments show with --model.help; the docs spell them --model.init_args.<name>.
    for name in ("Classifier", "EmbeddingNet"):
        helps["fit"] += help_text("fit", "--model.help", name).replace("--model.", "--model.init_args.")
    options = {sub: set(OPTION.findall(text)) for sub, text in helps.items()}
    options["demo"] |= options["fit"]  # `cubcam demo` hands every other argument to both fits
    return options


def test_every_documented_option_exists_in_its_subcommand() -> None:
    lines = shell_lines()
    assert len(lines) > 10 and {sub for _, sub, _ in lines} >= {"fit", "explain", "evaluate", "demo"}
    options = known_options()
    unknown = [
        f"{page}: cubcam {sub} {option}"
        for page, sub, rest in lines
        for option in OPTION.findall(rest)
        if option not in options.get(sub, set())
    ]
    assert not unknown, "documented options that the subcommand does not take:\n" + "\n".join(unknown)


def test_a_renamed_option_is_caught(monkeypatch) -> None:
    """The check itself: an option the tools do not take is reported."""
    monkeypatch.setattr(
        "test_docs.shell_lines", lambda: [("page.md", "evaluate", " C --weightings gradcam")] * 11 + _subs()
    )
    with pytest.raises(AssertionError, match=r"page.md: cubcam evaluate --weightings"):
        test_every_documented_option_exists_in_its_subcommand()


def _subs() -> list[tuple[str, str, str]]:
    return [("page.md", sub, "") for sub in ("fit", "explain", "demo")]
