"""Values that flow between the stages: the desired state, the observed state and the plan.

Everything here is a frozen dataclass or an enum: stages hand each other facts, never handles.
The plan is a tuple of typed actions (Issue, Renew, Revoke, …); apply dispatches on their type.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from datetime import datetime, timedelta
from fractions import Fraction
from typing import ClassVar, NamedTuple


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


class LeafRef(NamedTuple):
    """A client or server certificate's name: "client/pgquartz", "server/db1.acme.example".
    A tuple, so it sorts clients before servers and names in order."""

    kind: CertKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


# --------------------------------------------------------------------------- desired state


@dataclasses.dataclass(frozen=True, slots=True)
class RenewBefore:
    """The renewal window: a fixed duration, or a share of each certificate's lifetime."""

    duration: timedelta | None = None
    share: Fraction = Fraction(1, 3)

    def window(self, lifetime: timedelta) -> timedelta:
        if self.duration is not None:
            return self.duration
        seconds = lifetime.days * 86400 + lifetime.seconds
        return timedelta(seconds=seconds * self.share.numerator // self.share.denominator)

    def describe(self) -> str:
        if self.duration is not None:
            return describe_duration(self.duration)
        return f"{float(self.share) * 100:.0f}% of the lifetime"


DEFAULT_RENEW_BEFORE = RenewBefore()

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
    generation: int = 1  # raise it by one to replace the CA without an outage
    overlap: timedelta = timedelta(days=30)  # each of a rotation's first two stages lasts this

    def subject_of(self, generation: int) -> Subject:
        """The subject of this generation's CA. From generation 2 on its CN says which, since
        OpenSSL (and so PostgreSQL) cannot tell apart two CAs with the same subject when it
        looks up an issuer or a CRL: tests/test_rotation.py shows both failing."""
        if generation == 1:
            return self.subject
        mark = f" G{generation}"
        if not any(attr == "CN" for attr, _ in self.subject):
            return (*self.subject, ("CN", mark.strip()))
        return tuple(
            (attr, value + mark if attr == "CN" else value) for attr, value in self.subject
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CRLSpec:
    validity: timedelta
    refresh_before: timedelta


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
    external: bool = False  # issuer: external: another CA signs it, from our CSR

    @property
    def ref(self) -> LeafRef:
        return LeafRef(self.kind, self.name)

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
        if self.external:  # absent otherwise, so hashes recorded before it stay the same
            identity["issuer"] = "external"
        encoded = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()[:32]


@dataclasses.dataclass(frozen=True, slots=True)
class TrustRoot:
    """A root users.yaml's trust lists: clients trust it to verify external servers."""

    path: str  # relative to the state directory
    pem: bytes
    subject: Subject
    fingerprint: str
    not_after: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Desired:
    ca: CASpec
    crl: CRLSpec
    leaves: tuple[LeafSpec, ...]
    trust: tuple[TrustRoot, ...] = ()


# --------------------------------------------------------------------------- observed state


@dataclasses.dataclass(frozen=True, slots=True)
class Revocation:
    serial: int
    revoked_at: datetime
    reason: RevocationReason


class Found(enum.StrEnum):
    """What reading a file gave."""

    OK = "ok"
    MISSING = "missing"
    UNREADABLE = "unreadable"  # a symbolic link, no permission, an I/O error: detail says which
    UNUSABLE = "unusable"  # read, but not what it must be: detail says why
    PLAINTEXT = "not encrypted"  # a key file holding an unencrypted private key


@dataclasses.dataclass(frozen=True, slots=True)
class CertFacts:
    """What a parsed certificate says, reduced to the facts planning needs."""

    serial: int
    subject: Subject
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    key: str  # a KeyType value when supported, else a description such as "rsa-1024"
    not_before: datetime
    not_after: datetime
    fingerprint: str  # SHA-256 of the DER encoding, hex
    issuer: int | None  # the generation of our CA whose key signed it; None: none of ours
    is_ca: bool = False
    public_key: str = ""  # SHA-256 of the SubjectPublicKeyInfo ("": read from the ledger)
    server_auth: bool = True  # has EKU serverAuth (only checked for external certificates)
    issuer_dn: Subject = ()

    @property
    def signed_by_ca(self) -> bool:
        return self.issuer is not None


@dataclasses.dataclass(frozen=True, slots=True)
class KeyFacts:
    """What can be said of an encrypted key file without its passphrase."""

    found: Found
    sha256: str | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RequestFacts:
    """A CSR we made for an external server (servers/NAME.csr), with its pending key."""

    subject: Subject
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    key: str
    public_key: str  # SHA-256 of the SubjectPublicKeyInfo
    requested: datetime | None  # from the file's header lines
    generation: int
    pending_key: KeyFacts  # servers/pending/NAME.key


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedLeaf:
    ref: LeafRef
    cert: CertFacts | None  # None unless found is OK
    found: Found  # of the certificate file
    key: KeyFacts
    detail: str = ""  # why the certificate file is unreadable or unusable
    chain: bytes = b""  # a server certificate file no CA of ours signed, as it is
    request: RequestFacts | None = None  # a usable CSR (None: none, or unusable)
    pending: tuple[str, ...] = ()  # the request files present (CSR, pending key), relative


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedCA:
    cert: CertFacts | None
    found: Found
    key: KeyFacts
    detail: str = ""
    generation: int = 1  # which directory it was read from (layout.ca_dir)


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedCRL:
    found: Found  # UNUSABLE with detail "not signed by the current CA" when it does not verify
    detail: str = ""
    number: int | None = None
    this_update: datetime | None = None
    next_update: datetime | None = None
    revoked: tuple[Revocation, ...] = ()

    @property
    def serials(self) -> frozenset[int]:
        return frozenset(entry.serial for entry in self.revoked)


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
    ca_generation: int = 1  # the CA that signed it
    issuer: str | None = None  # an external certificate's issuer DN: never on our CRL

    @property
    def ref(self) -> LeafRef:
        return LeafRef(self.kind, self.name)

    def facts(self, subject: Subject) -> CertFacts:
        """What the certificate this entry records says: checked when it was issued."""
        return CertFacts(
            serial=self.serial,
            subject=subject,
            dns=self.dns,
            ips=self.ips,
            key=self.key,
            not_before=self.not_before,
            not_after=self.not_after,
            fingerprint=self.fingerprint,
            issuer=self.ca_generation if self.issuer is None else None,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Ledger:
    entries: tuple[LedgerEntry, ...] = ()
    crl_number: int = 0
    found: Found = Found.OK
    detail: str = ""
    ca_fingerprint: str | None = None  # SHA-256 of the CA certificate it was written under
    ca_key_sha256: str | None = None  # SHA-256 of the encrypted CA key file
    signature_ok: bool | None = None  # its CA signature verifies; None: no CA to check with
    # during a CA rotation, the same pins for the older CA (the newest one signs the ledger)
    previous_fingerprint: str | None = None
    previous_key_sha256: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TempFile:
    """A temporary file an interrupted write left behind, and the certificate it may hold."""

    path: str  # relative to the state directory
    cert: CertFacts | None
    ref: LeafRef | None  # whose certificate or key it was about to become


@dataclasses.dataclass(frozen=True, slots=True)
class Observed:
    ca: ObservedCA  # the newest generation present
    crl: ObservedCRL  # its CRL
    leaves: tuple[ObservedLeaf, ...]
    ledger: Ledger
    modes: tuple[tuple[str, int], ...] = ()  # managed path (relative) → permission bits
    temp_files: tuple[TempFile, ...] = ()
    plaintext_keys: tuple[str, ...] = ()  # files (relative) holding an unencrypted private key
    unreadable: tuple[tuple[str, str], ...] = ()  # (path, why) of what could not be read
    # plan --base REF: (path, how) of every path but users.yaml that differs from REF
    changed_from_base: tuple[tuple[str, str], ...] = ()
    base: str | None = None
    base_trust: tuple[TrustRoot, ...] = ()  # the roots base's users.yaml lists
    # during a CA rotation, the older CA and its CRL
    previous: ObservedCA | None = None
    previous_crl: ObservedCRL | None = None


# --------------------------------------------------------------------------- plan


class ActionKind(enum.StrEnum):
    """How an action is shown: the word in the plan's ACTION column and in its JSON."""

    CA = "ca"
    ISSUE = "issue"
    REISSUE = "reissue"
    RENEW = "renew"
    REVOKE = "revoke"
    CRL = "crl"
    REPAIR = "repair"
    REQUEST = "request"  # a new key and CSR for an external CA
    ACCEPT = "accept"  # an external CA's signed certificate, checked and recorded
    TRUST = "trust"  # plan --base: a trust root a pull request adds, changes or deletes
    WAITING = "waiting"  # for a signed certificate: not a change
    NOOP = "noop"


@dataclasses.dataclass(frozen=True, slots=True)
class Issuance:
    """A certificate to sign: apply adds the key and serial, and decides nothing else."""

    spec: LeafSpec
    not_before: datetime
    not_after: datetime
    ca_generation: int = 1  # the CA that signs it


@dataclasses.dataclass(frozen=True, slots=True)
class CreateCa:
    """Make the CA of spec.generation: there is none yet (a first apply, or an interrupted
    one), or users.yaml raised the generation (the first stage of a rotation)."""

    kind: ClassVar[ActionKind] = ActionKind.CA
    spec: CASpec
    not_before: datetime
    not_after: datetime
    reasons: tuple[str, ...]
    rotation: bool = False  # a second CA beside the one in place, under its passphrase

    @property
    def subject(self) -> str:
        return "ca"


@dataclasses.dataclass(frozen=True, slots=True)
class LeafAction:
    """What every action about one client or server certificate shares: the name."""

    leaf: LeafRef

    @property
    def subject(self) -> str:
        return str(self.leaf)


@dataclasses.dataclass(frozen=True, slots=True)
class NewCertificate(LeafAction):
    """A new key and certificate for a name users.yaml lists (Issue, Reissue or Renew).

    replaces is the serial of the certificate on disk, if any; supersede and revoke are what
    becomes of the name's earlier certificates; adopt records certificates an interrupted
    apply left on disk without a ledger entry."""

    kind: ClassVar[ActionKind]
    issuance: Issuance
    reasons: tuple[str, ...]
    replaces: int | None = None
    supersede: tuple[int, ...] = ()
    revoke: tuple[Revocation, ...] = ()
    adopt: tuple[LedgerEntry, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Issue(NewCertificate):
    """No usable certificate: missing, damaged, or not the one the ledger records."""

    kind: ClassVar[ActionKind] = ActionKind.ISSUE


@dataclasses.dataclass(frozen=True, slots=True)
class Reissue(NewCertificate):
    """The certificate no longer says what users.yaml asks (subject, SANs, key, generation)."""

    kind: ClassVar[ActionKind] = ActionKind.REISSUE


@dataclasses.dataclass(frozen=True, slots=True)
class Renew(NewCertificate):
    """The certificate is inside its renewal window, or expired."""

    kind: ClassVar[ActionKind] = ActionKind.RENEW


@dataclasses.dataclass(frozen=True, slots=True)
class Revoke(LeafAction):
    """The name left users.yaml: revoke every still-valid certificate, delete its files."""

    kind: ClassVar[ActionKind] = ActionKind.REVOKE
    revoke: tuple[Revocation, ...]
    remove_files: bool
    reasons: tuple[str, ...]
    replaces: int | None = None  # the certificate on disk, if any
    adopt: tuple[LedgerEntry, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RetireGeneration(LeafAction):
    """The name stays, but certificates of an older generation are still valid (a generation
    bump that an interrupted apply did not finish): revoke them, keep the current one."""

    kind: ClassVar[ActionKind] = ActionKind.REVOKE
    revoke: tuple[Revocation, ...]
    reasons: tuple[str, ...]
    replaces: int | None = None  # the certificate on disk, which stays


@dataclasses.dataclass(frozen=True, slots=True)
class SignCrl:
    kind: ClassVar[ActionKind] = ActionKind.CRL
    number: int
    this_update: datetime
    next_update: datetime
    revoked: tuple[Revocation, ...]
    reasons: tuple[str, ...]
    generation: int = 1  # the CA that signs it

    @property
    def subject(self) -> str:
        return crl_name(self.generation)


@dataclasses.dataclass(frozen=True, slots=True)
class RetireCa:
    """The last stage of a rotation: the older CA leaves the bundles; its files go (git keeps
    them in history)."""

    kind: ClassVar[ActionKind] = ActionKind.CA
    generation: int
    reasons: tuple[str, ...]

    @property
    def subject(self) -> str:
        return f"ca generation {self.generation}"


@dataclasses.dataclass(frozen=True, slots=True)
class Repair:
    """Files an interrupted write left: record any certificate in them, remove them."""

    kind: ClassVar[ActionKind] = ActionKind.REPAIR
    remove: tuple[str, ...]  # relative paths
    adopt: tuple[LedgerEntry, ...]
    reasons: tuple[str, ...]
    what: str = "temporary files"

    @property
    def subject(self) -> str:
        return self.what


@dataclasses.dataclass(frozen=True, slots=True)
class Request(LeafAction):
    """A new key (servers/pending/NAME.key) and CSR (servers/NAME.csr) for an external CA; the
    certificate in place, if any, keeps serving until the signed one is accepted."""

    kind: ClassVar[ActionKind] = ActionKind.REQUEST
    spec: LeafSpec
    reasons: tuple[str, ...]
    replaces: int | None = None  # the accepted certificate that serves meanwhile


@dataclasses.dataclass(frozen=True, slots=True)
class Accept(LeafAction):
    """The committed servers/NAME.crt passed every check: record it, move the pending key to
    servers/NAME.key, remove the CSR."""

    kind: ClassVar[ActionKind] = ActionKind.ACCEPT
    entry: LedgerEntry
    reasons: tuple[str, ...]
    supersede: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class TrustChange:
    """plan --base: a trust root the pull request adds, changes or deletes, which every
    client's root.crt will (or will no longer) trust. Nothing for apply to do: the review is
    the point."""

    kind: ClassVar[ActionKind] = ActionKind.TRUST
    subject: str  # the file
    reasons: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Noop:
    kind: ClassVar[ActionKind] = ActionKind.NOOP
    subject: str  # "ca", "crl", or a leaf such as "client/pgquartz"
    reasons: tuple[str, ...]
    replaces: int | None = None  # the certificate in place


@dataclasses.dataclass(frozen=True, slots=True)
class Waiting(Noop):
    """A CSR waits for its signed certificate: nothing for apply to do, and no failure."""

    kind: ClassVar[ActionKind] = ActionKind.WAITING


Action = (
    CreateCa
    | Issue
    | Reissue
    | Renew
    | Revoke
    | RetireGeneration
    | SignCrl
    | RetireCa
    | Repair
    | Request
    | Accept
    | TrustChange
    | Noop
)


class Standing(enum.StrEnum):
    """What plan makes of a certificate (or the CA, or the CRL) on disk: status shows it."""

    VALID = "valid"
    EXPIRING = "expiring"  # inside its renewal (or refresh) window
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"
    UNUSABLE = "unusable"
    MISSING = "missing"
    PENDING = "pending"  # no certificate yet: a CSR waits for an external CA's signature


@dataclasses.dataclass(frozen=True, slots=True)
class Held:
    """One row of `status`: the CA, the CRL, a certificate on disk, or one still out there."""

    kind: str  # "ca", "crl", "client", "server"
    name: str
    serial: int | None  # the CRL's number for the CRL
    not_after: datetime | None  # nextUpdate for the CRL
    standing: Standing
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    now: datetime
    actions: tuple[Action, ...]
    blockers: tuple[str, ...] = ()  # problems apply refuses to repair on its own
    modes: tuple[tuple[str, int, int], ...] = ()  # (path, mode, wanted): every apply fixes them
    signs: bool = False  # the changes sign something: a certificate, the CRL or the ledger
    makes_keys: bool = False  # the changes make leaf keys (and so need the key passphrase)
    trusted: tuple[int, ...] = (1,)  # CA generations clients and servers trust, newest first
    rotation: str | None = None  # the stage of a CA rotation, and the date of the next step
    trust: tuple[str, ...] = ()  # users.yaml's trust roots: client bundles hold them too

    @property
    def changes(self) -> tuple[Action, ...]:
        return tuple(
            action for action in self.actions if not isinstance(action, Noop | TrustChange)
        )

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


def crl_name(generation: int) -> str:
    """How plans and status name a CA generation's CRL."""
    return "crl" if generation == 1 else f"crl generation {generation}"
