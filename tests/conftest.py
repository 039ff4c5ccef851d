"""Fixtures shared by the tests that run git."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import GIT_IDENTITY


@pytest.fixture
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No global or system git configuration, and no identity, leaks in from the machine."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in GIT_IDENTITY:
        monkeypatch.delenv(name, raising=False)
