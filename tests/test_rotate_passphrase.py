"""rotate-passphrase ca|keys: afterwards only the new passphrase opens the state, every pin the
ledger holds of a key file is true again, bad input writes nothing, and a rotation killed with
SIGKILL at any moment is finished by running it again.

Real git repositories, real keys, real SIGKILLs of a real subprocess, whose moment is chosen by
its progress (the key files it has replaced), never by a clock.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from support import (
    CA_PASSPHRASE,
    GIT_IDENTITY,
    KEY_PASSPHRASE,
    SECRETS,
    at,
    files_under,
    git,
    kill_when,
    ledger_of,
    run,
    users_yaml,
)

from reconciler import pki
from reconciler.model import CASpec, KeyType
from reconciler.pem import file_sha256

T0 = at("2027-01-01T00:00:00Z")
NEW = "a new passphrase, long and random enough"
USERS = "  - name: alice\n  - name: bob\n"
SERVERS = "  - name: db1.example.com\n"

pytestmark = pytest.mark.usefixtures("isolated_git")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A committed state with a CA, two users and a server, in a git repository."""
    repo = tmp_path / "repo"
    directory = repo / "state"
    directory.mkdir(parents=True)
    git(repo, "init", "--quiet", "-b", "main")
    (repo / ".gitignore").write_text(".secrets/\n")
    (directory / "users.yaml").write_text(users_yaml(USERS, SERVERS))
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "users.yaml")
    result = run(directory, "apply", now=T0, environ={**SECRETS, **GIT_IDENTITY})
    assert result.code == 0, result.err
    return directory


def rotate(state: Path, what: str, environ: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = run(state, "rotate-passphrase", what, *args, now=T0, environ=environ)
    return result.code, result.out, result.err


def key_files(state: Path, what: str) -> list[Path]:
    if what == "ca":
        return [state / "ca" / "ca.key"]
    return sorted([*state.glob("clients/*.key"), *state.glob("servers/*.key")])


def opens(path: Path, passphrase: str) -> bool:
    try:
        pki.decrypt_key(path.read_bytes(), passphrase.encode())
    except (ValueError, TypeError):
        return False
    return True


def assert_pins_true(state: Path) -> None:
    ledger = ledger_of(state)
    assert ledger.ca_key_sha256 == file_sha256((state / "ca" / "ca.key").read_bytes())
    serials = {pki.load_certificates(p.read_bytes())[0].serial_number: p for p in leaf_certs(state)}
    for entry in ledger.entries:
        if entry.serial in serials:
            key = serials[entry.serial].with_suffix(".key")
            assert entry.key_sha256 == file_sha256(key.read_bytes()), key


def leaf_certs(state: Path) -> list[Path]:
    return [*state.glob("clients/*.crt"), *state.glob("servers/*.crt")]


def assert_clean_plan(state: Path) -> None:
    result = run(state, "plan", "--json", now=T0, environ={})
    assert result.code == 0, result.out + result.err
    plan = json.loads(result.out)
    assert plan["blockers"] == []
    assert plan["changes"] == 0, plan["summary"]


@pytest.mark.parametrize(
    ("what", "variable", "other"),
    [
        pytest.param("keys", "RECONCILER_KEY_PASSPHRASE", "ca", id="keys"),
        pytest.param("ca", "RECONCILER_CA_PASSPHRASE", "keys", id="ca"),
    ],
)
def test_afterwards_only_the_new_passphrase_opens_the_state(
    state: Path, what: str, variable: str, other: str
) -> None:
    old = SECRETS[variable]
    untouched = {p: p.read_bytes() for p in key_files(state, other)}
    head = git(state, "rev-parse", "HEAD")

    code, out, err = rotate(state, what, {**SECRETS, "RECONCILER_NEW_PASSPHRASE": NEW})
    assert code == 0, err
    rotated = key_files(state, what)
    for path in rotated:
        assert opens(path, NEW), path
        assert not opens(path, old), path
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert {p: p.read_bytes() for p in key_files(state, other)} == untouched
    assert f"Re-encrypted {len(rotated)} key file" in out
    # the passphrase came from a variable: one line says to replace it there
    assert err.count("\n") == 1
    assert f"${variable}" in err
    assert "CI secret store" in err

    # one commit, saying what was rotated and nothing secret, and a clean plan
    assert git(state, "rev-list", "--count", f"{head}..HEAD") == "1"
    message = git(state, "log", "-1", "--format=%B")
    assert message.startswith(f"rotate-passphrase {what}: ")
    changed = set(git(state, "show", "--name-only", "--format=", "HEAD").splitlines())
    assert changed == {f"state/{p.relative_to(state)}" for p in rotated} | {"state/ledger.jsonl"}
    for secret in (old, NEW, CA_PASSPHRASE, KEY_PASSPHRASE):
        assert secret not in message + out + err
    assert git(state, "status", "--porcelain") == ""
    assert_pins_true(state)
    assert_clean_plan(state)

    # apply (one that makes a key, so both passphrases are tried) works with the new one only
    (state / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n", SERVERS))
    stale = run(state, "apply", "--no-commit", now=T0, environ=SECRETS)
    assert stale.code == 1
    assert "does not unlock" in stale.err
    fresh = run(state, "apply", "--no-commit", now=T0, environ={**SECRETS, variable: NEW})
    assert fresh.code == 0, fresh.err
    assert opens(state / "clients" / "carol.key", NEW if what == "keys" else KEY_PASSPHRASE)


def test_a_passphrase_kept_in_dot_secrets_is_replaced_there(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS))
    assert run(state, "apply", "--no-commit", now=T0, environ={}).code == 0  # bootstraps
    secrets = tmp_path / ".secrets"
    old = (secrets / "keys.pass").read_text().strip()
    new_file = tmp_path / "new.pass"
    new_file.write_text(NEW + "\n")
    new_file.chmod(0o600)

    code, out, err = rotate(
        state, "keys", {}, "--no-commit", "--new-passphrase-file", str(new_file)
    )
    assert code == 0, err
    assert (secrets / "keys.pass").read_text() == NEW + "\n"
    assert (secrets / "keys.pass").stat().st_mode & 0o777 == 0o600
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert not list(secrets.glob(".*.tmp"))
    assert (
        err == f"reconciler: {secrets / 'keys.pass'} holds the new key passphrase now (mode 0600)\n"
    )
    assert old not in out + err
    for path in key_files(state, "keys"):
        assert opens(path, NEW)
        assert not opens(path, old)
    # the next commands find the new one where the old one was
    (state / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))
    assert run(state, "apply", "--no-commit", now=T0, environ={}).code == 0
    assert opens(state / "clients" / "carol.key", NEW)
    assert_clean_plan(state)


