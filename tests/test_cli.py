"""The command line as a newcomer meets it: options in either place, run from inside a state
directory, a second apply that says it waits, and a clone adopted as a state repository."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import SECRETS, at, iso, run, users_yaml

from reconciler.cli import main

ROOT = Path(__file__).resolve().parents[1]
T0 = at("2027-01-01T00:00:00Z")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    return directory


def in_process(*argv: str, cwd: Path) -> tuple[int, str, str]:
    import io

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        code = main(list(argv), environ=SECRETS, stdout=out, stderr=err)
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def test_global_options_work_before_and_after_the_command(state: Path) -> None:
    before = in_process("--state", str(state), "--now", iso(T0), "plan", "--json", cwd=state.parent)
    after = in_process("plan", "--json", "--state", str(state), "--now", iso(T0), cwd=state.parent)
    assert before[0] == after[0] == 0, (before[2], after[2])
    assert before[1] == after[1]
    mixed = in_process("--now", iso(T0), "validate", "--state", str(state), cwd=Path("/"))
    assert mixed[0] == 0, mixed[2]


def test_inside_a_state_directory_commands_use_it(state: Path) -> None:
    code, out, err = in_process("validate", cwd=state)
    assert code == 0, err
    assert out.startswith("users.yaml is valid: 1 user")
    code, out, err = in_process("--now", iso(T0), "plan", cwd=state)
    assert code == 0, err
    assert "client/alice" in out


def test_init_inside_a_state_directory_makes_no_nested_state(state: Path) -> None:
    code, _, err = in_process("init", cwd=state)
    assert code == 1
    assert "users.yaml already exists" in err
    assert not (state / "state").exists()


def test_init_in_an_empty_directory_makes_state(tmp_path: Path) -> None:
    code, out, err = in_process("init", cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "state" / "users.yaml").is_file()
    assert "Wrote state/users.yaml" in out


# --------------------------------------------------------------------------- the lock


def _hold_lock(state: Path) -> int:
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_second_apply_says_it_waits_then_gives_up(state: Path) -> None:
    fd = _hold_lock(state)
    try:
        result = run(state, "apply", "--no-commit", "--lock-timeout", "0.2", now=T0)
    finally:
        os.close(fd)
    assert result.code == 1
    waiting, gave_up = result.err.splitlines()
    assert waiting == (
        f"reconciler: another apply is running on {state}; waiting up to 0.2 s for it to finish"
    )
    assert "holds its lock; waited 0.2 s" in gave_up
    assert not (state / "ca").exists()
    for command in (["plan"], ["status"], ["validate"]):  # readers take no lock
        fd = _hold_lock(state)
        try:
            assert run(state, *command, now=T0, environ={}).code == 0, command
        finally:
            os.close(fd)


def test_a_waiting_apply_goes_on_when_the_lock_is_released(state: Path) -> None:
    """No sleeps that race: the lock is released only once the apply has said it waits."""
    fd = _hold_lock(state)
    command = [sys.executable, "-m", "reconciler", "--state", str(state), "--now", iso(T0)]
    apply = subprocess.Popen(
        [*command, "apply", "--no-commit", "--lock-timeout", "120"],
        env={"PATH": os.environ["PATH"], **SECRETS},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert apply.stderr is not None
        deadline = time.monotonic() + 60
        ready, _, _ = select.select([apply.stderr], [], [], deadline - time.monotonic())
        assert ready, "the apply never said that it waits"
        assert "waiting up to 120 s" in apply.stderr.readline()
        assert apply.poll() is None
    finally:
        os.close(fd)  # releases the lock
    out, err = apply.communicate(timeout=120)
    assert apply.returncode == 0, err
    assert "1 issued" in out


# --------------------------------------------------------------------------- adopting


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_a_clone_is_adopted_as_a_state_repository_with_make_adopt(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    (repo / "state").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    (repo / "state" / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "a fresh clone")
    first = run(repo / "state", "apply", now=T0, environ={**SECRETS, **GIT_ENV})
    assert first.code == 0, first.err
    assert "Not committed: .gitignore keeps" in first.out
    assert "run `make adopt`" in first.out
    assert "state/ca" not in _git(repo, "ls-files")

    adopted = subprocess.run(
        ["make", "adopt"], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True, text=True
    )
    assert adopted.returncode == 0, adopted.stderr
    assert "state/ca/" not in (repo / ".gitignore").read_text()
    assert ".secrets/" in (repo / ".gitignore").read_text()

    second = run(repo / "state", "apply", now=T0, environ={**SECRETS, **GIT_ENV})
    assert second.code == 0, second.err
    assert "Committed" in second.out
    tracked = _git(repo, "ls-files").split()
    assert {"state/ca/ca.crt", "state/ca/ca.key", "state/ledger.jsonl"} <= set(tracked)
    assert "state/clients/alice.crt" in tracked
    assert not [path for path in tracked if path.startswith(".secrets")]
    assert _git(repo, "status", "--porcelain") == ""
