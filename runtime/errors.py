"""The one exception type users see, and the CLI wrapper that turns it into a single line and an exit status."""

from __future__ import annotations

import sys

import click


class DDPMError(Exception):
    """A user-facing error; its message says what is wrong and what to do about it."""

    exit_code = 2


def run_cli(command: click.Command, prog_name: str, argv: list[str] | None = None,
            interrupted: str = "interrupted") -> None:
    """Run a click command as a console script: every user error (ours or click's usage errors) is one
    `error: ...` line on stderr and a non-zero exit status, never a traceback."""
    try:
        code = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except DDPMError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo(f"error: {interrupted}", err=True)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)