def test_during_a_ca_rotation_both_ca_keys_are_rotated_and_pinned(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS, validity="365d"))
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    bumped = users_yaml(USERS, validity="365d").replace("ca:\n", "ca:\n  generation: 2\n", 1)
    (state / "users.yaml").write_text(bumped)
    assert run(state, "apply", "--no-commit", now=T0).code == 0  # stage 1: two CAs
    cas = [state / "ca" / "g2" / "ca.key", state / "ca" / "ca.key"]
    environ = {**SECRETS, "RECONCILER_NEW_PASSPHRASE": NEW}
    assert rotate(state, "ca", environ, "--no-commit")[0] == 0
    for path in cas:
        assert opens(path, NEW), path
        assert not opens(path, CA_PASSPHRASE), path
    header = json.loads((state / "ledger.jsonl").read_text().splitlines()[0])
    assert header["ca_key"] == file_sha256(cas[0].read_bytes())
    assert header["previous"]["ca_key"] == file_sha256(cas[1].read_bytes())
    assert_clean_plan(state)
    # the ledger stays signed by the newer CA through a rotation of the keys too
    environ = {**SECRETS, "RECONCILER_CA_PASSPHRASE": NEW, "RECONCILER_NEW_PASSPHRASE": NEW}
    assert rotate(state, "keys", environ, "--no-commit")[0] == 0
    assert_clean_plan(state)


def _third_passphrase_on_bob(state: Path) -> None:
    key = pki.decrypt_key((state / "clients/bob.key").read_bytes(), KEY_PASSPHRASE.encode())
    (state / "clients/bob.key").write_bytes(pki.encrypt_key(key, b"nobody knows this one"))


