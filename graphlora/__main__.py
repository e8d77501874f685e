"""``python -m graphlora``: the same command line as the ``graphlora`` console script."""

from graphlora.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
