"""`python -m reconciler` and the `reconciler` command. Imports nothing outside the standard
library before it knows the packages the reconciler needs are installed, so a missing one is a
sentence, not a traceback."""

from __future__ import annotations

import sys


def console() -> None:
    try:
        from reconciler import cli
    except ModuleNotFoundError as exc:
        if (exc.name or "reconciler").partition(".")[0] == "reconciler":
            raise
        sys.stderr.write(
            f"reconciler: the Python package {exc.name!r} is not installed; run "
            "`make reconcile` (it creates .venv with everything) or `pip install -e .`, "
            "and use .venv/bin/reconciler\n"
        )
        sys.exit(1)
    cli.console()


if __name__ == "__main__":  # not when a worker process re-imports this module
    console()
