"""Decide what to do. plan() is pure: no I/O, no clock, no randomness.

Every decision lives here: what to issue, renew, re-issue and revoke, when the CRL is signed,
what blocks an apply, which passphrases it needs, and how status shows each certificate.
Checks run in a fixed order, cheapest and most decisive first (unreadable → missing → unusable
→ key → issuer and ledger → spec → time window), and every reason that applies is kept, in words.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from reconciler import layout, pki
from reconciler.model import (
    DEFAULT_RENEW_BEFORE,
    Accept,
    Action,
    CertFacts,
    CertStatus,
    CreateCa,
    Desired,
    Found,
    Held,
    Issuance,
    Issue,
    KeyFacts,
    LeafRef,
    LeafSpec,
    LedgerEntry,
    NewCertificate,
    Noop,
    Observed,
    ObservedCA,
    ObservedCRL,
    ObservedLeaf,
    Plan,
    Reissue,
    Renew,
    Repair,
    Request,
    RequestFacts,
    RetireCa,
    RetireGeneration,
    Revocation,
    RevocationReason,
    Revoke,
    SignCrl,
    Standing,
    Subject,
    TrustChange,
    Waiting,
    crl_name,
    describe_duration,
    format_serial,
    format_time,
)

BACKDATE = timedelta(minutes=5)
"""not_before and a CRL's thisUpdate lie this far before now, so a PostgreSQL server whose clock
is a little behind accepts a fresh certificate and CRL (a CRL not yet valid locks out all)."""

DOCS_CA = "docs/state.md#the-ca"
"""Where the docs say what to do about the CA (its expiry, its replacement)."""

REPLACE_CA = f"raise ca.generation by one to replace it without an outage ({DOCS_CA})"


def _dn(subject: Subject) -> str:
    return ", ".join(f"{attr}={value}" for attr, value in subject)


def _day(moment: datetime) -> str:
    return moment.date().isoformat()


def _short(serial: int) -> str:
    return format_serial(serial)[:12]


def _serials(serials: Iterable[int]) -> str:
    listed = [_short(serial) for serial in serials]
    return f"serial{'s' if len(listed) > 1 else ''} {', '.join(listed)}"


def _live(entry: LedgerEntry, now: datetime) -> bool:
    """Not revoked and not yet expired: a certificate of ours someone could still use (one
    from an external CA is not ours to revoke)."""
    return entry.status is not CertStatus.REVOKED and entry.not_after > now and not entry.issuer


def _unreadable(path: str, detail: str) -> str:
    return (
        f"{path} cannot be read ({detail}); every file under the state directory must be a "
        "regular file or directory that this user can read, and apply never follows a link: "
        f"replace it with the real file (git checkout -- {path}) or remove it"
    )


class _Context:
    """What every decision needs to know, computed once per plan."""

    def __init__(self, desired: Desired, observed: Observed, now: datetime) -> None:
        self.desired = desired
        self.observed = observed
        self.now = now
        self.start = now.replace(microsecond=0)
        self.entries: dict[LeafRef, list[LedgerEntry]] = defaultdict(list)
        for entry in observed.ledger.entries:
            self.entries[entry.ref].append(entry)
        self.by_serial = {entry.serial: entry for entry in observed.ledger.entries}
        self.specs = {spec.ref: spec for spec in desired.leaves}
        self.blockers: list[str] = []
        self.new_ca = False  # the only CA is new: every certificate is issued again
        ca = observed.ca
        self.issuing = ca.generation  # the CA generation that signs new certificates
        self.trusted = [ca.generation]  # CA generations in every bundle after this apply
        self.reissue_from: int | None = None  # a rotation's stage 2 and 3: leave this CA
        self.rotation: str | None = None
        self.ca_not_after: datetime | None = ca.cert.not_after if ca.cert is not None else None

    def block(self, problem: str) -> None:
        if problem not in self.blockers:
            self.blockers.append(problem)

    def blocked(self, name: str, problem: str) -> Noop:
        """Block on problem; name's action, which waits until it is solved."""
        self.block(problem)
        return Noop(name, ("blocked: see below",))

    def issuance(self, spec: LeafSpec) -> tuple[Issuance, tuple[str, ...]]:
        """What to issue for spec now, and a note when the CA's expiry shortens it."""
        not_after = self.start + spec.validity
        notes: tuple[str, ...] = ()
        if self.ca_not_after is not None and not_after > self.ca_not_after:
            not_after = self.ca_not_after
            notes = (f"shortened to end with the CA on {_day(not_after)}",)
        return Issuance(spec, self.start - BACKDATE, not_after, self.issuing), notes

    def revocation(self, serial: int, reason: RevocationReason) -> Revocation:
        return Revocation(serial, self.start, reason)


# --------------------------------------------------------------------------- CA


def _unfinished_first_apply(observed: Observed) -> bool:
    """A first apply writes the CA, then at once an empty ledger, before it signs anything: a
    CA with no ledger, no CRL and no certificate (not even in a temporary file: one of the
    ledger's own is no certificate) was interrupted there, and is finished."""
    return (
        observed.ledger.found is Found.MISSING
        and observed.crl.found is Found.MISSING
        and not observed.leaves
        and all(temp.ref is None for temp in observed.temp_files)
    )


def _create_ca(ctx: _Context, why: str, *, rotation: bool = False) -> CreateCa:
    spec = ctx.desired.ca
    not_after = ctx.start + spec.validity
    if not rotation:
        ctx.new_ca = True
        ctx.ca_not_after = not_after
        ctx.issuing = spec.generation
        ctx.trusted = [spec.generation]
    subject = _dn(spec.subject_of(spec.generation))
    return CreateCa(
        spec=spec,
        not_before=ctx.start - BACKDATE,
        not_after=not_after,
        reasons=(f"{why} ({subject}; {spec.key}; valid until {_day(not_after)})",),
        rotation=rotation,
    )


