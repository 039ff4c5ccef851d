"""Server certificates signed by another CA: the CSR goes out, the chain comes in.

A real two-level external CA (root and intermediate, made with the openssl command) signs the
CSR that apply makes; the chain is committed as servers/NAME.crt and checked before apply
accepts it; a real PostgreSQL 15 serves it to psql with sslmode=verify-full. Each refusal is
tried with a certificate that is wrong in one way. Validity comes from the real clock (openssl
signs from now), so most runs use the clock too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pgcluster import cluster
from support import KEY_PASSPHRASE, git, ledger_of, run

from reconciler import pki

SERVER = "pg.test.example"
CSR = Path("servers") / f"{SERVER}.csr"
PENDING = Path("servers") / "pending" / f"{SERVER}.key"
CRT = Path("servers") / f"{SERVER}.crt"
KEY = Path("servers") / f"{SERVER}.key"
DAY = timedelta(days=1)
USERS = (
    "version: 1\n"
    "ca: {subject: {CN: Test CA, O: Acme}, key: ecdsa-p256}\n"
    "defaults: {key: ecdsa-p256, validity: 30d, renew_before: 10d, subject: {O: Acme}}\n"
    "trust: [trust/corp-root.pem]\n"
    "users:\n  - name: alice\n    hba: [{database: postgres, address: 127.0.0.1/32}]\n"
    f"servers:\n  - name: {SERVER}\n    dns: [db.test.example]\n    ip: [127.0.0.1]\n"
    "    issuer: external\n"
)


def openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def make_ca(where: Path, name: str) -> Path:
    """An external CA as a corporate PKI team makes one: a root, and an intermediate that
    signs. Returns its directory (root.pem, inter.pem, inter.key)."""
    where.mkdir(parents=True)
    ca_ext = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
    (where / "ca.ext").write_text(
        ca_ext + "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        where,
        "req",
        "-x509",
        *curve,
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-days",
        "3650",
        "-subj",
        f"/O=Corp/CN={name} Root CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl(
        where,
        "req",
        "-new",
        *curve,
        "-keyout",
        "inter.key",
        "-out",
        "inter.csr",
        "-subj",
        f"/O=Corp/CN={name} Issuing CA",
    )
    openssl(
        where,
        "x509",
        "-req",
        "-in",
        "inter.csr",
        "-CA",
        "root.pem",
        "-CAkey",
        "root.key",
        "-set_serial",
        "0x1234",
        "-days",
        "3650",
        "-extfile",
        "ca.ext",
        "-out",
        "inter.pem",
    )
    return where


def sign(
    ca: Path, csr: Path, out: Path, *, sans: str, eku: str = "serverAuth", days: int = 30
) -> None:
    """The external CA signs csr; out gets the chain as it is committed (leaf, intermediate)."""
    ext = ca / f"{out.name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={eku}\nsubjectAltName={sans}\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl(
        ca,
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        "inter.pem",
        "-CAkey",
        "inter.key",
        "-set_serial",
        f"0x{os.urandom(8).hex()}",
        "-days",
        str(days),
        "-extfile",
        str(ext),
        "-out",
        str(out),
    )
    out.write_bytes(out.read_bytes() + (ca / "inter.pem").read_bytes())


GOOD_SANS = f"DNS:{SERVER},DNS:db.test.example,IP:127.0.0.1"


@pytest.fixture
def pending(tmp_path: Path) -> tuple[Path, Path]:
    """A state directory whose first apply made the CSR, and the external CA."""
    state = tmp_path / "state"
    (state / "trust").mkdir(parents=True)
    corp = make_ca(tmp_path / "corp", "Corp")
    shutil.copy(corp / "root.pem", state / "trust" / "corp-root.pem")
    (state / "users.yaml").write_text(USERS)
    applied = run(state, "apply", "--no-commit")
    assert applied.code == 0, applied.err
    return state, corp


def test_apply_makes_a_key_and_a_csr_and_the_plan_waits(pending: tuple[Path, Path]) -> None:
    state, _ = pending
    assert not (state / CRT).exists()
    assert not (state / KEY).exists()
    assert (state / PENDING).stat().st_mode & 0o777 == 0o600
    key = pki.decrypt_key((state / PENDING).read_bytes(), KEY_PASSPHRASE.encode())
    request = x509.load_pem_x509_csr((state / CSR).read_bytes())
    # pkilint lints certificates and CRLs, not CSRs: the CSR's content is checked here
    assert request.is_signature_valid
    assert pki.same_public_key(request.public_key(), key.public_key())
    assert request.subject.rfc4514_string() == f"CN={SERVER},O=Acme"
    alt = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == [SERVER, "db.test.example"]
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = request.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    planned = run(state, "plan", "--detailed-exitcode", environ={})
    assert planned.code == 0, planned.err  # waiting is no change and no failure
    assert "waiting for the signed certificate" in planned.out
    assert str(CRT) in planned.out
    status = run(state, "status", "--warn-days", "7", environ={})
    assert status.code == 0
    assert "pending" in status.out
    assert "since" in status.out
    exported = run(state, "export", SERVER, "--layout", "server", "--out", str(state.parent / "x"))
    assert exported.code == 1
    assert "no accepted certificate" in exported.err


def test_the_signed_chain_is_accepted_and_postgresql_serves_it(pending: tuple[Path, Path]) -> None:
    state, corp = pending
    pending_bytes = (state / PENDING).read_bytes()
    sign(corp, state / CSR, state / CRT, sans=GOOD_SANS)
    planned = run(state, "plan", environ={})
    assert planned.code == 0, planned.err
    assert "accept" in planned.out
    assert "Corp Issuing CA ← O=Corp, CN=Corp Root CA" in planned.out
    assert pki.fingerprint(pki.load_certificates((state / CRT).read_bytes())[0]) in planned.out
    assert run(state, "apply", "--no-commit").code == 0
    assert (state / KEY).read_bytes() == pending_bytes
    assert not (state / CSR).exists()
    assert not (state / PENDING).exists()
    entry = next(e for e in ledger_of(state).entries if e.name == SERVER)
    assert entry.issuer == "O=Corp, CN=Corp Issuing CA"
    assert run(state, "plan", "--detailed-exitcode", environ={}).code == 0
    status = run(state, "status", "--prometheus", str(state.parent / "r.prom"), environ={})
    assert f"server  {SERVER}" in status.out
    assert "valid" in status.out
    assert f'name="{SERVER}"' in (state.parent / "r.prom").read_text()
    server, client = state.parent / "server", state.parent / "alice"
    assert run(state, "export", SERVER, "--layout", "server", "--out", str(server)).code == 0
    assert run(state, "export", "alice", "--layout", "libpq", "--out", str(client)).code == 0
    assert (server / "server.crt").read_bytes() == (state / CRT).read_bytes()
    assert (server / "root.crt").read_bytes() == (state / "ca" / "ca.crt").read_bytes()
    assert (corp / "root.pem").read_bytes() in (client / "root.crt").read_bytes()
    hba = run(state, "hba", environ={})
    with cluster() as pg:
        pg.install_tls(server)
        pg.write_hba(f"local all all trust\n{hba.out}")
        pg.start()
        assert pg.sql("create role alice login").returncode == 0
        done = pg.login(client, "alice", host=SERVER)
        assert done.returncode == 0, done.stderr + pg.log()[-2000:]
        assert done.stdout.strip() == "alice"
        # the client's bundle without the external root cannot verify the server
        (client / "ours.crt").write_bytes((state / "ca" / "ca.crt").read_bytes())
        refused = pg.login(client, "alice", host=SERVER, options=f"sslrootcert={client}/ours.crt")
        assert refused.returncode != 0
        assert "certificate verify failed" in refused.stderr


def _wrong_key(state: Path, corp: Path) -> None:
    openssl(
        corp,
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.csr",
        "-subj",
        f"/CN={SERVER}",
    )
    sign(corp, corp / "other.csr", state / CRT, sans=GOOD_SANS)


def _untrusted(state: Path, corp: Path) -> None:
    sign(make_ca(corp.parent / "evil", "Evil"), state / CSR, state / CRT, sans=GOOD_SANS)


REFUSALS = {
    "wrong key": (_wrong_key, "its key is not the pending key", 0),
    "missing SAN": (
        lambda s, c: sign(c, s / CSR, s / CRT, sans=f"DNS:{SERVER},IP:127.0.0.1"),
        "it lacks the SAN db.test.example",
        0,
    ),
    "expired": (lambda s, c: sign(c, s / CSR, s / CRT, sans=GOOD_SANS, days=1), "expired on", 2),
    "untrusted root": (_untrusted, "its chain does not verify to a trust root", 0),
    "no serverAuth": (
        lambda s, c: sign(c, s / CSR, s / CRT, sans=GOOD_SANS, eku="clientAuth"),
        "it lacks EKU serverAuth",
        0,
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=REFUSALS)
def test_a_wrong_certificate_is_refused_for_that_server(
    pending: tuple[Path, Path], case: str
) -> None:
    state, corp = pending
    make, reason, days_later = REFUSALS[case]
    make(state, corp)
    now = datetime.now(UTC) + days_later * DAY
    planned = run(state, "plan", now=now, environ={})
    assert planned.code == 0, planned.err  # the server's refusal, not a blocker
    assert "refused" in planned.out
    assert reason in planned.out
    assert run(state, "apply", "--no-commit", now=now).code == 0
    assert not any(e.name == SERVER for e in ledger_of(state).entries)
    assert (state / CSR).exists()
    assert (state / PENDING).exists()
    assert not (state / KEY).exists()
    out = state.parent / "server"
    exported = run(state, "export", SERVER, "--layout", "server", "--out", str(out), now=now)
    assert exported.code == 1
    assert reason in exported.err
    assert not out.exists()


def test_renewal_makes_a_new_csr_while_the_old_chain_keeps_serving(
    pending: tuple[Path, Path],
) -> None:
    state, corp = pending
    sign(corp, state / CSR, state / CRT, sans=GOOD_SANS)
    assert run(state, "apply", "--no-commit").code == 0
    chain, key = (state / CRT).read_bytes(), (state / KEY).read_bytes()
    inside = datetime.now(UTC) + 25 * DAY  # 30-day certificate, 10-day window
    assert run(state, "apply", "--no-commit", now=inside).code == 0
    assert (state / CSR).exists()
    assert (state / PENDING).read_bytes() != key
    assert (state / CRT).read_bytes() == chain
    assert (state / KEY).read_bytes() == key
    out = state.parent / "server"
    assert (
        run(state, "export", SERVER, "--layout", "server", "--out", str(out), now=inside).code == 0
    )
    assert (out / "server.crt").read_bytes() == chain
    served = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    assert pki.same_public_key(served.public_key(), pki.load_certificates(chain)[0].public_key())
    assert "waiting" in run(state, "plan", now=inside, environ={}).out
    status = run(state, "status", "--warn-days", "7", now=inside, environ={})
    assert status.code == 1
    assert "renewal: a CSR waits" in status.out
    # the replacement arrives: accepted, and the new key takes over
    new_key = (state / PENDING).read_bytes()
    sign(corp, state / CSR, state / CRT, sans=GOOD_SANS)
    assert run(state, "apply", "--no-commit", now=inside).code == 0
    assert (state / KEY).read_bytes() == new_key
    assert [e.status.value for e in ledger_of(state).entries if e.name == SERVER] == [
        "superseded",
        "valid",
    ]


def test_an_apply_killed_while_accepting_is_finished_by_the_next(
    pending: tuple[Path, Path],
) -> None:
    state, corp = pending
    sign(corp, state / CSR, state / CRT, sans=GOOD_SANS)
    request, pending_key = (state / CSR).read_bytes(), (state / PENDING).read_bytes()
    (state / KEY).write_bytes(pending_key)  # killed after the key moved, before the ledger
    assert run(state, "apply", "--no-commit").code == 0
    assert any(e.name == SERVER for e in ledger_of(state).entries)
    (state / CSR).write_bytes(request)  # killed after the ledger, before the request went
    (state / PENDING).write_bytes(pending_key)
    planned = run(state, "plan", environ={})
    assert "no request is pending, remove" in planned.out, planned.out
    assert run(state, "apply", "--no-commit").code == 0
    assert not (state / CSR).exists()
    assert not (state / PENDING).exists()
    assert (state / KEY).read_bytes() == pending_key


def test_a_generation_bump_makes_a_new_key_and_csr(pending: tuple[Path, Path]) -> None:
    state, _ = pending
    before = (state / PENDING).read_bytes()
    (state / "users.yaml").write_text(
        USERS.replace("issuer: external", "issuer: external\n    generation: 2")
    )
    assert "generation changed from 1 to 2" in run(state, "plan", environ={}).out
    assert run(state, "apply", "--no-commit").code == 0
    assert (state / PENDING).read_bytes() != before
    assert "Generation: 2" in (state / CSR).read_text()


@pytest.mark.parametrize(
    ("trust", "message"),
    [
        ("[trust/none.pem]", "trust/none.pem does not exist in the state directory"),
        ("[users.yaml]", "is a file the reconciler writes or users.yaml"),
        ("[ca/ca.crt]", "is a file the reconciler writes"),
        ("[../corp/root.pem]", "must be a plain relative path inside the state directory"),
        ("[trust/link.pem]", "cannot be read (it is a symbolic link)"),
        ("[trust/text.pem]", "is not a PEM file holding one certificate"),
        ("[trust/leaf.pem]", "is not a CA certificate"),
    ],
)
def test_a_bad_trust_file_is_an_error_with_its_line(
    pending: tuple[Path, Path], trust: str, message: str
) -> None:
    state, corp = pending
    (state / "trust" / "text.pem").write_text("not a certificate\n")
    sign(corp, state / CSR, state / "trust" / "leaf.pem", sans=GOOD_SANS)
    leaf = pki.load_certificates((state / "trust" / "leaf.pem").read_bytes())[0]
    (state / "trust" / "leaf.pem").write_bytes(pki.pem(leaf))
    (state / "trust" / "link.pem").symlink_to(corp / "root.pem")
    (state / "users.yaml").write_text(USERS.replace("[trust/corp-root.pem]", trust))
    result = run(state, "validate", environ={})
    assert result.code == 1
    assert "users.yaml:4: trust[0]: " in result.err
    assert message in result.err
    (state / "users.yaml").write_text(USERS.replace("issuer: external", "issuer: corp"))
    result = run(state, "validate", environ={})
    assert result.code == 1
    assert "users.yaml:12: servers[0].issuer: 'corp' is not valid" in result.err


@pytest.mark.usefixtures("isolated_git")
def test_plan_base_lets_a_pull_request_commit_the_signed_chain_and_trust_roots(
    pending: tuple[Path, Path],
) -> None:
    state, corp = pending
    work = state.parent
    git(work, "init", "--quiet", "-b", "main")
    git(work, "add", "state")
    git(work, "commit", "--quiet", "-m", "a CSR is pending")
    git(work, "checkout", "--quiet", "-b", "signed")
    sign(corp, state / CSR, state / CRT, sans=GOOD_SANS)
    other = make_ca(work / "other", "Other")
    shutil.copy(other / "root.pem", state / "trust" / "other-root.pem")
    (state / "users.yaml").write_text(
        USERS.replace("corp-root.pem]", "corp-root.pem, trust/other-root.pem]")
    )
    git(work, "add", "state")
    git(work, "commit", "--quiet", "-m", "the signed chain, and a second root")
    planned = run(state, "plan", "--base", "main", "--markdown", environ={})
    assert planned.code == 0, planned.out + planned.err
    assert "**accept**" in planned.out
    assert "Corp Issuing CA" in planned.out
    assert "trust/other-root.pem" in planned.out
    assert "every client's root.crt will trust" in planned.out
    # anything else is still refused: the CSR, the ledger, another server's certificate
    for path in (CSR, Path("ledger.jsonl"), Path("servers/db9.test.example.crt")):
        (state / path).write_bytes((state / CRT).read_bytes())
        git(work, "add", "state")
        git(work, "commit", "--quiet", "-m", f"and {path}")
        blocked = run(state, "plan", "--base", "main", environ={})
        assert blocked.code == 1, blocked.out
        assert f"{path}: " in blocked.out
        git(work, "reset", "--quiet", "--hard", "HEAD~1")


def test_plan_base_lets_a_pull_request_retire_a_trust_root_with_its_entry(
    pending: tuple[Path, Path],
) -> None:
    state, _ = pending
    work = state.parent
    other = make_ca(work / "other", "Other")
    shutil.copy(other / "root.pem", state / "trust" / "other-root.pem")
    shutil.copy(other / "root.pem", state / "trust" / "unlisted.pem")  # never in trust
    two_roots = USERS.replace("corp-root.pem]", "corp-root.pem, trust/other-root.pem]")
    (state / "users.yaml").write_text(two_roots)
    sign(other, state / CSR, state / CRT, sans=GOOD_SANS)  # the server's chain ends at Other
    accepted = run(state, "apply", "--no-commit")
    assert accepted.code == 0, accepted.err
    assert (state / KEY).exists()
    git(work, "init", "--quiet", "-b", "main")
    git(work, "add", "state")
    git(work, "commit", "--quiet", "-m", "two trust roots, the server on Other's")
    git(work, "checkout", "--quiet", "-b", "retire")
    (state / "trust" / "other-root.pem").unlink()
    (state / "users.yaml").write_text(USERS)
    git(work, "commit", "--quiet", "-am", "retire the other root")
    planned = run(state, "plan", "--base", "main", environ={})
    assert planned.code == 0, planned.out + planned.err
    assert "trust/other-root.pem" in planned.out
    assert "stop trusting servers certified by O=Corp, CN=Other Root CA" in planned.out
    # ... and the server whose chain ended there asks for a new certificate
    server = next(line for line in planned.out.splitlines() if f"server/{SERVER}" in line)
    assert server.startswith("request"), planned.out
    assert "its chain no longer verifies to a trust root" in server
    # a trust file deleted while users.yaml still lists it: the usual file:line error
    git(work, "checkout", "--quiet", "HEAD~1", "--", "state/users.yaml")
    kept = run(state, "plan", "--base", "main", environ={})
    assert kept.code == 1
    assert "trust/other-root.pem does not exist" in kept.err
    git(work, "checkout", "--quiet", "HEAD", "--", "state/users.yaml")
    # a file base's trust never listed, and our own files, stay refused when deleted
    for path in ("trust/unlisted.pem", "ledger.jsonl", str(CRT)):
        (state / path).unlink()
        blocked = run(state, "plan", "--base", "main", environ={})
        assert blocked.code == 1, blocked.out
        assert f"{path}: deleted, compared with main" in blocked.out
        git(work, "checkout", "--quiet", "HEAD", "--", f"state/{path}")


def test_back_to_our_ca_issues_ours_and_removes_the_request(pending: tuple[Path, Path]) -> None:
    state, _ = pending
    (state / "users.yaml").write_text(USERS.replace("    issuer: external\n", ""))
    planned = run(state, "plan", environ={})
    assert "no request is pending, remove" in planned.out, planned.out
    assert run(state, "apply", "--no-commit").code == 0
    assert not (state / CSR).exists()
    assert not (state / PENDING).exists()
    assert (state / CRT).exists()
    assert run(state, "plan", "--detailed-exitcode", environ={}).code == 0


def test_a_pending_server_that_leaves_users_yaml_leaves_no_request(
    pending: tuple[Path, Path],
) -> None:
    state, _ = pending
    without = USERS[: USERS.index("servers:")] + "servers: []\n"
    (state / "users.yaml").write_text(without)
    planned = run(state, "plan", environ={})
    assert "no request is pending, remove" in planned.out, planned.out
    assert run(state, "apply", "--no-commit").code == 0
    assert not (state / CSR).exists()
    assert not (state / PENDING).exists()
    assert run(state, "plan", "--detailed-exitcode", environ={}).code == 0
