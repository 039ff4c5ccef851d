"""Decide what to do. plan() is pure: no I/O, no clock, no randomness.

Checks run in a fixed order, cheapest and most decisive first (missing → unusable → key →
issuer and ledger → spec → time window), and every reason that applies is kept, in words.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from reconciler.model import (
    Action,
    ActionKind,
    CAIssuance,
    CertFacts,
    CertKind,
    CertStatus,
    CRLIssuance,
    Desired,
    Issuance,
    LeafSpec,
    LedgerEntry,
    Observed,
    ObservedLeaf,
    Plan,
    RenewBefore,
    Revocation,
    RevocationReason,
    Subject,
    describe_duration,
    format_serial,
    format_time,
)
from reconciler.store import expected_mode

BACKDATE = timedelta(minutes=5)
"""not_before and a CRL's thisUpdate lie this far before now, so a PostgreSQL server whose clock
is a little behind accepts a fresh certificate and CRL (a CRL not yet valid locks out all)."""


# Looking up an enum member costs more than most of a no-op's per-name work (Python 3.11):
# the hot loops use these names instead.
_VALID, _REVOKED, _NOOP = CertStatus.VALID, CertStatus.REVOKED, ActionKind.NOOP


def _dn(subject: Subject) -> str:
    return ", ".join(f"{attr}={value}" for attr, value in subject)


def _day(moment: datetime) -> str:
    return moment.date().isoformat()  # not strftime: this runs twice per certificate


def _short(serial: int) -> str:
    return format_serial(serial)[:12]


def _live(entry: LedgerEntry, now: datetime) -> bool:
    """Not revoked and not yet expired: a certificate someone could still use."""
    return entry.status is not _REVOKED and entry.not_after > now


class _Context:
    """What every leaf decision needs to know, computed once per plan."""

    def __init__(self, desired: Desired, observed: Observed, now: datetime) -> None:
        self.desired = desired
        self.observed = observed
        self.now = now
        self.start = now.replace(microsecond=0)
        self.entries: dict[str, list[LedgerEntry]] = defaultdict(list)
        for entry in observed.ledger.entries:
            self.entries[entry.ref].append(entry)
        self.by_serial = observed.ledger.by_serial()
        self._windows: dict[tuple[int, datetime, datetime], tuple[RenewBefore, timedelta]] = {}
        self.reasons: dict[tuple[datetime, datetime], tuple[str, ...]] = {}
        self.new_ca = False
        self.ca_not_after: datetime | None = (
            observed.ca.cert.not_after if observed.ca.cert is not None else None
        )

    def issuance(self, spec: LeafSpec) -> tuple[Issuance, tuple[str, ...]]:
        """What to issue for spec now, and a note when the CA's expiry shortens it."""
        not_after = self.start + spec.validity
        notes: tuple[str, ...] = ()
        if self.ca_not_after is not None and not_after > self.ca_not_after:
            not_after = self.ca_not_after
            notes = (f"shortened to end with the CA on {_day(not_after)}",)
        issuance = Issuance(spec=spec, not_before=self.start - BACKDATE, not_after=not_after)
        return issuance, notes

    def window(
        self, renew_before: RenewBefore, not_before: datetime, not_after: datetime
    ) -> timedelta:
        """The renewal window of a certificate, computed once per distinct lifetime and setting."""
        # keyed on the setting's identity: hashing its Fraction costs more than the arithmetic
        key = (id(renew_before), not_before, not_after)
        cached = self._windows.get(key)
        if cached is None or cached[0] is not renew_before:
            cached = self._windows[key] = (
                renew_before,
                renew_before.window(not_after - not_before),
            )
        return cached[1]


# --------------------------------------------------------------------------- CA


def _bootstrap(ctx: _Context, why: str) -> Action:
    spec = ctx.desired.ca
    ctx.new_ca = True
    not_after = ctx.start + spec.validity
    ctx.ca_not_after = not_after
    return Action(
        kind=ActionKind.CA,
        subject="ca",
        reasons=(f"{why} ({_dn(spec.subject)}; {spec.key}; valid until {_day(not_after)})",),
        ca=CAIssuance(spec=spec, not_before=ctx.start - BACKDATE, not_after=not_after),
    )


