"""What the reconciler writes under state/ is a correct, RFC 5280-clean PKI, checked on the files.

For a CA of every key type (rsa-2048, ecdsa-p256, ecdsa-p384, ed25519) this module runs the real
command (``reconciler.cli.main(... apply --no-commit)``) in a temporary state directory that asks
for a client and a server of every leaf key type (one rsa-4096 client besides), a client whose
validity outlives the CA, and a client that is later removed from users.yaml and so revoked by a
second apply one day later. It then proves, on ca/ca.crt, ca/ca.key, ca/crl.pem,
clients/NAME.crt|key, servers/NAME.crt|key and ledger.jsonl:

1. OpenSSL (what libpq and the PostgreSQL server use) accepts clients for ``-purpose sslclient``
   and servers for ``-purpose sslserver`` (with their DNS and IP SANs as verify-full would check
   them), refuses each for the other purpose, and with ``-crl_check`` refuses the revoked
   certificate ("certificate revoked") while accepting the live ones.
2. The extensions, decoded with cryptography, are the DESIGN.md profile: CA (basicConstraints
   CA:TRUE critical, keyUsage keyCertSign+cRLSign critical, SKI, AKI), client (CN = role, EKU
   clientAuth only, CA:FALSE, digitalSignature, keyEncipherment exactly for RSA, SKI, AKI = CA
   SKI), server (CN = name, SAN = name + dns + ip as DNSName/IPAddress, EKU serverAuth); serials
   random, positive, below 2**159 and unique in the ledger; SHA-256 signatures (none named for
   Ed25519); no leaf outlives the CA; the CRL has an increasing CRLNumber, an AKI, a reason code
   on every entry and nextUpdate = thisUpdate + crl.validity.
3. Private keys are 0600 encrypted PKCS#8 PEM that open with the right passphrase only and match
   their certificate; certificates, the CRL and the ledger are 0644.
4. pkilint (``lint_pkix_cert``, ``lint_crl``) reports no warning or error for every CA, both
   CRLs of every CA (empty, and with the revocation), and a client and a server of every leaf key
   type; it does flag deliberately broken certificates and CRLs built here, so a clean result
   means something. Server names the schema accepts but pkilint rejects (single label,
   wildcard, IP address as a name) are a known reconciler bug, marked xfail(strict=True).

The clock of the machine never matters: the reconciler runs with --now and OpenSSL with -attime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from reconciler.cli import main
from reconciler.plan import BACKDATE

# --------------------------------------------------------------------------- the matrix

FIRST_NOW = datetime(2026, 12, 1, tzinfo=UTC)
SECOND_NOW = FIRST_NOW + timedelta(days=1)  # the revoking apply
VERIFY_AT = SECOND_NOW + timedelta(hours=1)  # OpenSSL's -attime: after both applies
CRL_VALIDITY = timedelta(days=30)
CA_PASSPHRASE = "ca-passphrase-used-only-by-these-tests"
KEY_PASSPHRASE = "key-passphrase-used-only-by-these-tests"
WRONG_PASSPHRASE = "not-the-passphrase-of-anything-here"
ENVIRON = {"RECONCILER_CA_PASSPHRASE": CA_PASSPHRASE, "RECONCILER_KEY_PASSPHRASE": KEY_PASSPHRASE}
LINT_BIN = Path(sys.executable).parent  # the venv's bin/, where pkilint's scripts live
TEAM_SUBJECT = {  # as in the shipped state/users.yaml: O is 63 of the 64 characters allowed
    "C": "NL",
    "ST": "Utrecht",
    "L": "Bilthoven",
    "O": "National Institute for Public Health and the Environment (Acme)",
}

KeyName = Literal["rsa-2048", "rsa-3072", "rsa-4096", "ecdsa-p256", "ecdsa-p384", "ed25519"]
Kind = Literal["client", "server"]

CA_KEYS: tuple[KeyName, ...] = ("rsa-2048", "ecdsa-p256", "ecdsa-p384", "ed25519")
LEAF_KEYS: tuple[KeyName, ...] = ("rsa-2048", "ecdsa-p256", "ecdsa-p384", "ed25519")
BIG_RSA_CA: KeyName = "rsa-2048"  # the one state that also holds an rsa-4096 client


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One users.yaml entry and where its files land."""

    kind: Kind
    name: str
    key: KeyName
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    validity: str | None = None

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.name}" if self.validity else f"{self.kind}-{self.key}"

    @property
    def cert_path(self) -> str:
        return f"{self.kind}s/{self.name}.crt"

    @property
    def key_path(self) -> str:
        return f"{self.kind}s/{self.name}.key"

    def entry(self) -> dict[str, object]:
        entry: dict[str, object] = {"name": self.name, "key": self.key}
        if self.dns:
            entry["dns"] = list(self.dns)
        if self.ips:
            entry["ip"] = list(self.ips)
        if self.validity:
            entry["validity"] = self.validity
        return entry


