"""The only module that builds keys, certificates and CRLs, and reads them back into facts.

Validity, serials and every other value come in as arguments: nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler.model import (
    CASpec,
    CertFacts,
    CertKind,
    KeyFacts,
    KeyType,
    LeafSpec,
    RequestFacts,
    Revocation,
    RevocationReason,
    Subject,
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_NAME_OIDS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
}
_OID_NAMES = {oid: short for short, oid in _NAME_OIDS.items()}

_REASONS = {
    RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
    RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
}


# --------------------------------------------------------------------------- keys


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type.is_rsa:
        return rsa.generate_private_key(
            public_exponent=65537, key_size=int(key_type.value.removeprefix("rsa-"))
        )
    if key_type is KeyType.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.ECDSA_P384:
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def generate_key_der(key_type: str) -> bytes:
    """A new key as unencrypted PKCS#8 DER: what a worker process hands back to apply (over a
    pipe between our own processes, never to disk)."""
    key = generate_key(KeyType(key_type))
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key_der(der: bytes) -> PrivateKey:
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, PrivateKey):
        raise TypeError(f"unsupported key type {type(key).__name__}")
    return key


def describe_key(public_key: object) -> str:
    """The KeyType value of a public key, or a plain description of an unsupported one."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}
        return names.get(public_key.curve.name, f"ecdsa-{public_key.curve.name}")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return type(public_key).__name__


def encrypt_key(key: PrivateKey, passphrase: bytes) -> bytes:
    """PKCS#8 PEM, encrypted with the best scheme the installed OpenSSL offers."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def decrypt_key(pem: bytes, passphrase: bytes) -> PrivateKey:
    """Raise ValueError when the passphrase is wrong or the data is not a supported key.

    An RSA key is not checked for consistency on loading (a quarter of a second for a 4096-bit
    CA key, on every apply): these keys are ours, they open only with our passphrase, and the
    CA key is then compared with ca.crt's public key."""
    key = serialization.load_pem_private_key(
        pem, password=passphrase, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, PrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def open_key(pem: bytes, passphrase: bytes) -> PrivateKey | None:
    """decrypt_key, or None when the passphrase does not open pem (or it holds no key of ours):
    each caller says in its own words which passphrase to set."""
    try:
        return decrypt_key(pem, passphrase)
    except (ValueError, TypeError):
        return None


def unencrypted_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def same_public_key(a: object, b: object) -> bool:
    def der(key: object) -> bytes:
        assert isinstance(key, PublicKey)
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return der(a) == der(b)


# --------------------------------------------------------------------------- certificates


def name(subject: Subject) -> x509.Name:
    return x509.Name([x509.NameAttribute(_NAME_OIDS[attr], value) for attr, value in subject])


def subject_of(value: x509.Name) -> Subject:
    return tuple(
        (_OID_NAMES.get(attr.oid, attr.oid.dotted_string), str(attr.value)) for attr in value
    )


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    """What every certificate shares; callers add the extensions that differ."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def build_ca_certificate(
    spec: CASpec, key: PrivateKey, *, serial: int, not_before: datetime, not_after: datetime
) -> x509.Certificate:
    subject = name(spec.subject_of(spec.generation))
    public_key = key.public_key()
    builder = (
        _builder(subject, subject, public_key, serial, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
    )
    return builder.sign(key, _signing_hash(key))


def build_leaf_certificate(
    spec: LeafSpec,
    public_key: PublicKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH
        if spec.kind is CertKind.CLIENT
        else ExtendedKeyUsageOID.SERVER_AUTH
    )
    builder = (
        _builder(name(spec.subject), ca_cert.subject, public_key, serial, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=spec.key.is_rsa), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if spec.kind is CertKind.SERVER:
        builder = builder.add_extension(_alt_names(spec), critical=False)
    return builder.sign(ca_key, _signing_hash(ca_key))


def _alt_names(spec: LeafSpec) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(dns) for dns in spec.dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in spec.ips]
    return x509.SubjectAlternativeName(names)


def build_request(spec: LeafSpec, key: PrivateKey) -> x509.CertificateSigningRequest:
    """An external server's CSR: CN = name and the entry's subject, SANs = name + dns + ip,
    and the server certificate's keyUsage and EKU serverAuth requested."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name(spec.subject))
        .add_extension(_alt_names(spec), critical=False)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=spec.key.is_rsa), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, _signing_hash(key))
    )