def _plan_ca(ctx: _Context, blockers: list[str]) -> Action:
    ca, spec, ledger = ctx.observed.ca, ctx.desired.ca, ctx.observed.ledger
    # A first apply writes ca.key, ca.crt, the certificates, the ledger, then the CRL: with no
    # ledger and no CRL, half a CA can only be an interrupted first apply, and nothing it signed
    # was recorded or handed out.
    first_run = ledger.problem == "missing" and ctx.observed.crl.problem == "missing"
    if ca.cert is None and ca.cert_problem == "missing":
        live = [entry for entry in ledger.entries if _live(entry, ctx.now)]
        if ca.key.problem == "missing" and not live:
            return _bootstrap(ctx, "no CA yet: create one")
        if ca.key.problem != "missing" and first_run:
            return _bootstrap(
                ctx, "an interrupted first apply left ca/ca.key without ca/ca.crt: create the CA"
            )
        if ca.key.problem != "missing":
            blockers.append(
                "ca/ca.key exists but ca/ca.crt does not: restore ca/ca.crt from git "
                "(git checkout -- ca/ca.crt), or move ca.key away to start a new CA"
            )
        else:
            blockers.append(
                f"ca/ca.crt is missing but the ledger holds {len(live)} certificates "
                "that are still valid: restore ca/ in the state directory from git; "
                "a new CA could not revoke them"
            )
        return Action(kind=ActionKind.NOOP, subject="ca", reasons=("blocked: see above",))
    if ca.cert is not None and ca.key.problem == "missing" and first_run:
        return _bootstrap(
            ctx, "an interrupted first apply left ca/ca.crt without ca/ca.key: create the CA"
        )
    if ca.cert is None or ca.cert_problem is not None:
        blockers.append(
            f"ca/ca.crt is {ca.cert_problem}: restore it from git; the tool never "
            "replaces a CA on its own, since that would orphan every certificate"
        )
        return Action(kind=ActionKind.NOOP, subject="ca", reasons=("blocked: see above",))
    if ca.key.problem is not None:
        advice = (
            "encrypt it (openssl pkcs8 -topk8 -v2 aes-256-cbc) and rotate the CA passphrase"
            if ca.key.problem == "not encrypted"
            else "restore it from git"
        )
        blockers.append(f"ca/ca.key is {ca.key.problem}: {advice}")
    if ledger.ca_fingerprint is not None and ledger.ca_fingerprint != ca.cert.fingerprint:
        blockers.append(
            f"ca/ca.crt is not the CA this state was issued under (the ledger names "
            f"{ledger.ca_fingerprint[:16]}…, ca.crt is {ca.cert.fingerprint[:16]}…): restore "
            "ca/ from git (git log -- ca/ shows who changed it); a CA is never replaced "
            "automatically, since every certificate and the CRL hang on it"
        )
    elif (
        ledger.ca_key_sha256 is not None
        and ca.key.sha256 is not None
        and ledger.ca_key_sha256 != ca.key.sha256
    ):
        blockers.append(
            "ca/ca.key is not the key file this state was issued with: restore it from git "
            "(git checkout -- ca/ca.key); if you re-encrypted it on purpose, restore the old "
            "file, since the reconciler cannot tell that from a replaced key"
        )
    elif ledger.signature_ok is False:
        blockers.append(
            "ledger.jsonl was changed outside the reconciler (its CA signature does not "
            "verify): restore it from git (git log -p -- ledger.jsonl shows the edit); only "
            "apply writes the ledger"
        )
    reasons = [f"valid until {_day(ca.cert.not_after)}"]
    if ca.cert.not_after <= ctx.now:
        blockers.append(
            f"the CA expired on {format_time(ca.cert.not_after)}: no certificate "
            "it signs is accepted; create a new CA (see README, 'Replacing the CA')"
        )
    if ca.cert.subject != spec.subject:
        reasons.append(
            f"users.yaml asks for CA subject {_dn(spec.subject)} but the CA has "
            f"{_dn(ca.cert.subject)}; a CA is never replaced automatically"
        )
    if ca.cert.key != spec.key.value:
        reasons.append(
            f"users.yaml asks for a {spec.key} CA key but the CA has {ca.cert.key}; "
            "a CA is never replaced automatically"
        )
    return Action(kind=ActionKind.NOOP, subject="ca", serial=ca.cert.serial, reasons=tuple(reasons))