def _edit_the_ledger(state: Path) -> None:
    ledger = state / "ledger.jsonl"
    ledger.write_bytes(ledger.read_bytes().replace(b'"valid"', b'"revoked"', 1))


WRONG = "a wrong passphrase, long enough"


@pytest.mark.parametrize(
    ("what", "environ", "damage", "expected"),
    [
        pytest.param("keys", SECRETS, None, "new passphrase is needed", id="no-new-passphrase"),
        pytest.param(
            "keys",
            {**SECRETS, "RECONCILER_NEW_PASSPHRASE": KEY_PASSPHRASE},
            None,
            "the new passphrase is the key one in use",
            id="new-is-old",
        ),
        pytest.param(
            "ca",
            {**SECRETS, "RECONCILER_NEW_PASSPHRASE": "Zq7-tiny"},
            None,
            "shorter than 16",
            id="new-too-short",
        ),
        pytest.param(
            "keys",
            {**SECRETS, "RECONCILER_KEY_PASSPHRASE": WRONG, "RECONCILER_NEW_PASSPHRASE": NEW},
            None,
            "clients/alice.key opens with neither the current key passphrase",
            id="wrong-key-passphrase",
        ),
        pytest.param(
            "ca",
            {**SECRETS, "RECONCILER_CA_PASSPHRASE": WRONG, "RECONCILER_NEW_PASSPHRASE": NEW},
            None,
            "ca/ca.key opens with neither the current CA passphrase",
            id="wrong-ca-passphrase",
        ),
        pytest.param(
            "keys",
            {**SECRETS, "RECONCILER_CA_PASSPHRASE": WRONG, "RECONCILER_NEW_PASSPHRASE": NEW},
            None,
            "does not unlock ca/ca.key",
            id="keys-need-the-ca-passphrase",
        ),
        pytest.param(
            "keys",
            {**SECRETS, "RECONCILER_NEW_PASSPHRASE": NEW},
            _third_passphrase_on_bob,
            "clients/bob.key opens with neither",
            id="a-key-neither-opens",
        ),
        pytest.param(
            "ca",
            {**SECRETS, "RECONCILER_NEW_PASSPHRASE": NEW},
            _edit_the_ledger,
            "ledger.jsonl was changed outside the reconciler",
            id="blocked-plan",
        ),
    ],
)
def test_bad_input_is_exit_1_with_nothing_written(
    state: Path, what: str, environ: dict[str, str], damage: object, expected: str
) -> None:
    if callable(damage):
        damage(state)
        git(state, "commit", "--quiet", "-am", "damage")
    before = files_under(state.parent)
    code, _, err = rotate(state, what, environ)
    assert code == 1
    assert expected in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert files_under(state.parent) == before


# --------------------------------------------------------------------------- kill -9


def _stamps(state: Path, paths: list[Path]) -> dict[Path, tuple[int, int]]:
    stamps = {}
    for path in paths:
        info = path.stat()
        stamps[path] = (info.st_ino, info.st_mtime_ns)
    return stamps


def _kill_at(command: list[str], env: dict[str, str], state: Path, what: str, moment: int) -> bool:
    """Run a rotation and SIGKILL it (its process group, git included) once `moment` of its
    key files have been replaced (0: once the ledger has); False when it finished first."""
    keys = key_files(state, what)
    watched = [state / "ledger.jsonl"] if moment == 0 else keys
    before = _stamps(state, watched)

    def reached() -> bool:
        try:
            now = _stamps(state, watched)
        except FileNotFoundError:  # between a rename and our stat: look again
            return False
        return sum(1 for p in watched if now[p] != before[p]) >= max(moment, 1)

    return kill_when([*command, "rotate-passphrase", what], env, reached)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["keys", "ca"])
