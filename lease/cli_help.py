"""`--help` text shared by the `lease` commands: every option's default, and descriptions from docstrings.

argparse's own `ArgumentDefaultsHelpFormatter` is not used: it adds nothing to an option without help
text, prints "(default: None)" for options without a value, and a parser's formatter class does not
reach its sub-commands. `show_defaults` rewrites the help of the actions themselves instead, through
every sub-command, once the parser is built.
"""
from __future__ import annotations

import argparse

_NO_DEFAULT = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _shows_default(action: argparse.Action) -> bool:
    """Not for a value that must be given (`required` is set for positionals other than nargs "?" and "*"),
    a flag (nargs 0: its absence is the default), a suppressed help, a help that already states its
    default ("(default" covers argparse's own "%(default)s"), or a default that is nothing."""
    if isinstance(action, _NO_DEFAULT) or action.required or action.nargs == 0 or action.help == argparse.SUPPRESS:
        return False
    if "(default" in (action.help or ""):
        return False
    default = action.default
    if default is None or default is False or (isinstance(default, str) and default == argparse.SUPPRESS):
        return False
    return not (isinstance(default, (str, list, tuple, dict, set)) and not default)


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append "(default: X)" to the help of each action of `parser` and of its sub-commands whose default
    is worth showing (not None, False, empty or suppressed), creating the help where there was none.
    Idempotent; returns `parser`."""
    for action in parser._actions:
        if _shows_default(action):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():  # an alias names a parser twice: idempotent
                show_defaults(sub)
    return parser


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph (up to its first blank line) as one line: a parser's description."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())
