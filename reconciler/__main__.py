"""`python -m reconciler` runs the command line."""

from reconciler.cli import console

if __name__ == "__main__":  # not when a worker process re-imports this module
    console()