# --------------------------------------------------------------------------- leaves


def _issue_problems(ctx: _Context, leaf: ObservedLeaf | None) -> list[str]:
    """Reasons the certificate on disk cannot be kept at all, in the order of the checks."""
    if leaf is None or leaf.cert is None:
        problem = "missing" if leaf is None else leaf.cert_problem
        return ["no certificate yet" if problem == "missing" else f"certificate file {problem}"]
    cert, reasons = leaf.cert, []
    if leaf.key.problem == "missing":
        reasons.append("private key missing")
    elif leaf.key.problem == "not encrypted":
        reasons.append("private key stored unencrypted")
    elif leaf.key.problem is not None:
        reasons.append(f"private key file {leaf.key.problem}")
    if ctx.new_ca or not cert.signed_by_ca:
        reasons.append("not signed by the current CA")
    entry = ctx.by_serial.get(cert.serial)
    if entry is None:
        reasons.append(f"serial {_short(cert.serial)} is not in the ledger")
    elif entry.fingerprint != cert.fingerprint:
        reasons.append(
            f"certificate differs from the ledger's record of serial {_short(cert.serial)}"
        )
    elif entry.name != leaf.name or entry.kind is not leaf.kind:
        reasons.append(f"serial {_short(cert.serial)} was issued to {entry.ref}")
    else:
        if leaf.key.problem is None and entry.key_sha256 != leaf.key.sha256:
            reasons.append(
                f"private key file is not the one issued with serial {_short(cert.serial)}"
            )
        if entry.status is not _VALID:
            reasons.append(f"serial {_short(cert.serial)} is {entry.status}")
    return reasons


def _spec_changes(ctx: _Context, spec: LeafSpec, leaf: ObservedLeaf) -> tuple[list[str], bool]:
    """Reasons to re-issue, and whether the generation changed (which revokes)."""
    assert leaf.cert is not None
    cert, reasons = leaf.cert, []
    if cert.subject != spec.subject:
        reasons.append(f"subject changed: {_dn(cert.subject)} → {_dn(spec.subject)}")
    if cert.key != spec.key:  # a StrEnum equals its value; .value costs an enum lookup
        reasons.append(f"key type changed: {cert.key} → {spec.key}")
    if (cert.dns or spec.dns) and {d.lower() for d in cert.dns} != set(spec.dns):
        reasons.append(
            f"DNS names changed: {', '.join(cert.dns) or 'none'} → {', '.join(spec.dns) or 'none'}"
        )
    if (cert.ips or spec.ips) and set(cert.ips) != set(spec.ips):
        reasons.append(
            f"IP addresses changed: {', '.join(cert.ips) or 'none'} → "
            f"{', '.join(spec.ips) or 'none'}"
        )
    entry = ctx.by_serial[cert.serial]
    generation_changed = entry.generation != spec.generation
    if generation_changed:
        reasons.append(
            f"generation changed from {entry.generation} to {spec.generation}: "
            "new key, and the old certificate is revoked"
        )
    return reasons, generation_changed


