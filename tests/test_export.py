"""export: the libpq, jdbc and server layouts, --with-crl, --owner, modes, encryption under
the key or a one-time export passphrase, refusals, --force."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support import KEY_PASSPHRASE, SECRETS, at, cert, files_under, iso, run, users_yaml

from reconciler import pki
from reconciler.secrets import VARIABLES

T0 = at("2027-01-01T00:00:00Z")
EXPORT_PASSPHRASE = "a one-time transport passphrase"
TRANSPORT = {**SECRETS, "RECONCILER_EXPORT_PASSPHRASE": EXPORT_PASSPHRASE}
CLIENT = ("postgresql.crt", "root.crt")
SERVER = ("server.crt", "server.key", "root.crt", "root.crl")
USERS = "  - name: alice\n  - name: bob\n"
SERVERS = "  - name: db1.acme.example\n    ip: [10.0.6.188]\n"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml(USERS, SERVERS))
    assert run(directory, "apply", "--no-commit", now=T0).code == 0
    return directory


def export(
    state: Path,
    name: str,
    layout: str,
    out: Path,
    *extra: str,
    environ: dict[str, str] | None = None,
) -> tuple[int, str]:
    result = run(
        state,
        "export",
        name,
        "--layout",
        layout,
        "--out",
        str(out),
        *extra,
        now=T0,
        environ=SECRETS if environ is None else environ,
    )
    return result.code, result.out + result.err


def read_key(path: Path, password: bytes | None = None) -> pki.PrivateKey:
    """A .pk8 file as DER PKCS#8 (and nothing else), any other key file as PEM."""
    data = path.read_bytes()
    if path.suffix != ".pk8":
        key = serialization.load_pem_private_key(data, password)
    else:
        key = serialization.load_der_private_key(data, password)
        # PKCS#8 exactly: the traditional DER forms (SEC1, PKCS#1) load too, and pgjdbc
        # cannot read them
        if password is None:
            pkcs8 = serialization.PrivateFormat.PKCS8
            none = serialization.NoEncryption()
            assert key.private_bytes(serialization.Encoding.DER, pkcs8, none) == data
    assert isinstance(key, pki.PrivateKey)
    return key


@pytest.mark.parametrize(
    ("name", "layout", "extra", "files"),
    [
        pytest.param("alice", "libpq", (), (*CLIENT, "postgresql.key"), id="libpq"),
        pytest.param(
            "alice",
            "libpq",
            ("--with-crl",),
            (*CLIENT, "postgresql.key", "root.crl"),
            id="libpq+crl",
        ),
        pytest.param("alice", "jdbc", (), (*CLIENT, "postgresql.pk8"), id="jdbc"),
        pytest.param("db1.acme.example", "server", (), SERVER, id="server"),
        pytest.param("db1.acme.example", "server", ("--with-crl",), SERVER, id="server+crl"),
    ],
)
def test_each_layout_writes_its_files_with_their_modes(
    state: Path,
    tmp_path: Path,
    name: str,
    layout: str,
    extra: tuple[str, ...],
    files: tuple[str, ...],
) -> None:
    out = tmp_path / "out"
    code, text = export(state, name, layout, out, *extra)
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert out.stat().st_mode & 0o777 == 0o700
    crt, key = files[0], next(f for f in files if f.endswith((".key", ".pk8")))
    for file in files:
        expected = 0o600 if file == key else 0o644
        assert (out / file).stat().st_mode & 0o777 == expected, file
    kind = "servers" if layout == "server" else "clients"
    assert (out / crt).read_bytes() == (state / kind / f"{name}.crt").read_bytes()
    assert (out / "root.crt").read_bytes() == (state / "ca/ca.crt").read_bytes()
    if "root.crl" in files:
        assert (out / "root.crl").read_bytes() == (state / "ca/crl.pem").read_bytes()
    private = read_key(out / key)
    assert pki.same_public_key(private.public_key(), cert(out / crt).public_key())
    # exporting again changes nothing
    code, text = export(state, name, layout, out, *extra)
    assert code == 0
    assert "unchanged" in text
    assert "wrote" not in text


