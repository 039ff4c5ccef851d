"""Against a real PostgreSQL 15: exported certificates log in exactly as they should.

One state directory is bootstrapped 40 days in the past (so a 1-day certificate has expired and
the first CRL has passed its nextUpdate), then reconciled now. The server gets its certificate
with `export --layout server`, its pg_hba.conf from `reconciler hba`; clients are psql with
`export --layout libpq` files and sslmode=verify-full. Tests that change the deployment run last.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pgcluster import Cluster, cluster
from support import run

from reconciler.desired import load_desired
from reconciler.hba import fragment
from reconciler.pem import PLAINTEXT_KEY
from reconciler.store import StateDir

NOW = datetime.now(UTC)  # PostgreSQL checks validity against the real clock
T1 = NOW - timedelta(days=40)
HBA = "    hba: [{database: postgres, address: 127.0.0.1/32}]\n"
SERVER = "pg.test.example"  # clients connect with hostaddr=127.0.0.1 and verify this name


def users_yaml(*, with_bob: bool = True) -> str:
    users = "  - name: alice\n" + HBA
    if with_bob:
        users += "  - name: bob\n" + HBA
    users += "  - name: rsauser\n    key: rsa-4096\n" + HBA
    users += "  - name: shortlived\n    validity: 1d\n    renew_before: 1h\n" + HBA
    return (
        "version: 1\n"
        "ca:\n  subject: {CN: PG Test CA, O: Acme}\n  key: ecdsa-p256\n  validity: 3650d\n"
        "defaults:\n  key: ecdsa-p256\n  validity: 365d\n  subject: {O: Acme}\n"
        "crl: {validity: 30d, refresh_before: 20d}\n"
        f"users:\n{users}"
        f"servers:\n  - name: {SERVER}\n"
    )


@dataclasses.dataclass
class Deployment:
    state: Path
    state_at_t1: Path  # a copy taken right after the bootstrap 40 days ago
    exports: Path
    pg: Cluster

    def export(self, name: str, layout: str = "libpq", *, now: datetime = NOW) -> Path:
        out = self.exports / f"{name}-{layout}-{now:%Y%m%d%H%M%S}"
        crl = ("--with-crl",) if layout == "libpq" else ()  # these clients check sslcrl too
        result = run(
            self.state, "export", name, "--layout", layout, "--out", str(out), *crl, now=now
        )
        assert result.code == 0, result.err
        return out

    def psql(
        self, files: Path, role: str, *, host: str = SERVER
    ) -> subprocess.CompletedProcess[str]:
        return self.pg.login(files, role, host=host, options=f"sslcrl={files}/root.crl")

    def logs_in_as(self, files: Path, role: str) -> str:
        done = self.psql(files, role)
        assert done.returncode == 0, done.stderr + self.pg.log()[-2000:]
        return done.stdout.strip()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("pg")
    state = base / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml())
    assert run(state, "apply", "--no-commit", now=T1).code == 0
    state_at_t1 = base / "state-at-t1"
    shutil.copytree(state, state_at_t1)
    with cluster() as pg:
        deploy = Deployment(state=state, state_at_t1=state_at_t1, exports=base / "exports", pg=pg)
        deploy.exports.mkdir()
        shortlived = deploy.export("shortlived", now=T1)
        shutil.copytree(shortlived, deploy.exports / "shortlived-at-t1")
        applied = run(state, "apply", "--no-commit", now=NOW)
        assert applied.code == 0, applied.err
        pg.install_tls(deploy.export(SERVER, "server"))
        hba = run(state, "hba", now=NOW)
        assert hba.code == 0, hba.err
        pg.write_hba(f"local all all trust\n{hba.out}")
        pg.start()
        for role in ("alice", "bob", "rsauser", "shortlived"):
            created = pg.sql(f"create role {role} login")
            assert created.returncode == 0, created.stderr
        yield deploy


def test_user_logs_in_with_verify_full_as_its_own_role(deployment: Deployment) -> None:
    alice = deployment.export("alice")
    assert deployment.logs_in_as(alice, "alice") == "alice"
    assert (alice / "postgresql.key").stat().st_mode & 0o777 == 0o600
    assert PLAINTEXT_KEY.match((alice / "postgresql.key").read_bytes())  # decrypted


def test_a_certificate_cannot_log_in_as_another_role(deployment: Deployment) -> None:
    alice = deployment.export("alice")
    done = deployment.psql(alice, "bob")
    assert done.returncode != 0
    assert 'certificate authentication failed for user "bob"' in done.stderr


def test_rsa_4096_and_ecdsa_users_both_log_in(deployment: Deployment) -> None:
    rsa = deployment.export("rsauser")
    assert b"BEGIN PRIVATE KEY" in (rsa / "postgresql.key").read_bytes()
    assert deployment.logs_in_as(rsa, "rsauser") == "rsauser"
    assert deployment.logs_in_as(deployment.export("bob"), "bob") == "bob"


def test_an_expired_certificate_is_refused(deployment: Deployment) -> None:
    expired = deployment.exports / "shortlived-at-t1"
    # today's CA and CRL on the client side, so only the client certificate is old
    current = deployment.export("alice")
    for name in ("root.crt", "root.crl"):
        shutil.copy2(current / name, expired / name)
    done = deployment.psql(expired, "shortlived")
    assert done.returncode != 0
    assert "alert certificate expired" in done.stderr, done.stderr
    # the renewed one, issued by today's apply, works
    assert deployment.logs_in_as(deployment.export("shortlived"), "shortlived") == "shortlived"


def test_verify_full_fails_when_the_server_sans_lack_the_host_name(
    deployment: Deployment,
) -> None:
    alice = deployment.export("alice")
    # the server certificate names pg.test.example only; the client asks for 127.0.0.1
    done = deployment.psql(alice, "alice", host="127.0.0.1")
    assert done.returncode != 0
    assert 'does not match host name "127.0.0.1"' in done.stderr


def test_hba_check_predicts_what_postgresql_does(deployment: Deployment) -> None:
    pg_hba = deployment.pg.data / "pg_hba.conf"
    ok = run(deployment.state, "hba", "--check", str(pg_hba), now=NOW)
    assert ok.code == 0, ok.out + ok.err
    original = pg_hba.read_text()
    deployment.pg.write_hba("host all all 127.0.0.0/8 scram-sha-256\n" + original)
    try:
        shadowed = run(deployment.state, "hba", "--check", str(pg_hba), now=NOW)
        assert shadowed.code == 1
        assert "pg_hba.conf:1: `host all all 127.0.0.0/8 scram-sha-256` matches first" in (
            shadowed.out
        )
        deployment.pg.reload()
        done = deployment.psql(deployment.export("alice"), "alice")
        assert done.returncode != 0  # PostgreSQL now asks for a password instead
        assert "password" in done.stderr
    finally:
        deployment.pg.write_hba(original)
        deployment.pg.reload()
    assert deployment.logs_in_as(deployment.export("alice"), "alice") == "alice"
    fragment_text = fragment(load_desired(StateDir(deployment.state)))
    assert "hostssl postgres alice 127.0.0.1/32 cert" in fragment_text


# --- the tests below change the deployment; they run last, in this order -------------------


def test_a_crl_past_its_next_update_locks_everyone_out_and_status_warns_first(
    deployment: Deployment,
) -> None:
    stale_crl = deployment.state_at_t1 / "ca" / "crl.pem"
    next_update = T1 + timedelta(days=30)
    assert next_update < NOW
    # status, run on the state as it was, warns a week before it happens ...
    warned = run(
        deployment.state_at_t1, "status", "--warn-days", "7", now=next_update - timedelta(days=5)
    )
    assert warned.code == 1
    assert "crl/crl" in warned.err
    early = run(
        deployment.state_at_t1, "status", "--warn-days", "7", now=next_update - timedelta(days=10)
    )
    assert "crl/crl" not in early.err
    # ... and once it has passed, PostgreSQL refuses every client certificate
    deployment.pg.install_crl(stale_crl)
    deployment.pg.reload()
    try:
        before = len(deployment.pg.log())
        done = deployment.psql(deployment.export("alice"), "alice")
        assert done.returncode != 0
        assert "SSL error" in done.stderr, done.stderr
        refused = "could not accept SSL connection: certificate verify failed"
        assert deployment.pg.logs(refused, since=before), deployment.pg.log()[before:]
    finally:
        deployment.pg.install_crl(deployment.state / "ca" / "crl.pem")
        deployment.pg.reload()
    assert deployment.logs_in_as(deployment.export("alice"), "alice") == "alice"


def test_removed_user_is_refused_after_apply_export_and_reload(deployment: Deployment) -> None:
    bob = deployment.export("bob")
    assert deployment.logs_in_as(bob, "bob") == "bob"
    (deployment.state / "users.yaml").write_text(users_yaml(with_bob=False))
    later = NOW + timedelta(minutes=1)
    applied = run(deployment.state, "apply", "--no-commit", now=later)
    assert applied.code == 0, applied.err
    assert "revoke" in applied.out
    gone = run(
        deployment.state,
        "export",
        "bob",
        "--layout",
        "libpq",
        "--out",
        str(deployment.exports / "bob-again"),
        now=later,
    )
    assert gone.code == 1
    assert "revoked" in gone.err
    # the server gets the new CRL from a fresh export, and reloads
    server = deployment.export(SERVER, "server", now=later)
    deployment.pg.install_crl(server / "root.crl")
    deployment.pg.reload()
    before = len(deployment.pg.log())
    done = deployment.psql(bob, "bob")
    assert done.returncode != 0
    refused = "could not accept SSL connection: certificate verify failed"
    assert deployment.pg.logs(refused, since=before), done.stderr + deployment.pg.log()[before:]
    # the only thing that changed is the CRL, and it names bob's certificate
    verified = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(server / "root.crt"),
            "-CRLfile",
            str(server / "root.crl"),
            str(bob / "postgresql.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert "certificate revoked" in verified.stdout + verified.stderr
    assert deployment.logs_in_as(deployment.export("alice", now=later), "alice") == "alice"
