"""plan() as a pure function: observed states built by hand, one decision checked per case.

No files, no clock, no crypto: each case builds a Desired and an Observed value, calls plan()
at a given instant, and checks the type of the action for each name it cares about, a words of
its reasons, and what blocks. The end-to-end tests (test_lifecycle, test_reliability) show the
same decisions on real certificates; these show every branch, at the edges (±1 s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest

from reconciler.model import (
    CASpec,
    CertFacts,
    CertKind,
    CertStatus,
    CreateCa,
    CRLSpec,
    Desired,
    Found,
    KeyFacts,
    KeyType,
    LeafSpec,
    Ledger,
    LedgerEntry,
    Noop,
    Observed,
    ObservedCA,
    ObservedCRL,
    ObservedLeaf,
    Plan,
    Reissue,
    Renew,
    RenewBefore,
    Repair,
    Request,
    RequestFacts,
    RetireGeneration,
    RevocationReason,
    Revoke,
    SignCrl,
    Standing,
    TempFile,
    Waiting,
)
from reconciler.model import Issue as IssueAction
from reconciler.plan import BACKDATE, plan, status

NOW = datetime(2027, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
CA_SUBJECT = (("CN", "Test CA"),)
CA_SPEC = CASpec(subject=CA_SUBJECT, key=KeyType.ECDSA_P256, validity=3650 * DAY)
CRL_SPEC = CRLSpec(validity=30 * DAY, refresh_before=20 * DAY)
WINDOW = RenewBefore(duration=10 * DAY)


def spec(name: str, kind: CertKind = CertKind.CLIENT, **changes: object) -> LeafSpec:
    base = LeafSpec(
        kind=kind,
        name=name,
        key=KeyType.ECDSA_P256,
        validity=30 * DAY,
        renew_before=WINDOW,
        subject=(("O", "Acme"), ("CN", name)),
        dns=(name,) if kind is CertKind.SERVER else (),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


ALICE, BOB = spec("alice"), spec("bob")
DB = spec("db.example.com", CertKind.SERVER, ips=("10.0.0.1",))


def issued(
    leaf: LeafSpec, serial: int, *, start: datetime = NOW - 5 * DAY, lifetime: timedelta = 30 * DAY
) -> CertFacts:
    return CertFacts(
        serial=serial,
        subject=leaf.subject,
        dns=leaf.dns,
        ips=leaf.ips,
        key=leaf.key.value,
        not_before=start,
        not_after=start + lifetime,
        fingerprint=f"fp{serial}",
        issuer=1,
    )


def entry(
    leaf: LeafSpec,
    cert: CertFacts,
    *,
    status: CertStatus = CertStatus.VALID,
    generation: int = 1,
) -> LedgerEntry:
    return LedgerEntry(
        serial=cert.serial,
        kind=leaf.kind,
        name=leaf.name,
        not_before=cert.not_before,
        not_after=cert.not_after,
        key=cert.key,
        spec=leaf.spec_hash(),
        generation=generation,
        fingerprint=cert.fingerprint,
        key_sha256=f"key{cert.serial}",
        status=status,
        subject=cert.subject,
    )


def on_disk(leaf: LeafSpec, cert: CertFacts | None, **key: object) -> ObservedLeaf:
    facts = KeyFacts(Found.OK, f"key{cert.serial}" if cert is not None else "k")
    return ObservedLeaf(
        ref=leaf.ref,
        cert=cert,
        found=Found.OK if cert is not None else Found.MISSING,
        key=dataclasses.replace(facts, **key),  # type: ignore[arg-type]
    )


CA_CERT = CertFacts(
    serial=1,
    subject=CA_SUBJECT,
    dns=(),
    ips=(),
    key="ecdsa-p256",
    not_before=NOW - 100 * DAY,
    not_after=NOW + 3000 * DAY,
    fingerprint="ca-fp",
    issuer=1,
    is_ca=True,
)
CA = ObservedCA(CA_CERT, Found.OK, KeyFacts(Found.OK, "ca-key"))
CRL = ObservedCRL(Found.OK, "", 3, NOW - 5 * DAY, NOW + 25 * DAY, ())


def world(
    *leaves: tuple[LeafSpec, int],
    desired: tuple[LeafSpec, ...] | None = None,
    **changes: object,
) -> tuple[Desired, Observed]:
    """A steady state: each (spec, serial) issued five days ago, on disk and in the ledger."""
    certs = [(leaf, issued(leaf, serial)) for leaf, serial in leaves]
    observed = Observed(
        ca=CA,
        crl=CRL,
        leaves=tuple(on_disk(leaf, cert) for leaf, cert in certs),
        ledger=Ledger(
            entries=tuple(entry(leaf, cert) for leaf, cert in certs),
            crl_number=3,
            ca_fingerprint="ca-fp",
            ca_key_sha256="ca-key",
            signature_ok=True,
        ),
    )
    wanted = tuple(leaf for leaf, _ in leaves) if desired is None else desired
    return (
        Desired(CA_SPEC, CRL_SPEC, wanted),
        dataclasses.replace(observed, **changes),  # type: ignore[arg-type]
    )


def leaf_changes(observed: Observed, ref: str, **changes: object) -> Observed:
    leaves = tuple(
        dataclasses.replace(leaf, **changes) if str(leaf.ref) == ref else leaf  # type: ignore[arg-type]
        for leaf in observed.leaves
    )
    return dataclasses.replace(observed, leaves=leaves)


def ledger_changes(observed: Observed, **changes: object) -> Observed:
    return dataclasses.replace(observed, ledger=dataclasses.replace(observed.ledger, **changes))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Case:
    """What plan() must decide for one subject of a hand-built state."""

    build: Callable[[], tuple[Desired, Observed]]
    subject: str
    action: type
    reason: str = ""
    now: datetime = NOW
    blocked: str = ""


def _steady() -> tuple[Desired, Observed]:
    return world((ALICE, 11), (DB, 12))


def _edited(*specs: LeafSpec) -> Callable[[], tuple[Desired, Observed]]:
    def build() -> tuple[Desired, Observed]:
        desired, observed = _steady()
        by_name = {leaf.name: leaf for leaf in specs}
        return (
            dataclasses.replace(
                desired, leaves=tuple(by_name.get(leaf.name, leaf) for leaf in desired.leaves)
            ),
            observed,
        )

    return build


def _leaf(ref: str, **changes: object) -> Callable[[], tuple[Desired, Observed]]:
    def build() -> tuple[Desired, Observed]:
        desired, observed = _steady()
        return desired, leaf_changes(observed, ref, **changes)

    return build


def _observed(change: Callable[[Observed], Observed]) -> Callable[[], tuple[Desired, Observed]]:
    def build() -> tuple[Desired, Observed]:
        desired, observed = _steady()
        return desired, change(observed)

    return build


ISSUED = NOW - 5 * DAY  # alice's certificate: not_after ISSUED + 30d, renews from ISSUED + 20d
RENEW_FROM = ISSUED + 20 * DAY


def _empty() -> tuple[Desired, Observed]:
    missing = ObservedCA(None, Found.MISSING, KeyFacts(Found.MISSING))
    return world(
        desired=(ALICE,),
        ca=missing,
        crl=ObservedCRL(Found.MISSING),
        ledger=Ledger(found=Found.MISSING),
    )


def _generation_bump_interrupted() -> tuple[Desired, Observed]:
    """The new generation's certificate is on disk; the old one was never revoked."""
    bumped = spec("alice", generation=2)
    old, new = issued(ALICE, 21, start=NOW - 9 * DAY), issued(bumped, 22)
    desired, observed = world(desired=(bumped,))
    return desired, dataclasses.replace(
        observed,
        leaves=(on_disk(bumped, new),),
        ledger=dataclasses.replace(
            observed.ledger,
            entries=(entry(ALICE, old), entry(bumped, new, generation=2)),
        ),
    )


