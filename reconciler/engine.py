"""Wire the stages together: load → observe → plan → apply. No printing, no clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler import collector
from reconciler.errors import SecretError, StateError, UsageError
from reconciler.model import ActionKind, Desired, Observed, Plan
from reconciler.observe import Reading
from reconciler.secrets import Passphrase, SecretSources, Which
from reconciler.store import LockTimeout, StateDir

# The stages that import the cryptography package, PyYAML or GitPython are imported where they
# are first used: by then observe's reader has forked, and reads the state while they load.
if TYPE_CHECKING:
    from reconciler import apply as apply_stage
    from reconciler import record as record_stage
    from reconciler.report import StatusRow


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


def validate(state_dir: Path) -> Desired:
    from reconciler.desired import load_desired

    store = StateDir(state_dir)
    return load_desired(store.users_yaml, display=str(store.users_yaml))


def snapshot(state_dir: Path) -> Snapshot:
    store = StateDir(state_dir)
    with Reading(store) as reading:  # reads the key and certificate files meanwhile
        from reconciler.desired import load_desired

        desired = load_desired(store.users_yaml, display=str(store.users_yaml))
        snap = Snapshot(store=store, desired=desired, observed=reading.observe())
        return collector.keep("snapshot", snap)


def plan_state(state_dir: Path, now: datetime) -> Plan:
    from reconciler.plan import plan as make_plan

    snap = snapshot(state_dir)
    return make_plan(snap.desired, snap.observed, now=now)


def status(state_dir: Path, now: datetime) -> list[StatusRow]:
    from reconciler.report import status_rows

    snap = snapshot(state_dir)
    return status_rows(snap.desired, snap.observed, now)


def reconcile(
    state_dir: Path,
    now: datetime,
    sources: SecretSources,
    progress: apply_stage.ProgressFactory | None = None,
) -> ApplyReport:
    """Plan and apply. Passphrases are generated only when a new CA is about to be created."""
    snap = snapshot(state_dir)  # first: it forks the reader before the heavy imports
    from reconciler import apply as apply_stage
    from reconciler.plan import plan as make_plan

    plan = make_plan(snap.desired, snap.observed, now=now)
    if plan.blockers:
        raise StateError(" ".join(f"{b}." if not b.endswith(".") else b for b in plan.blockers))
    if not any(apply_stage.needs_ca(action) for action in plan.changes):
        # nothing to sign: temporary files and modes need no passphrase
        outcome = apply_stage.apply(
            plan, snap.observed, snap.store, ca_passphrase=None, key_passphrase=None
        )
        return ApplyReport(plan=plan, outcome=outcome)
    ca_passphrase, key_passphrase = sources.find(Which.CA), sources.find(Which.KEY)
    bootstrapped: list[Passphrase] = []
    if any(action.kind is ActionKind.CA for action in plan.actions):
        if (ca_passphrase is None or key_passphrase is None) and sources.environ.get(
            "CI"
        ) == "true":
            raise SecretError(
                "no passphrase is configured, and CI=true: passphrases generated on a CI "
                "runner would be lost with it, leaving a CA nobody can unlock; set "
                f"{Which.CA.env} and {Which.KEY.env} in the CI secret store (nothing was written)"
            )
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
        plan,
        snap.observed,
        snap.store,
        ca_passphrase=ca_passphrase,
        key_passphrase=key_passphrase,
        progress=progress,
    )
    return ApplyReport(plan=plan, outcome=outcome, bootstrapped=tuple(bootstrapped))


MAX_PUSH_ATTEMPTS = 5
DEFAULT_LOCK_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What one `apply` did: the last attempt's apply, its commit, and the push."""

    applied: ApplyReport
    recorded: record_stage.Recorded | None = None
    pushed: bool = False
    attempts: int = 1
    in_git: bool = False


def _record(repo: record_stage.Repo, state_dir: Path, report: ApplyReport) -> record_stage.Recorded:
    from reconciler import record as record_stage
    from reconciler import render

    new_serials = dict(report.outcome.issued)
    return record_stage.record(
        repo,
        state_dir,
        report.outcome.changed,
        lambda users_edited, leftovers: record_stage.commit_message(
            render.done_summary(report.plan),
            report.plan,
            new_serials,
            users_yaml_edited=users_edited,
            leftovers=leftovers,
        ),
    )


def run(
    state_dir: Path,
    now: datetime,
    sources: SecretSources,
    *,
    commit: bool = True,
    push: bool = False,
    environ: Mapping[str, str] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    progress: apply_stage.ProgressFactory | None = None,
) -> RunReport:
    """apply, under the state directory's lock: reconcile, commit what changed when inside
    git, and push with retries.

    When the push is rejected because the remote moved, the local commit is discarded (its
    certificates were never committed anywhere else nor distributed), the branch moves onto the
    remote head, and the whole reconcile runs again against the remote's desired state: ledger
    and CRL are never merged as text.
    """
    if push and not commit:
        raise UsageError("--push and --no-commit contradict each other; drop one")
    store = StateDir(state_dir)
    if not store.root.is_dir():
        snapshot(state_dir)  # says what is wrong with the path
    try:
        with store.locked(lock_timeout):
            return _run_locked(state_dir, now, sources, commit, push, environ, progress)
    except LockTimeout:
        raise StateError(
            f"another apply is running on {state_dir} and holds its lock; waited "
            f"{lock_timeout:g} s: let it finish, or raise --lock-timeout"
        ) from None


def _run_locked(
    state_dir: Path,
    now: datetime,
    sources: SecretSources,
    commit: bool,
    push: bool,
    environ: Mapping[str, str] | None,
    progress: apply_stage.ProgressFactory | None,
) -> RunReport:
    if not commit:  # GitPython costs a tenth of a second to import: only when committing
        return RunReport(applied=reconcile(state_dir, now, sources, progress))
    from reconciler import record as record_stage

    repo = record_stage.find_repo(state_dir, environ)
    if repo is not None:
        record_stage.clear_stale_locks(repo)
    if not push:
        report = reconcile(state_dir, now, sources, progress)
        recorded = _record(repo, state_dir, report) if repo is not None else None
        return RunReport(applied=report, recorded=recorded, in_git=repo is not None)
    if repo is None:
        raise UsageError("--push needs the state directory inside a git work tree")
    record_stage.require_clean(repo)
    target = record_stage.upstream(repo)
    record_stage.sync(repo, target, reset=False)
    for attempt in range(1, MAX_PUSH_ATTEMPTS + 1):
        report = reconcile(state_dir, now, sources, progress)
        recorded = _record(repo, state_dir, report)
        if not record_stage.ahead_of(repo, target):
            return RunReport(report, recorded, pushed=False, attempts=attempt, in_git=True)
        if record_stage.push(repo, target):
            return RunReport(report, recorded, pushed=True, attempts=attempt, in_git=True)
        record_stage.sync(repo, target, reset=True)
    raise record_stage.GitError(
        f"gave up after {MAX_PUSH_ATTEMPTS} attempts: {target.ref} kept moving while this job "
        "ran; nothing of these attempts was pushed, so run the job again"
    )
