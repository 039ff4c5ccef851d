"""Against a real PostgreSQL 15 and the real pgjdbc driver: `export --layout jdbc` files log in
with sslmode=verify-full, and only as their own role. An --encrypted key is read by libpq with
sslpassword, not by pgjdbc: the docs' table of clients says so from these tests.

Every login attempt runs in one JVM (a single-file Java program, `java -cp JAR Login.java`),
so the JVM starts once. Without java or Debian's pgjdbc jar the tests skip, except under
CI=true, where that is a failure (.ci/run installs default-jdk-headless and
libpostgresql-jdbc-java).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pgcluster import cluster
from support import run

JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
NOW = datetime.now(UTC)  # PostgreSQL and Java check validity against the real clock
SERVER = "pg.jdbc.example"
EXPORT_PASSPHRASE = "one-time transport passphrase"
HBA = "    hba: [{database: postgres, address: 127.0.0.1/32}]\n"
USERS_YAML = (
    "version: 1\n"
    "ca:\n  subject: {CN: JDBC Test CA, O: Acme}\n  key: ecdsa-p256\n  validity: 3650d\n"
    "defaults:\n  key: ecdsa-p256\n  validity: 365d\n"
    f"users:\n  - name: alice\n{HBA}  - name: bob\n{HBA}"
    f"  - name: rsauser\n    key: rsa-2048\n{HBA}"
    # verify-full with an IP address in the URL: pgjdbc has no hostaddr, so the SAN is the IP
    f"servers:\n  - name: {SERVER}\n    ip: [127.0.0.1]\n"
)
LOGIN_JAVA = """
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;

public class Login {
    public static void main(String[] urls) {
        for (String url : urls) {
            try (Connection c = DriverManager.getConnection(url);
                 ResultSet r = c.createStatement().executeQuery("select current_user")) {
                r.next();
                System.out.println("OK " + r.getString(1));
            } catch (Exception e) {
                StringBuilder why = new StringBuilder("FAIL");
                for (Throwable t = e; t != null; t = t.getCause()) {
                    why.append(" | ").append(t);
                }
                System.out.println(why.toString().replace('\\n', ' '));
            }
        }
    }
}
"""


def require_java() -> str:
    """java, from a JDK: running a source file needs the compiler, which a bare JRE lacks."""
    java, javac = shutil.which("java"), shutil.which("javac")
    if java is None or javac is None or not JAR.is_file():
        what = "a JDK (javac)" if java is None or javac is None else str(JAR)
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{what} is missing, and CI=true: .ci/run should have installed "
                "default-jdk-headless and libpostgresql-jdbc-java"
            )
        pytest.skip(f"{what} is missing (install default-jdk-headless, libpostgresql-jdbc-java)")
    return java


def export(state: Path, name: str, out: Path, *extra: str, layout: str = "jdbc") -> Path:
    result = run(state, "export", name, "--layout", layout, "--out", str(out), *extra)
    assert result.code == 0, result.err
    return out


@pytest.fixture(scope="module")
def logins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Each attempt's outcome by name: "OK ROLE", or "FAIL | exception | cause…"."""
    java = require_java()
    base = tmp_path_factory.mktemp("jdbc")
    state = base / "state"
    state.mkdir()
    (state / "users.yaml").write_text(USERS_YAML)
    assert run(state, "apply", "--no-commit", now=NOW).code == 0
    alice = export(state, "alice", base / "alice")
    rsauser = export(state, "rsauser", base / "rsauser")
    # the one-time passphrase from a file this time (tests/test_export.py covers the variable)
    transport = base / "transport.pass"
    transport.write_text(EXPORT_PASSPHRASE)
    transport.chmod(0o600)
    sealing = ("--encrypted", "--export-passphrase-file", str(transport))
    sealed = export(state, "bob", base / "bob-encrypted", *sealing)
    sealed_libpq = export(state, "bob", base / "bob-libpq-encrypted", *sealing, layout="libpq")
    # what a rollout does on the target host: decrypt with the one-time passphrase
    to_plain_pkcs8 = ["pkcs8", "-topk8", "-nocrypt", "-inform", "DER", "-outform", "DER"]
    in_out = ["-in", str(sealed / "postgresql.pk8"), "-out", str(base / "bob.pk8")]
    opened = subprocess.run(
        ["openssl", *to_plain_pkcs8, *in_out, "-passin", "env:TRANSPORT"],
        capture_output=True,
        env={**os.environ, "TRANSPORT": EXPORT_PASSPHRASE},
    )
    assert opened.returncode == 0, opened.stderr
    shutil.copy(base / "bob.pk8", sealed / "opened.pk8")
    (base / "Login.java").write_text(LOGIN_JAVA)
    with cluster() as pg:
        server = base / "server"
        assert run(state, "export", SERVER, "--layout", "server", "--out", str(server)).code == 0
        pg.install_tls(server)
        hba = run(state, "hba")
        assert hba.code == 0, hba.err
        pg.write_hba(f"local all all trust\n{hba.out}")
        pg.start()
        for role in ("alice", "bob", "rsauser"):
            assert pg.sql(f"create role {role} login").returncode == 0

        def url(
            files: Path, role: str, key: str = "postgresql.pk8", extra: str = "", host: str = ""
        ) -> str:
            return (
                f"jdbc:postgresql://{host or '127.0.0.1'}:{pg.port}/postgres?user={role}"
                "&sslmode=verify-full"
                f"&sslcert={files}/postgresql.crt&sslkey={files}/{key}"
                f"&sslrootcert={files}/root.crt&connectTimeout=10{extra}"
            )

        attempts = {
            "alice": url(alice, "alice"),
            "alice as bob": url(alice, "bob"),
            "a name not in the server's SANs": url(alice, "alice", host="localhost"),
            "rsauser": url(rsauser, "rsauser"),
            "encrypted pk8": url(sealed, "bob", extra=f"&sslpassword={EXPORT_PASSPHRASE}"),
            "decrypted on the host": url(sealed, "bob", key="opened.pk8"),
        }
        done = subprocess.run(
            [java, "-cp", str(JAR), str(base / "Login.java"), *attempts.values()],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(base)},  # no ~/.postgresql of the machine's
        )
        assert done.returncode == 0, done.stderr
        outcomes = done.stdout.splitlines()
        assert len(outcomes) == len(attempts), done.stdout + done.stderr
        files = sealed_libpq
        conninfo = (
            f"host=127.0.0.1 port={pg.port} dbname=postgres user=bob sslmode=verify-full "
            f"sslcert={files}/postgresql.crt sslkey={files}/postgresql.key "
            f"sslrootcert={files}/root.crt sslpassword='{EXPORT_PASSPHRASE}'"
        )
        psql = subprocess.run(
            [str(pg.bindir / "psql"), "-XAtc", "select current_user", conninfo],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(base)},
        )
        libpq = f"OK {psql.stdout.strip()}" if psql.returncode == 0 else f"FAIL {psql.stderr}"
        yield dict(zip(attempts, outcomes, strict=True)) | {
            "libpq, encrypted": libpq,
            "server log": pg.log(),
        }


