"""Reliability: tampered state detected by plan and repaired (or refused, where repair would be
unsafe), and an apply killed with SIGKILL at many moments converges. (One apply at a time:
tests/test_cli.py.)

Nothing is mocked: tampering is done to real files, crashes are real SIGKILLs of a real apply
subprocess (its whole process group, git included), and the invariants are checked on the
files, the ledger, the CRL and every commit in the git history.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from support import (
    CA_PASSPHRASE,
    KEY_PASSPHRASE,
    SECRETS,
    at,
    cert,
    crl_serials,
    files_under,
    kill_when,
    ledger_of,
    run,
    users_yaml,
)

from reconciler import pki
from reconciler.desired import load_desired
from reconciler.engine import plan_state
from reconciler.ledger import decode as decode_ledger
from reconciler.model import CASpec, CertStatus, KeyType
from reconciler.pem import PLAINTEXT_KEY
from reconciler.store import StateDir

T0 = at("2027-01-01T00:00:00Z")
USERS = "  - name: alice\n  - name: bob\n  - name: carol\n"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml(USERS))
    assert run(directory, "apply", "--no-commit", now=T0).code == 0
    return directory


def plan_json(state: Path) -> dict[str, object]:
    result = run(state, "plan", "--json", now=T0, environ={})
    data: dict[str, object] = json.loads(result.out)
    data["code"] = result.code
    return data


def actions(plan: dict[str, object]) -> dict[str, dict[str, object]]:
    listed = plan["actions"]
    assert isinstance(listed, list)
    return {a["subject"]: a for a in listed}


def foreign_ca(tmp_path: Path) -> tuple[x509.Certificate, pki.PrivateKey]:
    key = pki.generate_key(KeyType.ECDSA_P256)
    spec = CASpec(
        subject=(("CN", "Test CA"), ("O", "Acme")),
        key=KeyType.ECDSA_P256,
        validity=timedelta(days=3650),
    )
    ca = pki.build_ca_certificate(
        spec,
        key,
        serial=x509.random_serial_number(),
        not_before=T0 - timedelta(days=1),
        not_after=T0 + timedelta(days=3650),
    )
    return ca, key


# --------------------------------------------------------------------------- tampering


def test_a_certificate_signed_by_another_ca_is_replaced(state: Path, tmp_path: Path) -> None:
    ca, ca_key = foreign_ca(tmp_path)
    leaf_key = pki.generate_key(KeyType.ECDSA_P256)
    genuine = cert(state / "clients/alice.crt")
    forged = (
        x509.CertificateBuilder()
        .subject_name(genuine.subject)
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(genuine.serial_number)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    (state / "clients/alice.crt").write_bytes(pki.pem(forged))
    alice = actions(plan_json(state))["client/alice"]
    assert alice["kind"] == "issue"
    assert "not signed by the current CA" in alice["reasons"]  # type: ignore[operator]
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    repaired = cert(state / "clients/alice.crt")
    repaired.verify_directly_issued_by(cert(state / "ca/ca.crt"))  # raises when it is not
    ledger = ledger_of(state)
    assert forged.fingerprint(hashes.SHA256()).hex() not in {
        e.fingerprint for e in ledger.entries
    }  # a foreign certificate is never recorded as ours
    assert not plan_state(state, T0).changes


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param("truncate-cert", "certificate file unusable", id="truncated-certificate"),
        pytest.param("other-key", "private key file is not the one issued", id="key-mismatch"),
        pytest.param("plaintext-key", "private key stored unencrypted", id="plaintext-key"),
        pytest.param("garbage-key", "private key file unusable", id="garbage-key"),
    ],
)
def test_damaged_leaf_files_are_detected_and_reissued(
    state: Path, damage: str, reason: str
) -> None:
    cert_path, key_path = state / "clients/bob.crt", state / "clients/bob.key"
    old_serial = cert(cert_path).serial_number
    other = pki.generate_key(KeyType.ECDSA_P256)
    if damage == "truncate-cert":
        cert_path.write_bytes(cert_path.read_bytes()[:200])
    elif damage == "other-key":
        key_path.write_bytes(pki.encrypt_key(other, KEY_PASSPHRASE.encode()))
    elif damage == "plaintext-key":
        key_path.write_bytes(pki.unencrypted_key_pem(other))
    else:
        key_path.write_bytes(b"not a key\n")
    bob = actions(plan_json(state))["client/bob"]
    assert bob["kind"] == "issue"
    assert any(str(r).startswith(reason) for r in bob["reasons"])  # type: ignore[attr-defined]
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    assert b"ENCRYPTED PRIVATE KEY" in key_path.read_bytes()
    key = pki.decrypt_key(key_path.read_bytes(), KEY_PASSPHRASE.encode())
    assert pki.same_public_key(key.public_key(), cert(cert_path).public_key())
    statuses = {e.serial: e.status for e in ledger_of(state).entries}
    assert statuses[old_serial] is CertStatus.SUPERSEDED
    assert not plan_state(state, T0).changes


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            "ca-cert",
            "ca/ca.crt is not the CA this state was issued under",
            id="ca-certificate-replaced",
        ),
        pytest.param(
            "ca-key",
            "ca/ca.key is not the key file this state was issued with",
            id="ca-key-replaced",
        ),
        pytest.param(
            "ledger-unrevoke", "ledger.jsonl was changed outside the reconciler", id="ledger-edited"
        ),
        pytest.param(
            "ledger-drop-line",
            "ledger.jsonl was changed outside the reconciler",
            id="ledger-line-deleted",
        ),
        pytest.param(
            "stray-plaintext",
            "notes/id.pem holds an unencrypted private key",
            id="stray-plaintext-key",
        ),
        pytest.param("ca-key-plaintext", "ca/ca.key is not encrypted", id="ca-key-plaintext"),
    ],
)
def test_unsafe_damage_is_refused_with_what_to_do_and_nothing_written(
    state: Path, tmp_path: Path, damage: str, message: str
) -> None:
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: bob\n"))
    assert run(state, "apply", "--no-commit", now=T0).code == 0  # carol revoked
    ledger_path = state / "ledger.jsonl"
    if damage == "ca-cert":
        ca, _ = foreign_ca(tmp_path)
        (state / "ca/ca.crt").write_bytes(pki.pem(ca))
    elif damage == "ca-key":
        _, key = foreign_ca(tmp_path)
        (state / "ca/ca.key").write_bytes(pki.encrypt_key(key, CA_PASSPHRASE.encode()))
    elif damage == "ledger-unrevoke":
        ledger_path.write_text(ledger_path.read_text().replace('"revoked"', '"valid"', 1))
    elif damage == "ledger-drop-line":
        lines = ledger_path.read_text().splitlines(keepends=True)
        ledger_path.write_text("".join(lines[:1] + lines[2:]))
    elif damage == "stray-plaintext":
        (state / "notes").mkdir()
        (state / "notes/id.pem").write_bytes(
            pki.unencrypted_key_pem(pki.generate_key(KeyType.ED25519))
        )
    else:
        key = pki.decrypt_key((state / "ca/ca.key").read_bytes(), CA_PASSPHRASE.encode())
        (state / "ca/ca.key").write_bytes(pki.unencrypted_key_pem(key))
    before = files_under(state.parent)
    planned = plan_json(state)
    assert planned["code"] == 1
    blockers = planned["blockers"]
    assert isinstance(blockers, list)
    assert any(message in b for b in blockers), blockers
    applied = run(state, "apply", "--no-commit", now=T0 + timedelta(days=25))
    assert applied.code == 1
    assert message in applied.err
    assert "Traceback" not in applied.err
    assert files_under(state.parent) == before


def test_wrong_modes_are_restored_by_any_apply(state: Path) -> None:
    (state / "clients/alice.key").chmod(0o644)
    (state / "ledger.jsonl").chmod(0o600)
    (state / "clients").chmod(0o777)
    planned = run(state, "plan", now=T0, environ={})
    assert "clients/alice.key is 0644, should be 0600" in planned.out
    assert "clients is 0777, should be 0755" in planned.out
    assert run(state, "plan", "--detailed-exitcode", now=T0, environ={}).code == 0
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    assert (state / "clients/alice.key").stat().st_mode & 0o777 == 0o600
    assert (state / "ledger.jsonl").stat().st_mode & 0o777 == 0o644
    assert (state / "clients").stat().st_mode & 0o777 == 0o755
    assert "should be" not in run(state, "plan", now=T0, environ={}).out


def test_leftovers_of_an_interrupted_apply_are_recorded_and_cleaned(state: Path) -> None:
    # an apply killed after writing a certificate, before the ledger: a signed certificate on
    # disk that the ledger does not know, and one fully written temporary file
    ca_cert = cert(state / "ca/ca.crt")
    ca_key = pki.decrypt_key((state / "ca/ca.key").read_bytes(), CA_PASSPHRASE.encode())
    desired = load_desired(StateDir(state))
    spec = desired.leaves[0]  # alice
    written, half = pki.generate_key(spec.key), pki.generate_key(spec.key)
    unknown = pki.build_leaf_certificate(
        spec,
        written.public_key(),
        ca_cert=ca_cert,
        ca_key=ca_key,
        serial=x509.random_serial_number(),
        not_before=T0,
        not_after=T0 + timedelta(days=30),
    )
    temp = pki.build_leaf_certificate(
        spec,
        half.public_key(),
        ca_cert=ca_cert,
        ca_key=ca_key,
        serial=x509.random_serial_number(),
        not_before=T0,
        not_after=T0 + timedelta(days=30),
    )
    (state / "clients/alice.key").write_bytes(pki.encrypt_key(written, KEY_PASSPHRASE.encode()))
    (state / "clients/alice.crt").write_bytes(pki.pem(unknown))
    (state / "clients/.bob.crt.tmp").write_bytes(pki.pem(temp))
    (state / ".ledger.jsonl.tmp").write_bytes(b'{"ledger": 1')
    plan = actions(plan_json(state))
    assert plan["client/alice"]["kind"] == "issue"
    assert any("is not in the ledger" in str(r) for r in plan["client/alice"]["reasons"])  # type: ignore[attr-defined]
    assert plan["temporary files"]["kind"] == "repair"
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    ledger = {e.serial: e for e in ledger_of(state).entries}
    assert ledger[unknown.serial_number].status is CertStatus.SUPERSEDED
    assert ledger[temp.serial_number].status is CertStatus.SUPERSEDED
    assert not list(state.rglob("*.tmp"))
    assert not plan_state(state, T0).changes


# --------------------------------------------------------------------------- what cannot be read


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param("dir-link", "clients cannot be read (it is a symbolic link)", id="dir-link"),
        pytest.param(
            "cert-link", "clients/bob.crt cannot be read (it is a symbolic link)", id="cert-link"
        ),
        pytest.param(
            "ledger-link", "ledger.jsonl cannot be read (it is a symbolic link)", id="ledger-link"
        ),
        pytest.param(
            "cert-dir", "clients/bob.crt cannot be read (it is not a regular file)", id="cert-dir"
        ),
        pytest.param("fifo", "ca/crl.pem cannot be read (it is not a regular file)", id="fifo"),
    ],
)
def test_what_cannot_be_read_blocks_and_says_why(
    state: Path, tmp_path: Path, damage: str, message: str
) -> None:
    """Missing is repaired; a link, a directory or a pipe where a file belongs is not read
    through, not written through, and blocks with the path and what it is."""
    outside = tmp_path / "outside"
    shutil.copytree(state / "clients", outside)
    if damage == "dir-link":
        shutil.rmtree(state / "clients")
        (state / "clients").symlink_to(outside)
        (state / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: dave\n"))
    elif damage == "cert-link":
        (state / "clients/bob.crt").unlink()
        (state / "clients/bob.crt").symlink_to(outside / "alice.crt")
    elif damage == "ledger-link":
        (state / "ledger.jsonl").unlink()
        (state / "ledger.jsonl").symlink_to("/dev/zero")
    elif damage == "cert-dir":
        (state / "clients/bob.crt").unlink()
        (state / "clients/bob.crt").mkdir()
    else:
        (state / "ca/crl.pem").unlink()
        os.mkfifo(state / "ca/crl.pem")
    before, outside_before = files_under(state), files_under(outside)
    planned = run(state, "plan", now=T0 + timedelta(days=25), environ={})
    assert planned.code == 1
    assert message in planned.out
    applied = run(state, "apply", "--no-commit", now=T0 + timedelta(days=25))
    assert applied.code == 1
    assert message in applied.err
    assert files_under(state) == before
    assert files_under(outside) == outside_before


# --------------------------------------------------------------------------- crash safety


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout


def _users(names: list[str], generation: dict[str, int]) -> str:
    body = "".join(
        f"  - name: {n}\n" + (f"    generation: {generation[n]}\n" if n in generation else "")
        for n in names
    )
    return users_yaml(body)


def _serials_on_disk(state: Path) -> dict[int, str]:
    """Every certificate a crash left on disk (temporary files included), by serial."""
    found = {}
    for path in [*state.glob("clients/*.crt"), *state.glob("clients/.*.crt.tmp")]:
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            continue  # a half-written temporary file: it never held a certificate
        name = path.name.removeprefix(".").removesuffix(".tmp").removesuffix(".crt")
        found[certificate.serial_number] = name
    return found


def _check_commit(repo: Path, commit: str) -> None:
    """In every commit: the ledger's CA signature verifies and every certificate is in it."""

    def show(path: str) -> bytes:
        return subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=repo, capture_output=True, check=True
        ).stdout

    files = _git(repo, "ls-tree", "-r", "--name-only", commit, "state").split()
    if "state/ledger.jsonl" not in files:
        assert not [f for f in files if f.endswith(".crt")]
        return
    ledger, signed, signature = decode_ledger(show("state/ledger.jsonl"))
    ca = x509.load_pem_x509_certificate(show("state/ca/ca.crt"))
    assert signature is not None
    assert pki.verify(ca.public_key(), signed, signature), commit
    known = {e.serial for e in ledger.entries}
    for path in files:
        if path.endswith(".crt") and "/ca/" not in path:
            assert x509.load_pem_x509_certificate(show(path)).serial_number in known, path
        assert not PLAINTEXT_KEY.search(show(path)), path


