"""Replacing the CA without an outage: raising ca.generation by one moves a state through the
three stages of DESIGN.md, paced by ca.overlap, in ordinary applies (time injected with --now).

The logins that prove no client is ever locked out are in tests/test_rotation_pg.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from support import CA_PASSPHRASE, at, git, ledger_of, run, users_yaml

from reconciler import pki

T0 = at("2026-01-01T00:00:00Z")
DAY = timedelta(days=1)
T1 = T0 + 10 * DAY  # the bump: stage 1 from here
STAGE_2 = T1 + 30 * DAY + DAY
STAGE_3 = T1 + 60 * DAY + DAY
USERS = "  - name: alice\n  - name: bob\n"
LINT_BIN = Path(sys.executable).parent


def write(state: Path, generation: int, users: str = USERS) -> None:
    text = users_yaml(users, validity="365d", renew_before="30d")
    text = text.replace("ca:\n", f"ca:\n  generation: {generation}\n  overlap: 30d\n", 1)
    (state / "users.yaml").write_text(text)


def apply(state: Path, now: object) -> str:
    done = run(state, "apply", "--no-commit", now=now)  # type: ignore[arg-type]
    assert done.code == 0, done.err
    return done.out


def certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def issuer_cn(path: Path) -> str:
    return str(certs(path)[0].issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    write(state, 1)
    apply(state, T0)
    return state


def test_three_stages_move_every_certificate_to_the_new_ca(state: Path, tmp_path: Path) -> None:
    old_cn = issuer_cn(state / "clients/alice.crt")
    write(state, 2)
    plan = run(state, "plan", now=T1)
    assert "stage 1 of 3" in plan.out
    assert f"from {(T1 + 30 * DAY).date()} every certificate is re-issued" in plan.out
    apply(state, T1)
    new_ca = certs(state / "ca/g2/ca.crt")[0]
    assert new_ca.subject.rfc4514_string().startswith("CN=Test CA G2")  # distinct from gen 1
    assert (state / "ca/g2/crl.pem").exists()
    assert issuer_cn(state / "clients/alice.crt") == old_cn  # stage 1: nothing re-issued
    header = json.loads((state / "ledger.jsonl").read_text().splitlines()[0])
    assert header["previous"]["ca"]  # the ledger pins both CAs
    bundle = tmp_path / "bundle"
    assert run(state, "export", "alice", "--layout", "libpq", "--out", str(bundle),
               "--with-crl", now=T1).code == 0  # fmt: skip
    assert len(certs(bundle / "root.crt")) == 2
    assert (bundle / "root.crl").read_bytes().count(b"BEGIN X509 CRL") == 2
    status = run(state, "status", now=T1 + DAY)
    assert "stage 1 of 3" in status.out

    # a user added in stage 1 gets a certificate of the old CA, still the issuing one
    write(state, 2, USERS + "  - name: carol\n")
    apply(state, T1 + 5 * DAY)
    assert issuer_cn(state / "clients/carol.crt") == old_cn

    out = apply(state, STAGE_2)
    assert "CA rotation: re-issue under the generation 2 CA" in out
    for name in ("alice", "bob", "carol"):
        assert issuer_cn(state / f"clients/{name}.crt") == "Test CA G2"
    entries = ledger_of(state).entries
    assert {e.ca_generation for e in entries if e.status.value == "valid"} == {2}
    assert {e.status.value for e in entries if e.ca_generation == 1} == {"superseded"}
    assert run(state, "plan", "--detailed-exitcode", now=STAGE_2 + DAY).code == 0

    out = apply(state, STAGE_3)
    assert "generation 1 leaves every bundle" in out
    assert not (state / "ca/ca.crt").exists()
    assert not (state / "ca/ca.key").exists()
    assert not (state / "ca/crl.pem").exists()
    final = tmp_path / "final"
    assert run(state, "export", "alice", "--layout", "libpq", "--out", str(final),
               "--with-crl", now=STAGE_3).code == 0  # fmt: skip
    assert [c.subject for c in certs(final / "root.crt")] == [new_ca.subject]
    assert run(state, "plan", "--detailed-exitcode", now=STAGE_3 + DAY).code == 0
    assert "rotation" not in run(state, "status", now=STAGE_3 + DAY).out


def test_a_generation_moves_by_one_and_never_back(state: Path) -> None:
    write(state, 3)
    jump = run(state, "plan", now=T1)
    assert jump.code == 1
    assert "ca.generation is 3 but the CA is generation 1: raise it by one at a time" in jump.out
    write(state, 2)
    apply(state, T1)
    write(state, 3)
    during = run(state, "plan", now=T1 + DAY)
    assert during.code == 1
    assert "a rotation from generation 1 to 2 is underway: set it back to 2" in during.out
    write(state, 1)
    assert run(state, "plan", now=T1 + DAY).code == 1
    write(state, 2)
    apply(state, STAGE_3)
    write(state, 1)
    lowered = run(state, "plan", now=STAGE_3 + DAY)
    assert lowered.code == 1
    assert "a generation is never lowered; set it back to 2" in lowered.out


def test_revoking_during_the_overlap_revokes_under_both_cas(state: Path) -> None:
    write(state, 2)
    apply(state, T1)
    old_serial = certs(state / "clients/bob.crt")[0].serial_number
    apply(state, STAGE_2)
    new_serial = certs(state / "clients/bob.crt")[0].serial_number
    write(state, 2, "  - name: alice\n")
    apply(state, STAGE_2 + DAY)
    old_crl = x509.load_pem_x509_crl((state / "ca/crl.pem").read_bytes())
    new_crl = x509.load_pem_x509_crl((state / "ca/g2/crl.pem").read_bytes())
    assert old_crl.get_revoked_certificate_by_serial_number(old_serial) is not None
    assert new_crl.get_revoked_certificate_by_serial_number(new_serial) is not None
    assert new_crl.get_revoked_certificate_by_serial_number(old_serial) is None  # not its own
    ca1 = certs(state / "ca/ca.crt")[0]
    ca2 = certs(state / "ca/g2/ca.crt")[0]
    assert old_crl.is_signature_valid(ca1.public_key())  # type: ignore[arg-type]
    assert new_crl.is_signature_valid(ca2.public_key())  # type: ignore[arg-type]


def test_an_apply_interrupted_as_the_rotation_began_is_finished(
    state: Path, tmp_path: Path
) -> None:
    """The state a kill after the new CA's files, before the ledger, leaves: a CA that signed
    nothing and that the ledger does not pin. The next apply makes it again."""
    ledger, crl = (state / "ledger.jsonl").read_bytes(), (state / "ca/crl.pem").read_bytes()
    write(state, 2)
    apply(state, T1)
    (state / "ledger.jsonl").write_bytes(ledger)  # apply writes the ledger, then the CRLs
    (state / "ca/crl.pem").write_bytes(crl)
    (state / "ca/g2/crl.pem").unlink()
    plan = run(state, "plan", now=T1 + DAY)
    assert plan.code == 0, plan.out
    assert "an interrupted apply began the rotation: create the generation 2 CA again" in plan.out
    apply(state, T1 + DAY)
    assert run(state, "plan", "--detailed-exitcode", now=T1 + 2 * DAY).code == 0


def test_an_apply_interrupted_while_retiring_is_finished(state: Path, tmp_path: Path) -> None:
    write(state, 2)
    apply(state, T1)
    kept = tmp_path / "gen1"
    shutil.copytree(state / "ca", kept, ignore=shutil.ignore_patterns("g2"))
    apply(state, STAGE_3)
    for name in ("ca.crt", "ca.key", "crl.pem"):  # the files stayed, the ledger moved on
        shutil.copy(kept / name, state / "ca" / name)
    plan = run(state, "plan", now=STAGE_3 + DAY)
    assert plan.code == 0, plan.out
    assert "generation 1 leaves every bundle" in plan.out
    apply(state, STAGE_3 + DAY)
    assert not (state / "ca/ca.crt").exists()


def test_a_swapped_older_ca_is_refused_during_the_overlap(state: Path, tmp_path: Path) -> None:
    write(state, 2)
    apply(state, T1)
    other = tmp_path / "other"
    other.mkdir()
    write(other, 1)
    apply(other, T0)
    shutil.copy(other / "ca/ca.crt", state / "ca/ca.crt")
    plan = run(state, "plan", now=T1 + DAY)
    assert plan.code == 1
    assert "ca/ca.crt is not the CA this state was issued under" in plan.out


def test_the_new_ca_and_both_crls_are_pkilint_clean(state: Path) -> None:
    write(state, 2)
    apply(state, T1)
    targets = [
        ("lint_pkix_cert", ["-s", "WARNING"], state / "ca/g2/ca.crt"),
        ("lint_crl", ["-t", "CRL", "-p", "PKIX", "-s", "WARNING"], state / "ca/g2/crl.pem"),
        ("lint_crl", ["-t", "CRL", "-p", "PKIX", "-s", "WARNING"], state / "ca/crl.pem"),
    ]
    for tool, options, path in targets:
        done = subprocess.run(
            [str(LINT_BIN / tool), "lint", *options, str(path)], capture_output=True, text=True
        )
        assert (done.returncode, done.stdout.strip(), done.stderr.strip()) == (0, "", ""), (
            path,
            done.stdout,
            done.stderr,
        )


def test_a_rotation_needs_the_ca_passphrase_in_place_and_generates_none(state: Path) -> None:
    """Only a first CA gets generated passphrases: the new CA of a rotation is encrypted with
    the CA passphrase that opens the one in place, so both open with one secret."""
    write(state, 2)
    secrets_dir = state.parent / ".secrets"
    done = run(state, "apply", "--no-commit", now=T1, environ={"HOME": str(state.parent)})
    assert done.code == 1
    assert "RECONCILER_CA_PASSPHRASE" in done.err
    assert not secrets_dir.exists()
    assert not (state / "ca/g2").exists()
    apply(state, T1)
    for key in ("ca/ca.key", "ca/g2/ca.key"):
        load_pem_private_key((state / key).read_bytes(), CA_PASSPHRASE.encode())


def test_a_no_op_during_a_rotation_parses_no_known_certificate(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast no-op keeps working across a rotation: a certificate the signed ledger records
    is taken from the ledger, whichever CA issued it; only the two CA certificates are read."""
    write(state, 2)
    apply(state, T1)
    apply(state, STAGE_2)  # alice and bob re-issued under generation 2, the old ones superseded
    parsed: list[bytes] = []
    real = pki.load_certificates

    def counting(data: bytes) -> list[x509.Certificate]:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(pki, "load_certificates", counting)
    assert run(state, "plan", "--detailed-exitcode", now=STAGE_2 + DAY).code == 0
    assert len(parsed) == 2  # ca/ca.crt and ca/g2/ca.crt
    assert all(b"BEGIN CERTIFICATE" in data for data in parsed)


def test_each_commit_of_a_rotation_names_its_stage(tmp_path: Path, isolated_git: None) -> None:
    state = tmp_path / "repo" / "state"
    state.mkdir(parents=True)
    write(state, 1)
    git(tmp_path / "repo", "init", "--quiet", "-b", "main")
    assert run(state, "apply", now=T0).code == 0
    write(state, 2)
    assert run(state, "apply", now=T1).code == 0
    message = git(tmp_path / "repo", "log", "-1", "--format=%B")
    assert "CA rotation from generation 1 to 2, stage 1 of 3" in message
    assert "ca: ca.generation raised to 2: create the new CA" in message
    assert run(state, "apply", now=STAGE_2).code == 0
    assert "stage 2 of 3" in git(tmp_path / "repo", "log", "-1", "--format=%B")
