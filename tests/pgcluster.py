"""A real PostgreSQL server for the tests: initdb in a temporary directory, run as an
unprivileged user when the tests run as root, TLS on, reloadable.

When no PostgreSQL server binaries are found the tests skip, except under CI=true, where a
missing server is a failure (.ci/run installs Debian's postgresql package).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import eventually


def find_bindir() -> Path | None:
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(done.stdout.strip())
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def require_bindir() -> Path:
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "PostgreSQL server binaries are missing, and CI=true: .ci/run should "
                "have installed Debian's postgresql package"
            )
        pytest.skip("no PostgreSQL server binaries (install Debian's postgresql package)")
    return bindir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class Cluster:
    bindir: Path
    root: Path  # owned by the server's user
    port: int
    user: str | None  # run server commands as this user (when the tests run as root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), capture_output=True, text=True, check=check, user=self.user, cwd=self.root
        )

    def give(self, path: Path) -> None:
        """Hand a file or directory to the server's user (no-op when not root)."""
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
                os.chown(item, entry.pw_uid, entry.pw_gid)

    def install_tls(self, server_dir: Path) -> None:
        """Copy exported server files (server.crt/key, root.crt/crl) into place."""
        self.tls.mkdir(exist_ok=True, mode=0o700)
        for name in ("server.crt", "server.key", "root.crt", "root.crl"):
            shutil.copy2(server_dir / name, self.tls / name)
        (self.tls / "server.key").chmod(0o600)
        self.give(self.tls)

    def install_crl(self, crl: Path) -> None:
        shutil.copy2(crl, self.tls / "root.crl")
        self.give(self.tls / "root.crl")

    def write_hba(self, lines: str) -> None:
        (self.data / "pg_hba.conf").write_text(lines)
        self.give(self.data / "pg_hba.conf")

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def reload(self) -> None:
        """Signal a reload and wait until the postmaster has re-read its files: a new connection
        then sees pg_conf_load_time move (it copies the postmaster's time at fork)."""
        before = self.sql("select pg_conf_load_time()").stdout
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "reload")
        if not eventually(lambda: self.sql("select pg_conf_load_time()").stdout != before, 30):
            pytest.fail("PostgreSQL did not reload its configuration")

    def stop(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "stop",
            check=False,
        )

    def sql(self, statement: str) -> subprocess.CompletedProcess[str]:
        """Run SQL as the superuser over the Unix socket."""
        return self._run(
            str(self.bindir / "psql"),
            "-h",
            str(self.root),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtqc",
            statement,
            check=False,
        )

    def login(
        self, files: Path, role: str, *, host: str, options: str = "", home: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """psql as role with a libpq export's files and sslmode=verify-full: to 127.0.0.1,
        checking that the server's certificate names host. options: more conninfo, which
        overrides. HOME is home (files by default), so no ~/.postgresql of the machine's is
        read."""
        conninfo = (
            f"host={host} hostaddr=127.0.0.1 port={self.port} dbname=postgres user={role} "
            f"sslmode=verify-full sslcert={files}/postgresql.crt sslkey={files}/postgresql.key "
            f"sslrootcert={files}/root.crt connect_timeout=10 {options}"
        )
        return subprocess.run(
            [str(self.bindir / "psql"), conninfo, "-XAtc", "select current_user"],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(home or files)},
            timeout=60,
        )

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text()
        except OSError:
            return ""

    def logs(self, text: str, since: int = 0, seconds: float = 10) -> bool:
        """Whether the server log, from offset since, says text within seconds: a backend
        writes why it refused a connection after the client has already seen the refusal."""
        return eventually(lambda: text in self.log()[since:], seconds)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    bindir = require_bindir()
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
    root = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
    root.chmod(0o755)
    cl = Cluster(bindir=bindir, root=root, port=free_port(), user=user)
    cl.give(root)
    try:
        cl._run(
            str(bindir / "initdb"),
            "-D",
            str(cl.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C",
        )
        with (cl.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {cl.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}'\n"
                "ssl = on\n"
                f"ssl_cert_file = '{cl.tls / 'server.crt'}'\n"
                f"ssl_key_file = '{cl.tls / 'server.key'}'\n"
                f"ssl_ca_file = '{cl.tls / 'root.crt'}'\n"
                f"ssl_crl_file = '{cl.tls / 'root.crl'}'\n"
                "fsync = off\n"
                "log_connections = on\n"
            )
        yield cl
    finally:
        cl.stop()
        shutil.rmtree(root, ignore_errors=True)