def _leaf_files(state: Path) -> dict[str, tuple[int, int]]:
    with os.scandir(state / "clients") as entries:
        return {
            entry.name: (info.st_ino, info.st_mtime_ns)
            for entry in entries
            if not entry.name.endswith(".tmp")
            for info in [entry.stat(follow_symlinks=False)]
        }


def _progress(state: Path, before: dict[str, tuple[int, int]], moment: int | str) -> bool:
    """Has the apply reached the moment: that many leaf files written, or the ledger or CRL
    replaced (moment names the file)?"""
    if isinstance(moment, str):
        try:
            info = (state / moment).stat()
        except FileNotFoundError:
            return False
        return before.get(moment) != (info.st_ino, info.st_mtime_ns)
    now = _leaf_files(state)
    return sum(1 for name, seen in now.items() if before.get(name) != seen) >= moment


def _kill_at(command: list[str], env: dict[str, str], state: Path, moment: int | str) -> bool:
    """Run an apply and SIGKILL it (its whole process group, git included) at the moment it
    reaches `moment`; False when it finished first. Waits on progress, never on a clock."""
    before = _leaf_files(state)
    for name in ("ledger.jsonl", "ca/crl.pem"):
        info = (state / name).stat()
        before[name] = (info.st_ino, info.st_mtime_ns)
    return kill_when([*command, "apply"], env, lambda: _progress(state, before, moment))