def _removed() -> tuple[Desired, Observed]:
    return world((ALICE, 11), (BOB, 13), desired=(ALICE,))


def _removed_files_gone() -> tuple[Desired, Observed]:
    desired, observed = world((ALICE, 11), (BOB, 13), desired=(ALICE,))
    return desired, dataclasses.replace(observed, leaves=observed.leaves[:1])


def _ca_ends_first(days_left: int) -> Callable[[], tuple[Desired, Observed]]:
    def build() -> tuple[Desired, Observed]:
        ca = dataclasses.replace(
            CA, cert=dataclasses.replace(CA_CERT, not_after=NOW + days_left * DAY)
        )
        return world((ALICE, 11), ca=ca)

    return build


def _temp_file() -> tuple[Desired, Observed]:
    stray = issued(BOB, 99)
    return world(
        (ALICE, 11),
        temp_files=(TempFile("clients/.bob.crt.tmp", stray, BOB.ref),),
    )


CASES = {
    # bootstrap
    "empty state: create the CA": Case(_empty, "ca", CreateCa, "no CA yet: create one"),
    "empty state: issue": Case(_empty, "client/alice", IssueAction, "no certificate yet"),
    "empty state: first CRL": Case(_empty, "crl", SignCrl, "new CA: sign its first CRL"),
    "interrupted first apply: key without certificate": Case(
        lambda: world(
            ca=ObservedCA(None, Found.MISSING, KeyFacts(Found.OK, "k")),
            crl=ObservedCRL(Found.MISSING),
            ledger=Ledger(found=Found.MISSING),
        ),
        "ca",
        CreateCa,
        "interrupted first apply left ca/ca.key without ca/ca.crt",
    ),
    # nothing to do
    "steady state": Case(_steady, "client/alice", Noop, "renews from 2027-01-16"),
    "steady CRL": Case(_steady, "crl", Noop, "number 3, 0 revoked"),
    # the renewal window, at its edge
    "one second before the window": Case(_steady, "client/alice", Noop, now=RENEW_FROM - SECOND),
    "at the window's opening": Case(
        _steady, "client/alice", Renew, "inside the 10d renewal window", now=RENEW_FROM
    ),
    "one second into the window": Case(
        _steady, "client/alice", Renew, "inside the 10d renewal window", now=RENEW_FROM + SECOND
    ),
    "expired": Case(_steady, "client/alice", Renew, "expired on", now=ISSUED + 31 * DAY),
    "a share of the lifetime": Case(
        _edited(spec("alice", renew_before=RenewBefore(share=Fraction(1, 2)))),
        "client/alice",
        Renew,
        "(50% of the lifetime)",
        now=ISSUED + 15 * DAY,
    ),
    "just before a share's window": Case(
        _edited(spec("alice", renew_before=RenewBefore(share=Fraction(1, 2)))),
        "client/alice",
        Noop,
        now=ISSUED + 15 * DAY - SECOND,
    ),
    # the CA
    "the CA ends before a renewal would": Case(
        _ca_ends_first(20),
        "client/alice",
        Noop,
        "the CA expires first; replace the CA",
        now=RENEW_FROM + DAY,
    ),
    "a renewal is cut to the CA's end": Case(
        _ca_ends_first(40), "client/alice", Renew, "shortened to end with the CA", now=RENEW_FROM
    ),
    "the CA expired": Case(_ca_ends_first(-1), "ca", Noop, blocked="the CA expired on"),
    # what users.yaml asks changed
    "generation bump": Case(
        _edited(spec("alice", generation=2)),
        "client/alice",
        Reissue,
        "generation changed from 1 to 2",
    ),
    "subject changed": Case(
        _edited(spec("alice", subject=(("O", "Other"), ("CN", "alice")))),
        "client/alice",
        Reissue,
        "subject changed: O=Acme, CN=alice → O=Other, CN=alice",
    ),
    "key type changed": Case(
        _edited(spec("alice", key=KeyType.ED25519)),
        "client/alice",
        Reissue,
        "key type changed: ecdsa-p256 → ed25519",
    ),
    "DNS names changed": Case(
        _edited(dataclasses.replace(DB, dns=(DB.name, "pg.example.com"))),
        "server/db.example.com",
        Reissue,
        "DNS names changed",
    ),
    "IP addresses changed": Case(
        _edited(dataclasses.replace(DB, ips=("10.0.0.2",))),
        "server/db.example.com",
        Reissue,
        "IP addresses changed: 10.0.0.1 → 10.0.0.2",
    ),
    "an interrupted generation bump": Case(
        _generation_bump_interrupted,
        "client/alice",
        RetireGeneration,
        "revoke the older generation's serial",
    ),
    # damage that is safe to repair
    "certificate file damaged": Case(
        _leaf("client/alice", cert=None, found=Found.UNUSABLE, detail="no PEM certificate"),
        "client/alice",
        IssueAction,
        "certificate file unusable: no PEM certificate",
    ),
    "private key missing": Case(
        _leaf("client/alice", key=KeyFacts(Found.MISSING)),
        "client/alice",
        IssueAction,
        "private key missing",
    ),
    "private key unencrypted": Case(
        _leaf("client/alice", key=KeyFacts(Found.PLAINTEXT, "x")),
        "client/alice",
        IssueAction,
        "private key stored unencrypted",
    ),
    "private key replaced": Case(
        _leaf("client/alice", key=KeyFacts(Found.OK, "another")),
        "client/alice",
        IssueAction,
        "private key file is not the one issued",
    ),
    "signed by another CA": Case(
        _leaf("client/alice", cert=dataclasses.replace(issued(ALICE, 11), issuer=None)),
        "client/alice",
        IssueAction,
        "not signed by the current CA",
    ),
    "not in the ledger": Case(
        _leaf("client/alice", cert=issued(ALICE, 77)),
        "client/alice",
        IssueAction,
        "is not in the ledger",
    ),
    "differs from the ledger's record": Case(
        _leaf("client/alice", cert=dataclasses.replace(issued(ALICE, 11), fingerprint="other")),
        "client/alice",
        IssueAction,
        "certificate differs from the ledger's record",
    ),
    "temporary files": Case(_temp_file, "temporary files", Repair, "holds serial"),
    # removal
    "removed name": Case(_removed, "client/bob", Revoke, "no longer in users.yaml"),
    "removed name, files already gone": Case(
        _removed_files_gone, "client/bob", Revoke, "revoke serial"
    ),
    # the CRL
    "one second before the CRL's refresh window": Case(
        _steady, "crl", Noop, now=NOW + 5 * DAY - SECOND
    ),
    "the CRL's refresh window": Case(
        _steady, "crl", SignCrl, "within the 20d refresh window", now=NOW + 5 * DAY
    ),
    "the CRL passed its next update": Case(
        _steady, "crl", SignCrl, "PostgreSQL refuses every client", now=NOW + 25 * DAY
    ),
    "the CRL misses a revoked serial": Case(_removed, "crl", SignCrl, "does not list revoked"),
    "the CRL is unusable": Case(
        _observed(lambda o: dataclasses.replace(o, crl=ObservedCRL(Found.UNUSABLE, "garbage"))),
        "crl",
        SignCrl,
        "CRL unusable: garbage",
    ),
    # damage that blocks: missing is not unreadable
    "a certificate that cannot be read": Case(
        _leaf("client/alice", cert=None, found=Found.UNREADABLE, detail="it is a symbolic link"),
        "client/alice",
        Noop,
        blocked="clients/alice.crt cannot be read (it is a symbolic link)",
    ),
    "a directory that cannot be read": Case(
        _observed(
            lambda o: dataclasses.replace(o, unreadable=(("servers", "it is a symbolic link"),))
        ),
        "client/alice",
        Noop,
        blocked="servers cannot be read (it is a symbolic link)",
    ),
    "the ledger is missing": Case(
        _observed(lambda o: dataclasses.replace(o, ledger=Ledger(found=Found.MISSING))),
        "ca",
        Noop,
        blocked="ledger.jsonl is missing but a CA exists",
    ),
    "the ledger was edited": Case(
        _observed(lambda o: ledger_changes(o, signature_ok=False)),
        "ca",
        Noop,
        blocked="ledger.jsonl was changed outside the reconciler",
    ),
    "another CA": Case(
        _observed(lambda o: ledger_changes(o, ca_fingerprint="somebody-else")),
        "ca",
        Noop,
        blocked="ca/ca.crt is not the CA this state was issued under",
    ),
    "a CA key without its certificate": Case(
        _observed(lambda o: dataclasses.replace(o, ca=ObservedCA(None, Found.MISSING, CA.key))),
        "ca",
        Noop,
        blocked="ca/ca.key exists but ca/ca.crt does not",
    ),
    "a plaintext key where none belongs": Case(
        _observed(lambda o: dataclasses.replace(o, plaintext_keys=("notes.txt",))),
        "ca",
        Noop,
        blocked="notes.txt holds an unencrypted private key",
    ),
}