def _plan_ca(ctx: _Context) -> Action:
    ca, spec, ledger = ctx.observed.ca, ctx.desired.ca, ctx.observed.ledger
    cert_path, key_path = layout.ca_cert(ca.generation), layout.ca_key(ca.generation)
    for path, facts in ((cert_path, ca), (key_path, ca.key)):
        if facts.found is Found.UNREADABLE:
            return ctx.blocked("ca", _unreadable(path, facts.detail))
    # A first apply writes ca.key, ca.crt, the certificates, the ledger, then the CRL: with no
    # ledger and no CRL, half a CA can only be an interrupted first apply, and nothing it signed
    # was recorded or handed out.
    first_run = ledger.found is Found.MISSING and ctx.observed.crl.found is Found.MISSING
    cert_missing, key_missing = ca.found is Found.MISSING, ca.key.found is Found.MISSING
    if first_run and cert_missing != key_missing:
        kept, lost = (key_path, cert_path) if cert_missing else (cert_path, key_path)
        return _create_ca(
            ctx, f"an interrupted first apply left {kept} without {lost}: create the CA"
        )
    if cert_missing:
        live = [entry for entry in ledger.entries if _live(entry, ctx.now)]
        if key_missing and not live:
            return _create_ca(ctx, "no CA yet: create one")
        if not key_missing:
            return ctx.blocked(
                "ca",
                f"{key_path} exists but {cert_path} does not: restore {cert_path} from git "
                f"(git checkout -- {cert_path}), or move ca.key away to start a new CA",
            )
        return ctx.blocked(
            "ca",
            f"{cert_path} is missing but the ledger holds {len(live)} certificates "
            f"that are still valid: restore {layout.ca_dir(ca.generation)}/ in the state "
            "directory from git; a new CA could not revoke them",
        )
    if ca.cert is None or ca.found is not Found.OK:
        return ctx.blocked(
            "ca",
            f"{cert_path} is unusable ({ca.detail}): restore it from git; the tool never "
            "replaces a CA on its own, since that would orphan every certificate",
        )
    previous = ctx.observed.previous
    if (
        previous is not None
        and previous.cert is not None
        and ledger.ca_fingerprint == previous.cert.fingerprint
        and ledger.previous_fingerprint is None
        and ctx.observed.crl.found is Found.MISSING
    ):
        # the ledger was never signed by this CA, and it signed no CRL: the apply that began
        # the rotation stopped right after writing it, and nothing depends on it yet
        ctx.issuing, ctx.trusted = previous.generation, [ca.generation, previous.generation]
        return _create_ca(
            ctx,
            f"an interrupted apply began the rotation: create the generation {ca.generation} "
            "CA again",
            rotation=True,
        )
    pinned = _check_ca_files(ctx, ca, ledger.ca_fingerprint, ledger.ca_key_sha256)
    if pinned and ledger.signature_ok is False:
        ctx.block(
            "ledger.jsonl was changed outside the reconciler (its CA signature does not "
            "verify): restore it from git (git log -p -- ledger.jsonl shows the edit); only "
            "apply writes the ledger"
        )
    reasons = [f"valid until {_day(ca.cert.not_after)}"]
    if _unfinished_first_apply(ctx.observed):
        reasons.append("an interrupted first apply left no ledger: this apply finishes it")
    if ca.cert.not_after <= ctx.now:
        ctx.block(
            f"the CA expired on {format_time(ca.cert.not_after)}: no certificate it signs is "
            f"accepted; {REPLACE_CA}"
        )
    if ca.cert.subject != spec.subject_of(ca.generation):
        reasons.append(
            f"users.yaml asks for CA subject {_dn(spec.subject_of(ca.generation))} but the CA "
            f"has {_dn(ca.cert.subject)}; {REPLACE_CA}"
        )
    if ca.cert.key != spec.key:
        reasons.append(
            f"users.yaml asks for a {spec.key} CA key but the CA has {ca.cert.key}; {REPLACE_CA}"
        )
    return Noop("ca", tuple(reasons), ca.cert.serial)


def _check_ca_files(ctx: _Context, ca: ObservedCA, pin: str | None, key_pin: str | None) -> bool:
    """Block unless ca's files are usable and are the ones the ledger pins; False when they
    are not the pinned ones."""
    assert ca.cert is not None
    cert_path, key_path = layout.ca_cert(ca.generation), layout.ca_key(ca.generation)
    if ca.key.found is Found.PLAINTEXT:
        ctx.block(
            f"{key_path} is not encrypted: encrypt it (openssl pkcs8 -topk8 -v2 aes-256-cbc) "
            "and rotate the CA passphrase"
        )
    elif ca.key.found is not Found.OK:
        ctx.block(f"{key_path} is {ca.key.found} ({ca.key.detail}): restore it from git")
    pinned = False
    if pin is not None and pin != ca.cert.fingerprint:
        ctx.block(
            f"{cert_path} is not the CA this state was issued under (the ledger names "
            f"{pin[:16]}…, ca.crt is {ca.cert.fingerprint[:16]}…): restore "
            f"{layout.ca_dir(ca.generation)}/ from git (git log -- ca/ shows who changed it); "
            "a CA is never replaced automatically, since every certificate and the CRL hang on it"
        )
    elif key_pin not in (None, ca.key.sha256) and ca.key.sha256 is not None:
        ctx.block(
            f"{key_path} is not the key file this state was issued with: restore it from git "
            f"(git checkout -- {key_path}); if you re-encrypted it on purpose, restore the old "
            "file, since the reconciler cannot tell that from a replaced key"
        )
    else:
        pinned = True
    if ca.cert.not_before > ctx.now:
        ctx.block(
            f"the CA is not valid before {format_time(ca.cert.not_before)} (the clock went "
            "back, or the first apply ran with a later --now): no certificate it signs is "
            f"accepted until then; set the clock right ({DOCS_CA})"
        )
    return pinned


def rotation_stage(desired: Desired, observed: Observed, now: datetime) -> tuple[int, datetime]:
    """The stage (1, 2 or 3) of the CA rotation underway, and when the next stage begins (for
    stage 3, when it began). Stages are paced by ca.overlap from the day the newer CA was made,
    so ordinary applies move them on and no one has to remember a step."""
    assert observed.ca.cert is not None
    started = observed.ca.cert.not_before + BACKDATE
    stage_2, stage_3 = started + desired.ca.overlap, started + 2 * desired.ca.overlap
    if now < stage_2:
        return 1, stage_2
    return (2, stage_3) if now < stage_3 else (3, stage_3)


