"""The subcommand registry, the argument parser and ``main``: how a command is run and how its
errors end (one line on stderr, exit code 2).

Each subcommand is one function ``run(args) -> exit code`` registered with :func:`subcommand`
together with a function that adds its arguments, so adding a command is one decorated function
in one of the command modules of :mod:`graphlora.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from graphlora.errors import GraphloraError, GraphloraWarning

__all__ = ["EXIT_ERROR", "Subcommand", "build_parser", "main", "subcommand", "wrap_help"]

EXIT_ERROR = 2


@dataclass(frozen=True)
class Subcommand:
    """A registered command: what :func:`build_parser` adds and :func:`main` runs."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None


_SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str,
    *,
    help: str,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``run(args) -> int`` as the subcommand ``name``; ``arguments(parser)`` adds its options."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in _SUBCOMMANDS:
            raise ValueError(f"graphlora subcommand {name!r} is registered twice")
        _SUBCOMMANDS[name] = Subcommand(name, help, run, arguments, description or (run.__doc__ or help))
        return run

    return register


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    return common


def wrap_help(*paragraphs: str) -> str:
    """Help paragraphs wrapped for the terminal (descriptions use RawDescriptionHelpFormatter so
    that the MODEL/RULES tables keep their layout)."""
    return "".join(textwrap.fill(p, 96) + "\n\n" for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from graphlora.version import __version__

    common = _common()
    parser = argparse.ArgumentParser(
        prog="graphlora",
        description="LoRA, QLoRA and quantization as compiler passes over torch.fx graphs.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"graphlora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _SUBCOMMANDS.values():
        sub = subparsers.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if cmd.arguments is not None:
            cmd.arguments(sub)
        sub.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    verbose = getattr(args, "verbose", False)
    try:
        with _one_line_warnings(args.command):
            return int(run(args))
    except KeyboardInterrupt:
        print("graphlora: interrupted", file=sys.stderr)
        return 130
    except GraphloraError as exc:
        if verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split("\n"))
        print(f"graphlora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug still ends with one line and exit code 2
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        print(f"graphlora {args.command}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show graphlora's own warnings as one ``graphlora CMD: warning: ...`` line, like errors;
    other libraries' warnings keep Python's default display."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, GraphloraWarning):
            text = " ".join(str(message).split("\n"))
            print(f"graphlora {command}: warning: {text}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
