"""ECDSA P-384 client certificates and TLS 1.2, against a real PostgreSQL 15.

PostgreSQL 15 offers one elliptic curve for the key exchange, `ssl_ecdh_curve` (prime256v1 by
default). On TLS 1.2 OpenSSL also holds a client's ECDSA certificate to the curves the two sides
share, so a P-384 certificate fails there while it works on TLS 1.3. `validate` warns about it,
and docs/postgresql.md says which server setting avoids it; this test shows both are right.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgcluster import Cluster, cluster
from support import run

SERVER = "pg.curves.example"
USERS_YAML = f"""\
version: 1
ca:
  subject: {{CN: Curves CA}}
  key: ecdsa-p256
defaults:
  key: ecdsa-p256
users:
  - name: p256user
    hba: [{{database: postgres, address: 127.0.0.1/32}}]
  - name: p384user
    key: ecdsa-p384
    hba: [{{database: postgres, address: 127.0.0.1/32}}]
servers:
  - name: {SERVER}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    base = tmp_path_factory.mktemp("curves")
    state = base / "state"
    state.mkdir()
    (state / "users.yaml").write_text(USERS_YAML)
    applied = run(state, "apply", "--no-commit")
    assert applied.code == 0, applied.err
    with cluster() as pg:
        out = base / "server"
        assert run(state, "export", SERVER, "--layout", "server", "--out", str(out)).code == 0
        pg.install_tls(out)
        pg.write_hba(f"local all all trust\n{run(state, 'hba').out}")
        pg.start()
        for role in ("p256user", "p384user"):
            assert pg.sql(f"create role {role} login").returncode == 0
        for role in ("p256user", "p384user"):
            files = base / role
            exported = run(state, "export", role, "--layout", "libpq", "--out", str(files))
            assert exported.code == 0, exported.err
        yield pg, base


def login(pg: Cluster, files: Path, role: str, tls: str) -> subprocess.CompletedProcess[str]:
    tls_options = f"ssl_min_protocol_version={tls} ssl_max_protocol_version={tls}"
    return pg.login(files, role, host=SERVER, options=tls_options)


def test_p384_client_fails_on_tls12_and_logs_in_on_tls13(server: tuple[Cluster, Path]) -> None:
    pg, base = server
    for tls in ("TLSv1.2", "TLSv1.3"):
        done = login(pg, base / "p256user", "p256user", tls)
        assert done.stdout.strip() == "p256user", done.stderr
    on_13 = login(pg, base / "p384user", "p384user", "TLSv1.3")
    assert on_13.stdout.strip() == "p384user", on_13.stderr
    on_12 = login(pg, base / "p384user", "p384user", "TLSv1.2")
    assert on_12.returncode != 0
    assert pg.logs("wrong curve"), on_12.stderr


def test_the_server_settings_that_avoid_it(server: tuple[Cluster, Path]) -> None:
    pg, base = server
    # one curve for everyone: P-384 works on TLS 1.2, and P-256 fails there instead
    configure(pg, "ssl_ecdh_curve = 'secp384r1'")
    assert login(pg, base / "p384user", "p384user", "TLSv1.2").stdout.strip() == "p384user"
    assert login(pg, base / "p256user", "p256user", "TLSv1.2").returncode != 0
    # TLS 1.3 only (what validate advises): every curve logs in, and TLS 1.2 is refused
    configure(pg, "ssl_ecdh_curve = 'prime256v1'\nssl_min_protocol_version = 'TLSv1.3'")
    for role in ("p256user", "p384user"):
        assert login(pg, base / role, role, "TLSv1.3").stdout.strip() == role
        assert login(pg, base / role, role, "TLSv1.2").returncode != 0


def configure(pg: Cluster, settings: str) -> None:
    with (pg.data / "postgresql.conf").open("a") as conf:
        conf.write(f"\n{settings}\n")
    pg.reload()


def test_validate_warns_about_p384_users(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(USERS_YAML)
    done = run(state, "validate")
    assert done.code == 0
    assert done.err.startswith("warning: users on ecdsa-p384 (p384user) fail on TLS 1.2")
    assert "ssl_min_protocol_version = 'TLSv1.3'" in done.err
    (state / "users.yaml").write_text(USERS_YAML.replace("key: ecdsa-p384", "key: ecdsa-p256"))
    assert run(state, "validate").err == ""  # no P-384 user, no warning
