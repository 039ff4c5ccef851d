"""Carry out a plan: keys, certificates, ledger and CRL written; never decides anything.

Order of effects: the CA (bootstrap), each new key and certificate, the ledger, the CRL, and only
then the removal of files of revoked names, so a revocation is recorded before evidence goes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from cryptography import x509

from reconciler import pki
from reconciler.errors import SecretError, StateError
from reconciler.model import (
    Action,
    ActionKind,
    CertKind,
    CertStatus,
    Issuance,
    LeafSpec,
    Ledger,
    LedgerEntry,
    Observed,
    Plan,
)
from reconciler.secrets import Passphrase
from reconciler.store import StateDir, encode_ledger


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


def _unique_serial(taken: set[int]) -> int:
    while True:
        serial = x509.random_serial_number()  # 159 random bits, positive
        if serial > 0 and serial not in taken:
            taken.add(serial)
            return serial


def _unlock_ca(store: StateDir, passphrase: Passphrase) -> tuple[x509.Certificate, pki.PrivateKey]:
    cert_data, key_data = store.read(store.ca_cert), store.read(store.ca_key)
    if cert_data is None or key_data is None:
        raise StateError("the CA files vanished while planning; run the command again")
    try:
        key = pki.decrypt_key(key_data, passphrase.reveal())
    except (ValueError, TypeError):
        raise SecretError(
            f"the CA passphrase from {passphrase.origin} does not unlock "
            "ca/ca.key; set the right one (nothing was written)"
        ) from None
    cert = pki.load_certificates(cert_data)[0]
    if not pki.same_public_key(cert.public_key(), key.public_key()):
        raise StateError(
            "ca/ca.key does not belong to ca/ca.crt; restore both from git (nothing was written)"
        )
    return cert, key


def _check_key_passphrase(observed: Observed, store: StateDir, passphrase: Passphrase) -> None:
    """Refuse a key passphrase that does not open the keys already issued."""
    for leaf in observed.leaves:
        if leaf.key.problem is None and leaf.cert is not None and leaf.cert.signed_by_ca:
            data = store.read(store.leaf_key(leaf.kind, leaf.name))
            if data is None:
                continue
            try:
                pki.decrypt_key(data, passphrase.reveal())
            except (ValueError, TypeError):
                raise SecretError(
                    f"the key passphrase from {passphrase.origin} does not "
                    f"unlock {leaf.kind.directory}/{leaf.name}.key; set the one "
                    "the existing keys use (nothing was written)"
                ) from None
            return


def _ledger_after(
    ledger: Ledger,
    actions: Iterable[Action],
    new: list[LedgerEntry],
    crl_number: int | None,
    ca_fingerprint: str,
    ca_key_sha256: str,
) -> Ledger:
    adopted = [entry for action in actions for entry in action.adopt]
    revoked = {r.serial: r for action in actions for r in action.revoke}
    superseded = {serial for action in actions for serial in action.supersede}
    entries = []
    for entry in (*ledger.entries, *adopted):
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
    entries.extend(new)
    return Ledger(
        entries=tuple(entries),
        crl_number=crl_number if crl_number is not None else ledger.crl_number,
        ca_fingerprint=ca_fingerprint,
        ca_key_sha256=ca_key_sha256,
    )


def needs_ca(action: Action) -> bool:
    """Everything but a repair that records nothing (chmod, removing temporary files) signs:
    a certificate, the CRL, or at least the ledger."""
    return action.kind is not ActionKind.REPAIR or bool(action.adopt)


def apply(
    plan: Plan,
    observed: Observed,
    store: StateDir,
    *,
    ca_passphrase: Passphrase | None,
    key_passphrase: Passphrase | None,
    progress: ProgressFactory | None = None,
) -> Outcome:
    """Execute every change in plan. Checks both passphrases before the first write.

    Order: the CA (bootstrap); each new key, then its certificate; the ledger; the CRL; then
    files of revoked names and temporary files are removed, and modes restored. A crash at any
    point leaves nothing a later apply cannot finish: a certificate written before the ledger
    is found on disk and recorded (adopted) by the next plan.
    """
    if plan.blockers:
        raise StateError(plan.blockers[0])
    changes = plan.changes
    writer = _Writer(store)
    issued: list[tuple[str, int]] = []
    if any(needs_ca(action) for action in changes):
        issued = _sign_and_record(
            plan, observed, store, writer, ca_passphrase, key_passphrase, progress
        )
    for action in changes:
        for relative in action.remove_paths:
            writer.remove(store.root / relative)
    for action in (*changes, *plan.housekeeping):
        for relative, mode in action.chmod:
            path = store.root / relative
            if path.exists():
                store.chmod(path, mode)
    return Outcome(changed=tuple(writer.changed), issued=tuple(issued))


def _sign_and_record(
    plan: Plan,
    observed: Observed,
    store: StateDir,
    writer: _Writer,
    ca_passphrase: Passphrase | None,
    key_passphrase: Passphrase | None,
    progress: ProgressFactory | None,
) -> list[tuple[str, int]]:
    changes = plan.changes
    if ca_passphrase is None:
        raise SecretError(
            "the CA passphrase is needed to sign; set RECONCILER_CA_PASSPHRASE "
            "or --ca-passphrase-file (nothing was written)"
        )
    issuing = [action for action in changes if action.issue is not None]
    if issuing and key_passphrase is None:
        raise SecretError(
            "the key passphrase is needed to store new keys; set "
            "RECONCILER_KEY_PASSPHRASE or --key-passphrase-file "
            "(nothing was written)"
        )
    ca_action = next((action.ca for action in changes if action.ca is not None), None)
    if ca_action is None:
        ca_cert, ca_key = _unlock_ca(store, ca_passphrase)
        ca_key_sha256 = observed.ca.key.sha256 or ""
        if issuing and key_passphrase is not None:
            _check_key_passphrase(observed, store, key_passphrase)
    else:
        ca_key = pki.generate_key(ca_action.spec.key)
        ca_cert = pki.build_ca_certificate(
            ca_action.spec,
            ca_key,
            serial=x509.random_serial_number(),
            not_before=ca_action.not_before,
            not_after=ca_action.not_after,
        )
        ca_key_pem = pki.encrypt_key(ca_key, ca_passphrase.reveal())
        ca_key_sha256 = hashlib.sha256(ca_key_pem).hexdigest()
        writer.write(store.ca_key, ca_key_pem, secret=True)
        writer.write(store.ca_cert, pki.pem(ca_cert))

    taken = {entry.serial for entry in observed.ledger.entries}
    adopted = [entry for action in changes for entry in action.adopt]
    taken |= {entry.serial for entry in adopted}
    ca_fingerprint = pki.certificate_facts(ca_cert, None).fingerprint
    sign = functools.partial(pki.sign, ca_key)
    if adopted:
        # Write ahead: record what an interrupted apply left on disk before anything below
        # overwrites it, so a second crash cannot lose a certificate that reached the disk.
        recorded = dataclasses.replace(
            observed.ledger,
            entries=(*observed.ledger.entries, *adopted),
            ca_fingerprint=ca_fingerprint,
            ca_key_sha256=ca_key_sha256,
        )
        writer.write(store.ledger, encode_ledger(recorded, sign))
    new_entries: list[LedgerEntry] = []
    issued: list[tuple[str, int]] = []
    bar = progress(len(issuing), "issuing") if progress is not None and issuing else None
    specs = [action.issue.spec for action in issuing if action.issue is not None]
    try:
        for action, key in zip(issuing, _new_keys(specs), strict=True):
            assert action.issue is not None
            assert key_passphrase is not None
            entry = _issue(action.issue, key, writer, ca_cert, ca_key, key_passphrase, taken)
            new_entries.append(entry)
            issued.append((action.subject, entry.serial))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    crl_action = next((action.crl for action in changes if action.crl is not None), None)
    ledger = _ledger_after(
        observed.ledger,
        changes,
        new_entries,
        crl_action.number if crl_action else None,
        ca_fingerprint,
        ca_key_sha256,
    )
    writer.write(store.ledger, encode_ledger(ledger, sign))
    if crl_action is not None:
        crl = pki.build_crl(
            ca_cert,
            ca_key,
            number=crl_action.number,
            this_update=crl_action.this_update,
            next_update=crl_action.next_update,
            revoked=crl_action.revoked,
        )
        writer.write(store.crl, pki.pem(crl))

    for action in changes:
        if action.remove_files:
            kind_text, _, name = action.subject.partition("/")
            kind = CertKind(kind_text)
            writer.remove(store.leaf_key(kind, name))
            writer.remove(store.leaf_cert(kind, name))
    return issued


class _Writer:
    """Writes through the store and remembers which state-relative paths changed."""

    def __init__(self, store: StateDir) -> None:
        self.store = store
        self.changed: list[str] = []

    def write(self, path: Path, data: bytes, *, secret: bool = False) -> None:
        self.store.write(path, data, secret=secret)
        self.changed.append(self.store.relative(path))

    def remove(self, path: Path) -> None:
        if self.store.remove(path):
            self.changed.append(self.store.relative(path))


RSA_IN_PARALLEL = 2
"""From this many new RSA keys on, keys are generated in worker processes, one per core:
cryptography holds the GIL while it searches for primes, so threads would not help."""


def _new_keys(specs: list[LeafSpec]) -> Iterator[pki.PrivateKey]:
    """A new key for each spec, in order; RSA keys in parallel when there are several."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    rsa_keys = sum(1 for spec in specs if spec.key.is_rsa)
    if cores < 2 or rsa_keys < RSA_IN_PARALLEL:
        yield from (pki.generate_key(spec.key) for spec in specs)
        return
    # forkserver: workers start from a clean process, never from a fork of one whose other
    # threads might hold a lock (OpenSSL's, or a caller's)
    import concurrent.futures  # only when several RSA keys are due: not at every start-up
    import multiprocessing

    context = multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=cores, mp_context=context) as pool:
        ders = pool.map(pki.generate_key_der, [spec.key.value for spec in specs], chunksize=1)
        yield from (pki.load_key_der(der) for der in ders)


def _issue(
    issuance: Issuance,
    key: pki.PrivateKey,
    writer: _Writer,
    ca_cert: x509.Certificate,
    ca_key: pki.PrivateKey,
    passphrase: Passphrase,
    taken: set[int],
) -> LedgerEntry:
    spec = issuance.spec
    serial = _unique_serial(taken)
    cert = pki.build_leaf_certificate(
        spec,
        key.public_key(),
        ca_cert=ca_cert,
        ca_key=ca_key,
        serial=serial,
        not_before=issuance.not_before,
        not_after=issuance.not_after,
    )
    key_pem = pki.encrypt_key(key, passphrase.reveal())
    store = writer.store
    writer.write(store.leaf_key(spec.kind, spec.name), key_pem, secret=True)
    writer.write(store.leaf_cert(spec.kind, spec.name), pki.pem(cert))
    facts = pki.certificate_facts(cert, None)
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
        key_sha256=hashlib.sha256(key_pem).hexdigest(),
        subject=facts.subject,
        dns=facts.dns,
        ips=facts.ips,
    )