def _describe_rotation(stage: int, when: datetime, old: int, new: int) -> str:
    return (
        f"CA rotation from generation {old} to {new}, stage {stage} of 3: "
        + {
            1: f"both CAs are trusted, and generation {old} still issues; from {_day(when)} every "
            f"certificate is re-issued under generation {new}",
            2: f"generation {new} issues, and every certificate is re-issued under it; both CAs "
            f"stay trusted until {_day(when)}",
            3: f"generation {old} left the bundles on {_day(when)}",
        }[stage]
    )


def _plan_rotation(ctx: _Context) -> list[Action]:
    """Raising ca.generation by one replaces the CA in three stages (DESIGN.md, "Replacing the
    CA without an outage"): (1) a new CA, both trusted, the old one still issuing; (2) after
    ca.overlap, every certificate re-issued under the new one; (3) after another overlap, the
    old CA leaves the bundles."""
    spec, ledger = ctx.desired.ca, ctx.observed.ledger
    ca, previous = ctx.observed.ca, ctx.observed.previous
    if ca.cert is None or ctx.new_ca or ctx.blockers:
        return []
    wanted, current = spec.generation, ca.generation
    if previous is None:
        if wanted == current:
            return []
        if wanted != current + 1:
            ctx.block(
                f"ca.generation is {wanted} but the CA is generation {current}: "
                + (
                    f"raise it by one at a time ({current + 1}), and only once a rotation ends"
                    if wanted > current
                    else f"a generation is never lowered; set it back to {current}"
                )
            )
            return []
        ctx.trusted = [wanted, current]
        ctx.rotation = _describe_rotation(1, ctx.start + spec.overlap, current, wanted)
        return [
            _create_ca(
                ctx,
                f"ca.generation raised to {wanted}: create the new CA, trusted from now on "
                f"beside generation {current}, which issues until {_day(ctx.start + spec.overlap)}",
                rotation=True,
            )
        ]
    if previous.cert is None or previous.found is not Found.OK:
        ctx.block(
            f"{layout.ca_cert(previous.generation)} is unusable "
            f"({previous.detail or previous.found}) while a CA rotation is underway: restore it "
            "from git"
        )
        return []
    if wanted != current:
        ctx.block(
            f"ca.generation is {wanted}, but a rotation from generation {previous.generation} "
            f"to {current} is underway: set it back to {current} until that rotation ends"
        )
        return []
    stage, when = rotation_stage(ctx.desired, ctx.observed, ctx.now)
    ctx.rotation = _describe_rotation(stage, when, previous.generation, current)
    if ledger.previous_fingerprint is None and ledger.ca_fingerprint == ca.cert.fingerprint:
        if stage < 3:
            ctx.block(
                f"the ledger does not pin {layout.ca_cert(previous.generation)}: restore "
                "ledger.jsonl and ca/ from git"
            )
            return []
        # an apply retired the old CA in the ledger, and stopped before removing its files
    else:
        _check_ca_files(ctx, previous, ledger.previous_fingerprint, ledger.previous_key_sha256)
    if stage == 1:
        ctx.issuing, ctx.trusted = previous.generation, [current, previous.generation]
        ctx.ca_not_after = previous.cert.not_after
        return []
    ctx.reissue_from = previous.generation
    if stage == 2:
        ctx.trusted = [current, previous.generation]
        return []
    return [
        RetireCa(
            previous.generation,
            (
                f"stage 3 of the rotation: generation {previous.generation} leaves every bundle; "
                f"its files stay in git's history",
            ),
        )
    ]


# --------------------------------------------------------------------------- leaves


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


def _entry_for(cert: CertFacts, ref: LeafRef, key_sha256: str, status: CertStatus) -> LedgerEntry:
    """What the ledger records of cert as ref's from the certificate alone (an adopted one's
    spec is unknown, its generation 0)."""
    return LedgerEntry(
        serial=cert.serial,
        kind=ref.kind,
        name=ref.name,
        not_before=cert.not_before,
        not_after=cert.not_after,
        key=cert.key,
        spec="unknown",
        generation=0,
        fingerprint=cert.fingerprint,
        key_sha256=key_sha256,
        status=status,
        subject=cert.subject,
        dns=cert.dns,
        ips=cert.ips,
        ca_generation=cert.issuer or 1,
    )


def _adoptable(ctx: _Context, leaf: ObservedLeaf | None) -> tuple[LedgerEntry, ...]:
    if leaf is None or leaf.cert is None or not _unrecorded(ctx, leaf.cert):
        return ()
    return (_entry_for(leaf.cert, leaf.ref, leaf.key.sha256 or "", CertStatus.VALID),)


def _cannot_keep(ctx: _Context, leaf: ObservedLeaf | None) -> list[str]:
    """Reasons the certificate on disk cannot be kept at all, in the order of the checks."""
    if leaf is None or leaf.found is Found.MISSING:
        return ["no certificate yet"]
    if leaf.cert is None:
        return [f"certificate file {leaf.found}: {leaf.detail}"]
    cert, reasons = leaf.cert, []
    if leaf.key.found is Found.MISSING:
        reasons.append("private key missing")
    elif leaf.key.found is Found.PLAINTEXT:
        reasons.append("private key stored unencrypted")
    elif leaf.key.found is not Found.OK:
        reasons.append(f"private key file {leaf.key.found}: {leaf.key.detail}")
    entry = ctx.by_serial.get(cert.serial)
    external = entry is not None and entry.issuer is not None and cert.issuer is None
    if (ctx.new_ca or not cert.signed_by_ca) and not external:
        reasons.append("not signed by the current CA")
    if cert.not_before > ctx.now:
        reasons.append(
            f"not valid before {format_time(cert.not_before)} (the clock went back, or an "
            "apply ran with a later --now)"
        )
    if entry is None:
        reasons.append(f"serial {_short(cert.serial)} is not in the ledger")
    elif entry.fingerprint != cert.fingerprint:
        reasons.append(
            f"certificate differs from the ledger's record of serial {_short(cert.serial)}"
        )
    elif (entry.kind, entry.name) != leaf.ref:
        reasons.append(f"serial {_short(cert.serial)} was issued to {entry.ref}")
    else:
        if leaf.key.found is Found.OK and entry.key_sha256 != leaf.key.sha256:
            reasons.append(
                f"private key file is not the one issued with serial {_short(cert.serial)}"
            )
        if entry.status is not CertStatus.VALID:
            reasons.append(f"serial {_short(cert.serial)} is {entry.status}")
    return reasons


