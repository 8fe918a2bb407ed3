"""The help formatter of every spidr command: argparse's defaults formatter, minus the noise it adds; and the help
texts several commands share."""

from __future__ import annotations

import argparse

SET_HELP = ("override a config value, e.g. --set optimizer.lr=1e-4 (repeatable; read as TOML, but a text field "
            "takes the text as written and 'none' or nothing clears a field that may be none)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where it informs: not to a help text that already names its default, not for
    ``None`` (an option left unset), a switch's ``False``, an empty list (a repeatable option) or an empty text (an
    empty comma-separated list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False or action.default in ([], ""):
            return text
        return super()._get_help_string(action)
