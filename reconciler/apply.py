"""Carry out a plan: keys, certificates, ledger and CRL written; never decides anything.

Order of effects: the CA (bootstrap), each new key and certificate, the ledger, the CRL, and only
then the removal of files of revoked names and of temporary files, so a revocation is recorded
before evidence goes. A crash at any point leaves nothing a later apply cannot finish: a
certificate written before the ledger is found on disk and recorded (adopted) by the next plan.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from cryptography import x509

from reconciler import layout, ledger, pem, pki
from reconciler.errors import SecretError, StateError
from reconciler.model import (
    Accept,
    Action,
    CertStatus,
    CreateCa,
    Found,
    LeafRef,
    LeafSpec,
    Ledger,
    LedgerEntry,
    NewCertificate,
    Observed,
    Plan,
    Repair,
    Request,
    RetireCa,
    RetireGeneration,
    Revocation,
    Revoke,
    SignCrl,
    format_time,
)
from reconciler.secrets import Passphrase
from reconciler.store import StateDir


class Progress(Protocol):
    """A progress display (tqdm fits): apply reports each certificate it issues."""

    def update(self, n: float | None = 1) -> object: ...

    def close(self) -> object: ...


ProgressFactory = Callable[[int, str], Progress]
"""Makes a Progress for (total, what); the command line decides whether to show one."""


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    changed: tuple[str, ...] = ()  # state-relative paths written or removed, in order
    issued: tuple[tuple[str, int], ...] = ()  # (action subject, new serial)


@dataclasses.dataclass(frozen=True, slots=True)
class _Signer:
    cert: x509.Certificate
    key: pki.PrivateKey
    key_sha256: str  # of the encrypted ca.key file

    @property
    def fingerprint(self) -> str:
        return pki.fingerprint(self.cert)

    def sign(self, data: bytes) -> bytes:
        return pki.sign(self.key, data)


class _Writer:
    """Writes through the store and remembers which state-relative paths changed."""

    def __init__(self, store: StateDir) -> None:
        self.store = store
        self.changed: list[str] = []

    def write(self, relative: str, data: bytes, *, secret: bool = False) -> None:
        self.store.write(relative, data, secret=secret)
        self.changed.append(relative)

    def remove(self, relative: str) -> None:
        if self.store.remove(relative):
            self.changed.append(relative)


def _ledger_changes(
    action: Action,
) -> tuple[Sequence[LedgerEntry], Sequence[Revocation], Sequence[int]]:
    """What an action does to the ledger: entries to adopt, revocations, serials superseded."""
    match action:
        case NewCertificate(adopt=adopt, revoke=revoke, supersede=supersede):
            return adopt, revoke, supersede
        case Revoke(adopt=adopt, revoke=revoke):
            return adopt, revoke, ()
        case RetireGeneration(revoke=revoke):
            return (), revoke, ()
        case Repair(adopt=adopt):
            return adopt, (), ()
        case Accept(supersede=supersede):
            return (), (), supersede
    return (), (), ()


def apply(
    plan: Plan,
    observed: Observed,
    store: StateDir,
    *,
    ca_passphrase: Passphrase,
    key_passphrase: Passphrase | None,
    progress: ProgressFactory | None = None,
) -> Outcome:
    """Execute every change in plan. Before anything is written, the CA key is opened with
    ca_passphrase and proved to belong to ca.crt, even when there is nothing to sign (a pull
    request could have swapped in a whole CA of its own); plan.makes_keys needs key_passphrase,
    checked against a key already issued."""
    if plan.blockers:
        raise StateError(plan.blockers[0])
    if plan.makes_keys and key_passphrase is None:
        raise ValueError("this plan makes keys: apply needs the key passphrase")
    writer = _Writer(store)
    create = next((action for action in plan.changes if isinstance(action, CreateCa)), None)
    present = [ca.generation for ca in (observed.ca, observed.previous) if ca and ca.cert]
    signers = {
        generation: _unlock_ca(store, ca_passphrase, generation)
        for generation in present
        if create is None or generation != create.spec.generation
    }
    if create is not None:
        signers[create.spec.generation] = _create_ca(create, writer, ca_passphrase)
    issued: list[tuple[str, int]] = []
    if plan.makes_keys and key_passphrase is not None:
        _check_key_passphrase(observed, store, key_passphrase)
    # an accepted certificate's pending key is opened and matched before anything is written
    accepted = {
        action.leaf: _pending_key(action, store, key_passphrase)
        for action in plan.changes
        if isinstance(action, Accept) and key_passphrase is not None
    }
    if plan.signs:
        issued = _sign_and_record(
            plan, observed, writer, signers, key_passphrase, accepted, progress
        )
    for action in plan.changes:
        match action:
            case Revoke(leaf=leaf, remove_files=True):
                for path in (layout.leaf_key(leaf), layout.leaf_cert(leaf)):
                    writer.remove(path)
            case Accept(leaf=leaf):  # recorded, and its key in place: the request is done
                writer.remove(layout.pending_key(leaf))
                writer.remove(layout.leaf_request(leaf))
            case Request(leaf=leaf, spec=spec):
                assert key_passphrase is not None
                key = pki.generate_key(spec.key)
                secret = pki.encrypt_key(key, key_passphrase.reveal())
                writer.write(layout.pending_key(leaf), secret, secret=True)
                header = (
                    f"Requested: {format_time(plan.now)}\nGeneration: {spec.generation}\n"
                    f"Commit the signed chain as: {layout.leaf_cert(leaf)}\n"
                )
                request = pki.build_request(spec, key)
                writer.write(layout.leaf_request(leaf), pki.request_pem(request, header))
            case RetireCa(generation=generation):
                for path_of in (layout.ca_key, layout.ca_cert, layout.crl):
                    writer.remove(path_of(generation))
            case Repair(remove=paths):
                for relative in paths:
                    writer.remove(relative)
    for relative, _, mode in plan.modes:
        store.chmod(relative, mode)
    return Outcome(changed=tuple(writer.changed), issued=tuple(issued))


def _sign_and_record(
    plan: Plan,
    observed: Observed,
    writer: _Writer,
    signers: dict[int, _Signer],
    key_passphrase: Passphrase | None,
    accepted: dict[LeafRef, bytes],
    progress: ProgressFactory | None,
) -> list[tuple[str, int]]:
    changes = plan.changes
    retired = {action.generation for action in changes if isinstance(action, RetireCa)}
    kept = sorted((g for g in signers if g not in retired), reverse=True)
    signer = signers[kept[0]]  # the newest CA signs the ledger, which pins every CA kept
    previous = signers[kept[1]] if len(kept) > 1 else None
    new_certificates = [action for action in changes if isinstance(action, NewCertificate)]

    adopted = [entry for action in changes for entry in _ledger_changes(action)[0]]
    if adopted:
        # Write ahead: record what an interrupted apply left on disk before anything below
        # overwrites it, so a second crash cannot lose a certificate that reached the disk.
        recorded = _pinned(
            dataclasses.replace(observed.ledger, entries=(*observed.ledger.entries, *adopted)),
            signer,
            previous,
        )
        writer.write(layout.LEDGER, ledger.encode(recorded, signer.sign))

    taken = {entry.serial for entry in (*observed.ledger.entries, *adopted)}
    new_entries: list[LedgerEntry] = []
    bar = progress(len(new_certificates), "issuing") if progress and new_certificates else None
    try:
        specs = [action.issuance.spec for action in new_certificates]
        for action, key in zip(new_certificates, _new_keys(specs), strict=True):
            assert key_passphrase is not None
            issuer = signers[action.issuance.ca_generation]
            new_entries.append(_issue(action, key, writer, issuer, key_passphrase, taken))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    for leaf, key_pem in accepted.items():  # before the ledger: a crash here is accepted again
        writer.write(layout.leaf_key(leaf), key_pem, secret=True)
    new_entries += [action.entry for action in changes if isinstance(action, Accept)]
    crls = [action for action in changes if isinstance(action, SignCrl)]
    after = _pinned(_ledger_after(observed.ledger, changes, new_entries, crls), signer, previous)
    writer.write(layout.LEDGER, ledger.encode(after, signer.sign))
    for crl in crls:
        ca = signers[crl.generation]
        signed = pki.build_crl(
            ca.cert,
            ca.key,
            number=crl.number,
            this_update=crl.this_update,
            next_update=crl.next_update,
            revoked=crl.revoked,
        )
        writer.write(layout.crl(crl.generation), pki.pem(signed))
    return [
        (action.subject, entry.serial)
        for action, entry in zip(new_certificates, new_entries, strict=False)
    ]


def _pinned(before: Ledger, signer: _Signer, previous: _Signer | None) -> Ledger:
    """The ledger pinning the CA files it is signed under (and, in a rotation, the older's)."""
    return dataclasses.replace(
        before,
        ca_fingerprint=signer.fingerprint,
        ca_key_sha256=signer.key_sha256,
        previous_fingerprint=previous.fingerprint if previous else None,
        previous_key_sha256=previous.key_sha256 if previous else None,
    )


def _create_ca(action: CreateCa, writer: _Writer, passphrase: Passphrase) -> _Signer:
    generation = action.spec.generation
    key = pki.generate_key(action.spec.key)
    cert = pki.build_ca_certificate(
        action.spec,
        key,
        serial=x509.random_serial_number(),
        not_before=action.not_before,
        not_after=action.not_after,
    )
    key_pem = pki.encrypt_key(key, passphrase.reveal())
    writer.write(layout.ca_key(generation), key_pem, secret=True)
    writer.write(layout.ca_cert(generation), pki.pem(cert))
    signer = _Signer(cert, key, pem.file_sha256(key_pem))
    if not action.rotation:
        # at once an empty ledger, before anything is signed: a first apply interrupted from
        # here on is finished by the next one (plan's _unfinished_first_apply)
        writer.write(layout.LEDGER, ledger.encode(_pinned(Ledger(), signer, None), signer.sign))
    return signer


def _unlock_ca(store: StateDir, passphrase: Passphrase, generation: int) -> _Signer:
    cert_path, key_path = layout.ca_cert(generation), layout.ca_key(generation)
    cert_read, key_read = store.read(cert_path), store.read(key_path)
    if cert_read.found is not Found.OK or key_read.found is not Found.OK:
        raise StateError("the CA files changed while planning; run the command again")
    key = pki.open_key(key_read.data, passphrase.reveal())
    if key is None:
        raise SecretError(
            f"the CA passphrase from {passphrase.origin} does not unlock {key_path}: set the "
            f"right one; if it is right, {key_path} was replaced (git log -- ca/ shows by whom) "
            "and must be restored; nothing was written"
        )
    cert = pki.load_certificates(cert_read.data)[0]
    if not pki.same_public_key(cert.public_key(), key.public_key()):
        raise StateError(
            f"{key_path} does not belong to {cert_path}; restore both from git (nothing was "
            "written)"
        )
    return _Signer(cert, key, pem.file_sha256(key_read.data))


def _pending_key(action: Accept, store: StateDir, passphrase: Passphrase) -> bytes:
    """The pending key file of an accepted certificate, proved to be that certificate's key."""
    path = layout.pending_key(action.leaf)
    key_read, cert_read = store.read(path), store.read(layout.leaf_cert(action.leaf))
    certs = pki.load_certificates(cert_read.data) if cert_read.found is Found.OK else []
    if (
        key_read.found is not Found.OK
        or not certs
        or pki.fingerprint(certs[0]) != action.entry.fingerprint
    ):
        raise StateError("the state directory changed while planning; run the command again")
    key = _open_leaf_key(key_read.data, passphrase, path)
    if not pki.same_public_key(key.public_key(), certs[0].public_key()):
        raise StateError(
            f"{path} is not the key of {layout.leaf_cert(action.leaf)} although its CSR is: it "
            f"was replaced; restore it from git (nothing was written)"
        )
    return key_read.data


def rekey(
    store: StateDir,
    keys: Mapping[str, bytes],
    pinned: Ledger | None,
    unlock: Mapping[int, Passphrase],
) -> list[str]:
    """Carry out a passphrase rotation: prove every CA key first (unlock maps each generation
    to the passphrase its key file opens with as it is now), then write each re-encrypted key
    file, then the ledger with its pins made true (None: unchanged), signed by the newest CA.
    The paths written, in order."""
    signers = {generation: _unlock_ca(store, p, generation) for generation, p in unlock.items()}
    for path, data in keys.items():
        store.write(path, data, secret=True)
    if pinned is None:
        return list(keys)
    store.write(layout.LEDGER, ledger.encode(pinned, signers[max(signers)].sign))
    return [*keys, layout.LEDGER]


def _check_key_passphrase(observed: Observed, store: StateDir, passphrase: Passphrase) -> None:
    """Refuse a key passphrase that does not open the keys already issued."""
    for leaf in observed.leaves:
        if leaf.key.found is Found.OK and leaf.cert is not None and leaf.cert.signed_by_ca:
            read = store.read(layout.leaf_key(leaf.ref))
            if read.found is not Found.OK:
                continue
            _open_leaf_key(read.data, passphrase, layout.leaf_key(leaf.ref))
            return


def _open_leaf_key(data: bytes, passphrase: Passphrase, path: str) -> pki.PrivateKey:
    key = pki.open_key(data, passphrase.reveal())
    if key is None:
        raise SecretError(
            f"the key passphrase from {passphrase.origin} does not unlock {path}; set the one "
            "the existing keys use (nothing was written)"
        )
    return key


def _ledger_after(
    before: Ledger, changes: Sequence[Action], new: list[LedgerEntry], crls: list[SignCrl]
) -> Ledger:
    adopted: list[LedgerEntry] = []
    revoked: dict[int, Revocation] = {}
    superseded: set[int] = set()
    for action in changes:
        adopt, revoke, supersede = _ledger_changes(action)
        adopted += adopt
        revoked.update((r.serial, r) for r in revoke)
        superseded.update(supersede)
    entries = []
    for entry in (*before.entries, *adopted):
        if entry.serial in revoked:
            revocation = revoked[entry.serial]
            entry = dataclasses.replace(
                entry,
                status=CertStatus.REVOKED,
                revoked_at=revocation.revoked_at,
                reason=revocation.reason,
            )
        elif entry.serial in superseded and entry.status is CertStatus.VALID:
            entry = dataclasses.replace(entry, status=CertStatus.SUPERSEDED)
        entries.append(entry)
    return Ledger(
        entries=(*entries, *new),
        crl_number=max([crl.number for crl in crls], default=before.crl_number),
    )


RSA_IN_PARALLEL = 2
"""From this many new RSA keys on, keys are generated in worker processes, one per core:
cryptography holds the GIL while it searches for primes, so threads would not help."""


def _new_keys(specs: list[LeafSpec]) -> Iterator[pki.PrivateKey]:
    """A new key for each spec, in order; RSA keys in parallel when there are several."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if cores < 2 or sum(1 for spec in specs if spec.key.is_rsa) < RSA_IN_PARALLEL:
        yield from (pki.generate_key(spec.key) for spec in specs)
        return
    # forkserver: workers start from a clean process, never from a fork of one whose other
    # threads might hold a lock (OpenSSL's, or a caller's)
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=cores, mp_context=context) as pool:
        ders = pool.map(pki.generate_key_der, [spec.key.value for spec in specs], chunksize=1)
        yield from (pki.load_key_der(der) for der in ders)


def _issue(
    action: NewCertificate,
    key: pki.PrivateKey,
    writer: _Writer,
    signer: _Signer,
    passphrase: Passphrase,
    taken: set[int],
) -> LedgerEntry:
    issuance = action.issuance
    spec = issuance.spec
    serial = x509.random_serial_number()  # 159 random bits, positive
    while serial in taken:
        serial = x509.random_serial_number()
    taken.add(serial)
    cert = pki.build_leaf_certificate(
        spec,
        key.public_key(),
        ca_cert=signer.cert,
        ca_key=signer.key,
        serial=serial,
        not_before=issuance.not_before,
        not_after=issuance.not_after,
    )
    key_pem = pki.encrypt_key(key, passphrase.reveal())
    writer.write(layout.leaf_key(action.leaf), key_pem, secret=True)
    writer.write(layout.leaf_cert(action.leaf), pki.pem(cert))
    facts = pki.certificate_facts(cert)
    return LedgerEntry(
        serial=serial,
        kind=spec.kind,
        name=spec.name,
        not_before=facts.not_before,
        not_after=facts.not_after,
        key=spec.key.value,
        spec=spec.spec_hash(),
        generation=spec.generation,
        fingerprint=facts.fingerprint,
        key_sha256=pem.file_sha256(key_pem),
        subject=facts.subject,
        dns=facts.dns,
        ips=facts.ips,
        ca_generation=issuance.ca_generation,
    )