def _spec_changes(
    spec: LeafSpec, cert: CertFacts | RequestFacts, generation: int, *, subject: bool = True
) -> list[str]:
    """Reasons to re-issue (or request again): what the certificate or CSR says is not what
    users.yaml asks. subject False: only its CN counts (an external CA may set the rest)."""
    reasons = []
    if not subject and dict(cert.subject).get("CN") != spec.name:
        reasons.append(f"CN is {dict(cert.subject).get('CN')}, users.yaml asks for {spec.name}")
    if subject and cert.subject != spec.subject:
        reasons.append(f"subject changed: {_dn(cert.subject)} → {_dn(spec.subject)}")
    if cert.key != spec.key:
        reasons.append(f"key type changed: {cert.key} → {spec.key}")
    if cert.dns != spec.dns and {d.lower() for d in cert.dns} != set(spec.dns):
        reasons.append(
            f"DNS names changed: {', '.join(cert.dns) or 'none'} → {', '.join(spec.dns) or 'none'}"
        )
    if cert.ips != spec.ips and set(cert.ips) != set(spec.ips):
        reasons.append(
            f"IP addresses changed: {', '.join(cert.ips) or 'none'} → "
            f"{', '.join(spec.ips) or 'none'}"
        )
    if generation != spec.generation:
        reasons.append(
            f"generation changed from {generation} to {spec.generation}: new key"
            + ("" if spec.external else ", and the old certificate is revoked")
        )
    return reasons


def _renewal(spec: LeafSpec, cert: CertFacts, now: datetime) -> tuple[bool, str]:
    """Whether cert is due for renewal at now (inside its renewal window, or expired), and
    its standing in words: when it renews, or why it is due."""
    window = spec.renew_before.window(cert.not_after - cert.not_before)
    renew_from = cert.not_after - window
    if now < renew_from:
        return False, f"valid until {_day(cert.not_after)}; renews from {_day(renew_from)}"
    if now >= cert.not_after:
        return True, f"expired on {format_time(cert.not_after)}"
    share = "" if spec.renew_before.duration else f" ({spec.renew_before.describe()})"
    return True, (
        f"expires {_day(cert.not_after)}, inside the {describe_duration(window)} "
        f"renewal window{share}"
    )


def _plan_leaf(ctx: _Context, ref: LeafRef, spec: LeafSpec, leaf: ObservedLeaf | None) -> Action:
    entries = ctx.entries.get(ref, [])
    current = leaf.cert if leaf is not None else None
    serial = current.serial if current is not None else None

    # Every still-valid certificate of another generation is revoked, whatever else happens:
    # a generation bump is a promise that the old keys stop working, and it must survive an
    # apply that was interrupted after the new certificate reached the disk.
    old: list[Revocation] = []
    valid: list[int] = []
    for e in entries:
        if e.generation not in (0, spec.generation) and _live(e, ctx.now):
            old.append(ctx.revocation(e.serial, RevocationReason.SUPERSEDED))
        elif e.status is CertStatus.VALID:
            valid.append(e.serial)
    old_generation, supersede = tuple(old), tuple(valid)
    old_reason: tuple[str, ...] = ()
    if old_generation:
        serials = _serials(r.serial for r in old_generation)
        old_reason = (f"generation is {spec.generation}: revoke the older generation's {serials}",)

    issuance, notes = ctx.issuance(spec)  # whichever action issues, this is what it issues
    problems = _cannot_keep(ctx, leaf)
    if problems:
        adopt = _adoptable(ctx, leaf)
        return Issue(
            leaf=ref,
            issuance=issuance,
            reasons=(*problems, *old_reason, *notes),
            replaces=serial,
            supersede=(*supersede, *(entry.serial for entry in adopt)),
            revoke=old_generation,
            adopt=adopt,
        )
    assert current is not None
    entry = ctx.by_serial[current.serial]
    changes = _spec_changes(spec, current, entry.generation)
    if entry.issuer is not None:
        changes.append("issuer changed from external to ca: issue one of our own")
    elif ctx.reissue_from is not None and current.issuer == ctx.reissue_from:
        changes.append(f"CA rotation: re-issue under the generation {ctx.issuing} CA")
    if changes:
        revoke = old_generation
        if entry.generation != spec.generation:  # the bump revokes every live certificate
            revoke = tuple(
                ctx.revocation(e.serial, RevocationReason.SUPERSEDED)
                for e in entries
                if _live(e, ctx.now)
            )
            supersede = tuple(s for s in supersede if s not in {r.serial for r in revoke})
        return Reissue(
            leaf=ref,
            issuance=issuance,
            reasons=(*changes, *notes),
            replaces=serial,
            supersede=supersede,
            revoke=revoke,
        )

    due, standing = _renewal(spec, current, ctx.now)
    reasons: tuple[str, ...] = (standing,)
    if due:
        if issuance.not_after > current.not_after:
            return Renew(
                leaf=ref,
                issuance=issuance,
                reasons=(standing, *old_reason, *notes),
                replaces=serial,
                supersede=supersede,
                revoke=old_generation,
            )
        reasons = (
            standing,
            "not renewed: a new certificate would not outlive this one, because the CA "
            f"expires first; replace the CA ({DOCS_CA})",
        )
    if old_generation:
        return RetireGeneration(ref, old_generation, (*reasons, *old_reason), serial)
    return Noop(str(ref), reasons, serial)


