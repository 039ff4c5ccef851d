"""Passphrases: bootstrap, sources, and refusal with nothing written when one is missing or wrong.

validate, plan and status must work with no secret at all (the pull-request pipeline has none).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from support import CA_PASSPHRASE, KEY_PASSPHRASE, SECRETS, at, files_under, run, users_yaml

from reconciler import pki

T0 = at("2027-01-01T00:00:00Z")
USERS = "  - name: alice\n  - name: bob\n"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml(USERS))
    return directory


def test_first_apply_bootstraps_random_passphrases_into_dot_secrets(state: Path) -> None:
    result = run(state, "apply", "--no-commit", now=T0, environ={})
    assert result.code == 0, result.err
    secrets = state.parent / ".secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    ca_pass = (secrets / "ca.pass").read_text().strip()
    key_pass = (secrets / "keys.pass").read_text().strip()
    for name in ("ca.pass", "keys.pass"):
        assert (secrets / name).stat().st_mode & 0o777 == 0o600
    assert len(ca_pass) >= 32
    assert ca_pass != key_pass
    assert "RECONCILER_CA_PASSPHRASE" in result.err
    assert "RECONCILER_KEY_PASSPHRASE" in result.err
    assert str(secrets / "ca.pass") in result.err
    assert ca_pass not in result.out + result.err
    assert key_pass not in result.out + result.err
    pki.decrypt_key((state / "ca/ca.key").read_bytes(), ca_pass.encode())
    pki.decrypt_key((state / "clients/alice.key").read_bytes(), key_pass.encode())

    # the next run finds them in .secrets/ and says nothing about generating
    (state / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))
    again = run(state, "apply", "--no-commit", now=T0, environ={})
    assert again.code == 0, again.err
    assert "generated" not in again.err


def test_configured_passphrases_are_used_and_nothing_is_generated(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    assert not (state.parent / ".secrets").exists()
    pki.decrypt_key((state / "ca/ca.key").read_bytes(), CA_PASSPHRASE.encode())
    pki.decrypt_key((state / "clients/bob.key").read_bytes(), KEY_PASSPHRASE.encode())


def test_passphrase_files_given_by_flag(state: Path, tmp_path: Path) -> None:
    ca_file, key_file = tmp_path / "ca-pass", tmp_path / "key-pass"
    ca_file.write_text(CA_PASSPHRASE + "\n")
    key_file.write_text(KEY_PASSPHRASE + "\n")
    ca_file.chmod(0o600)
    key_file.chmod(0o600)
    result = run(
        state,
        "apply",
        "--no-commit",
        "--ca-passphrase-file",
        str(ca_file),
        "--key-passphrase-file",
        str(key_file),
        now=T0,
        environ={},
    )
    assert result.code == 0, result.err
    pki.decrypt_key((state / "ca/ca.key").read_bytes(), CA_PASSPHRASE.encode())


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, "passphrase is needed", id="missing-ca-passphrase"),
        pytest.param(
            {**SECRETS, "RECONCILER_CA_PASSPHRASE": "a wrong passphrase, long enough"},
            "does not unlock ca/ca.key",
            id="wrong-ca-passphrase",
        ),
        pytest.param(
            {**SECRETS, "RECONCILER_KEY_PASSPHRASE": "a wrong key passphrase, long"},
            "does not unlock clients/",
            id="wrong-key-passphrase",
        ),
        pytest.param(
            {"RECONCILER_CA_PASSPHRASE": CA_PASSPHRASE},
            "key passphrase is needed",
            id="missing-key-passphrase",
        ),
        pytest.param(
            {**SECRETS, "RECONCILER_CA_PASSPHRASE": "Zq7-tiny"},
            "shorter than 16",
            id="short-passphrase",
        ),
    ],
)
def test_missing_or_wrong_passphrase_is_exit_1_with_nothing_written(
    state: Path, environ: dict[str, str], expected: str
) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    (state / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))
    before = files_under(state.parent)
    result = run(state, "apply", "--no-commit", now=T0 + timedelta(days=1), environ=environ)
    assert result.code == 1
    assert expected in result.err
    assert "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    for secret in (*environ.values(), CA_PASSPHRASE, KEY_PASSPHRASE):
        assert secret not in result.err + result.out
    assert files_under(state.parent) == before


def test_validate_plan_and_status_need_no_secret(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    for args in (["validate"], ["plan"], ["status"]):
        result = run(state, *args, now=T0, environ={})
        assert result.code == 0, (args, result.err)
    assert not (state.parent / ".secrets").exists()


def test_every_apply_needs_the_ca_passphrase_even_with_nothing_to_do(state: Path) -> None:
    """A no-op apply proves that ca.key opens with the CA passphrase: a pull request that
    swapped in a CA of its own cannot ride on months of 'nothing to do'."""
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    before = files_under(state)
    missing = run(state, "apply", "--no-commit", now=T0, environ={})
    assert missing.code == 1
    assert "every apply proves that ca/ca.key opens with it" in missing.err
    wrong = {**SECRETS, "RECONCILER_CA_PASSPHRASE": "not the CA passphrase at all"}
    refused = run(state, "apply", "--no-commit", now=T0, environ=wrong)
    assert refused.code == 1
    assert "does not unlock ca/ca.key" in refused.err
    assert "ca/ca.key was replaced" in refused.err
    only_ca = {"RECONCILER_CA_PASSPHRASE": CA_PASSPHRASE}
    assert run(state, "apply", "--no-commit", now=T0, environ=only_ca).code == 0
    assert files_under(state) == before


def test_ci_never_bootstraps_passphrases_it_would_lose(state: Path) -> None:
    result = run(state, "apply", "--no-commit", now=T0, environ={"CI": "true"})
    assert result.code == 1
    assert "CI secret store" in result.err
    assert not (state / "ca").exists()
    assert not (state.parent / ".secrets").exists()


def test_passphrases_never_reach_output_commit_messages_or_process_arguments(
    tmp_path: Path,
) -> None:
    """Run the real CLI in a subprocess with git tracing on: git logs every command line it is
    started with, and /proc shows our own arguments; neither may hold a passphrase."""
    repo = tmp_path / "repo"
    (repo / "state").mkdir(parents=True)
    (repo / "state" / "users.yaml").write_text(users_yaml(USERS))
    trace_file = tmp_path / "git-trace.log"  # git appends every command line it runs here
    env = {
        **os.environ,
        **SECRETS,
        "GIT_TRACE": str(trace_file),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    outputs = []
    for now in ("2027-01-01T00:00:00Z", "2027-01-25T00:00:00Z"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "reconciler",
                "--state",
                str(repo / "state"),
                "--now",
                now,
                "apply",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(done.stdout + done.stderr)
    trace = trace_file.read_text()
    assert "git commit --only" in trace
    trace += "\n".join(outputs)
    log = subprocess.run(
        ["git", "log", "--format=%B"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    assert "reconcile:" in log
    for secret in (CA_PASSPHRASE, KEY_PASSPHRASE):
        assert secret not in trace  # output, and every git command line
        assert secret not in log
    # the state directory: keys 0600, everything else 0644, directories 0755
    for path in (repo / "state").rglob("*"):
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o755, path
        elif path.name != "users.yaml":
            assert mode == (0o600 if path.suffix == ".key" else 0o644), path
