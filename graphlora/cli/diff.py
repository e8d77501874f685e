"""``graphlora diff`` and ``graphlora graph-text``: commands on saved graphs (no model needed)."""

from __future__ import annotations

import argparse
import sys

from graphlora.cli.app import subcommand, wrap_help


_SAVED_GRAPHS = """\
A saved graph is one of:
  *.onnx        an ONNX model (external data is not needed)
  *.pt2         a torch.export archive (torch.export.save); loading one unpickles it and a
                crafted archive runs code, so it needs --allow-pickle (only for files you trust)
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
    _allow_pickle_argument(parser)


def _allow_pickle_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .pt2 archives (torch.export.load unpickles them: a crafted archive runs code; "
        "only for files you trust)",
    )


@subcommand(
    "diff",
    help="compare two saved graphs node by node",
    arguments=_diff_arguments,
    description=wrap_help(
        "Compare two saved graphs; print a summary grouped by module path and a unified diff of "
        "their canonical graph texts."
    )
    + _SAVED_GRAPHS,
)
def run_diff(args: argparse.Namespace) -> int:
    from graphlora.diff import diff, read_graph_text

    pickle = args.allow_pickle
    before = read_graph_text(args.before, allow_pickle=pickle)
    result = diff(before, read_graph_text(args.after, allow_pickle=pickle), context=args.context)
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
    _allow_pickle_argument(parser)


@subcommand(
    "graph-text",
    help="print the canonical graph text of a saved graph",
    arguments=_graph_text_arguments,
    description=wrap_help(
        "Print (or save with -o) the canonical graph text of a saved graph, e.g. to keep a "
        "*.graph.txt next to an exported model for later `graphlora diff`."
    )
    + _SAVED_GRAPHS.split("\n\n")[0],
)
def run_graph_text(args: argparse.Namespace) -> int:
    from graphlora.diff import read_graph_text, save_graph_text

    text = read_graph_text(args.graph, allow_pickle=args.allow_pickle)
    if args.output:
        save_graph_text(text, args.output)
    else:
        sys.stdout.write(text)
    return 0
