"""Status of what is on disk, as rows: pure, like plan(), with now passed in."""

from __future__ import annotations

import dataclasses
import enum
import math
from datetime import datetime, timedelta

from reconciler.model import (
    DEFAULT_RENEW_BEFORE,
    CertStatus,
    Desired,
    Observed,
    RenewBefore,
)


class State(enum.StrEnum):
    VALID = "valid"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"
    UNUSABLE = "unusable"
    MISSING = "missing"


@dataclasses.dataclass(frozen=True, slots=True)
class StatusRow:
    kind: str  # "ca", "crl", "client", "server"
    name: str
    serial: int | None
    not_after: datetime | None
    days_left: int | None
    state: State
    detail: str = ""


def _days_left(not_after: datetime, now: datetime) -> int:
    return math.floor((not_after - now) / timedelta(days=1))


def _dated(
    kind: str,
    name: str,
    serial: int | None,
    not_after: datetime,
    now: datetime,
    window: timedelta,
    detail: str = "",
) -> StatusRow:
    if not_after <= now:
        state = State.EXPIRED
    elif not_after - window <= now:
        state = State.EXPIRING
    else:
        state = State.VALID
    return StatusRow(kind, name, serial, not_after, _days_left(not_after, now), state, detail)


def status_rows(desired: Desired | None, observed: Observed, now: datetime) -> list[StatusRow]:
    """One row for the CA, the CRL, each certificate on disk and each one still out there."""
    rows: list[StatusRow] = []
    ca = observed.ca
    leaf_validity = (
        max((spec.validity for spec in desired.leaves), default=timedelta(days=365))
        if desired is not None
        else timedelta(days=365)
    )
    if ca.cert is None or ca.cert_problem is not None:
        state = State.MISSING if ca.cert_problem == "missing" else State.UNUSABLE
        rows.append(StatusRow("ca", "ca", None, None, None, state, ca.cert_problem or ""))
    else:
        cn = dict(ca.cert.subject).get("CN", "ca")
        rows.append(
            _dated(
                "ca",
                cn,
                ca.cert.serial,
                ca.cert.not_after,
                now,
                leaf_validity,
                "" if ca.key.problem is None else f"ca.key {ca.key.problem}",
            )
        )
    crl = observed.crl
    if crl.next_update is None:  # missing or unparsable
        state = State.MISSING if crl.problem == "missing" else State.UNUSABLE
        rows.append(StatusRow("crl", "crl", None, None, None, state, crl.problem or ""))
    else:
        refresh = desired.crl.refresh_before if desired is not None else timedelta(days=20)
        row = _dated(
            "crl", "crl", crl.number, crl.next_update, now, refresh, f"{len(crl.serials)} revoked"
        )
        if crl.problem is not None:
            row = dataclasses.replace(row, state=State.UNUSABLE, detail=crl.problem)
        rows.append(row)

    ledger = observed.ledger.by_serial()
    specs = desired.by_ref() if desired is not None else {}
    on_disk: set[int] = set()
    for leaf in observed.leaves:
        spec = specs.get(leaf.ref)
        renew: RenewBefore = spec.renew_before if spec is not None else DEFAULT_RENEW_BEFORE
        if leaf.cert is None:
            rows.append(
                StatusRow(
                    leaf.kind.value,
                    leaf.name,
                    None,
                    None,
                    None,
                    State.UNUSABLE if leaf.cert_problem != "missing" else State.MISSING,
                    f"certificate {leaf.cert_problem}",
                )
            )
            continue
        cert = leaf.cert
        on_disk.add(cert.serial)
        row = _dated(
            leaf.kind.value,
            leaf.name,
            cert.serial,
            cert.not_after,
            now,
            renew.window(cert.lifetime),
        )
        entry = ledger.get(cert.serial)
        if leaf.key.problem is not None:
            row = dataclasses.replace(row, state=State.UNUSABLE, detail=f"key {leaf.key.problem}")
        elif not cert.signed_by_ca:
            row = dataclasses.replace(
                row, state=State.UNUSABLE, detail="not signed by the current CA"
            )
        elif entry is None:
            row = dataclasses.replace(row, state=State.UNUSABLE, detail="not in the ledger")
        elif entry.status is CertStatus.REVOKED:
            row = dataclasses.replace(row, state=State.REVOKED)
        rows.append(row)
    for entry in observed.ledger.entries:
        if entry.serial in on_disk or entry.not_after <= now:
            continue
        if entry.status is CertStatus.VALID:
            continue  # its file is gone; plan says what happens next
        state = State.REVOKED if entry.status is CertStatus.REVOKED else State.SUPERSEDED
        rows.append(
            StatusRow(
                entry.kind.value,
                entry.name,
                entry.serial,
                entry.not_after,
                _days_left(entry.not_after, now),
                state,
                entry.reason.value if entry.reason else "",
            )
        )
    return rows