def _action(result: Plan, subject: str) -> object:
    found = [action for action in result.actions if action.subject == subject]
    assert len(found) == 1, [action.subject for action in result.actions]
    return found[0]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_decides(case: Case) -> None:
    desired, observed = case.build()
    result = plan(desired, observed, now=case.now)
    action = _action(result, case.subject)
    assert type(action) is case.action, action
    assert case.reason in "; ".join(action.reasons), action.reasons  # type: ignore[attr-defined]
    if case.blocked:
        assert any(case.blocked in blocker for blocker in result.blockers), result.blockers
    else:
        assert result.blockers == ()
    assert plan(desired, observed, now=case.now) == result  # pure: the same again


def test_every_reason_word_is_covered() -> None:
    """Each action type the plan can make appears in the table above."""
    made = {case.action for case in CASES.values()}
    assert {
        CreateCa,
        IssueAction,
        Reissue,
        Renew,
        Revoke,
        RetireGeneration,
        SignCrl,
        Repair,
        Noop,
    } <= made


def test_a_generation_bump_revokes_every_live_certificate_of_the_name() -> None:
    desired, observed = _edited(spec("alice", generation=2))()
    action = _action(plan(desired, observed, now=NOW), "client/alice")
    assert isinstance(action, Reissue)
    assert [(r.serial, r.reason) for r in action.revoke] == [(11, RevocationReason.SUPERSEDED)]
    assert action.supersede == ()


