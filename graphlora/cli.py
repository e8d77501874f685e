"""The ``graphlora`` command line (also ``python -m graphlora``).

Each subcommand is one function ``run(args) -> exit code`` registered with :func:`subcommand`
together with a function that adds its arguments, so adding a command is one decorated function::

    def _demo_arguments(parser): parser.add_argument("--steps", type=int, default=10)

    @subcommand("demo", help="run the end-to-end demo", arguments=_demo_arguments)
    def demo(args): ...; return 0

Exit codes: what the command returns (``diff``: 0 identical, 1 different); 2 on any error, reported
as one line on stderr (``--verbose`` adds the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphlora.errors import GraphloraError

__all__ = ["Subcommand", "build_parser", "main", "subcommand"]

EXIT_ERROR = 2


@dataclass(frozen=True)
class Subcommand:
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from graphlora import __version__

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


# --------------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------------

_SAVED_GRAPHS = """\
A saved graph is one of:
  *.onnx        an ONNX model (external data is not needed)
  *.pt2         a torch.export archive (torch.export.save)
  *.graph.txt   a graph text written by graphlora.save_graph_text(graph, path)
                or by `graphlora graph-text MODEL -o FILE`

exit status: 0 if the graphs are identical, 1 if they differ, 2 on error.
"""


def _diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("before", help="saved graph (.onnx, .pt2, *.graph.txt)")
    parser.add_argument("after", help="saved graph (.onnx, .pt2, *.graph.txt)")
    parser.add_argument(
        "-U", "--context", type=int, default=3, metavar="N", help="lines of context in the unified diff (default 3)"
    )
    parser.add_argument(
        "--summary", action="store_true", help="print only the summary grouped by module path, no unified diff"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing; only set the exit status")


@subcommand(
    "diff",
    help="compare two saved graphs node by node",
    arguments=_diff_arguments,
    description="Compare two saved graphs; print a summary grouped by module path and a unified diff of "
    "their canonical graph texts.\n\n" + _SAVED_GRAPHS,
)
def run_diff(args: argparse.Namespace) -> int:
    from graphlora.diff import diff, read_graph_text

    result = diff(read_graph_text(args.before), read_graph_text(args.after), context=args.context)
    if not args.quiet:
        if not result:
            print("no differences")
        elif args.summary:
            print(result.summary)
            for line in result.grouped():
                print(f"  {line}")
        else:
            print(str(result))
    return 1 if result else 0


def _graph_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="saved graph (.onnx, .pt2, *.graph.txt)")
    parser.add_argument("-o", "--output", help="write to this file (atomically) instead of stdout")


@subcommand(
    "graph-text",
    help="print the canonical graph text of a saved graph",
    arguments=_graph_text_arguments,
    description="Print (or save with -o) the canonical graph text of a saved graph, e.g. to keep a "
    "*.graph.txt next to an exported model for later `graphlora diff`.\n\n" + _SAVED_GRAPHS.split("\n\n")[0],
)
def run_graph_text(args: argparse.Namespace) -> int:
    from graphlora.diff import read_graph_text, save_graph_text

    text = read_graph_text(args.graph)
    if args.output:
        save_graph_text(text, args.output)
    else:
        sys.stdout.write(text)
    return 0
