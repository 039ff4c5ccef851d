"""export: the libpq and server layouts, modes, encryption, refusals, --force."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support import KEY_PASSPHRASE, SECRETS, at, cert, files_under, run, users_yaml

from reconciler import pki

T0 = at("2027-01-01T00:00:00Z")
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


@pytest.mark.parametrize(
    ("name", "layout", "files"),
    [
        pytest.param("alice", "libpq", ("postgresql.crt", "postgresql.key"), id="libpq"),
        pytest.param("db1.acme.example", "server", ("server.crt", "server.key"), id="server"),
    ],
)
def test_layouts_write_cert_key_ca_and_crl(
    state: Path, tmp_path: Path, name: str, layout: str, files: tuple[str, str]
) -> None:
    out = tmp_path / "out"
    code, text = export(state, name, layout, out)
    assert code == 0, text
    crt, key = files
    assert sorted(p.name for p in out.iterdir()) == sorted([crt, key, "root.crt", "root.crl"])
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / key).stat().st_mode & 0o777 == 0o600
    for public in (crt, "root.crt", "root.crl"):
        assert (out / public).stat().st_mode & 0o777 == 0o644
    kind = "clients" if layout == "libpq" else "servers"
    assert (out / crt).read_bytes() == (state / kind / f"{name}.crt").read_bytes()
    assert (out / "root.crt").read_bytes() == (state / "ca/ca.crt").read_bytes()
    assert (out / "root.crl").read_bytes() == (state / "ca/crl.pem").read_bytes()
    private = serialization.load_pem_private_key((out / key).read_bytes(), password=None)
    assert pki.same_public_key(private.public_key(), cert(out / crt).public_key())
    # exporting again changes nothing
    code, text = export(state, name, layout, out)
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
    ("name", "layout", "environ", "expected"),
    [
        pytest.param("carol", "libpq", SECRETS, "there is no client named 'carol'", id="unknown"),
        pytest.param(
            "alice", "server", SECRETS, "there is no server named 'alice'", id="wrong-layout"
        ),
        pytest.param("alice", "libpq", {}, "needs the key passphrase", id="no-passphrase"),
        pytest.param(
            "alice",
            "libpq",
            {"RECONCILER_KEY_PASSPHRASE": "not the key passphrase at all"},
            "does not unlock clients/alice.key",
            id="wrong-passphrase",
        ),
    ],
)
def test_refusals_are_exit_1_with_nothing_written(
    state: Path, tmp_path: Path, name: str, layout: str, environ: dict[str, str], expected: str
) -> None:
    out = tmp_path / "out"
    code, text = export(state, name, layout, out, environ=environ)
    assert code == 1
    assert expected in text
    assert "Traceback" not in text
    assert not out.exists()


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