def test_a_renewal_supersedes_and_never_revokes() -> None:
    desired, observed = _steady()
    action = _action(plan(desired, observed, now=RENEW_FROM), "client/alice")
    assert isinstance(action, Renew)
    assert (action.supersede, action.revoke, action.replaces) == ((11,), (), 11)
    assert action.issuance.not_before == RENEW_FROM - BACKDATE
    assert action.issuance.not_after == RENEW_FROM + 30 * DAY


def test_a_removal_revokes_for_cessation_and_deletes_the_files() -> None:
    desired, observed = _removed()
    result = plan(desired, observed, now=NOW)
    action = _action(result, "client/bob")
    assert isinstance(action, Revoke)
    assert action.remove_files
    assert [(r.serial, r.reason) for r in action.revoke] == [
        (13, RevocationReason.CESSATION_OF_OPERATION)
    ]
    crl = _action(result, "crl")
    assert isinstance(crl, SignCrl)
    assert [r.serial for r in crl.revoked] == [13]
    assert crl.number == 4


def test_a_certificate_an_interrupted_apply_left_is_adopted_then_superseded() -> None:
    desired, observed = _leaf("client/alice", cert=issued(ALICE, 77))()
    action = _action(plan(desired, observed, now=NOW), "client/alice")
    assert isinstance(action, IssueAction)
    assert [e.serial for e in action.adopt] == [77]
    assert 77 in action.supersede