def test_a_jdbc_export_logs_in_with_verify_full_as_its_own_role(logins: dict[str, str]) -> None:
    assert logins["alice"] == "OK alice", logins["server log"][-2000:]
    assert logins["rsauser"] == "OK rsauser"


def test_a_jdbc_certificate_cannot_log_in_as_another_role(logins: dict[str, str]) -> None:
    assert logins["alice as bob"].startswith("FAIL")
    assert 'certificate authentication failed for user "bob"' in logins["alice as bob"]


def test_verify_full_checks_the_server_name(logins: dict[str, str]) -> None:
    outcome = logins["a name not in the server's SANs"]
    assert outcome.startswith("FAIL"), outcome
    assert "hostname localhost could not be verified" in outcome, outcome


def test_pgjdbc_cannot_read_our_encrypted_pkcs8_with_sslpassword(logins: dict[str, str]) -> None:
    """What docs/postgresql.md says: pgjdbc asks Java for a cipher named after the key's
    encryption scheme, PBES2 (PBKDF2 + AES-256-CBC, what OpenSSL 3 writes), and Java has none
    by that name. Should a newer pgjdbc or JDK read it, this fails: then update the docs."""
    outcome = logins["encrypted pk8"]
    assert outcome.startswith("FAIL"), outcome
    assert "Cannot find any provider supporting PBES2" in outcome, outcome


def test_libpq_reads_an_encrypted_export_with_sslpassword(logins: dict[str, str]) -> None:
    assert logins["libpq, encrypted"] == "OK bob"


def test_an_encrypted_jdbc_export_decrypted_on_the_host_logs_in(logins: dict[str, str]) -> None:
    """The rollout's path: --encrypted under a one-time passphrase, `openssl pkcs8 -topk8
    -nocrypt -passin env:VAR` on the target, pgjdbc reads the result."""
    assert logins["decrypted on the host"] == "OK bob"
