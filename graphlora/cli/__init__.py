"""The ``graphlora`` command line (also ``python -m graphlora``).

Each subcommand is one function ``run(args) -> exit code`` registered with :func:`subcommand`
together with a function that adds its arguments, so adding a command is one decorated function::

    def _hello_arguments(parser): parser.add_argument("--times", type=int, default=1)

    @subcommand("hello", help="say hello", arguments=_hello_arguments)
    def hello(args): print("hello " * args.times); return 0

Exit codes: what the command returns (``diff``: 0 identical, 1 different); 2 on any error, reported
as one line on stderr (``--verbose`` adds the traceback).

Commands that take a model (``inspect``, ``transform``, ``export``) share one convention for MODEL
(a transformers directory or a ``module:attr`` factory, see :func:`graphlora.model_source.load_model`),
RULES (a TOML/JSON rules file, see :mod:`graphlora.rules_file`) and the example inputs used for
tracing.

The modules: :mod:`~graphlora.cli.app` (registry, parser, ``main``, error handling), one module per
group of commands (:mod:`~graphlora.cli.diff`: diff, graph-text; :mod:`~graphlora.cli.inspection`:
inspect; :mod:`~graphlora.cli.transform`: transform, export; :mod:`~graphlora.cli.demo`: demo;
:mod:`~graphlora.cli.generate`: generate) and
:mod:`~graphlora.cli.model_options`, the MODEL/RULES arguments the model commands share. Importing
this package registers the commands, in the order ``--help`` lists them.
"""

from graphlora.cli.app import Subcommand, build_parser, main, subcommand
from graphlora.cli import diff, inspection, transform, demo, generate  # noqa: F401, E402 - registers the subcommands

__all__ = ["Subcommand", "build_parser", "main", "subcommand"]