def _plan_removal(ctx: _Context, ref: LeafRef, leaf: ObservedLeaf | None) -> Action:
    adopt = _adoptable(ctx, leaf)
    live = [e for e in (*ctx.entries.get(ref, ()), *adopt) if _live(e, ctx.now)]
    revoke = tuple(ctx.revocation(e.serial, RevocationReason.CESSATION_OF_OPERATION) for e in live)
    reasons = ["no longer in users.yaml"]
    if revoke:
        reasons.append(f"revoke {_serials(r.serial for r in revoke)}")
    if leaf is not None:
        reasons.append("delete its key and certificate")
    if any(e.issuer and e.not_after > ctx.now for e in ctx.entries.get(ref, ())):
        reasons.append("its certificate from another CA is still valid: ask that CA to revoke it")
    current = leaf.cert if leaf is not None else None
    return Revoke(
        leaf=ref,
        revoke=revoke,
        remove_files=leaf is not None,
        reasons=tuple(reasons),
        replaces=current.serial if current is not None else None,
        adopt=adopt,
    )


# --------------------------------------------------------------------------- external issuer


def _describe_chain(ctx: _Context, spec: LeafSpec, leaf: ObservedLeaf) -> tuple[str, str | None]:
    """What a reviewer checks of a chain file from another CA (subject, issuer chain, SHA-256,
    notAfter), and why it does not verify to a trust root at now (None: it does)."""
    assert leaf.cert is not None
    roots = [root.pem for root in ctx.desired.trust]
    issuers, error = pki.verify_server_chain(leaf.chain, roots, spec.name, ctx.now)
    chain = " ← ".join(_dn(subject) for subject in issuers)
    return (
        f"{_dn(leaf.cert.subject)}, issued by {chain}; SHA-256 {leaf.cert.fingerprint}; "
        f"not after {format_time(leaf.cert.not_after)}"
    ), error


def _refusals(
    ctx: _Context, spec: LeafSpec, cert: CertFacts, request: RequestFacts, error: str | None
) -> list[str]:
    """Why a committed certificate cannot be accepted for the pending request, in the order
    of the checks: key, names, time, usage, serial, chain."""
    reasons = []
    if cert.public_key != request.public_key:
        reasons.append(f"its key is not the pending key ({layout.pending_key(spec.ref)})")
    if dict(cert.subject).get("CN") != spec.name:
        reasons.append(f"its CN is not {spec.name}")
    wanted, named = {*spec.dns, *spec.ips}, {*(dns.lower() for dns in cert.dns), *cert.ips}
    if wanted - named:
        reasons.append(f"it lacks the SAN {', '.join(sorted(wanted - named))}")
    if named - wanted:
        reasons.append(f"it names {', '.join(sorted(named - wanted))}, which users.yaml does not")
    if cert.not_before > ctx.now:
        reasons.append(f"not valid before {format_time(cert.not_before)}")
    if cert.not_after <= ctx.now:
        reasons.append(f"expired on {format_time(cert.not_after)}")
    if not cert.server_auth:
        reasons.append("it lacks EKU serverAuth")
    if cert.serial in ctx.by_serial:
        reasons.append(f"serial {_short(cert.serial)} is in the ledger already")
    if error is not None:
        reasons.append(f"its chain does not verify to a trust root: {error}")
    return reasons


def _plan_external(ctx: _Context, spec: LeafSpec, leaf: ObservedLeaf | None) -> Action:
    """A server another CA signs (DESIGN.md, "Server certificates signed by another CA"): a
    key and CSR out, the signed chain in, checked before it is accepted. The certificate in
    place serves until a replacement is accepted; a refusal is the server's, never a blocker."""
    ref = spec.ref
    leaf = leaf or ObservedLeaf(ref, None, Found.MISSING, KeyFacts(Found.MISSING))
    cert, request = leaf.cert, leaf.request
    problems = _cannot_keep(ctx, leaf)
    entry = ctx.by_serial[cert.serial] if cert is not None and not problems else None
    if request is not None and (
        request.pending_key.found is not Found.OK
        or (entry is not None and request.pending_key.sha256 == entry.key_sha256)
    ):
        request = None  # half a request, or the one whose certificate is in place already
    stale = _spec_changes(spec, request, request.generation) if request is not None else []
    since = request.requested if request is not None else None
    waiting = (
        f"waiting for the signed certificate (requested {format_time(since) if since else '-'}):"
        f" have {layout.leaf_request(ref)} signed and commit the chain (leaf first, then "
        f"intermediates) as {layout.leaf_cert(ref)}"
    )
    if cert is not None and entry is not None:
        reasons = _spec_changes(spec, cert, entry.generation, subject=entry.issuer is None)
        if entry.issuer is None:
            reasons.append("issuer changed to external: request a certificate from that CA")
        elif cert.not_after > ctx.now and (error := _describe_chain(ctx, spec, leaf)[1]):
            reasons.append(f"its chain no longer verifies to a trust root: {error}")
        due, standing = _renewal(spec, cert, ctx.now)
        if due:
            reasons.append(standing)
        if not reasons:
            return Noop(str(ref), (standing,), cert.serial)
        serves = "the certificate in place serves until the signed one is accepted"
        if request is not None and not stale:
            return Waiting(str(ref), (*reasons, waiting, serves), cert.serial)
        return Request(ref, spec, (*reasons, *stale, f"new key and CSR; {serves}"), cert.serial)
    if request is None or stale:
        return Request(ref, spec, (*problems, *stale, "make a key and CSR for the external CA"))
    if cert is None or not leaf.chain:
        return Waiting(str(ref), (*problems[:1], waiting))
    description, error = _describe_chain(ctx, spec, leaf)
    refusals = _refusals(ctx, spec, cert, request, error)
    if refusals:
        refused = f"{layout.leaf_cert(ref)} refused: {'; '.join(refusals)} ({description})"
        return Waiting(str(ref), (refused, waiting))
    accepted = dataclasses.replace(
        _entry_for(cert, ref, request.pending_key.sha256 or "", CertStatus.VALID),
        spec=spec.spec_hash(),
        generation=spec.generation,
        ca_generation=1,  # none of ours signed it: issuer names who did
        issuer=_dn(cert.issuer_dn),
    )
    supersede = tuple(e.serial for e in ctx.entries.get(ref, ()) if e.status is CertStatus.VALID)
    return Accept(ref, accepted, (f"signed certificate: {description}",), supersede)


