"""`python -m reconciler` and the `reconciler` command. Imports nothing outside the standard
library before it knows the packages the reconciler needs are installed, so a missing one is a
sentence, not a traceback; and takes the passphrases out of the process environment before
any of them can start a process (GitPython runs `git version` when it is imported)."""

from __future__ import annotations

import os
import sys

from reconciler.secrets import VARIABLES


def console() -> None:
    environ = dict(os.environ)
    for name in VARIABLES:
        os.environ.pop(name, None)  # main() gets them from environ; no child process ever does
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
    cli.console(environ)


if __name__ == "__main__":  # not when a worker process re-imports this module
    console()
