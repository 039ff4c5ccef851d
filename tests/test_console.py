"""The `reconciler` command as users run it: a separate process that exits with os._exit after
main() (no interpreter teardown), so its output must be flushed and its exit code kept."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import SECRETS, at, iso, run, users_yaml

from reconciler import desired as desired_module

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


@pytest.mark.parametrize("enabled", [True, False])
def test_main_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path, enabled: bool) -> None:
    """main() runs with the cyclic collector off: callers in process get theirs back."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    seen: list[bool] = []
    original = desired_module.load_desired

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(desired_module, "load_desired", spy)
            assert run(state, "validate").code == 0
            assert run(state, "plan", now=T0).code == 0
        assert seen == [False, False]  # off while the commands ran
        assert gc.isenabled() is enabled
        assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


KEEP_PROBE = """
import gc, weakref
from reconciler import collector

class Value:
    pass

first, second, loose = Value(), Value(), Value()
assert collector.keep("slot", loose) is loose
probe = weakref.ref(loose)
del loose
assert probe() is None, "kept although keep_until_exit() was not called"

collector.keep_until_exit()
assert not gc.isenabled()
kept_first, kept_second = weakref.ref(first), weakref.ref(second)
assert collector.keep("slot", first) is first
del first
assert kept_first() is not None, "freed although kept until exit"
collector.keep("slot", second)
del second
assert kept_first() is None, "a slot holds one value: the previous one is freed"
assert kept_second() is not None
print("ok")
"""


def test_keep_holds_values_until_exit_only_in_the_command() -> None:
    """The command keeps what a run built (one value per slot) and never collects again; an
    in-process caller of main() keeps nothing. Own interpreter: this changes the process."""
    result = subprocess.run(
        [sys.executable, "-c", KEEP_PROBE], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