def _slug(key: KeyName) -> str:
    return key.replace("-", "")


CLIENTS = tuple(Leaf("client", f"app_{_slug(key)}", key) for key in LEAF_KEYS)
SERVERS = tuple(
    Leaf(
        "server",
        f"db-{_slug(key)}.acme.example",
        key,
        dns=(f"pg-{_slug(key)}.acme.example", f"vip-{_slug(key)}.acme.example"),
        ips=(f"10.0.6.{10 + index}", f"2001:db8::{10 + index:x}"),
    )
    for index, key in enumerate(LEAF_KEYS)
)
BIG_RSA = Leaf("client", "app_rsa4096", "rsa-4096")
LONG_LIVED = Leaf("client", "archiver", "ecdsa-p256", validity="7300d")  # CA: 3650d
LEAVER = Leaf("client", "leaver", "ecdsa-p256")  # removed before the second apply


def live_leaves(ca_key: KeyName) -> tuple[Leaf, ...]:
    extra = (BIG_RSA,) if ca_key == BIG_RSA_CA else ()
    return (*CLIENTS, *extra, LONG_LIVED, *SERVERS)


def _cases(kinds: Iterable[Kind]) -> list[object]:
    wanted = set(kinds)
    return [
        pytest.param(ca_key, leaf, id=f"ca-{ca_key}/{leaf.id}")
        for ca_key in CA_KEYS
        for leaf in live_leaves(ca_key)
        if leaf.kind in wanted
    ]


ALL_LEAVES = _cases(("client", "server"))
CLIENT_LEAVES = _cases(("client",))
SERVER_LEAVES = _cases(("server",))
PER_CA = [pytest.param(ca_key, id=f"ca-{ca_key}") for ca_key in CA_KEYS]


# --------------------------------------------------------------------------- building the states


@dataclasses.dataclass(frozen=True)
class Pki:
    """A state directory after two applies, plus evidence the second apply removed."""

    ca_key: KeyName
    root: Path  # the state directory
    leaves: tuple[Leaf, ...]  # the live ones
    first_crl: Path  # copy of ca/crl.pem after the first apply
    revoked_cert: Path  # copy of the leaver's certificate (its file is deleted on revocation)
    first_serials: dict[Leaf, int]

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def crl_path(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def ca_cert(self) -> x509.Certificate:
        return load_certificate(self.path("ca/ca.crt"))

    def cert(self, leaf: Leaf) -> x509.Certificate:
        return load_certificate(self.path(leaf.cert_path))

    @property
    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.crl_path.read_bytes())

    @property
    def crl_before_revocation(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.first_crl.read_bytes())

    def ledger(self) -> tuple[dict[str, object], list[dict[str, object]]]:
        header, *entries, signature = (
            json.loads(line)
            for line in self.path("ledger.jsonl").read_text("utf-8").splitlines()
            if line.strip()
        )
        assert set(signature) == {"signature"}  # the CA's signature closes the ledger
        return header, entries


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (servers/NAME.crt is leaf first)."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def ca_common_name(ca_key: KeyName) -> str:
    return f"Test {ca_key} PostgreSQL CA"