def _plan_leaf(ctx: _Context, ref: str, spec: LeafSpec, leaf: ObservedLeaf | None) -> Action:
    entries = ctx.entries.get(ref, ())
    current = leaf.cert if leaf is not None else None
    serial = current.serial if current is not None else None

    # Every still-valid certificate of another generation is revoked, whatever else happens:
    # a generation bump is a promise that the old keys stop working, and it must survive an
    # apply that was interrupted after the new certificate reached the disk.
    supersede_list: list[int] = []
    old_list: list[Revocation] = []
    for e in entries:
        if _live(e, ctx.now) and e.generation not in (0, spec.generation):
            old_list.append(Revocation(e.serial, ctx.start, RevocationReason.SUPERSEDED))
        elif e.status is _VALID:
            supersede_list.append(e.serial)
    supersede, old_generation = tuple(supersede_list), tuple(old_list)
    old_reason = (
        (
            f"generation is {spec.generation}: revoke the older generation's serial"
            f"{'s' if len(old_generation) > 1 else ''} "
            f"{', '.join(_short(r.serial) for r in old_generation)}",
        )
        if old_generation
        else ()
    )

    problems = _issue_problems(ctx, leaf)
    if problems:
        issuance, notes = ctx.issuance(spec)
        adopt = _adoptable(ctx, leaf)
        return Action(
            kind=ActionKind.ISSUE,
            subject=ref,
            reasons=(*problems, *old_reason, *notes),
            serial=serial,
            issue=issuance,
            supersede=(*supersede, *(entry.serial for entry in adopt)),
            revoke=old_generation,
            adopt=adopt,
        )
    assert leaf is not None
    assert current is not None
    changes, generation_changed = _spec_changes(ctx, spec, leaf)
    if changes:
        issuance, notes = ctx.issuance(spec)
        revoke: tuple[Revocation, ...] = old_generation
        if generation_changed:
            revoke = tuple(
                Revocation(e.serial, ctx.start, RevocationReason.SUPERSEDED)
                for e in entries
                if _live(e, ctx.now)
            )
            supersede = tuple(s for s in supersede if s not in {r.serial for r in revoke})
        return Action(
            kind=ActionKind.REISSUE,
            subject=ref,
            reasons=(*changes, *notes),
            serial=serial,
            issue=issuance,
            supersede=supersede,
            revoke=revoke,
        )

    window = ctx.window(spec.renew_before, current.not_before, current.not_after)
    renew_from = current.not_after - window
    if ctx.now < renew_from:
        # the common case of a no-op: certificates issued together share their reason text
        reasons = ctx.reasons.get((current.not_after, renew_from))
        if reasons is None:
            reasons = ctx.reasons[(current.not_after, renew_from)] = (
                f"valid until {_day(current.not_after)}; renews from {_day(renew_from)}",
            )
        return Action(
            kind=ActionKind.REVOKE if old_generation else _NOOP,
            subject=ref,
            serial=serial,
            reasons=(*reasons, *old_reason) if old_reason else reasons,
            revoke=old_generation,
        )
    if ctx.now >= current.not_after:
        why = f"expired on {format_time(current.not_after)}"
    else:
        share = "" if spec.renew_before.duration else f" ({spec.renew_before.describe()})"
        why = (
            f"expires {_day(current.not_after)}, inside the {describe_duration(window)} "
            f"renewal window{share}"
        )
    issuance, notes = ctx.issuance(spec)
    if issuance.not_after <= current.not_after:
        return Action(
            kind=ActionKind.REVOKE if old_generation else _NOOP,
            subject=ref,
            serial=serial,
            reasons=(
                why,
                "not renewed: a new certificate would not outlive this one, "
                "because the CA expires first; replace the CA",
                *old_reason,
            ),
            revoke=old_generation,
        )
    return Action(
        kind=ActionKind.RENEW,
        subject=ref,
        serial=serial,
        issue=issuance,
        supersede=supersede,
        revoke=old_generation,
        reasons=(why, *old_reason, *notes),
    )


def _plan_removal(ctx: _Context, ref: str, leaf: ObservedLeaf | None) -> Action:
    live = [entry for entry in ctx.entries.get(ref, []) if _live(entry, ctx.now)]
    revoke = [
        Revocation(e.serial, ctx.start, RevocationReason.CESSATION_OF_OPERATION) for e in live
    ]
    serials = {e.serial for e in live}
    current = leaf.cert if leaf is not None else None
    adopt = _adoptable(ctx, leaf)
    for entry in adopt:
        if entry.not_after > ctx.now and entry.serial not in serials:
            revoke.append(
                Revocation(entry.serial, ctx.start, RevocationReason.CESSATION_OF_OPERATION)
            )
    reasons = ["no longer in users.yaml"]
    if revoke:
        listed = ", ".join(_short(r.serial) for r in revoke)
        reasons.append(f"revoke serial{'s' if len(revoke) > 1 else ''} {listed}")
    if leaf is not None:
        reasons.append("delete its key and certificate")
    return Action(
        kind=ActionKind.REVOKE,
        subject=ref,
        reasons=tuple(reasons),
        serial=current.serial if current else None,
        revoke=tuple(revoke),
        remove_files=leaf is not None,
        adopt=adopt,
    )


