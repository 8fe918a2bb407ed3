"""Every ``spidr`` command line that the README and docs/ show (code blocks and inline code) names a command and
options that exist: a renamed or dropped option makes the documentation wrong, and this test fails."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from spidr.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# "spidr" as the program a shell runs: a line's first word, after "-m " (python, torchrun) or after ; & | (
COMMAND = re.compile(r"(?:^\s*(?:\$ )?|-m |[;&|(]\s*)spidr ([a-z][a-z0-9-]*)([^;&|#\n]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def shown_command_lines(text: str) -> list[str]:
    """The shell lines of fenced bash/sh blocks (continuations joined) and the inline code spans."""
    lines, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
        elif block in ("bash", "sh", "console", ""):
            lines.append(line)
    shell = "\n".join(lines).replace("\\\n", " ")
    outside_blocks = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return [*shell.splitlines(), *re.findall(r"`([^`\n]+)`", outside_blocks)]


def _subcommands() -> dict[str, set[str]]:
    parser = build_parser()
    actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in sub._actions for o in a.option_strings} for name, sub in actions.choices.items()}


def test_the_line_reader_finds_commands_in_blocks_and_inline_code():
    text = ("Run `spidr extract --out x` or\n```bash\nspidr kmeans feats \\\n    --num-units 8  # a comment\n"
            "torchrun --nproc-per-node 2 -m spidr train c.toml\n```\n"
            "```python\nspidr.load_model('x')  # not a shell line\n```\n`--jobs spidr spidr-small` (job names)\n")
    found = [m.groups() for line in shown_command_lines(text) for m in COMMAND.finditer(line)]
    assert found == [("kmeans", " feats      --num-units 8  "), ("train", " c.toml"), ("extract", " --out x")]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_documented_commands_and_options_exist(document: Path):
    commands = _subcommands()
    wrong, checked = [], 0
    for line in shown_command_lines(document.read_text(encoding="utf-8")):
        for match in COMMAND.finditer(line):
            command, rest = match.groups()
            if command not in commands:
                wrong.append(f"spidr {command} (no such command): {line.strip()}")
                continue
            for option in OPTION.findall(rest):
                checked += 1
                if option not in commands[command]:
                    wrong.append(f"spidr {command} has no {option}: {line.strip()}")
    assert not wrong, "\n".join(wrong)
    if document.name == "README.md":
        assert checked >= 50  # (the reader still finds the README's command lines)