def _write_users_yaml(state: Path, ca_key: KeyName, leaves: Iterable[Leaf]) -> None:
    leaves = tuple(leaves)
    document = {
        "version": 1,
        "ca": {
            "subject": {"CN": ca_common_name(ca_key), **TEAM_SUBJECT},
            "key": ca_key,
            "validity": "3650d",
        },
        "defaults": {
            "key": "ecdsa-p256",
            "validity": "365d",
            "renew_before": "33%",
            "subject": TEAM_SUBJECT,
        },
        "crl": {"validity": f"{CRL_VALIDITY.days}d", "refresh_before": "20d"},
        "users": [leaf.entry() for leaf in leaves if leaf.kind == "client"],
        "servers": [leaf.entry() for leaf in leaves if leaf.kind == "server"],
    }
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    (state / "users.yaml").write_text(text, encoding="utf-8")


def _apply(state: Path, now: datetime) -> str:
    out, err = io.StringIO(), io.StringIO()
    argv = ["--state", str(state), "--now", now.strftime("%Y-%m-%dT%H:%M:%SZ")]
    code = main([*argv, "apply", "--no-commit"], environ=ENVIRON, stdout=out, stderr=err)
    assert code == 0, f"apply at {now} exited {code}:\n{out.getvalue()}{err.getvalue()}"
    return out.getvalue()


def _build(base: Path, ca_key: KeyName) -> Pki:
    state, evidence = base / "state", base / "evidence"
    state.mkdir()
    evidence.mkdir()
    leaves = live_leaves(ca_key)
    _write_users_yaml(state, ca_key, (*leaves, LEAVER))
    _apply(state, FIRST_NOW)
    shutil.copyfile(state / "ca/crl.pem", evidence / "crl-before-revocation.pem")
    shutil.copyfile(state / LEAVER.cert_path, evidence / "revoked.crt")
    first_serials = {
        leaf: load_certificate(state / leaf.cert_path).serial_number for leaf in (*leaves, LEAVER)
    }
    _write_users_yaml(state, ca_key, leaves)  # the leaver is gone: the next apply revokes it
    _apply(state, SECOND_NOW)
    return Pki(
        ca_key=ca_key,
        root=state,
        leaves=leaves,
        first_crl=evidence / "crl-before-revocation.pem",
        revoked_cert=evidence / "revoked.crt",
        first_serials=first_serials,
    )


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[KeyName, Pki]:
    """One state directory per CA key type, issued once for the whole module."""
    return {ca_key: _build(tmp_path_factory.mktemp(f"pki-{ca_key}"), ca_key) for ca_key in CA_KEYS}


# --------------------------------------------------------------------------- helpers


def openssl_verify(pki: Pki, cert: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [
        "openssl",
        "verify",
        "-x509_strict",
        "-attime",
        str(int(VERIFY_AT.timestamp())),
        "-CAfile",
        str(pki.path("ca/ca.crt")),
        *options,
        str(cert),
    ]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def purpose_of(kind: Kind) -> str:
    return "sslclient" if kind == "client" else "sslserver"


def usages(ku: x509.KeyUsage) -> set[str]:
    """The names of the key usage bits that are set."""
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ]
    found = {name for name in names if getattr(ku, name)}
    if ku.key_agreement:
        found |= {name for name in ("encipher_only", "decipher_only") if getattr(ku, name)}
    return found


def issuer_key(
    cert: x509.Certificate,
) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey:
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return key