def test_what_an_apply_needs_follows_from_the_plan() -> None:
    steady = plan(*_steady(), now=NOW)
    assert (steady.changes, steady.signs, steady.makes_keys) == ((), False, False)
    crl_only = plan(*_steady(), now=NOW + 5 * DAY)
    assert (crl_only.signs, crl_only.makes_keys) == (True, False)
    renewal = plan(*_steady(), now=RENEW_FROM)
    assert (renewal.signs, renewal.makes_keys) == (True, True)
    desired, observed = _steady()
    cleanup = plan(
        desired,
        dataclasses.replace(observed, temp_files=(TempFile("ca/.crl.pem.tmp", None, None),)),
        now=NOW,
    )
    assert [type(a) for a in cleanup.changes] == [Repair]
    assert (cleanup.signs, cleanup.makes_keys) == (False, False)  # removing files signs nothing


def test_wrong_modes_are_housekeeping_not_changes() -> None:
    desired, observed = _steady()
    result = plan(
        desired,
        dataclasses.replace(observed, modes=(("clients/alice.key", 0o644), ("ca/ca.crt", 0o644))),
        now=NOW,
    )
    assert result.changes == ()
    assert result.modes == (("clients/alice.key", 0o644, 0o600),)


@pytest.mark.parametrize(
    ("now", "standing"),
    [
        (RENEW_FROM - SECOND, Standing.VALID),
        (RENEW_FROM, Standing.EXPIRING),
        (ISSUED + 30 * DAY - SECOND, Standing.EXPIRING),
        (ISSUED + 30 * DAY, Standing.EXPIRED),
    ],
)
def test_status_shows_what_plan_decided(now: datetime, standing: Standing) -> None:
    rows = {(row.kind, row.name): row for row in status(*_steady(), now=now)}
    assert rows[("client", "alice")].standing is standing
    assert rows[("ca", "Test CA")].standing is Standing.VALID


