"""The command layer every CLI shares: option types, the options several commands take, and `run_cli`.

This is the one module of the library that knows click; each command (ddpm-train, ddpm-export, ddpm-run, ddpm-serve,
ddpm-eval) declares the shared options through the decorators below, so they parse and check alike everywhere.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from runtime.backends import PRECISIONS, PROVIDERS
from runtime.errors import DDPMError
from runtime.progress import set_quiet

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"]}
SEED_MAX = 2**63 - 1  # what torch.manual_seed, numpy's SeedSequence and the C++ host (int64) all accept


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and inf (click's FLOAT takes them)."""

    name = "float"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()
SEED = click.IntRange(0, SEED_MAX)
POSITIVE = click.IntRange(min=1)
COUNT = click.IntRange(min=0)


def choice(values: tuple[str, ...]) -> click.Choice:
    return click.Choice(values, case_sensitive=False)


def provider_option(help: str = "ONNX Runtime / torch device (.plan files always run on their GPU).") \
        -> Callable[[F], F]:
    return click.option("--provider", type=choice(PROVIDERS), default="cpu", show_default=True, help=help)


def precision_option(f: F) -> F:
    return click.option("--precision", type=choice(PRECISIONS), default="auto", show_default=True,
                   help="auto: the FP16 graph on CUDA when it was exported, FP32 on CPU.")(f)


def threads_option(f: F) -> F:
    return click.option("--threads", type=COUNT, default=0, show_default=True,
                        help="CPU threads (0: library default).")(f)


def seed_option(help: str = "Image i draws its noise from rng([seed, i]).", default: int = 0) -> Callable[[F], F]:
    return click.option("--seed", type=SEED, default=default, show_default=True, help=help)


def force_option(help: str = "Overwrite existing output files.") -> Callable[[F], F]:
    return click.option("--force", is_flag=True, help=help)


def backend_options(f: F) -> F:
    """--provider, --precision and --threads: how a model file is opened (`runtime.backends.open_model`)."""
    return provider_option()(precision_option(threads_option(f)))


def model_argument(f: F) -> F:
    """MODEL (a .onnx/.plan/.pt file, a diffusers folder, or the hub id of one in the local Hugging Face cache) and
    the two options of PyTorch sources. The command receives `model` and `source_options`, the keyword arguments of
    `runtime.backends.open_model` / `train.sources.load_source` that were given."""

    @functools.wraps(f)
    def command(*args: Any, flags: str | None = None, scheduler_config: Path | None = None, **kwargs: Any) -> Any:
        options = {k: v for k, v in (("flags", flags), ("scheduler_config", scheduler_config)) if v is not None}
        return f(*args, source_options=options, **kwargs)

    command = click.option("--scheduler-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
                           help="The scheduler config JSON of a bare diffusers UNet2DModel folder (any DDPM-family "
                           "scheduler). Default: the pipeline's; none: DDPMScheduler's defaults.")(command)
    command = click.option("--flags", default=None,
                           help="improved-diffusion model and diffusion flags, as on their scripts' command line "
                           "(\"--image_size 32 --num_channels 128 ...\") or a JSON file; marks MODEL as an "
                           "improved-diffusion .pt.")(command)
    return click.argument("model", type=click.Path(path_type=Path))(command)  # type: ignore[return-value]


class DefaultCommandGroup(click.Group):
    """A group whose first argument goes to its default command unless it names a subcommand: `ddpm-export SOURCE`
    is `ddpm-export export SOURCE`, `ddpm-run MODEL` is `ddpm-run run MODEL`."""

    def __init__(self, *args: Any, default_command: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def require_suffix(path: Path, suffixes: tuple[str, ...], flag: str, what: str) -> None:
    """Refuse an output name whose extension promises another format than the one written."""
    if path.suffix.lower() not in suffixes:
        raise DDPMError(f"{flag} {path} would hold {what}; give it the {' or '.join(suffixes)} extension")


def _flags(command: click.Command) -> dict[str, str]:
    """Parameter name -> its long flag, over a command and all its subcommands (for `DDPMError.render`)."""
    flags: dict[str, str] = {}
    for sub in getattr(command, "commands", {}).values():
        flags.update(_flags(sub))
    for param in command.params:
        if isinstance(param, click.Option) and param.name:
            flags[param.name] = max(param.opts, key=len)
            for off in param.secondary_opts:  # --fp16/--no-fp16: "no_fp16" names the off switch
                flags["no_" + param.name] = off
    return flags


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        set_quiet(True)


def add_quiet(command: click.Command) -> click.Command:
    """Give the command and every subcommand --quiet / -q (no progress bars), declared once here."""
    for sub in getattr(command, "commands", {}).values():
        add_quiet(sub)
    if not any(p.name == "quiet" for p in command.params):
        command.params.append(click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, is_eager=True,
                                           callback=_quiet, help="No progress bars (TQDM_DISABLE=1 works too)."))
    return command


def run_cli(command: click.Command, prog_name: str, argv: list[str] | None = None,
            interrupted: str = "interrupted") -> None:
    """Run a click command as a console script: every user error (ours or click's usage errors) is one
    `error: ...` line on stderr and a non-zero exit status, never a traceback. Arguments a library message names
    (`{opt:name}`) are shown as this command's flags. Every command takes --quiet."""
    add_quiet(command)
    try:
        code = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except DDPMError as exc:
        click.echo(f"error: {exc.render(_flags(command))}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo(f"error: {interrupted}", err=True)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)