# --------------------------------------------------------------------------- repairs, CRL


def _plan_temp_files(ctx: _Context) -> list[Action]:
    temps = ctx.observed.temp_files
    if not temps:
        return []
    reasons = [
        f"{len(temps)} temporary file{'s' if len(temps) > 1 else ''} left by an interrupted "
        "write: remove them"
    ]
    adopt = []
    for temp in temps:
        if temp.ref is not None and temp.cert is not None and _unrecorded(ctx, temp.cert):
            adopt.append(_entry_for(temp.cert, temp.ref, "", CertStatus.SUPERSEDED))
            reasons.append(f"{temp.path} holds serial {_short(temp.cert.serial)}: record it")
    remove = tuple(temp.path for temp in temps)
    return [Repair(remove=remove, adopt=tuple(adopt), reasons=tuple(reasons))]


def _still_revoked(ctx: _Context, generation: int, crl: ObservedCRL) -> dict[int, Revocation]:
    """Every revocation the generation's next CRL must carry: the ledger's, and every one the
    CRL in place lists, until the ledger says that certificate expired (a revoked serial
    stays revoked, whatever an older ledger says)."""
    revoked = {
        r.serial: r
        for r in crl.revoked
        if r.serial not in ctx.by_serial or ctx.by_serial[r.serial].not_after > ctx.now
    }
    for e in ctx.observed.ledger.entries:
        if (
            e.status is CertStatus.REVOKED
            and e.not_after > ctx.now
            and e.ca_generation == generation
        ):
            reason = e.reason or RevocationReason.CESSATION_OF_OPERATION
            revoked[e.serial] = Revocation(e.serial, e.revoked_at or ctx.start, reason)
    return revoked


def _crl_of(observed: Observed, generation: int) -> ObservedCRL:
    """The CRL in place of a CA generation (missing for a CA this apply creates)."""
    if generation == observed.ca.generation:
        return observed.crl
    if observed.previous is not None and generation == observed.previous.generation:
        return observed.previous_crl or ObservedCRL(Found.MISSING)
    return ObservedCRL(Found.MISSING)


def _plan_crl(ctx: _Context, actions: list[Action], generation: int) -> Action:
    """The CRL of one trusted CA generation: carried on, refreshed, or signed anew."""
    spec, name, path = ctx.desired.crl, crl_name(generation), layout.crl(generation)
    crl = _crl_of(ctx.observed, generation)
    if crl.found is Found.UNREADABLE:
        return ctx.blocked(name, _unreadable(path, crl.detail))
    if crl.number is not None and ctx.observed.ledger.crl_number < crl.number:
        ctx.block(
            f"ledger.jsonl is older than {path} (it knows CRL number "
            f"{ctx.observed.ledger.crl_number}, the CRL is number {crl.number}): an older ledger "
            "was restored, which would un-revoke certificates; restore the newest ledger from "
            "git (git log -- ledger.jsonl)"
        )
    lifetime = crl.next_update - crl.this_update if crl.next_update and crl.this_update else None
    if lifetime is not None and lifetime > spec.validity + BACKDATE:
        ctx.block(
            f"{path} is valid for {lifetime / timedelta(days=1):.0f}d, longer than "
            f"crl.validity ({describe_duration(spec.validity)}) lets the reconciler sign it: "
            "it was replaced (a pull request may have swapped in a CA of its own: git log -- "
            "ca/; restore ca/ from git), or crl.validity was shortened (then remove "
            f"{path} in the same change: apply signs a new one from the ledger) ({DOCS_CA})"
        )
    revoked = _still_revoked(ctx, generation, crl)
    issuers = {entry.serial: entry.ca_generation for entry in ctx.observed.ledger.entries}
    for action in actions:
        if isinstance(action, NewCertificate | Revoke):
            issuers.update((entry.serial, entry.ca_generation) for entry in action.adopt)
    for action in actions:
        if isinstance(action, NewCertificate | Revoke | RetireGeneration):
            revoked.update((r.serial, r) for r in action.revoke if issuers[r.serial] == generation)
    reasons: list[str] = []
    if ctx.new_ca:
        reasons.append(
            "new CA: sign its first CRL"
            if crl.found is Found.MISSING
            else "new CA: re-sign the CRL with it"
        )
    elif crl.found is not Found.OK or crl.next_update is None or crl.this_update is None:
        reasons.append(f"CRL {crl.found}" + (f": {crl.detail}" if crl.detail else ""))
    else:
        if crl.this_update > ctx.now:
            reasons.append(
                f"CRL not valid before {format_time(crl.this_update)} (the clock went back, or "
                "an apply ran with a later --now): PostgreSQL refuses every client until then"
            )
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
            reasons.append(f"CRL does not list revoked {_serials(missing)}")
    if not reasons:
        assert crl.next_update is not None
        return Noop(
            name,
            (
                f"number {crl.number}, {len(crl.revoked)} revoked, next update "
                f"{_day(crl.next_update)}",
            ),
        )
    return SignCrl(
        number=max(ctx.observed.ledger.crl_number, crl.number or 0) + 1,
        this_update=ctx.start - BACKDATE,
        next_update=ctx.start + spec.validity,
        revoked=tuple(sorted(revoked.values(), key=lambda r: r.serial)),
        reasons=tuple(reasons),
        generation=generation,
    )


# --------------------------------------------------------------------------- plan


