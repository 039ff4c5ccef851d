"""Replacing the CA against a real PostgreSQL 15: no login fails at any stage.

Every apply runs in the past with --now; every login runs at real time, with the files each
stage exported, as hosts that are a stage behind or ahead would hold them:

    A0 = now - 80d   generation 1 issues everything
    A1 = now - 75d   ca.generation 2: stage 1 (both trusted, generation 1 still issues)
    A2 = now - 40d   stage 2: every certificate re-issued under generation 2
    A2 + 1d          carol leaves users.yaml: revoked under both CAs
    A3 = now - 10d   stage 3: generation 1 leaves the bundles

Also: why a new generation's CA gets its own subject. Two CAs with the same subject in
ssl_ca_file and ssl_crl_file do not work, since OpenSSL looks issuers and CRLs up by name.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pgcluster import Cluster, cluster
from support import run

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
A0, A1, A2, A3 = NOW - 80 * DAY, NOW - 75 * DAY, NOW - 40 * DAY, NOW - 10 * DAY
SERVER = "pg.rotation.example"
HBA = "    hba: [{database: postgres, address: 127.0.0.1/32}]\n"


def users_yaml(generation: int, users: tuple[str, ...] = ("alice", "bob", "carol")) -> str:
    return (
        "version: 1\n"
        f"ca:\n  subject: {{CN: Rotation CA, O: Acme}}\n  key: ecdsa-p256\n"
        f"  generation: {generation}\n  overlap: 30d\n"
        "defaults:\n  key: ecdsa-p256\n  validity: 365d\n"
        # long enough that a CRL signed at A1 is still current now
        "crl: {validity: 120d, refresh_before: 10d}\n"
        "users:\n" + "".join(f"  - name: {user}\n{HBA}" for user in users) + ""
        f"servers:\n  - name: {SERVER}\n"
    )


class Rotation:
    def __init__(self, base: Path, pg: Cluster) -> None:
        self.base, self.pg = base, pg
        self.state = base / "state"

    def apply(self, now: datetime, generation: int, users: tuple[str, ...] | None = None) -> None:
        text = users_yaml(generation) if users is None else users_yaml(generation, users)
        (self.state / "users.yaml").write_text(text)
        done = run(self.state, "apply", "--no-commit", now=now)
        assert done.code == 0, done.err

    def export(self, name: str, layout: str, label: str, now: datetime) -> Path:
        out = self.base / f"{label}-{name}"
        done = run(self.state, "export", name, "--layout", layout, "--out", str(out), now=now)
        assert done.code == 0, done.err
        return out

    def serve(self, files: Path) -> None:
        """Put a stage's server files in place and reload."""
        self.pg.install_tls(files)
        self.pg.reload()

    def login(self, files: Path, role: str) -> subprocess.CompletedProcess[str]:
        return self.pg.login(files, role, host=SERVER)

    def logs_in(self, files: Path, role: str) -> bool:
        return self.login(files, role).stdout.strip() == role


@pytest.fixture(scope="module")
def rotation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rotation]:
    base = tmp_path_factory.mktemp("rotation")
    (base / "state").mkdir()
    with cluster() as pg:
        r = Rotation(base, pg)
        r.apply(A0, 1)
        r.apply(A1, 2)
        pg.install_tls(r.export(SERVER, "server", "s1", A1))
        pg.write_hba(f"local all all trust\n{run(r.state, 'hba').out}")
        pg.start()
        for role in ("alice", "bob", "carol"):
            assert pg.sql(f"create role {role} login").returncode == 0
        yield r


