"""`--help` is the first manual a user on a board reads: every option of every subcommand says
what it does, and every subcommand's help renders (a stray % in a help string breaks it)."""

from __future__ import annotations

import argparse

import pytest

from edgert.tools.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("edgert",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_every_option_says_what_it_does():
    silent = [f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
              for path, parser in COMMANDS for a in parser._actions
              if a.help is None and not isinstance(a, argparse._SubParsersAction)]
    assert not silent, f"options without help: {silent}"


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_renders(path, parser):
    text = parser.format_help()
    assert text.startswith("usage: " + " ".join(path))
