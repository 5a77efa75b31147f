"""The exceptions users see. Library code words them about values and arguments; only the command layer
(`runtime.cli_common.run_cli`) knows flag names.

A message may name an argument as `{opt:name}` (e.g. "pass {opt:force} to overwrite it"): a library caller reads
`force`, a command-line user reads the command's flag for that parameter (`--force`).
"""

from __future__ import annotations

import re
from typing import Mapping

_ARGUMENT = re.compile(r"\{opt:(\w+)\}")


class DDPMError(Exception):
    """A user-facing error; its message says what is wrong and what to do about it."""

    exit_code = 2

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with each `{opt:name}` as `flags[name]` (a command's flag), else as the bare name."""
        text = str(self.args[0]) if self.args else ""
        return _ARGUMENT.sub(lambda m: (flags or {}).get(m.group(1), m.group(1)), text)

    def __str__(self) -> str:
        return self.render()


class NonFiniteError(DDPMError):
    """A NaN or inf appeared where only finite numbers make sense (a broken model, noise file or learning rate)."""
