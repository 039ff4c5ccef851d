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

import dataclasses

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

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


Cas = list[tuple[int, x509.Certificate]]
"""The usable CA certificates with their generations, newest first."""


def _parse(data: bytes, cas: Cas) -> CertFacts:
    """ValueError when data holds no certificate, or a broken one."""
    return pki.certificate_facts(pki.load_certificates(data)[0], cas)


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

    def ca(self, generation: int) -> tuple[ObservedCA, x509.Certificate | None]:
        key = _key(self.read(layout.ca_key(generation), key=True))
        read = self.read(layout.ca_cert(generation))
        if read.found is not Found.OK:
            return ObservedCA(None, read.found, key, read.detail, generation), None
        try:
            cert = pki.load_certificates(read.data)[0]
            facts = pki.certificate_facts(cert, [(generation, cert)])
        except ValueError as exc:
            return ObservedCA(None, Found.UNUSABLE, key, _unusable(exc), generation), None
        if not facts.is_ca or not facts.signed_by_ca:
            detail = "not a self-signed CA certificate"
            return ObservedCA(facts, Found.UNUSABLE, key, detail, generation), None
        return ObservedCA(facts, Found.OK, key, "", generation), cert

    def ledger(self, cas: Cas) -> Ledger:
        """The ledger, its signature checked with the CA its header names (the newest CA
        signs it; an apply interrupted as a rotation began leaves the older one's)."""
        read = self.read(layout.LEDGER)
        if read.found is not Found.OK:
            return Ledger(found=read.found, detail=read.detail)
        try:
            decoded, signed, signature = ledger.decode(read.data)
        except ValueError as exc:
            return Ledger(found=Found.UNUSABLE, detail=_unusable(exc))
        named = [cert for _, cert in cas if pki.fingerprint(cert) == decoded.ca_fingerprint]
        signers = named or [cert for _, cert in cas]
        if not signers:
            return decoded
        signer = signers[0]
        ok = signature is not None and pki.verify(signer.public_key(), signed, signature)
        return dataclasses.replace(decoded, signature_ok=ok)

    def leaves(
        self,
        listing_names: dict[CertKind, list[str]],
        cas: Cas,
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
                    leaf = ObservedLeaf(ref, entry.facts(entry.subject), Found.OK, key)
                else:
                    try:
                        leaf = ObservedLeaf(ref, _parse(data, cas), Found.OK, key)
                    except ValueError as exc:
                        leaf = ObservedLeaf(ref, None, Found.UNUSABLE, key, _unusable(exc))
                if leaf.cert is not None and not leaf.cert.signed_by_ca:
                    leaf = dataclasses.replace(leaf, chain=data)
                leaves.append(leaf)
        return [self.request(leaf) if leaf.ref.kind is CertKind.SERVER else leaf for leaf in leaves]

    def request(self, leaf: ObservedLeaf) -> ObservedLeaf:
        """An external server's CSR and pending key, when there are any."""
        csr_path, key_path = layout.request_files(leaf.ref)
        csr, key = self.read(csr_path), self.read(key_path, key=True)
        reads = ((csr_path, csr), (key_path, key))
        present = tuple(path for path, read in reads if read.found is not Found.MISSING)
        if csr.found is not Found.OK:
            return dataclasses.replace(leaf, pending=present)
        try:
            request = pki.request_facts(csr.data, _key(key))
        except (ValueError, UnsupportedAlgorithm):
            request = None  # an unusable CSR is made again
        return dataclasses.replace(leaf, request=request, pending=present)

    def crl(self, generation: int, ca_cert: x509.Certificate | None) -> ObservedCRL:
        read = self.read(layout.crl(generation))
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

    def temp_file(self, relative: str, cas: Cas) -> TempFile:
        data = self.store.read(relative).data
        self.check(relative, data)
        leaf = layout.leaf_of(relative)
        cert = None
        if leaf is not None and leaf[1] == ".crt":
            try:
                cert = _parse(data, cas)
            except ValueError:
                cert = None
        return TempFile(path=relative, cert=cert, ref=leaf[0] if leaf is not None else None)


def observe(store: StateDir) -> Observed:
    """Everything plan() needs to know about the state directory, read once."""
    listing = store.listing()
    observer = _Observer(store, dict(listing.dir_modes))
    generations = sorted(listing.ca_generations or {1}, reverse=True)
    unreadable = list(listing.unreadable)
    for extra in generations[2:]:
        unreadable.append(
            (layout.ca_dir(extra), "a third CA generation: a rotation keeps two at the most")
        )
    (ca, ca_cert), previous = observer.ca(generations[0]), None
    cas: Cas = [(generations[0], ca_cert)] if ca_cert is not None else []
    if len(generations) > 1:
        previous = observer.ca(generations[1])
        if previous[1] is not None:
            cas.append((generations[1], previous[1]))
    found_ledger = observer.ledger(cas)
    known = (
        {entry.fingerprint: entry for entry in found_ledger.entries}
        if found_ledger.signature_ok
        else {}
    )
    leaves = observer.leaves(listing.leaf_names, cas, known)
    crl = observer.crl(generations[0], ca_cert)
    temp_files = tuple(observer.temp_file(path, cas) for path in listing.temp_files)
    for relative in [*listing.other_files, layout.USERS_YAML]:
        observer.check(relative, store.read(relative).data)
    return Observed(
        ca=ca,
        crl=crl,
        previous=previous[0] if previous else None,
        previous_crl=observer.crl(generations[1], previous[1]) if previous else None,
        leaves=tuple(leaves),
        ledger=found_ledger,
        modes=tuple(sorted(observer.modes.items())),
        temp_files=temp_files,
        plaintext_keys=tuple(sorted(set(observer.plaintext))),
        unreadable=tuple(unreadable),
    )
