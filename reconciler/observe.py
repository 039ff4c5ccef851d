"""Read the state directory into an immutable Observed value. Needs no passphrase.

A file that cannot be used is an observation ("unusable: …"), never an exception: deciding what
to do about it is plan()'s job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography import x509

from reconciler import pki
from reconciler.model import (
    CertKind,
    KeyFacts,
    Observed,
    ObservedCA,
    ObservedCRL,
    ObservedLeaf,
)
from reconciler.store import StateDir

_ENCRYPTED_PEM = re.compile(
    rb"\A\s*-----BEGIN ENCRYPTED PRIVATE KEY-----\r?\n([A-Za-z0-9+/=\r\n]+)"
    rb"-----END ENCRYPTED PRIVATE KEY-----\s*\Z"
)


def key_facts(data: bytes | None) -> KeyFacts:
    if data is None:
        return KeyFacts(problem="missing", sha256=None)
    digest = hashlib.sha256(data).hexdigest()
    match = _ENCRYPTED_PEM.match(data)
    if match:
        try:
            base64.b64decode(match.group(1), validate=False)
        except binascii.Error:
            return KeyFacts(problem="unusable: broken PEM", sha256=digest)
        return KeyFacts(problem=None, sha256=digest)
    if b"PRIVATE KEY-----" in data and b"ENCRYPTED" not in data:
        return KeyFacts(problem="not encrypted", sha256=digest)
    return KeyFacts(problem="unusable: not an encrypted PKCS#8 PEM key", sha256=digest)


def _problem(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"unusable: {text}"


def _observe_ca(store: StateDir) -> tuple[ObservedCA, x509.Certificate | None]:
    key = key_facts(store.read(store.ca_key))
    data = store.read(store.ca_cert)
    if data is None:
        return ObservedCA(cert=None, cert_problem="missing", key=key, key_id=None), None
    try:
        cert = pki.load_certificates(data)[0]
        facts = pki.certificate_facts(cert, cert)
    except ValueError as exc:
        return ObservedCA(cert=None, cert_problem=_problem(exc), key=key, key_id=None), None
    if not facts.is_ca or not facts.signed_by_ca:
        return (
            ObservedCA(
                cert=facts, cert_problem="not a self-signed CA certificate", key=key, key_id=None
            ),
            None,
        )
    return ObservedCA(cert=facts, cert_problem=None, key=key, key_id=pki.subject_key_id(cert)), cert


def _observe_leaf(
    store: StateDir, kind: CertKind, name: str, ca_cert: x509.Certificate | None
) -> ObservedLeaf:
    key = key_facts(store.read(store.leaf_key(kind, name)))
    data = store.read(store.leaf_cert(kind, name))
    if data is None:
        return ObservedLeaf(kind=kind, name=name, cert=None, cert_problem="missing", key=key)
    try:
        cert = pki.load_certificates(data)[0]
        facts = pki.certificate_facts(cert, ca_cert)
    except ValueError as exc:
        return ObservedLeaf(kind=kind, name=name, cert=None, cert_problem=_problem(exc), key=key)
    return ObservedLeaf(kind=kind, name=name, cert=facts, cert_problem=None, key=key)


def _observe_crl(store: StateDir, ca_cert: x509.Certificate | None) -> ObservedCRL:
    data = store.read(store.crl)
    if data is None:
        return ObservedCRL(
            problem="missing", number=None, this_update=None, next_update=None, serials=frozenset()
        )
    try:
        crl = x509.load_pem_x509_crl(data)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        serials = frozenset(entry.serial_number for entry in crl)
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
    except (ValueError, x509.ExtensionNotFound) as exc:
        return ObservedCRL(
            problem=_problem(exc),
            number=None,
            this_update=None,
            next_update=None,
            serials=frozenset(),
        )
    problem = None
    if ca_cert is None or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        problem = "not signed by the current CA"
    return ObservedCRL(
        problem=problem,
        number=number,
        this_update=this_update,
        next_update=next_update,
        serials=serials,
    )


def observe(store: StateDir) -> Observed:
    """Everything plan() needs to know about the state directory, read once."""
    ca, ca_cert = _observe_ca(store)
    leaves = tuple(
        _observe_leaf(store, kind, name, ca_cert)
        for kind in CertKind
        for name in store.leaf_names(kind)
    )
    return Observed(
        ca=ca, crl=_observe_crl(store, ca_cert), leaves=leaves, ledger=store.load_ledger()
    )
