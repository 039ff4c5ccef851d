"""Read the state directory into an immutable Observed value. Needs no passphrase.

A file that cannot be used is an observation ("unusable: …"), never an exception: deciding what
to do about it is plan()'s job. Observed too: file modes, temporary files left by an interrupted
write (and any certificate in them), files holding an unencrypted private key, and whether the
ledger's CA signature verifies.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from cryptography import x509

from reconciler import pki
from reconciler.model import (
    CertFacts,
    CertKind,
    KeyFacts,
    LedgerEntry,
    Observed,
    ObservedCA,
    ObservedCRL,
    ObservedLeaf,
    Subject,
    TempFile,
)
from reconciler.store import TEMP_PREFIX, TEMP_SUFFIX, Listing, StateDir

_ENCRYPTED_PEM = re.compile(
    rb"\A\s*-----BEGIN ENCRYPTED PRIVATE KEY-----\r?\n([A-Za-z0-9+/=\r\n]+)"
    rb"-----END ENCRYPTED PRIVATE KEY-----\s*\Z"
)


def key_facts(data: bytes | None) -> KeyFacts:
    if data is None:
        return KeyFacts(problem="missing", sha256=None)
    digest = hashlib.sha256(data).hexdigest()
    if _ENCRYPTED_PEM.match(data):
        return KeyFacts(problem=None, sha256=digest)
    if pki.PLAINTEXT_KEY.search(data):
        return KeyFacts(problem="not encrypted", sha256=digest)
    return KeyFacts(problem="unusable: not an encrypted PKCS#8 PEM key", sha256=digest)


def _problem(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"unusable: {text}"


class _Observer:
    def __init__(self, store: StateDir, listing: Listing) -> None:
        self.store = store
        self.plaintext: list[str] = []
        self.modes: dict[str, int] = dict(listing.modes)
        self.mode_wanted = {
            f"{directory}/{file}"
            for directory, files in listing.leaf_files.items()
            for file in files
            if file.endswith(".crt")
        }
        self.ca_subject: Subject = ()

    def read(self, relative: str) -> bytes | None:
        """Read a file that must not hold a private key, noting it when it does."""
        data, mode = self.store.read_relative(relative)
        if mode is not None and relative in self.mode_wanted:
            self.modes[relative] = mode
        if data is not None and b"PRIVATE KEY" in data and pki.PLAINTEXT_KEY.search(data):
            self.plaintext.append(relative)
        return data

    def read_key(self, relative: str) -> KeyFacts:
        data, mode = self.store.read_relative(relative)
        if mode is not None:
            self.modes[relative] = mode
        return key_facts(data)

    def ca(self) -> tuple[ObservedCA, x509.Certificate | None]:
        key = key_facts(self.store.read(self.store.ca_key))
        data = self.read("ca/ca.crt")
        if data is None:
            return ObservedCA(cert=None, cert_problem="missing", key=key), None
        try:
            cert = pki.load_certificates(data)[0]
            facts = pki.certificate_facts(cert, cert)
        except ValueError as exc:
            return ObservedCA(cert=None, cert_problem=_problem(exc), key=key), None
        if not facts.is_ca or not facts.signed_by_ca:
            return (
                ObservedCA(
                    cert=facts,
                    cert_problem="not a self-signed CA certificate",
                    key=key,
                ),
                None,
            )
        ca = ObservedCA(cert=facts, cert_problem=None, key=key)
        self.ca_subject = facts.subject
        return ca, cert

    def leaf(
        self,
        kind: CertKind,
        name: str,
        ca_cert: x509.Certificate | None,
        known: Mapping[str, LedgerEntry],
    ) -> ObservedLeaf:
        directory = kind.directory
        key = self.read_key(f"{directory}/{name}.key")
        relative = f"{directory}/{name}.crt"
        data = self.read(relative)
        if data is None:
            return ObservedLeaf(kind=kind, name=name, cert=None, cert_problem="missing", key=key)
        # A certificate the CA-signed ledger records by fingerprint was checked when it was
        # issued: its facts come from the ledger, without parsing or verifying it again.
        entry = known.get(pki.pem_fingerprint(data) or "")
        if (
            entry is not None
            and entry.subject is not None
            and entry.kind is kind
            and (entry.name == name)
        ):
            return ObservedLeaf(
                kind=kind,
                name=name,
                cert=_facts_from(entry, self.ca_subject),
                cert_problem=None,
                key=key,
            )
        try:
            facts = pki.certificate_facts(pki.load_certificates(data)[0], ca_cert)
        except ValueError as exc:
            return ObservedLeaf(
                kind=kind, name=name, cert=None, cert_problem=_problem(exc), key=key
            )
        return ObservedLeaf(kind=kind, name=name, cert=facts, cert_problem=None, key=key)

    def crl(self, ca_cert: x509.Certificate | None) -> ObservedCRL:
        data = self.read("ca/crl.pem")
        if data is None:
            return ObservedCRL(
                problem="missing",
                number=None,
                this_update=None,
                next_update=None,
                serials=frozenset(),
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

    def temp_file(self, relative: str, ca_cert: x509.Certificate | None) -> TempFile:
        data = self.store.read_relative(relative)[0] or b""
        directory, _, file = relative.rpartition("/")
        target = file[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
        kind = next((k for k in CertKind if k.directory == directory), None)
        cert = None
        if target.endswith(".crt"):
            try:
                cert = pki.certificate_facts(pki.load_certificates(data)[0], ca_cert)
            except ValueError:
                cert = None
        if pki.PLAINTEXT_KEY.search(data):
            self.plaintext.append(relative)
        name = target[:-4] if kind is not None and target.endswith((".crt", ".key")) else None
        return TempFile(path=relative, cert=cert, kind=kind, name=name)


def _facts_from(entry: LedgerEntry, issuer: Subject) -> CertFacts:
    assert entry.subject is not None
    return CertFacts(
        serial=entry.serial,
        subject=entry.subject,
        issuer=issuer,
        dns=entry.dns,
        ips=entry.ips,
        key=entry.key,
        not_before=entry.not_before,
        not_after=entry.not_after,
        fingerprint=entry.fingerprint,
        signed_by_ca=True,
        is_ca=False,
    )


def observe(store: StateDir) -> Observed:
    """Everything plan() needs to know about the state directory, read once."""
    listing: Listing = store.scan()
    observer = _Observer(store, listing)
    ca, ca_cert = observer.ca()
    verify = None
    if ca_cert is not None:
        public_key = ca_cert.public_key()

        def verify(data: bytes, signature: bytes) -> bool:
            return pki.verify(public_key, data, signature)

    ledger = store.load_ledger(verify)
    known = {entry.fingerprint: entry for entry in ledger.entries} if ledger.signature_ok else {}
    leaves = tuple(
        observer.leaf(kind, name, ca_cert, known)
        for kind in CertKind
        for name in store.leaf_names(kind, listing)
    )
    crl = observer.crl(ca_cert)
    temp_files = tuple(observer.temp_file(path, ca_cert) for path in listing.temp_files)
    for relative in [*listing.other_files, "users.yaml"]:
        observer.read(relative)
    return Observed(
        ca=ca,
        crl=crl,
        leaves=leaves,
        ledger=ledger,
        modes=tuple(sorted(observer.modes.items())),
        temp_files=temp_files,
        plaintext_keys=tuple(sorted(set(observer.plaintext))),
    )