def test_status_lists_superseded_and_revoked_certificates_still_out_there() -> None:
    desired, observed = _generation_bump_interrupted()
    observed = ledger_changes(
        observed,
        entries=tuple(
            dataclasses.replace(e, status=CertStatus.REVOKED) if e.serial == 21 else e
            for e in observed.ledger.entries
        ),
    )
    rows = {row.serial: row for row in status(desired, observed, now=NOW)}
    assert rows[21].standing is Standing.REVOKED
    assert rows[22].standing is Standing.VALID


def test_plan_refuses_a_naive_now() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        plan(*_steady(), now=NOW.replace(tzinfo=None))


# --------------------------------------------------------------------------- external issuer

EXT = spec("ext.example.com", CertKind.SERVER, external=True)


def request(leaf: LeafSpec, *, dns: tuple[str, ...] | None = None) -> RequestFacts:
    return RequestFacts(
        subject=leaf.subject,
        dns=leaf.dns if dns is None else dns,
        ips=leaf.ips,
        key=leaf.key.value,
        public_key="pending-spki",
        requested=NOW - 2 * DAY,
        generation=leaf.generation,
        pending_key=KeyFacts(Found.OK, "pending-key"),
    )


def external_action(observed_leaf: ObservedLeaf | None, *, now: datetime = NOW) -> list[object]:
    desired, observed = world(desired=(EXT,))
    if observed_leaf is not None:
        observed = dataclasses.replace(observed, leaves=(observed_leaf,))
    planned = plan(desired, observed, now=now)
    assert not planned.blockers
    return [a for a in planned.actions if a.subject == str(EXT.ref)]


def test_external_server_without_anything_gets_a_key_and_csr() -> None:
    (action,) = external_action(None)
    assert isinstance(action, Request)
    assert "make a key and CSR for the external CA" in action.reasons


def test_a_pending_csr_waits_and_is_no_change_and_no_failure() -> None:
    pending = ObservedLeaf(
        EXT.ref, None, Found.MISSING, KeyFacts(Found.MISSING), request=request(EXT)
    )
    (action,) = external_action(pending)
    assert isinstance(action, Waiting)
    waiting = "waiting for the signed certificate (requested 2026-12-30T00:00:00Z)"
    assert any(reason.startswith(waiting) for reason in action.reasons)
    desired, observed = world(desired=(EXT,), leaves=(pending,))
    assert action not in plan(desired, observed, now=NOW).changes


def test_a_csr_for_other_names_is_made_again() -> None:
    stale = request(EXT, dns=("old.example.com",))
    pending = ObservedLeaf(EXT.ref, None, Found.MISSING, KeyFacts(Found.MISSING), request=stale)
    (action,) = external_action(pending)
    assert isinstance(action, Request)
    assert any("DNS names changed" in reason for reason in action.reasons)


def test_removing_an_external_server_revokes_nothing_of_ours() -> None:
    cert = dataclasses.replace(issued(EXT, 77), issuer=None)
    accepted = dataclasses.replace(entry(EXT, cert), issuer="CN=Corp Intermediate")
    desired, observed = world(desired=())
    observed = dataclasses.replace(
        observed,
        leaves=(on_disk(EXT, cert),),
        ledger=dataclasses.replace(observed.ledger, entries=(accepted,)),
    )
    planned = plan(desired, observed, now=NOW)
    (action,) = [a for a in planned.actions if a.subject == str(EXT.ref)]
    assert isinstance(action, Revoke)
    assert action.revoke == ()  # another CA's certificate is not ours to put on our CRL
    assert "ask that CA to revoke it" in "; ".join(action.reasons)