def request_facts(data: bytes, pending_key: KeyFacts) -> RequestFacts:
    """What a CSR file says; its header lines ("Requested: TIME", "Generation: N") say when
    and for which generation apply made it. ValueError when it is no valid CSR."""
    request = x509.load_pem_x509_csr(data)
    if not request.is_signature_valid:
        raise ValueError("its signature does not verify")
    header = dict(
        line.split(": ", 1) for line in data.decode("ascii", "replace").splitlines() if ": " in line
    )
    try:
        alt = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alt = x509.SubjectAlternativeName([])
    return RequestFacts(
        subject=subject_of(request.subject),
        dns=tuple(alt.get_values_for_type(x509.DNSName)),
        ips=tuple(str(ip) for ip in alt.get_values_for_type(x509.IPAddress)),
        key=describe_key(request.public_key()),
        public_key=public_key_sha256(request.public_key()),
        requested=datetime.fromisoformat(header["Requested"]) if "Requested" in header else None,
        generation=int(header.get("Generation", "1")),
        pending_key=pending_key,
    )


def request_pem(request: x509.CertificateSigningRequest, header: str) -> bytes:
    return header.encode() + request.public_bytes(serialization.Encoding.PEM)


def verify_server_chain(
    data: bytes, roots: Sequence[bytes], host: str, now: datetime
) -> tuple[list[Subject], str | None]:
    """Verify a chain file (leaf, then intermediates) for host to one of roots at now, with
    cryptography's verifier (chain building, EKU serverAuth, the Web PKI profile). The
    subjects of the issuers from the leaf's up, and None; or as the file lists them, and why
    it does not verify."""
    certs = load_certificates(data)
    issuers = [subject_of(cert.issuer) for cert in certs[:1]] + [
        subject_of(cert.subject) for cert in certs[1:]
    ]
    if not roots:
        return issuers, "users.yaml lists no trust root"
    store = verification.Store([cert for pem in roots for cert in load_certificates(pem)])
    verifier = (
        verification.PolicyBuilder()
        .store(store)
        .time(now)
        .build_server_verifier(x509.DNSName(host))
    )
    try:
        chain = verifier.verify(certs[0], certs[1:])
    except verification.VerificationError as exc:
        return issuers, str(exc)
    return [subject_of(cert.subject) for cert in chain[1:]], None


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
    revoked: Iterable[Revocation],
) -> x509.CertificateRevocationList:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in sorted(revoked, key=lambda r: r.serial):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(_REASONS[entry.reason]), critical=False)
            .build()
        )
    return builder.sign(ca_key, _signing_hash(ca_key))


def reason_of(entry: x509.RevokedCertificate) -> RevocationReason:
    """The reason a CRL gives for a revocation: superseded, or cessation of operation for any
    other (the reasons this tool writes; another tool's CRL keeps its entries as revoked)."""
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        flag = None
    superseded = flag is x509.ReasonFlags.superseded
    return RevocationReason.SUPERSEDED if superseded else RevocationReason.CESSATION_OF_OPERATION


def sign(key: PrivateKey, data: bytes) -> bytes:
    """A signature over data with the CA key (the ledger is signed this way)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def verify(public_key: object, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


def pem(item: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return item.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- reading back


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file; ValueError when there is none or one is broken."""
    return x509.load_pem_x509_certificates(data)


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def public_key_sha256(key: CertificatePublicKeyTypes) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, hex: how the ledger names a certificate."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_facts(
    cert: x509.Certificate, cas: Sequence[tuple[int, x509.Certificate]] = ()
) -> CertFacts:
    """Reduce a certificate to CertFacts; issuer is the generation of the first of cas (pairs
    of generation and CA certificate) whose key signed it."""
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    is_ca = server_auth = False
    for extension in cert.extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName):
            dns = tuple(value.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in value.get_values_for_type(x509.IPAddress))
        elif isinstance(value, x509.BasicConstraints):
            is_ca = value.ca
        elif isinstance(value, x509.ExtendedKeyUsage):
            server_auth = ExtendedKeyUsageOID.SERVER_AUTH in value
    public_key = cert.public_key()
    return CertFacts(
        serial=cert.serial_number,
        subject=subject_of(cert.subject),
        dns=dns,
        ips=ips,
        key=describe_key(public_key),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
        issuer=next((generation for generation, ca in cas if issued_by(cert, ca)), None),
        is_ca=is_ca,
        public_key=public_key_sha256(public_key),
        server_auth=server_auth,
        issuer_dn=subject_of(cert.issuer),
    )