def test_encrypted_export_needs_no_passphrase_and_keeps_the_stored_key(
    state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, text = export(state, "alice", "libpq", out, "--encrypted", environ={})
    assert code == 0, text
    stored = (state / "clients/alice.key").read_bytes()
    assert (out / "postgresql.key").read_bytes() == stored
    pki.decrypt_key(stored, KEY_PASSPHRASE.encode())


def test_a_differing_file_is_replaced_only_with_force(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "root.crt").write_text("someone else's CA\n")
    code, text = export(state, "alice", "libpq", out)
    assert code == 1
    assert "root.crt exists and differs; pass --force" in text
    assert sorted(p.name for p in out.iterdir()) == ["root.crt"]
    code, text = export(state, "alice", "libpq", out, "--force")
    assert code == 0, text
    assert (out / "root.crt").read_bytes() == (state / "ca/ca.crt").read_bytes()


@pytest.mark.parametrize(
    ("name", "layout", "extra", "environ", "expected"),
    [
        pytest.param(
            "carol", "libpq", (), SECRETS, "there is no client named 'carol'", id="unknown"
        ),
        pytest.param(
            "alice", "server", (), SECRETS, "there is no server named 'alice'", id="wrong-layout"
        ),
        pytest.param(
            "alice", "libpq", (), {}, "so the key passphrase is needed", id="no-passphrase"
        ),
        pytest.param(
            "alice",
            "libpq",
            (),
            {"RECONCILER_KEY_PASSPHRASE": "not the key passphrase at all"},
            "does not unlock clients/alice.key",
            id="wrong-passphrase",
        ),
        pytest.param(
            "alice",
            "jdbc",
            ("--with-crl",),
            SECRETS,
            "pgjdbc cannot read a CRL: leave out --with-crl",
            id="jdbc-with-crl",
        ),
        pytest.param(
            "alice",
            "libpq",
            ("--owner", "no-such-user"),
            SECRETS,
            "--owner no-such-user: no such user or group; name existing ones",
            id="unknown-owner",
        ),
        pytest.param(
            "alice",
            "libpq",
            ("--owner", "nobody:no-such-group"),
            SECRETS,
            "--owner nobody:no-such-group: no such user or group",
            id="unknown-group",
        ),
        pytest.param(
            "alice",
            "jdbc",
            (),
            TRANSPORT,
            "an export passphrase only applies with --encrypted: add it, or unset it",
            id="export-passphrase-without-encrypted",
        ),
        pytest.param(
            "alice",
            "libpq",
            ("--encrypted",),
            {"RECONCILER_EXPORT_PASSPHRASE": EXPORT_PASSPHRASE},
            "re-encrypted (--encrypted alone keeps it as stored), so the key passphrase is needed",
            id="export-passphrase-without-key-passphrase",
        ),
        pytest.param(
            "alice",
            "libpq",
            ("--encrypted",),
            {**SECRETS, "RECONCILER_EXPORT_PASSPHRASE": "short"},
            "the export passphrase from $RECONCILER_EXPORT_PASSPHRASE is shorter than 16",
            id="short-export-passphrase",
        ),
    ],
)
def test_refusals_are_exit_1_with_nothing_written(
    state: Path,
    tmp_path: Path,
    name: str,
    layout: str,
    extra: tuple[str, ...],
    environ: dict[str, str],
    expected: str,
) -> None:
    out = tmp_path / "out"
    code, text = export(state, name, layout, out, *extra, environ=environ)
    assert code == 1
    assert expected in text
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists()


def openssl(*args: str, passphrase: str) -> subprocess.CompletedProcess[bytes]:
    """Run openssl with the passphrase in $TRANSPORT, as a rollout does on the target host."""
    return subprocess.run(
        ["openssl", *args, "-passin", "env:TRANSPORT"],
        capture_output=True,
        env={**os.environ, "TRANSPORT": passphrase},
    )


@pytest.mark.parametrize(
    ("layout", "key", "decrypt"),
    [
        pytest.param("libpq", "postgresql.key", ("pkey",), id="libpq-pem"),
        # `openssl pkey -outform DER` would write SEC1/PKCS#1 DER, which pgjdbc cannot read
        pytest.param(
            "jdbc",
            "postgresql.pk8",
            ("pkcs8", "-topk8", "-nocrypt", "-inform", "DER", "-outform", "DER"),
            id="jdbc-der",
        ),
    ],
)
def test_the_export_passphrase_replaces_the_key_passphrase(
    state: Path, tmp_path: Path, layout: str, key: str, decrypt: tuple[str, ...]
) -> None:
    sealed, plain = tmp_path / "sealed", tmp_path / "plain"
    code, text = export(state, "alice", layout, sealed, "--encrypted", environ=TRANSPORT)
    assert code == 0, text
    assert export(state, "alice", layout, plain)[0] == 0
    path = sealed / key
    assert path.stat().st_mode & 0o777 == 0o600
    assert EXPORT_PASSPHRASE.encode() not in path.read_bytes()
    assert EXPORT_PASSPHRASE not in text
    # OpenSSL 3 reads it with the export passphrase, in whichever encoding
    assert openssl("pkey", "-in", str(path), "-noout", passphrase=EXPORT_PASSPHRASE).returncode == 0
    refused = openssl("pkey", "-in", str(path), "-noout", passphrase=KEY_PASSPHRASE)
    assert refused.returncode != 0
    # and what the target host decrypts is byte for byte the plain export: nothing to redeploy
    opened = openssl(*decrypt, "-in", str(path), passphrase=EXPORT_PASSPHRASE)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == (plain / key).read_bytes()
    private = read_key(path, EXPORT_PASSPHRASE.encode())
    assert pki.same_public_key(private.public_key(), cert(sealed / "postgresql.crt").public_key())


def test_an_encrypted_jdbc_export_without_export_passphrase_is_the_stored_key_as_der(
    state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, text = export(state, "alice", "jdbc", out, "--encrypted", environ={})
    assert code == 0, text
    data = (out / "postgresql.pk8").read_bytes()
    assert b"-----" not in data
    key = serialization.load_der_private_key(data, KEY_PASSPHRASE.encode())
    stored = pki.decrypt_key((state / "clients/alice.key").read_bytes(), KEY_PASSPHRASE.encode())
    assert pki.same_public_key(key.public_key(), stored.public_key())


def test_the_export_passphrase_comes_from_a_file_and_never_from_secrets_dir(
    state: Path, tmp_path: Path
) -> None:
    passfile = tmp_path / "transport.pass"
    passfile.write_text(EXPORT_PASSPHRASE + "\n")
    passfile.chmod(0o600)
    out = tmp_path / "out"
    flag = ("--export-passphrase-file", str(passfile))
    code, text = export(state, "alice", "libpq", out, "--encrypted", *flag)
    assert code == 0, text
    read_key(out / "postgresql.key", EXPORT_PASSPHRASE.encode())
    # a file in .secrets/ is not a source: --encrypted alone still exports the stored key
    secrets_dir = tmp_path / ".secrets"
    secrets_dir.mkdir(mode=0o700)
    shutil.copy(passfile, secrets_dir / "export.pass")
    stored = tmp_path / "stored"
    code, text = export(state, "alice", "libpq", stored, "--encrypted", environ={})
    assert code == 0, text
    assert (stored / "postgresql.key").read_bytes() == (state / "clients/alice.key").read_bytes()
    # and the variables never reach a child process (git, a hook)
    assert {"RECONCILER_EXPORT_PASSPHRASE", "RECONCILER_EXPORT_PASSPHRASE_FILE"} <= set(VARIABLES)


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true runs the tests as root, so that --owner can really chown")
        pytest.skip("--owner is tested with a real chown, which needs root")


def test_owner_gives_the_directory_and_every_file_to_that_user(state: Path, tmp_path: Path) -> None:
    require_root()
    nobody, daemon = pwd.getpwnam("nobody"), grp.getgrnam("daemon")
    out = tmp_path / "out"
    code, text = export(state, "alice", "jdbc", out, "--owner", "nobody")
    assert code == 0, text
    for path in [out, *out.iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / "postgresql.pk8").stat().st_mode & 0o777 == 0o600
    # files left alone because they are unchanged are handed over too, to USER:GROUP
    code, text = export(state, "alice", "jdbc", out, "--owner", "nobody:daemon")
    assert code == 0, text
    assert "wrote" not in text
    for path in [out, *out.iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, daemon.gr_gid), path


def test_owner_without_the_right_to_chown_is_one_sentence_and_writes_nothing(
    state: Path, tmp_path: Path
) -> None:
    """Root without CAP_CHOWN (setpriv drops it) stands for any user who may not chown."""
    require_root()
    out = tmp_path / "out"
    no_chown = ["setpriv", "--inh-caps=-chown", "--bounding-set=-chown"]
    reconciler = [sys.executable, "-m", "reconciler", "--state", str(state), "--now", iso(T0)]
    export_args = ["export", "alice", "--layout", "libpq", "--out", str(out), "--owner", "nobody"]
    done = subprocess.run(
        [*no_chown, *reconciler, *export_args],
        capture_output=True,
        text=True,
        env={**os.environ, **SECRETS},
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"reconciler: cannot give {out} to nobody (Operation not permitted); run the export "
        "as root, or leave out --owner (no file was written)\n"
    )
    assert list(out.iterdir()) == []


def test_a_revoked_name_cannot_be_exported(state: Path, tmp_path: Path) -> None:
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n", SERVERS))
    assert run(state, "apply", "--no-commit", now=T0 + timedelta(hours=1)).code == 0
    code, text = export(state, "bob", "libpq", tmp_path / "out")
    assert code == 1
    assert "client/bob was revoked" in text


def test_an_expired_certificate_exports_with_a_warning(state: Path, tmp_path: Path) -> None:
    before = files_under(state)
    result = run(
        state,
        "export",
        "alice",
        "--layout",
        "libpq",
        "--out",
        str(tmp_path / "out"),
        now=T0 + timedelta(days=31),
    )
    assert result.code == 0, result.err
    assert "warning: client/alice expired on" in result.err
    assert files_under(state) == before  # export never touches the state directory