def test_no_login_fails_at_any_stage(rotation: Rotation) -> None:
    r = rotation
    # stage 1: the server holds the two-CA bundle; an old client logs in
    s1 = r.base / f"s1-{SERVER}"
    old = {name: r.export(name, "libpq", "s1", A1) for name in ("alice", "carol")}
    assert r.logs_in(old["alice"], "alice"), r.login(old["alice"], "alice").stderr

    # stage 2: every certificate re-issued under generation 2
    r.apply(A2, 2)
    new = {name: r.export(name, "libpq", "s2", A2) for name in ("alice", "carol")}
    s2 = r.export(SERVER, "server", "s2", A2)
    # a new client, on a server still on its stage-1 files
    assert r.logs_in(new["alice"], "alice"), r.login(new["alice"], "alice").stderr
    # an old client (its stage-1 bundle) on a server with the stage-2 files: it verifies the
    # new server certificate with verify-full, and the server still takes its certificate
    r.serve(s2)
    assert r.logs_in(old["alice"], "alice"), r.login(old["alice"], "alice").stderr
    assert r.logs_in(new["alice"], "alice")

    # revoked during the overlap: carol's certificates under both CAs are refused
    r.apply(A2 + DAY, 2, ("alice", "bob"))
    r.serve(r.export(SERVER, "server", "s2-revoked", A2 + DAY))
    for files in (old["carol"], new["carol"]):
        refused = r.login(files, "carol")
        assert refused.returncode != 0
        assert "revoked" in refused.stderr + r.pg.log()[-3000:]
    assert r.logs_in(old["alice"], "alice")
    assert r.logs_in(new["alice"], "alice")

    # stage 3: generation 1 leaves the bundles; its clients are refused, the new ones are not
    r.apply(A3, 2, ("alice", "bob"))
    r.serve(r.export(SERVER, "server", "s3", A3))
    assert not r.logs_in(old["alice"], "alice")
    assert r.logs_in(new["alice"], "alice"), r.login(new["alice"], "alice").stderr
    assert s1.exists()


def test_two_cas_with_one_subject_work_together_in_postgresql_15(tmp_path: Path) -> None:
    """What DESIGN.md asked to find out: two CAs with the same subject in ssl_ca_file and
    ssl_crl_file work on PostgreSQL 15 with OpenSSL 3, logins and revocation alike, because
    our certificates and CRLs carry key identifiers that tell the two apart. Generation 2's
    CA is called "… G2" all the same, for people and for TLS stacks that match on names."""
    states = []
    for label in ("a", "b"):
        state = tmp_path / label / "state"
        state.mkdir(parents=True)
        (state / "users.yaml").write_text(users_yaml(1, ("alice",)))
        assert run(state, "apply", "--no-commit", now=NOW - DAY).code == 0
        states.append(state)
    server = tmp_path / "server"
    assert run(states[0], "export", SERVER, "--layout", "server", "--out", str(server)).code == 0
    with (server / "root.crt").open("ab") as bundle:
        bundle.write((states[1] / "ca/ca.crt").read_bytes())
    with (server / "root.crl").open("ab") as crls:
        crls.write((states[1] / "ca/crl.pem").read_bytes())
    with cluster() as pg:
        pg.install_tls(server)
        pg.write_hba(f"local all all trust\n{run(states[0], 'hba').out}")
        pg.start()
        assert pg.sql("create role alice login").returncode == 0
        r = Rotation(tmp_path, pg)
        logins = []
        for label, state in zip("ab", states, strict=True):
            files = tmp_path / f"alice-{label}"
            assert run(state, "export", "alice", "--layout", "libpq", "--out", str(files)).code == 0
            shutil.copy(server / "root.crt", files / "root.crt")  # trust the server either way
            logins.append(r.logs_in(files, "alice"))
        assert logins == [True, True]
        # revoked by the second CA, whose CRL comes second in the file: refused
        (states[1] / "users.yaml").write_text(users_yaml(1, ("bob",)))
        assert run(states[1], "apply", "--no-commit").code == 0
        first_crl = (states[0] / "ca/crl.pem").read_bytes()
        (server / "root.crl").write_bytes(first_crl + (states[1] / "ca/crl.pem").read_bytes())
        pg.install_crl(server / "root.crl")
        pg.reload()
        assert r.logs_in(tmp_path / "alice-a", "alice")
        refused = r.login(tmp_path / "alice-b", "alice")
        assert refused.returncode != 0
        assert "revoked" in refused.stderr + pg.log()[-2000:]