def public_der(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_name(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}[public_key.curve.name]
    assert isinstance(public_key, ed25519.Ed25519PublicKey)
    return "ed25519"


def ski_of(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def common_names(cert: x509.Certificate) -> list[str]:
    return [str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def subject_attributes(name: x509.Name) -> dict[str, str]:
    pairs = [(attr.rfc4514_attribute_name, str(attr.value)) for attr in name]
    assert len({short for short, _ in pairs}) == len(pairs), f"an attribute repeats in {name}"
    return dict(pairs)


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def all_certificates(pki: Pki) -> Iterator[tuple[str, x509.Certificate]]:
    yield "ca/ca.crt", pki.ca_cert
    for leaf in pki.leaves:
        yield leaf.cert_path, pki.cert(leaf)
    yield "revoked.crt", load_certificate(pki.revoked_cert)


# --------------------------------------------------------------------------- 1. OpenSSL


@pytest.mark.parametrize(("ca_key", "leaf"), ALL_LEAVES)
def test_openssl_accepts_leaf_for_its_purpose_with_and_without_crl(
    pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf
) -> None:
    pki = pkis[ca_key]
    cert = pki.path(leaf.cert_path)
    plain = openssl_verify(pki, cert, "-purpose", purpose_of(leaf.kind))
    assert plain.returncode == 0, _said(plain)
    assert plain.stdout.strip() == f"{cert}: OK"
    checked = openssl_verify(
        pki, cert, "-purpose", purpose_of(leaf.kind), "-crl_check", "-CRLfile", str(pki.crl_path)
    )
    assert checked.returncode == 0, _said(checked)


@pytest.mark.parametrize(("ca_key", "leaf"), CLIENT_LEAVES)
def test_openssl_refuses_client_certificate_as_server(
    pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf
) -> None:
    pki = pkis[ca_key]
    result = openssl_verify(pki, pki.path(leaf.cert_path), "-purpose", "sslserver")
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in _said(result)


@pytest.mark.parametrize(("ca_key", "leaf"), SERVER_LEAVES)
def test_openssl_refuses_server_certificate_as_client(
    pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf
) -> None:
    pki = pkis[ca_key]
    result = openssl_verify(pki, pki.path(leaf.cert_path), "-purpose", "sslclient")
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in _said(result)


@pytest.mark.parametrize(("ca_key", "leaf"), SERVER_LEAVES)
def test_openssl_matches_server_names_and_addresses_like_verify_full(
    pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf
) -> None:
    pki = pkis[ca_key]
    cert = pki.path(leaf.cert_path)
    for host in (leaf.name, *leaf.dns):
        result = openssl_verify(pki, cert, "-purpose", "sslserver", "-verify_hostname", host)
        assert result.returncode == 0, f"{host}: {_said(result)}"
    for address in leaf.ips:
        result = openssl_verify(pki, cert, "-purpose", "sslserver", "-verify_ip", address)
        assert result.returncode == 0, f"{address}: {_said(result)}"
    stranger = openssl_verify(
        pki, cert, "-purpose", "sslserver", "-verify_hostname", "other.acme.example"
    )
    assert stranger.returncode != 0
    assert "hostname mismatch" in _said(stranger)


@pytest.mark.parametrize("ca_key", PER_CA)
def test_openssl_crl_check_rejects_the_revoked_certificate(
    pkis: dict[KeyName, Pki], ca_key: KeyName
) -> None:
    pki = pkis[ca_key]
    purpose = ("-purpose", "sslclient")
    # Controls: the certificate itself is fine, and the CRL from before its removal lets it pass.
    assert openssl_verify(pki, pki.revoked_cert, *purpose).returncode == 0
    before = openssl_verify(
        pki, pki.revoked_cert, *purpose, "-crl_check", "-CRLfile", str(pki.first_crl)
    )
    assert before.returncode == 0, _said(before)
    after = openssl_verify(
        pki, pki.revoked_cert, *purpose, "-crl_check", "-CRLfile", str(pki.crl_path)
    )
    assert after.returncode != 0
    assert "certificate revoked" in _said(after)


# --------------------------------------------------------------------------- 2. extensions


@pytest.mark.parametrize("ca_key", PER_CA)
def test_ca_certificate_profile(pkis: dict[KeyName, Pki], ca_key: KeyName) -> None:
    ca = pkis[ca_key].ca_cert
    assert ca.version is x509.Version.v3
    assert ca.subject == ca.issuer
    assert subject_attributes(ca.subject) == {"CN": ca_common_name(ca_key), **TEAM_SUBJECT}
    assert key_name(ca.public_key()) == ca_key
    ca.verify_directly_issued_by(ca)

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    key_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical
    assert usages(key_usage.value) == {"key_cert_sign", "crl_sign"}
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value.digest
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == ski.value.digest


def _leaf_profile(pki: Pki, leaf: Leaf, usage: x509.ObjectIdentifier) -> x509.Certificate:
    """The checks clients and servers share; returns the certificate for the rest."""
    ca, cert = pki.ca_cert, pki.cert(leaf)
    assert cert.version is x509.Version.v3
    assert common_names(cert) == [leaf.name]
    assert subject_attributes(cert.subject) == {"CN": leaf.name, **TEAM_SUBJECT}
    assert cert.issuer == ca.subject
    assert key_name(cert.public_key()) == leaf.key
    cert.verify_directly_issued_by(ca)

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is False
    assert constraints.value.path_length is None
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical
    is_rsa = isinstance(cert.public_key(), rsa.RSAPublicKey)
    expected = {"digital_signature", "key_encipherment"} if is_rsa else {"digital_signature"}
    assert usages(key_usage.value) == expected
    extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(extended.value) == [usage]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value.digest
    assert ski.value.digest != ski_of(ca)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical
    assert aki.value.key_identifier == ski_of(ca)
    return cert


@pytest.mark.parametrize(("ca_key", "leaf"), CLIENT_LEAVES)
def test_client_certificate_profile(pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf) -> None:
    _leaf_profile(pkis[ca_key], leaf, ExtendedKeyUsageOID.CLIENT_AUTH)


@pytest.mark.parametrize(("ca_key", "leaf"), SERVER_LEAVES)
def test_server_certificate_profile(pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf) -> None:
    cert = _leaf_profile(pkis[ca_key], leaf, ExtendedKeyUsageOID.SERVER_AUTH)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [leaf.name, *leaf.dns]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in leaf.ips]
    assert len(list(san)) == 1 + len(leaf.dns) + len(leaf.ips)  # nothing else, no IP as DNSName


@pytest.mark.parametrize("ca_key", PER_CA)
def test_signatures_use_sha256_or_ed25519(pkis: dict[KeyName, Pki], ca_key: KeyName) -> None:
    pki = pkis[ca_key]
    expected_oid = {
        "rsa-2048": SignatureAlgorithmOID.RSA_WITH_SHA256,
        "ecdsa-p256": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        "ecdsa-p384": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        "ed25519": SignatureAlgorithmOID.ED25519,
    }[ca_key]
    signed: list[tuple[str, x509.Certificate | x509.CertificateRevocationList]] = [
        *all_certificates(pki),
        ("ca/crl.pem", pki.crl),
        ("crl before revocation", pki.crl_before_revocation),
    ]
    for where, item in signed:
        assert item.signature_algorithm_oid == expected_oid, where
        if ca_key == "ed25519":
            assert item.signature_hash_algorithm is None, where
        else:
            assert isinstance(item.signature_hash_algorithm, hashes.SHA256), where


def test_serial_numbers_are_random_positive_and_at_most_159_bits(
    pkis: dict[KeyName, Pki],
) -> None:
    serials = [cert.serial_number for pki in pkis.values() for _, cert in all_certificates(pki)]
    assert all(0 < serial < 2**159 for serial in serials)
    # 40-odd random 159-bit serials all below 2**150: probability 2**-360. A counter: certain.
    assert max(serials) >= 2**150
    assert len(set(serials)) == len(serials)


@pytest.mark.parametrize("ca_key", PER_CA)
def test_ledger_records_every_serial_once_with_its_status(
    pkis: dict[KeyName, Pki], ca_key: KeyName
) -> None:
    pki = pkis[ca_key]
    header, entries = pki.ledger()
    assert header["crl_number"] == 2
    serials = [int(str(entry["serial"]), 16) for entry in entries]
    assert len(set(serials)) == len(serials)
    assert all(0 < serial < 2**159 for serial in serials)
    by_serial = {int(str(entry["serial"]), 16): entry for entry in entries}
    # The revoking apply issued nothing: every entry comes from the first apply.
    assert sorted(serials) == sorted(pki.first_serials.values())
    for leaf in pki.leaves:
        cert = pki.cert(leaf)
        assert cert.serial_number == pki.first_serials[leaf]
        entry = by_serial[cert.serial_number]
        der = cert.public_bytes(serialization.Encoding.DER)
        assert (entry["kind"], entry["name"], entry["status"]) == (leaf.kind, leaf.name, "valid")
        assert entry["fingerprint"] == hashlib.sha256(der).hexdigest()
    leaver = by_serial[pki.first_serials[LEAVER]]
    assert (leaver["name"], leaver["status"]) == (LEAVER.name, "revoked")
    assert leaver["reason"] == "cessationOfOperation"
    assert leaver["revoked_at"] == SECOND_NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert not pki.path(LEAVER.cert_path).exists()
    assert not pki.path(LEAVER.key_path).exists()


@pytest.mark.parametrize("ca_key", PER_CA)
def test_no_leaf_outlives_the_ca(pkis: dict[KeyName, Pki], ca_key: KeyName) -> None:
    pki = pkis[ca_key]
    ca_end = pki.ca_cert.not_valid_after_utc
    for path, cert in all_certificates(pki):
        assert cert.not_valid_before_utc <= FIRST_NOW < cert.not_valid_after_utc <= ca_end, path
    # archiver asks for 7300 days under a 3650-day CA: it is cut to end with the CA.
    assert pki.cert(LONG_LIVED).not_valid_after_utc == ca_end
    assert pki.cert(CLIENTS[0]).not_valid_after_utc < ca_end


@pytest.mark.parametrize("ca_key", PER_CA)
def test_crl_number_aki_reasons_and_next_update(pkis: dict[KeyName, Pki], ca_key: KeyName) -> None:
    pki = pkis[ca_key]
    ca = pki.ca_cert
    before, after = pki.crl_before_revocation, pki.crl
    numbers = [
        crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        for crl in (before, after)
    ]
    assert numbers[0] < numbers[1]
    for crl, now in ((before, FIRST_NOW), (after, SECOND_NOW)):
        assert crl.issuer == ca.subject
        assert crl.is_signature_valid(issuer_key(ca))
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ski_of(ca)
        assert crl.last_update_utc == now - BACKDATE
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - now == CRL_VALIDITY
    assert len(before) == 0
    assert [entry.serial_number for entry in after] == [pki.first_serials[LEAVER]]
    for entry in after:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.cessation_of_operation
        assert entry.revocation_date_utc == SECOND_NOW


# --------------------------------------------------------------------------- 3. keys and modes


def _check_key_file(path: Path, passphrase: str, cert: x509.Certificate) -> None:
    assert mode_of(path) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert data.rstrip().endswith(b"-----END ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(data, password=passphrase.encode())
    assert public_der(key.public_key()) == public_der(cert.public_key())
    others = {WRONG_PASSPHRASE, CA_PASSPHRASE, KEY_PASSPHRASE} - {passphrase}
    for other in sorted(others):
        # No message match: about 1 wrong passphrase in 256 gets past the CBC padding check and
        # fails later as unparsable data instead of "incorrect password". Both are ValueError.
        with pytest.raises(ValueError):  # noqa: PT011
            serialization.load_pem_private_key(data, password=other.encode())
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(data, password=None)
    # OpenSSL (what PostgreSQL and libpq use) opens it too; the passphrase goes via the env.
    result = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-passin", "env:TEST_KEY_PASSPHRASE", "-noout"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "TEST_KEY_PASSPHRASE": passphrase},
    )
    assert result.returncode == 0, _said(result)
    # ... and it is a modern scheme (PBES2 with AES-256), not PBES1 with 3DES or RC2.
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-in", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert parsed.returncode == 0, _said(parsed)
    assert ":PBES2" in parsed.stdout
    assert ":aes-256-" in parsed.stdout


@pytest.mark.parametrize(("ca_key", "leaf"), ALL_LEAVES)
def test_leaf_key_is_encrypted_0600_and_matches_its_certificate(
    pkis: dict[KeyName, Pki], ca_key: KeyName, leaf: Leaf
) -> None:
    pki = pkis[ca_key]
    _check_key_file(pki.path(leaf.key_path), KEY_PASSPHRASE, pki.cert(leaf))


@pytest.mark.parametrize("ca_key", PER_CA)
def test_ca_key_is_encrypted_0600_and_matches_the_ca(
    pkis: dict[KeyName, Pki], ca_key: KeyName
) -> None:
    pki = pkis[ca_key]
    _check_key_file(pki.path("ca/ca.key"), CA_PASSPHRASE, pki.ca_cert)


@pytest.mark.parametrize("ca_key", PER_CA)
def test_public_files_are_0644(pkis: dict[KeyName, Pki], ca_key: KeyName) -> None:
    pki = pkis[ca_key]
    public = ["ca/ca.crt", "ca/crl.pem", "ledger.jsonl", *(leaf.cert_path for leaf in pki.leaves)]
    assert {path: mode_of(pki.path(path)) for path in public} == dict.fromkeys(public, 0o644)


# --------------------------------------------------------------------------- 4. pkilint

LintKind = Literal["cert", "crl"]


def run_pkilint(kind: LintKind, path: Path) -> subprocess.CompletedProcess[str]:
    if kind == "cert":
        command = [str(LINT_BIN / "lint_pkix_cert"), "lint", "-s", "WARNING", str(path)]
    else:
        options = ["-t", "CRL", "-p", "PKIX", "-s", "WARNING"]
        command = [str(LINT_BIN / "lint_crl"), "lint", *options, str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def lint_sample(ca_key: KeyName) -> tuple[Leaf, ...]:
    """The leaves pkilint reads under this CA: one client and one server, rotated so that across
    the four CAs every leaf key type is linted once as a client and once as a server, each under
    a different CA (each run costs half a second of CPU; the CA certificates already carry every
    signature algorithm encoding). The rsa-4096 client comes along where it lives."""
    index = CA_KEYS.index(ca_key)
    client, server = CLIENTS[index % len(CLIENTS)], SERVERS[(index + 1) % len(SERVERS)]
    return (client, BIG_RSA, server) if ca_key == BIG_RSA_CA else (client, server)


def test_pkilint_sample_covers_every_key_type_as_client_and_server() -> None:
    sampled = {(leaf.kind, leaf.key) for ca_key in CA_KEYS for leaf in lint_sample(ca_key)}
    wanted = {(kind, key) for kind in ("client", "server") for key in LEAF_KEYS}
    assert wanted | {("client", "rsa-4096")} == sampled


def _lint_targets(pki: Pki) -> list[tuple[LintKind, Path]]:
    sample = lint_sample(pki.ca_key)
    certs = [pki.path("ca/ca.crt"), *(pki.path(leaf.cert_path) for leaf in sample)]
    return [
        *(("cert", path) for path in certs),
        ("crl", pki.first_crl),
        ("crl", pki.path("ca/crl.pem")),
    ]


@pytest.fixture(scope="module")
def pkilint_results(
    pkis: dict[KeyName, Pki],
) -> dict[Path, subprocess.CompletedProcess[str]]:
    """pkilint over the sampled files of every CA, run once and in parallel."""
    targets = [target for pki in pkis.values() for target in _lint_targets(pki)]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda target: run_pkilint(*target), targets))
    return {path: result for (_, path), result in zip(targets, results, strict=True)}


class LintFindings(AssertionError):
    """pkilint reported something (or failed): its output is the message."""


def _assert_lint_clean(result: subprocess.CompletedProcess[str]) -> None:
    if (result.returncode, result.stdout.strip(), result.stderr.strip()) != (0, "", ""):
        raise LintFindings(f"exit {result.returncode}\n{result.stdout}{result.stderr}")


LINT_CERTS = [
    pytest.param(ca_key, relative, id=f"ca-{ca_key}/{what}")
    for ca_key in CA_KEYS
    for what, relative in [
        ("ca", "ca/ca.crt"),
        *((leaf.id, leaf.cert_path) for leaf in lint_sample(ca_key)),
    ]
]


@pytest.mark.slow
@pytest.mark.parametrize(("ca_key", "relative"), LINT_CERTS)
def test_pkilint_finds_nothing_in_certificate(
    pkis: dict[KeyName, Pki],
    pkilint_results: dict[Path, subprocess.CompletedProcess[str]],
    ca_key: KeyName,
    relative: str,
) -> None:
    _assert_lint_clean(pkilint_results[pkis[ca_key].path(relative)])


@pytest.mark.slow
@pytest.mark.parametrize("revoked", [False, True], ids=["empty-crl", "crl-with-entry"])
@pytest.mark.parametrize("ca_key", PER_CA)
def test_pkilint_finds_nothing_in_crl(
    pkis: dict[KeyName, Pki],
    pkilint_results: dict[Path, subprocess.CompletedProcess[str]],
    ca_key: KeyName,
    revoked: bool,
) -> None:
    pki = pkis[ca_key]
    path = pki.path("ca/crl.pem") if revoked else pki.first_crl
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert len(crl) == (1 if revoked else 0)
    _assert_lint_clean(pkilint_results[path])


# The controls: pkilint does speak up, about exactly the defect put in.

_CONTROL_TIME = datetime(2026, 12, 1, tzinfo=UTC)


def _control_ca(*, key_usage_critical: bool = True, with_ski: bool = True) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pkilint control CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_CONTROL_TIME)
        .not_valid_after(_CONTROL_TIME + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=key_usage_critical,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    if with_ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def _control_crl(*, with_number: bool = True, with_aki: bool = True) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pkilint control CA")])
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(_CONTROL_TIME)
        .next_update(_CONTROL_TIME + CRL_VALIDITY)
    )
    if with_number:
        builder = builder.add_extension(x509.CRLNumber(1), critical=False)
    if with_aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key_usage_critical", "with_ski", "finding"),
    [
        pytest.param(True, True, None, id="well-formed-ca-is-clean"),
        pytest.param(False, True, "pkix.key_usage_extension_not_critical", id="ku-not-critical"),
        pytest.param(True, False, "pkix.certificate_skid_ca_missing", id="ca-without-ski"),
    ],
)
def test_pkilint_flags_a_broken_certificate(
    tmp_path: Path, key_usage_critical: bool, with_ski: bool, finding: str | None
) -> None:
    path = tmp_path / "control.crt"
    cert = _control_ca(key_usage_critical=key_usage_critical, with_ski=with_ski)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    result = run_pkilint("cert", path)
    if finding is None:
        _assert_lint_clean(result)
    else:
        assert result.returncode != 0
        assert finding in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("with_number", "with_aki", "finding"),
    [
        pytest.param(True, True, None, id="well-formed-crl-is-clean"),
        pytest.param(False, True, "pkix.crl_number_missing", id="crl-without-number"),
        pytest.param(True, False, "pkix.authority_key_identifier_missing", id="crl-without-aki"),
    ],
)
def test_pkilint_flags_a_broken_crl(
    tmp_path: Path, with_number: bool, with_aki: bool, finding: str | None
) -> None:
    path = tmp_path / "control.crl"
    path.write_bytes(_control_crl(with_number=with_number, with_aki=with_aki))
    result = run_pkilint("crl", path)
    if finding is None:
        _assert_lint_clean(result)
    else:
        assert result.returncode != 0
        assert finding in result.stdout