def _unrecorded(ctx: _Context, cert: CertFacts | None) -> bool:
    """A certificate of the current CA that the ledger does not know: an interrupted apply
    wrote it. It is recorded (adopted) so that it can be superseded or revoked like any other."""
    return (
        cert is not None
        and cert.signed_by_ca
        and not ctx.new_ca
        and not cert.is_ca
        and cert.serial not in ctx.by_serial
    )


def _adopted_entry(cert: CertFacts, kind: CertKind, name: str, key_sha256: str) -> LedgerEntry:
    return LedgerEntry(
        serial=cert.serial,
        kind=kind,
        name=name,
        not_before=cert.not_before,
        not_after=cert.not_after,
        key=cert.key,
        spec="unknown",
        generation=0,
        fingerprint=cert.fingerprint,
        key_sha256=key_sha256,
        subject=cert.subject,
        dns=cert.dns,
        ips=cert.ips,
    )


def _adoptable(ctx: _Context, leaf: ObservedLeaf | None) -> tuple[LedgerEntry, ...]:
    if leaf is None or not _unrecorded(ctx, leaf.cert):
        return ()
    assert leaf.cert is not None
    return (_adopted_entry(leaf.cert, leaf.kind, leaf.name, leaf.key.sha256 or ""),)


# --------------------------------------------------------------------------- repairs


def _plan_temp_files(ctx: _Context) -> Action | None:
    temps = ctx.observed.temp_files
    if not temps:
        return None
    reasons = [
        f"{len(temps)} temporary file{'s' if len(temps) > 1 else ''} left by an interrupted "
        "write: remove them"
    ]
    adopt = []
    for temp in temps:
        if temp.kind is not None and temp.name is not None and _unrecorded(ctx, temp.cert):
            assert temp.cert is not None
            entry = _adopted_entry(temp.cert, temp.kind, temp.name, "")
            adopt.append(dataclasses.replace(entry, status=CertStatus.SUPERSEDED))
            reasons.append(f"{temp.path} holds serial {_short(temp.cert.serial)}: record it")
    return Action(
        kind=ActionKind.REPAIR,
        subject="temporary files",
        reasons=tuple(reasons),
        adopt=tuple(adopt),
        remove_paths=tuple(temp.path for temp in temps),
    )


def _plan_modes(ctx: _Context) -> Action | None:
    wrong = [
        (path, mode, expected_mode(path))
        for path, mode in ctx.observed.modes
        if mode != expected_mode(path)
    ]
    if not wrong:
        return None
    shown = [f"{path} is {mode:04o}, should be {want:04o}" for path, mode, want in wrong[:5]]
    if len(wrong) > 5:
        shown.append(f"and {len(wrong) - 5} more")
    return Action(
        kind=ActionKind.REPAIR,
        subject="file modes",
        reasons=(f"{len(wrong)} file modes to restore (git keeps no modes)", *shown),
        chmod=tuple((path, want) for path, _, want in wrong),
    )


# --------------------------------------------------------------------------- CRL


