"""Read the state directory into an immutable Observed value. Needs no passphrase.

A file that is missing, cannot be read (a link, no permission, an I/O error) or cannot be used
is an observation, never an exception: deciding what to do about it is plan()'s job. Observed
too: file modes, temporary files left by an interrupted write (and any certificate in them),
files holding an unencrypted private key, and whether the ledger's CA signature verifies.

A certificate whose fingerprint the CA-signed ledger records was checked when it was issued:
its facts come from the ledger, without parsing or verifying it again. That is what makes a
no-op over thousands of names cheap.
"""

from __future__ import annotations

from cryptography import x509

from reconciler import layout, ledger, pem, pki
from reconciler.model import (
    CertFacts,
    CertKind,
    Found,
    KeyFacts,
    LeafRef,
    Ledger,
    LedgerEntry,
    Observed,
    ObservedCA,
    ObservedCRL,
    ObservedLeaf,
    Revocation,
    TempFile,
)
from reconciler.store import FileRead, StateDir


def _unusable(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _key(read: FileRead) -> KeyFacts:
    return (
        pem.key_facts(read.data)
        if read.found is Found.OK
        else KeyFacts(read.found, None, read.detail)
    )


def _parse(data: bytes, ca_cert: x509.Certificate | None) -> CertFacts:
    """ValueError when data holds no certificate, or a broken one."""
    return pki.certificate_facts(pki.load_certificates(data)[0], ca_cert)


class _Observer:
    def __init__(self, store: StateDir, modes: dict[str, int]) -> None:
        self.store = store
        self.plaintext: list[str] = []
        self.modes = modes  # of every managed file read, and of the directories

    def read(self, relative: str, *, key: bool = False) -> FileRead:
        """Read a file, noting its mode, and noting a private key where none belongs."""
        read = self.store.read(relative)
        self.note(relative, read, key=key)
        return read

    def note(self, relative: str, read: FileRead, *, key: bool = False) -> None:
        if read.found is not Found.OK:
            return
        self.modes[relative] = read.mode
        if not key:
            self.check(relative, read.data)

    def check(self, relative: str, data: bytes) -> None:
        if pem.holds_plaintext_key(data):
            self.plaintext.append(relative)

    def ca(self) -> tuple[ObservedCA, x509.Certificate | None]:
        key = _key(self.read(layout.CA_KEY, key=True))
        read = self.read(layout.CA_CERT)
        if read.found is not Found.OK:
            return ObservedCA(None, read.found, key, read.detail), None
        try:
            cert = pki.load_certificates(read.data)[0]
            facts = pki.certificate_facts(cert, cert)
        except ValueError as exc:
            return ObservedCA(None, Found.UNUSABLE, key, _unusable(exc)), None
        if not facts.is_ca or not facts.signed_by_ca:
            return ObservedCA(facts, Found.UNUSABLE, key, "not a self-signed CA certificate"), None
        return ObservedCA(facts, Found.OK, key), cert

    def ledger(self, ca_cert: x509.Certificate | None) -> Ledger:
        read = self.read(layout.LEDGER)
        if read.found is not Found.OK:
            return Ledger(found=read.found, detail=read.detail)
        try:
            decoded, signed, signature = ledger.decode(read.data)
        except ValueError as exc:
            return Ledger(found=Found.UNUSABLE, detail=_unusable(exc))
        if ca_cert is None:
            return decoded
        ok = signature is not None and pki.verify(ca_cert.public_key(), signed, signature)
        return Ledger(
            entries=decoded.entries,
            crl_number=decoded.crl_number,
            ca_fingerprint=decoded.ca_fingerprint,
            ca_key_sha256=decoded.ca_key_sha256,
            signature_ok=ok,
        )

    def leaves(
        self,
        listing_names: dict[CertKind, list[str]],
        ca_cert: x509.Certificate | None,
        known: dict[str, LedgerEntry],
    ) -> list[ObservedLeaf]:
        leaves = []
        for kind, names in listing_names.items():
            for name, key_read, cert_read in self.store.read_leaves(kind, names):
                ref = LeafRef(kind, name)
                key = _key(key_read)
                self.note(layout.leaf_key(ref), key_read, key=True)
                self.note(layout.leaf_cert(ref), cert_read)
                if cert_read.found is not Found.OK:
                    leaves.append(ObservedLeaf(ref, None, cert_read.found, key, cert_read.detail))
                    continue
                data = cert_read.data
                entry = known.get(pem.fingerprint(data) or "")
                if entry is not None and entry.subject is not None and entry.ref == ref:
                    leaves.append(ObservedLeaf(ref, entry.facts(entry.subject), Found.OK, key))
                    continue
                try:
                    leaves.append(ObservedLeaf(ref, _parse(data, ca_cert), Found.OK, key))
                except ValueError as exc:
                    leaves.append(ObservedLeaf(ref, None, Found.UNUSABLE, key, _unusable(exc)))
        return leaves

    def crl(self, ca_cert: x509.Certificate | None) -> ObservedCRL:
        read = self.read(layout.CRL)
        if read.found is not Found.OK:
            return ObservedCRL(read.found, read.detail)
        try:
            crl = x509.load_pem_x509_crl(read.data)
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            revoked = tuple(
                Revocation(entry.serial_number, entry.revocation_date_utc, pki.reason_of(entry))
                for entry in crl
            )
            this_update, next_update = crl.last_update_utc, crl.next_update_utc
        except (ValueError, x509.ExtensionNotFound) as exc:
            return ObservedCRL(Found.UNUSABLE, _unusable(exc))
        signed = ca_cert is not None and crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
        return ObservedCRL(
            Found.OK if signed else Found.UNUSABLE,
            "" if signed else "not signed by the current CA",
            number,
            this_update,
            next_update,
            revoked,
        )

    def temp_file(self, relative: str, ca_cert: x509.Certificate | None) -> TempFile:
        data = self.store.read(relative).data
        self.check(relative, data)
        leaf = layout.leaf_of(relative)
        cert = None
        if leaf is not None and leaf[1] == ".crt":
            try:
                cert = _parse(data, ca_cert)
            except ValueError:
                cert = None
        return TempFile(path=relative, cert=cert, ref=leaf[0] if leaf is not None else None)


def observe(store: StateDir) -> Observed:
    """Everything plan() needs to know about the state directory, read once."""
    listing = store.listing()
    observer = _Observer(store, dict(listing.dir_modes))
    ca, ca_cert = observer.ca()
    found_ledger = observer.ledger(ca_cert)
    known = (
        {entry.fingerprint: entry for entry in found_ledger.entries}
        if found_ledger.signature_ok
        else {}
    )
    leaves = observer.leaves(listing.leaf_names, ca_cert, known)
    crl = observer.crl(ca_cert)
    temp_files = tuple(observer.temp_file(path, ca_cert) for path in listing.temp_files)
    for relative in [*listing.other_files, layout.USERS_YAML]:
        observer.check(relative, store.read(relative).data)
    return Observed(
        ca=ca,
        crl=crl,
        leaves=tuple(leaves),
        ledger=found_ledger,
        modes=tuple(sorted(observer.modes.items())),
        temp_files=temp_files,
        plaintext_keys=tuple(sorted(set(observer.plaintext))),
        unreadable=tuple(listing.unreadable),
    )