# Server names, each issued on its own: either the reconciler refuses the name (exit 1,
# users.yaml must change: single labels, wildcards and IP addresses as DNS names are outside the
# preferred name syntax pkilint enforces) or the certificate it signs is lint-clean. DESIGN.md:
# "Every certificate and the CRL pass an RFC 5280 linter ... with no error or warning".


@pytest.mark.slow
@pytest.mark.parametrize(
    "server",
    [
        pytest.param(
            Leaf("server", "pg.acme.example", "ecdsa-p256", dns=("db1.acme.example",)),
            id="control-fully-qualified",
        ),
        pytest.param(
            Leaf("server", "pgprod", "ecdsa-p256"),
            id="single-label-server-name",
        ),
        pytest.param(
            Leaf("server", "pg.acme.example", "ecdsa-p256", dns=("pgvip",)),
            id="single-label-dns-san",
        ),
        pytest.param(
            Leaf("server", "pg.acme.example", "ecdsa-p256", dns=("*.pg.acme.example",)),
            id="wildcard-dns-san",
        ),
        pytest.param(
            Leaf("server", "10.0.6.188", "ecdsa-p256"),
            id="ip-address-as-server-name",
        ),
    ],
)
def test_every_accepted_server_name_yields_a_lint_clean_certificate(
    tmp_path: Path, server: Leaf
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _write_users_yaml(state, "ecdsa-p256", [server])
    out, err = io.StringIO(), io.StringIO()
    argv = ["--state", str(state), "--now", "2026-12-01T00:00:00Z", "apply", "--no-commit"]
    code = main(argv, environ=ENVIRON, stdout=out, stderr=err)
    if code == 1:  # refused with advice: nothing was issued, nothing to lint
        assert "users.yaml" in err.getvalue()
        assert not (state / "ca").exists()
        return
    assert code == 0, err.getvalue()
    cert = load_certificate(state / server.cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [server.name, *server.dns]
    _assert_lint_clean(run_pkilint("cert", state / server.cert_path))