def test_a_rotation_killed_at_any_moment_is_finished_by_running_it_again(
    tmp_path: Path, what: str
) -> None:
    seed = int(os.environ.get("CRASH_SEED", str(random.randrange(2**32))))  # noqa: S311
    rng = random.Random(seed)  # noqa: S311
    repo = tmp_path / "repo"
    state = repo / "state"
    state.mkdir(parents=True)
    git(repo, "init", "--quiet", "-b", "main")
    (repo / ".gitignore").write_text(".secrets/\n")
    users = "".join(f"  - name: user{i:03d}\n" for i in range(80))
    (state / "users.yaml").write_text(users_yaml(users, SERVERS))
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "users.yaml")
    env = {**os.environ, **SECRETS, **GIT_IDENTITY}
    command = [sys.executable, "-m", "reconciler", "--state", str(state), "--now", T0.isoformat()]
    first = subprocess.run([*command, "apply"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    variable = "RECONCILER_CA_PASSPHRASE" if what == "ca" else "RECONCILER_KEY_PASSPHRASE"
    keys = key_files(state, what)
    # moments: after some key files (for ca, the one), and after the ledger
    moments = [rng.randrange(1, len(keys)) if len(keys) > 1 else 1 for _ in range(3)] + [0]
    kills = 0
    for number, moment in enumerate(moments, start=1):
        old, new = env[variable], f"passphrase number {number} of seed {seed}"
        rotating = {**env, "RECONCILER_NEW_PASSPHRASE": new}
        ledger_before = (state / "ledger.jsonl").read_bytes()
        killed = _kill_at(command, rotating, state, what, moment)
        kills += killed
        already = {p: p.read_bytes() for p in keys if opens(p, new)}
        if killed and already and (state / "ledger.jsonl").read_bytes() == ledger_before:
            # half way: plan says what it sees, and a plain apply with the old passphrases
            # (the ones configured until the rotation ends) refuses, with nothing written
            plan = run(state, "plan", "--json", now=T0, environ={})
            assert (plan.code == 1) == (what == "ca"), f"seed {seed}: {plan.out}"
            files = files_under(state)
            stale = run(state, "apply", "--no-commit", now=T0, environ=env)
            assert stale.code == 1, f"seed {seed}: {stale.out}"
            assert files_under(state) == files, f"seed {seed}"
        again = subprocess.run(
            [*command, "rotate-passphrase", what], env=rotating, capture_output=True, text=True
        )
        assert again.returncode == 0, f"seed {seed}: {again.stderr}"
        assert {p: p.read_bytes() for p in already} == already  # kept as they were
        for path in keys:
            assert opens(path, new), f"seed {seed}: {path}"
            assert not opens(path, old), f"seed {seed}: {path}"
        assert not list(state.rglob("*.tmp")), f"seed {seed}"
        assert git(repo, "status", "--porcelain") == "", f"seed {seed}"
        assert_pins_true(state)
        assert_clean_plan(state)
        env[variable] = new
    assert kills >= 2, f"seed {seed}: the rotation finished before enough kills"
    # one commit per rotation, however often it was killed; and apply has nothing to do
    log = git(repo, "log", "--format=%s")
    assert log.count("rotate-passphrase") == len(moments), log
    done = subprocess.run([*command, "apply"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Nothing to do" in done.stdout


def test_keys_covers_the_pending_key_of_an_external_server(tmp_path: Path) -> None:
    """A CSR made before a key passphrase rotation is still accepted after it: its pending key
    is re-encrypted with the others."""
    directory = tmp_path / "state"
    directory.mkdir()
    external = SERVERS.replace("\n", "\n    issuer: external\n", 1)
    root_key = pki.generate_key(KeyType.ECDSA_P256)
    spec = CASpec((("CN", "Corp Root"),), KeyType.ECDSA_P256, timedelta(days=3650))
    root = pki.build_ca_certificate(
        spec, root_key, serial=1, not_before=T0 - timedelta(days=1), not_after=T0 + spec.validity
    )
    (directory / "trust").mkdir()
    (directory / "trust" / "corp.pem").write_bytes(pki.pem(root))
    text = users_yaml(USERS, external) + "trust:\n  - trust/corp.pem\n"
    (directory / "users.yaml").write_text(text)
    assert run(directory, "apply", "--no-commit", now=T0).code == 0
    pending = directory / "servers" / "pending" / "db1.example.com.key"
    assert opens(pending, KEY_PASSPHRASE)
    code, _, err = rotate(
        directory, "keys", {**SECRETS, "RECONCILER_NEW_PASSPHRASE": NEW}, "--no-commit"
    )
    assert code == 0, err
    assert opens(pending, NEW)
    assert not opens(pending, KEY_PASSPHRASE)
