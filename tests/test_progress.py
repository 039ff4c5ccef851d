"""The progress bar: on stderr when it is a terminal (count, rate, ETA), silent otherwise and
with --quiet. The terminal is a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from support import SECRETS, users_yaml

USERS = "".join(f"  - name: user{i:03d}\n" for i in range(600))


def apply_with_stderr_on(state: Path, terminal: bool, *extra: str) -> str:
    command = [
        sys.executable,
        "-m",
        "reconciler",
        "--state",
        str(state),
        *extra,
        "--now",
        "2027-01-01T00:00:00Z",
        "apply",
        "--no-commit",
    ]
    env = {**os.environ, **SECRETS, "COLUMNS": "100"}
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return done.stderr
    leader, follower = pty.openpty()
    # a fresh pseudo-terminal is 0 columns wide; a real one is not
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=follower) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait() == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml(USERS))
    return directory


@pytest.mark.slow
def test_a_terminal_gets_count_rate_and_eta(state: Path) -> None:
    shown = apply_with_stderr_on(state, terminal=True)
    assert "issuing:" in shown
    assert "/600" in shown
    assert "cert/s" in shown
    assert "<" in shown  # tqdm's elapsed<remaining


@pytest.mark.slow
@pytest.mark.parametrize(
    ("terminal", "extra"),
    [pytest.param(False, (), id="not-a-terminal"), pytest.param(True, ("--quiet",), id="quiet")],
)
def test_no_bar_off_a_terminal_or_with_quiet(
    state: Path, terminal: bool, extra: tuple[str, ...]
) -> None:
    shown = apply_with_stderr_on(state, terminal, *extra)
    assert "issuing" not in shown
    assert "cert/s" not in shown