def plan(desired: Desired, observed: Observed, *, now: datetime) -> Plan:
    """One action per name in desired or observed (no-ops included), plus the CA and the CRL."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime, such as datetime.now(timezone.utc)")
    ctx = _Context(desired, observed, now)
    for path, detail in observed.unreadable:
        ctx.block(_unreadable(path, detail))
    actions: list[Action] = []
    for path, how in observed.changed_from_base:
        allowed = _allowed_from_base(ctx, path, how)
        if allowed is None:
            ctx.block(
                f"{path}: {how}, compared with {observed.base}; only users.yaml may change in a "
                "pull request (everything else is written by apply, after the merge), but for "
                "the signed certificate of a server whose CSR is pending and the trust roots "
                "(a trust file may go only with its entry in trust)"
            )
        elif isinstance(allowed, TrustChange):
            actions.append(allowed)
    ledger = observed.ledger
    if ledger.found is Found.UNREADABLE:
        ctx.block(_unreadable(layout.LEDGER, ledger.detail))
    elif (
        ledger.found is Found.MISSING
        and observed.ca.found is not Found.MISSING
        and not (_unfinished_first_apply(observed))
    ):
        ctx.block(
            "ledger.jsonl is missing but a CA exists: restore it from git (git checkout -- "
            "ledger.jsonl); without it no certificate issued so far could be revoked"
        )
    elif ledger.found is Found.UNUSABLE:
        ctx.block(
            f"ledger.jsonl is unusable ({ledger.detail}): restore it from git "
            "(git checkout -- ledger.jsonl); it is the record of every serial"
        )
    actions[:0] = [_plan_ca(ctx), *_plan_rotation(ctx)]
    leaves = {leaf.ref: leaf for leaf in observed.leaves}
    specs = ctx.specs
    removed = {ref for ref in leaves if ref not in specs} | {
        ref
        for ref, entries in ctx.entries.items()
        if ref not in specs and any(_live(entry, now) for entry in entries)
    }
    for ref in sorted([*specs, *removed]):
        spec, leaf = specs.get(ref), leaves.get(ref)
        if leaf is not None and Found.UNREADABLE in (leaf.found, leaf.key.found):
            bad = layout.leaf_cert(ref) if leaf.found is Found.UNREADABLE else layout.leaf_key(ref)
            actions.append(ctx.blocked(str(ref), _unreadable(bad, leaf.detail or leaf.key.detail)))
            continue
        if spec is None:
            action = _plan_removal(ctx, ref, leaf)
        elif spec.external:
            action = _plan_external(ctx, spec, leaf)
        else:
            action = _plan_leaf(ctx, ref, spec, leaf)
        actions.append(action)
        # request files that no Request replaces and no Waiting or Accept uses: the server is
        # gone or no longer external, or its certificate in place needs no new one
        if leaf is not None and leaf.pending and not isinstance(action, Request | Waiting | Accept):
            why = f"{', '.join(leaf.pending)}: no request is pending, remove"
            actions.append(Repair(leaf.pending, (), (why,), what=str(ref)))
    actions += [_plan_crl(ctx, actions, generation) for generation in ctx.trusted]
    actions += _plan_temp_files(ctx)
    for path in observed.plaintext_keys:
        what = (
            "delete it from the file"
            if path == layout.USERS_YAML
            else "move it out of the state directory (everything there is committed)"
        )
        ctx.block(
            f"{path} holds an unencrypted private key: {what}; if it was ever committed or "
            "pushed, treat that key as leaked (SECURITY.md says how to recover)"
        )
    changes = [action for action in actions if not isinstance(action, Noop)]
    # git keeps no file modes, so every fresh clone has 0644 keys: restoring modes is
    # housekeeping that every apply does, not a change that would show on every plan
    modes = tuple(
        (path, mode, layout.expected_mode(path))
        for path, mode in observed.modes
        if mode != layout.expected_mode(path)
    )
    return Plan(
        now=now,
        actions=tuple(actions),
        blockers=tuple(ctx.blockers),
        modes=modes,
        signs=any(
            a.adopt if isinstance(a, Repair) else not isinstance(a, Request) for a in changes
        ),
        makes_keys=any(isinstance(a, NewCertificate | Request | Accept) for a in changes),
        trusted=tuple(ctx.trusted),
        rotation=ctx.rotation,
        trust=tuple(root.path for root in desired.trust),
    )


def _allowed_from_base(ctx: _Context, path: str, how: str) -> TrustChange | bool | None:
    """What plan --base lets a pull request change besides users.yaml: the signed certificate
    of a server whose CSR is pending and unchanged, added or changed (True; its action shows
    it), and a trust root, added, changed, or deleted with its entry in trust (a TrustChange
    that shows it). None: refused."""
    if how == "deleted":
        gone = next((root for root in ctx.observed.base_trust if root.path == path), None)
        if gone is None or any(root.path == path for root in ctx.desired.trust):
            return None
        return TrustChange(
            path,
            (
                f"deleted in this pull request, with its entry in trust: every client's "
                f"root.crt will stop trusting servers certified by {_dn(gone.subject)} (SHA-256 "
                f"{gone.fingerprint}); a server whose chain ends there needs a new certificate",
            ),
        )
    if how not in ("changed", "added (a file)", "added (a file, not committed)"):
        return None
    root = next((root for root in ctx.desired.trust if root.path == path), None)
    if root is not None:
        return TrustChange(
            path,
            (
                f"{how} in this pull request: every client's root.crt will trust servers "
                f"certified by {_dn(root.subject)} (SHA-256 {root.fingerprint}, valid until "
                f"{_day(root.not_after)})",
            ),
        )
    leaf = next((leaf for leaf in ctx.observed.leaves if layout.leaf_cert(leaf.ref) == path), None)
    spec = ctx.specs.get(leaf.ref) if leaf is not None else None
    changed = {changed for changed, _ in ctx.observed.changed_from_base}
    pending = leaf is not None and leaf.request is not None and not changed & set(leaf.pending)
    return True if pending and spec is not None and spec.external else None


# --------------------------------------------------------------------------- status rows


def _dated(
    kind: str, name: str, serial: int | None, not_after: datetime, window: timedelta, now: datetime
) -> Held:
    if not_after <= now:
        standing = Standing.EXPIRED
    elif not_after - window <= now:
        standing = Standing.EXPIRING
    else:
        standing = Standing.VALID
    return Held(kind, name, serial, not_after, standing)


def _ca_rows(
    ca: ObservedCA, crl: ObservedCRL, longest: timedelta, refresh: timedelta, now: datetime
) -> list[Held]:
    """The status rows of one CA generation and its CRL."""
    rows: list[Held] = []
    if ca.cert is None or ca.found is not Found.OK:
        standing = Standing.MISSING if ca.found is Found.MISSING else Standing.UNUSABLE
        rows.append(Held("ca", "ca", None, None, standing, ca.detail))
    else:
        name = dict(ca.cert.subject).get("CN", "ca")
        row = _dated("ca", name, ca.cert.serial, ca.cert.not_after, longest, now)
        detail = "" if ca.key.found is Found.OK else f"ca.key {ca.key.found}"
        if ca.cert.not_before > now:
            row = dataclasses.replace(row, standing=Standing.UNUSABLE)
            detail = f"not valid before {format_time(ca.cert.not_before)}"
        rows.append(dataclasses.replace(row, detail=detail))
    name = crl_name(ca.generation)
    if crl.next_update is None:
        standing = Standing.MISSING if crl.found is Found.MISSING else Standing.UNUSABLE
        rows.append(Held("crl", name, None, None, standing, crl.detail))
    else:
        row = _dated("crl", name, crl.number, crl.next_update, refresh, now)
        if crl.this_update is not None and crl.this_update > now:
            detail = f"not valid before {format_time(crl.this_update)}"
            rows.append(dataclasses.replace(row, standing=Standing.UNUSABLE, detail=detail))
        elif crl.found is Found.OK:
            rows.append(dataclasses.replace(row, detail=f"{len(crl.revoked)} revoked"))
        else:
            rows.append(dataclasses.replace(row, standing=Standing.UNUSABLE, detail=crl.detail))
    return rows


def status(desired: Desired, observed: Observed, *, now: datetime) -> tuple[Held, ...]:
    """What `status` shows, as plan judges it: one row for the CA, the CRL, each certificate
    on disk, and each superseded or revoked certificate that has not expired. Pure."""
    rows: list[Held] = []
    # expiring: a leaf issued now would be cut short by the CA's end
    longest = max((spec.validity for spec in desired.leaves), default=timedelta(days=365))
    for ca in (observed.ca, observed.previous):
        if ca is not None:
            crl = _crl_of(observed, ca.generation)
            rows += _ca_rows(ca, crl, longest, desired.crl.refresh_before, now)
    if observed.previous is not None and observed.ca.cert is not None:
        stage, when = rotation_stage(desired, observed, now)
        text = _describe_rotation(stage, when, observed.previous.generation, observed.ca.generation)
        rows[0] = dataclasses.replace(rows[0], detail=text)
    specs = {spec.ref: spec for spec in desired.leaves}
    by_serial = {entry.serial: entry for entry in observed.ledger.entries}
    on_disk = set()
    for leaf in observed.leaves:
        kind, name = str(leaf.ref.kind), leaf.ref.name
        request = leaf.request
        requested = (
            f"a CSR waits for its signed certificate since {format_time(request.requested)}"
            if request and request.requested
            else ""
        )
        if leaf.cert is None:
            standing = Standing.MISSING if leaf.found is Found.MISSING else Standing.UNUSABLE
            detail = f"certificate {leaf.found}" + (f": {leaf.detail}" if leaf.detail else "")
            if requested and leaf.found is Found.MISSING:
                standing, detail = Standing.PENDING, requested
            rows.append(Held(kind, name, None, None, standing, detail))
            continue
        cert = leaf.cert
        on_disk.add(cert.serial)
        spec = specs.get(leaf.ref)
        renew_before = spec.renew_before if spec is not None else DEFAULT_RENEW_BEFORE
        window = renew_before.window(cert.not_after - cert.not_before)
        row = _dated(kind, name, cert.serial, cert.not_after, window, now)
        entry = by_serial.get(cert.serial)
        external = entry is not None and entry.issuer is not None
        if (
            requested
            and request is not None
            and entry
            and request.pending_key.sha256 != entry.key_sha256
        ):
            row = dataclasses.replace(row, detail=f"renewal: {requested}")
        unusable = None
        if leaf.key.found is not Found.OK:
            unusable = f"key {leaf.key.found}"
        elif leaf.chain and not external:
            unusable = "from another CA, not accepted: `reconciler plan` says why"
        elif not cert.signed_by_ca and not external:
            unusable = "not signed by the current CA"
        elif cert.not_before > now:
            unusable = f"not valid before {format_time(cert.not_before)}"
        elif entry is None or entry.fingerprint != cert.fingerprint:
            unusable = "not in the ledger"
        elif entry.status is CertStatus.REVOKED:
            row = dataclasses.replace(row, standing=Standing.REVOKED)
        if unusable is not None:
            row = dataclasses.replace(row, standing=Standing.UNUSABLE, detail=unusable)
        rows.append(row)
    for entry in observed.ledger.entries:
        if entry.serial in on_disk or entry.not_after <= now or entry.status is CertStatus.VALID:
            continue  # a valid one whose file is gone: the plan says what happens next
        standing = Standing.REVOKED if entry.status is CertStatus.REVOKED else Standing.SUPERSEDED
        reason = entry.reason.value if entry.reason else ""
        rows.append(
            Held(str(entry.kind), entry.name, entry.serial, entry.not_after, standing, reason)
        )
    return tuple(rows)


def needs_attention(rows: Iterable[Held], now: datetime, days: int) -> list[Held]:
    """The rows `status --warn-days` fails on: what cannot be used, and what runs out within
    days (a CRL past its next update locks every client out)."""
    horizon = now + timedelta(days=days)
    return [
        row
        for row in rows
        if row.standing in (Standing.UNUSABLE, Standing.MISSING)
        or (
            row.standing in (Standing.VALID, Standing.EXPIRING, Standing.EXPIRED)
            and row.not_after is not None
            and row.not_after < horizon
        )
    ]