def _plan_crl(ctx: _Context, actions: Sequence[Action]) -> Action:
    crl, spec = ctx.observed.crl, ctx.desired.crl
    revoked = {
        e.serial: Revocation(
            e.serial, e.revoked_at or ctx.start, e.reason or RevocationReason.CESSATION_OF_OPERATION
        )
        for e in ctx.observed.ledger.entries
        if e.status is _REVOKED and e.not_after > ctx.now
    }
    for action in actions:
        revoked.update((r.serial, r) for r in action.revoke)
    reasons: list[str] = []
    if ctx.new_ca:
        reasons.append(
            "new CA: sign its first CRL"
            if crl.problem == "missing"
            else "new CA: re-sign the CRL with it"
        )
    elif crl.problem is not None:
        reasons.append(f"CRL {crl.problem}")
    else:
        assert crl.next_update is not None
        if crl.next_update <= ctx.now:
            reasons.append(
                f"CRL passed its next update on {format_time(crl.next_update)}: "
                "PostgreSQL refuses every client certificate until it is refreshed"
            )
        elif crl.next_update - ctx.now <= spec.refresh_before:
            reasons.append(
                f"CRL next update {_day(crl.next_update)} is within the "
                f"{describe_duration(spec.refresh_before)} refresh window"
            )
        missing = sorted(set(revoked) - crl.serials)
        if missing:
            reasons.append(
                f"CRL does not list revoked serial{'s' if len(missing) > 1 else ''} "
                f"{', '.join(_short(s) for s in missing)}"
            )
    if not reasons:
        assert crl.next_update is not None
        return Action(
            kind=ActionKind.NOOP,
            subject="crl",
            reasons=(
                f"number {crl.number}, {len(crl.serials)} revoked, next update "
                f"{_day(crl.next_update)}",
            ),
        )
    number = max(ctx.observed.ledger.crl_number, crl.number or 0) + 1
    return Action(
        kind=ActionKind.CRL,
        subject="crl",
        reasons=tuple(reasons),
        crl=CRLIssuance(
            number=number,
            this_update=ctx.start - BACKDATE,
            next_update=ctx.start + spec.validity,
            revoked=tuple(sorted(revoked.values(), key=lambda r: r.serial)),
        ),
    )


# --------------------------------------------------------------------------- plan


def _removed_refs(ctx: _Context, specs: Mapping[str, LeafSpec], leaves: Iterable[str]) -> set[str]:
    """Names users.yaml no longer lists that still have files or a live certificate."""
    removed = {ref for ref in leaves if ref not in specs}
    for ref in ctx.entries.keys() - specs.keys():
        if any(_live(entry, ctx.now) for entry in ctx.entries[ref]):
            removed.add(ref)
    return removed


def plan(desired: Desired, observed: Observed, *, now: datetime) -> Plan:
    """One action per name in desired or observed (no-ops included), plus the CA and the CRL."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime, such as datetime.now(timezone.utc)")
    ctx = _Context(desired, observed, now)
    blockers: list[str] = []
    ledger_problem = observed.ledger.problem
    if ledger_problem == "missing" and observed.ca.cert_problem != "missing":
        blockers.append(
            "ledger.jsonl is missing but a CA exists: restore it from git (git checkout -- "
            "ledger.jsonl); without it no certificate issued so far could be revoked"
        )
    elif ledger_problem is not None and ledger_problem != "missing":
        blockers.append(
            f"ledger.jsonl is {ledger_problem}: restore it from git "
            "(git checkout -- ledger.jsonl); it is the record of every serial"
        )
    actions = [_plan_ca(ctx, blockers)]
    leaves = {leaf.ref: leaf for leaf in observed.leaves}
    specs = desired.by_ref()
    # "client/…" sorts before "server/…", and names within a kind in order: plain string order
    for ref in sorted([*specs, *_removed_refs(ctx, specs, leaves)]):
        spec = specs.get(ref)
        actions.append(
            _plan_leaf(ctx, ref, spec, leaves.get(ref))
            if spec is not None
            else _plan_removal(ctx, ref, leaves.get(ref))
        )
    actions.append(_plan_crl(ctx, actions))
    temp_files = _plan_temp_files(ctx)
    if temp_files is not None:
        actions.append(temp_files)
    # git keeps no file modes, so every fresh clone has 0644 keys: restoring modes is
    # housekeeping that every apply does, not a change that would show on every plan
    modes = _plan_modes(ctx)
    housekeeping = (modes,) if modes is not None else ()
    for path in observed.plaintext_keys:
        what = (
            "delete it from the file"
            if path == "users.yaml"
            else ("move it out of the state directory (everything there is committed)")
        )
        blockers.append(
            f"{path} holds an unencrypted private key: {what}; if it was ever committed or "
            "pushed, treat that key as leaked (SECURITY.md says how to recover)"
        )
    return Plan(
        now=now, actions=tuple(actions), blockers=tuple(blockers), housekeeping=housekeeping
    )
