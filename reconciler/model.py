"""Values that flow between the stages: the desired state, the observed state and the plan.

Everything here is a frozen dataclass or an enum: stages hand each other facts, never handles.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from fractions import Fraction
from typing import TypeVar

_T = TypeVar("_T")


def quick_init(cls: type[_T]) -> type[_T]:
    """Give a frozen, slotted dataclass an __init__ that stores each field through its slot's
    descriptor. A frozen dataclass's own __init__ calls object.__setattr__ once per field (its
    __setattr__ refuses); for the values made once per certificate on every run (ledger
    entries, facts, actions) that was a tenth of a no-op. Same signature, same defaults, same
    instance; it stays frozen, since assignment still goes through the refusing __setattr__."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    slots = getattr(cls, "__slots__", ())
    if hasattr(cls, "__post_init__") or any(
        not f.init or f.default_factory is not dataclasses.MISSING or f.name not in slots
        for f in fields
    ):
        raise TypeError(f"quick_init cannot build {cls.__name__}")
    namespace: dict[str, object] = {}
    params, body = [], []
    for f in fields:
        namespace[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"    _set_{f.name}(self, {f.name})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body) + "\n"
    # generated from the class's own fields, as dataclasses does
    exec(source, namespace)  # noqa: S102
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    setattr(cls, "__init__", init)  # noqa: B010 -- mypy refuses to assign a method
    return cls


class KeyType(enum.StrEnum):
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    ED25519 = "ed25519"

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")


class CertKind(enum.StrEnum):
    CLIENT = "client"
    SERVER = "server"

    @property
    def directory(self) -> str:
        return f"{self.value}s"


class CertStatus(enum.StrEnum):
    """A ledger entry's status. Expiry is not a status: it follows from not_after and now."""

    VALID = "valid"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


class RevocationReason(enum.StrEnum):
    """The RFC 5280 reason codes this tool uses (names as in cryptography's ReasonFlags)."""

    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"


# --------------------------------------------------------------------------- desired state


@dataclasses.dataclass(frozen=True, slots=True)
class RenewBefore:
    """The renewal window: a fixed duration, or a share of each certificate's lifetime."""

    duration: timedelta | None = None
    share: Fraction | None = None

    def window(self, lifetime: timedelta) -> timedelta:
        if self.duration is not None:
            return self.duration
        numerator, denominator = self._ratio
        seconds = lifetime.days * 86400 + lifetime.seconds
        return timedelta(seconds=seconds * numerator // denominator)

    @property
    def _ratio(self) -> tuple[int, int]:
        share = self.share if self.share is not None else Fraction(1, 3)
        return share.numerator, share.denominator

    def describe(self) -> str:
        if self.duration is not None:
            return describe_duration(self.duration)
        share = self.share if self.share is not None else Fraction(1, 3)
        return f"{float(share) * 100:.0f}% of the lifetime"


DEFAULT_RENEW_BEFORE = RenewBefore(share=Fraction(1, 3))

Subject = tuple[tuple[str, str], ...]
"""A distinguished name as (short attribute name, value) pairs, in certificate order."""


@dataclasses.dataclass(frozen=True, slots=True)
class HbaRule:
    database: str
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class CASpec:
    subject: Subject
    key: KeyType
    validity: timedelta


@dataclasses.dataclass(frozen=True, slots=True)
class CRLSpec:
    validity: timedelta
    refresh_before: timedelta


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class LeafSpec:
    """One certificate users.yaml asks for, with every default already applied."""

    kind: CertKind
    name: str
    key: KeyType
    validity: timedelta
    renew_before: RenewBefore
    subject: Subject
    generation: int = 1
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    hba: tuple[HbaRule, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"  # a StrEnum formats as its value, without .value

    def spec_hash(self) -> str:
        """Hash of what the certificate's content depends on (not its validity or window)."""
        identity = {
            "kind": str(self.kind),
            "name": self.name,
            "key": self.key.value,
            "subject": [list(pair) for pair in self.subject],
            "dns": sorted(self.dns),
            "ips": sorted(self.ips),
            "generation": self.generation,
        }
        encoded = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()[:32]


@dataclasses.dataclass(frozen=True, slots=True)
class Desired:
    ca: CASpec
    crl: CRLSpec
    leaves: tuple[LeafSpec, ...]

    def by_ref(self) -> Mapping[str, LeafSpec]:
        """Every leaf by "kind/name", for lookups in loops (a scan per lookup is quadratic)."""
        return {spec.ref: spec for spec in self.leaves}


# --------------------------------------------------------------------------- observed state


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class CertFacts:
    """What a parsed certificate says, reduced to the facts planning needs."""

    serial: int
    subject: Subject
    issuer: Subject
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    key: str  # a KeyType value when supported, else a description such as "rsa-1024"
    not_before: datetime
    not_after: datetime
    fingerprint: str  # SHA-256 of the DER encoding, hex
    signed_by_ca: bool  # the signature verifies with the current CA's public key
    is_ca: bool

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class KeyFacts:
    """What can be said of an encrypted key file without its passphrase."""

    problem: str | None  # None when it is an encrypted PKCS#8 PEM
    sha256: str | None


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class ObservedLeaf:
    kind: CertKind
    name: str
    cert: CertFacts | None
    cert_problem: str | None  # "missing" or "unusable: …" when cert is None
    key: KeyFacts

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"  # a StrEnum formats as its value, without .value


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedCA:
    cert: CertFacts | None
    cert_problem: str | None  # "missing" or "unusable: …"
    key: KeyFacts


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedCRL:
    problem: str | None  # "missing", "unusable: …", "not signed by the current CA"
    number: int | None
    this_update: datetime | None
    next_update: datetime | None
    serials: frozenset[int]


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class LedgerEntry:
    serial: int
    kind: CertKind
    name: str
    not_before: datetime
    not_after: datetime
    key: str
    spec: str
    generation: int
    fingerprint: str
    key_sha256: str
    status: CertStatus = CertStatus.VALID
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None
    # what the certificate says, so a certificate whose fingerprint the signed ledger holds need
    # not be parsed or verified again (None in entries written before these were recorded)
    subject: Subject | None = None
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"  # a StrEnum formats as its value, without .value


@dataclasses.dataclass(frozen=True, slots=True)
class Ledger:
    entries: tuple[LedgerEntry, ...] = ()
    crl_number: int = 0
    problem: str | None = None  # "missing", or "unusable: …" when the file could not be read
    ca_fingerprint: str | None = None  # SHA-256 of the CA certificate it was written under
    ca_key_sha256: str | None = None  # SHA-256 of the encrypted CA key file
    signature_ok: bool | None = None  # its CA signature verifies; None: no CA to check with

    def by_serial(self) -> Mapping[int, LedgerEntry]:
        return {entry.serial: entry for entry in self.entries}


@dataclasses.dataclass(frozen=True, slots=True)
class TempFile:
    """A temporary file an interrupted write left behind, and the certificate it may hold."""

    path: str  # relative to the state directory
    cert: CertFacts | None
    kind: CertKind | None
    name: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Observed:
    ca: ObservedCA
    crl: ObservedCRL
    leaves: tuple[ObservedLeaf, ...]
    ledger: Ledger
    modes: tuple[tuple[str, int], ...] = ()  # managed path (relative) → permission bits
    temp_files: tuple[TempFile, ...] = ()
    plaintext_keys: tuple[str, ...] = ()  # files (relative) holding an unencrypted private key


# --------------------------------------------------------------------------- plan


class ActionKind(enum.StrEnum):
    CA = "ca"
    ISSUE = "issue"
    REISSUE = "reissue"
    RENEW = "renew"
    REVOKE = "revoke"
    CRL = "crl"
    REPAIR = "repair"
    NOOP = "noop"


@dataclasses.dataclass(frozen=True, slots=True)
class Issuance:
    """A certificate to sign: apply adds the key and serial, and decides nothing else."""

    spec: LeafSpec
    not_before: datetime
    not_after: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class CAIssuance:
    spec: CASpec
    not_before: datetime
    not_after: datetime


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    serial: int
    revoked_at: datetime
    reason: RevocationReason


@dataclasses.dataclass(frozen=True, slots=True)
class CRLIssuance:
    number: int
    this_update: datetime
    next_update: datetime
    revoked: tuple[Revocation, ...]


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    subject: str  # "ca", "crl", "client/pgquartz", "server/db1.acme.example"
    reasons: tuple[str, ...] = ()
    serial: int | None = None  # the certificate in place now, if any
    issue: Issuance | None = None
    ca: CAIssuance | None = None
    crl: CRLIssuance | None = None
    supersede: tuple[int, ...] = ()
    revoke: tuple[Revocation, ...] = ()
    remove_files: bool = False  # the name's key and certificate (a removed name)
    adopt: tuple[LedgerEntry, ...] = ()  # certificates on disk the ledger lacks: record them
    remove_paths: tuple[str, ...] = ()  # other files to delete (temporary files), relative
    chmod: tuple[tuple[str, int], ...] = ()  # (relative path, mode) to restore

    @property
    def changes(self) -> bool:
        return self.kind is not ActionKind.NOOP


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    now: datetime
    actions: tuple[Action, ...]
    blockers: tuple[str, ...] = ()  # problems apply refuses to repair on its own
    housekeeping: tuple[Action, ...] = ()  # done by every apply, never a change (file modes)

    @property
    def changes(self) -> tuple[Action, ...]:
        return tuple(action for action in self.actions if action.changes)

    def counts(self) -> dict[ActionKind, int]:
        counts: dict[ActionKind, int] = {}
        for action in self.actions:
            counts[action.kind] = counts.get(action.kind, 0) + 1
        return counts


# --------------------------------------------------------------------------- helpers


def describe_duration(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds}s"


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_serial(serial: int) -> str:
    return f"{serial:040x}"