@pytest.mark.slow
def test_kill_9_at_many_moments_converges(tmp_path: Path) -> None:
    # which moments: CRASH_SEED replays a failure
    seed = int(os.environ.get("CRASH_SEED", str(random.randrange(2**32))))  # noqa: S311
    rng = random.Random(seed)  # noqa: S311
    repo = tmp_path / "repo"
    state = repo / "state"
    state.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".secrets/\n")
    names = [f"user{i:03d}" for i in range(300)]
    (state / "users.yaml").write_text(_users(names, {}))
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "users.yaml: 300 users")
    env = {
        **os.environ,
        **SECRETS,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e.invalid",
    }
    command = [sys.executable, "-m", "reconciler", "--state", str(state), "--now", T0.isoformat()]
    first = subprocess.run([*command, "apply"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr

    # one apply that issues 100, re-issues 20 (generation bump) and revokes 100 at once,
    # killed while it writes keys and certificates, after it wrote the ledger, after the CRL
    removed = names[:100]
    kept = names[100:]
    added = [f"user{i:03d}" for i in range(300, 400)]
    bumped = {name: 2 for name in kept[:20]}
    (state / "users.yaml").write_text(_users(kept + added, bumped))
    seen: dict[int, str] = _serials_on_disk(state)
    kills = 0
    for moment in ["writes"] * 5 + ["ledger.jsonl", "ca/crl.pem"]:
        to_issue = sum(
            1 for a in plan_state(state, T0).changes if a.kind in ("issue", "renew", "reissue")
        )
        if moment == "writes":
            if to_issue < 3:
                continue
            target: int | str = rng.randrange(1, 2 * to_issue - 2)  # files: a key, a certificate
        else:
            target = moment
        kills += _kill_at(command, env, state, target)
        seen.update(_serials_on_disk(state))
    final = subprocess.run([*command, "apply"], env=env, capture_output=True, text=True)
    assert final.returncode == 0, f"seed {seed}: {final.stderr}"
    assert kills >= 3, f"seed {seed}: the apply finished before enough kills"

    # converged: nothing left to do, nothing left behind, everything committed
    assert not plan_state(state, T0).changes
    again = subprocess.run([*command, "apply"], env=env, capture_output=True, text=True)
    assert "Nothing to do" in again.stdout
    assert not list(state.rglob("*.tmp")), f"seed {seed}"
    assert _git(repo, "status", "--porcelain", "--", "state") == "", f"seed {seed}"
    # every certificate that reached the disk is in the ledger
    ledger = {e.serial: e for e in ledger_of(state).entries}
    missing = {s: n for s, n in seen.items() if s not in ledger}
    assert not missing, f"seed {seed}: {len(missing)} unrecorded, e.g. {list(missing)[:3]}"
    # no still-valid certificate of a removed name escapes the CRL
    revoked = crl_serials(state)
    for entry in ledger.values():
        if entry.name in removed and entry.not_after > T0:
            assert entry.status is CertStatus.REVOKED, f"seed {seed}: {entry}"
            assert entry.serial in revoked, f"seed {seed}: {entry}"
    for serial, name in seen.items():
        if name in removed:
            assert serial in revoked, f"seed {seed}: {name} {serial:x}"
    # the generation bump revoked the old certificates of the bumped names
    for entry in ledger.values():
        if entry.name in bumped and entry.generation == 1:
            assert entry.status is CertStatus.REVOKED, f"seed {seed}: {entry}"
    # and the history holds no commit whose ledger misses a certificate or lost its signature
    for commit in _git(repo, "rev-list", "HEAD").split():
        _check_commit(repo, commit)
    shutil.rmtree(repo / ".secrets", ignore_errors=True)
