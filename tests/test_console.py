"""The `reconciler` command as users run it, in a separate process: its output arrives whole
with its exit code, a reader that goes away gets no traceback, and so does a machine where the
packages it needs are not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import SECRETS, at, iso, run, users_yaml

ROOT = Path(__file__).resolve().parents[1]
T0 = at("2027-01-01T00:00:00Z")


def command(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env={"PATH": "/usr/bin:/bin", **SECRETS},
        check=False,
        timeout=120,
    )


def test_output_through_a_pipe_arrives_whole_with_the_exit_code(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    names = [f"user{n:04d}" for n in range(300)]
    (state / "users.yaml").write_text(users_yaml("".join(f"  - name: {n}\n" for n in names)))
    result = command("--state", str(state), "--now", iso(T0), "plan", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)  # all of it: a truncated document would not parse
    subjects = {action["subject"] for action in plan["actions"]}
    assert {f"client/{n}" for n in names} <= subjects
    changes = command(
        "--state", str(state), "--now", iso(T0), "plan", "--detailed-exitcode"
    ).returncode
    assert changes == 2
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    result = command("--state", str(state), "--now", iso(T0), "apply", "--no-commit")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("Nothing to do")


def test_help_version_and_usage_errors_keep_their_exit_codes() -> None:
    assert command("--version").returncode == 0
    helped = command("--help")
    assert helped.returncode == 0
    assert "usage: reconciler" in helped.stdout
    wrong = command("--no-such-flag", "plan")
    assert wrong.returncode == 1
    assert "reconciler:" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    names = "".join(f"  - name: user{n:04d}\n" for n in range(2000))
    (state / "users.yaml").write_text(users_yaml(names))
    with subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--state", str(state), "--now", iso(T0), "plan"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", **SECRETS},
    ) as reconciler:
        assert reconciler.stdout is not None
        assert reconciler.stderr is not None
        head = reconciler.stdout.read(100)  # as `| head -c 100`: read a little, then go away
        reconciler.stdout.close()
        stderr = reconciler.stderr.read().decode()
        code = reconciler.wait(timeout=120)
    assert len(head) == 100
    assert stderr == ""
    assert code == 141  # as a shell reports a command that SIGPIPE ended


def test_without_its_dependencies_it_says_what_to_install(tmp_path: Path) -> None:
    """A Python without site-packages (-S) has none of cryptography, PyYAML, GitPython."""
    result = subprocess.run(
        [sys.executable, "-S", "-m", "reconciler", "--state", str(tmp_path), "validate"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reconciler: the Python package ")
    assert "is not installed" in lines[0]
