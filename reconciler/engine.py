"""Wire the stages together: load → observe → plan → apply. No printing, no clock."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from reconciler import apply as apply_stage
from reconciler.desired import load_desired
from reconciler.errors import SecretError, StateError
from reconciler.model import ActionKind, Desired, Observed, Plan
from reconciler.observe import observe
from reconciler.plan import plan as make_plan
from reconciler.report import StatusRow, status_rows
from reconciler.secrets import Passphrase, SecretSources, Which
from reconciler.store import StateDir


@dataclasses.dataclass(frozen=True)
class Snapshot:
    store: StateDir
    desired: Desired
    observed: Observed


@dataclasses.dataclass(frozen=True)
class ApplyReport:
    plan: Plan
    outcome: apply_stage.Outcome
    bootstrapped: tuple[Passphrase, ...] = ()


def snapshot(state_dir: Path) -> Snapshot:
    store = StateDir(state_dir)
    desired = load_desired(store.users_yaml, display=str(store.users_yaml))
    return Snapshot(store=store, desired=desired, observed=observe(store))


def plan_state(state_dir: Path, now: datetime) -> Plan:
    snap = snapshot(state_dir)
    return make_plan(snap.desired, snap.observed, now=now)


def status(state_dir: Path, now: datetime) -> list[StatusRow]:
    snap = snapshot(state_dir)
    return status_rows(snap.desired, snap.observed, now)


def reconcile(state_dir: Path, now: datetime, sources: SecretSources) -> ApplyReport:
    """Plan and apply. Passphrases are generated only when a new CA is about to be created."""
    snap = snapshot(state_dir)
    plan = make_plan(snap.desired, snap.observed, now=now)
    if plan.blockers:
        raise StateError(" ".join(f"{b}." if not b.endswith(".") else b for b in plan.blockers))
    if not plan.changes:
        return ApplyReport(plan=plan, outcome=apply_stage.Outcome())
    ca_passphrase, key_passphrase = sources.find(Which.CA), sources.find(Which.KEY)
    bootstrapped: list[Passphrase] = []
    if any(action.kind is ActionKind.CA for action in plan.actions):
        if ca_passphrase is None:
            ca_passphrase = sources.bootstrap(Which.CA)
            bootstrapped.append(ca_passphrase)
        if key_passphrase is None:
            key_passphrase = sources.bootstrap(Which.KEY)
            bootstrapped.append(key_passphrase)
    elif ca_passphrase is None:
        raise SecretError(
            "the CA exists, so its passphrase is needed to sign: set "
            f"{Which.CA.env} (or {Which.CA.flag}, or put it in "
            f"{sources.secrets_dir / Which.CA.file_name}); nothing was written"
        )
    outcome = apply_stage.apply(
        plan, snap.observed, snap.store, ca_passphrase=ca_passphrase, key_passphrase=key_passphrase
    )
    return ApplyReport(plan=plan, outcome=outcome, bootstrapped=tuple(bootstrapped))
