"""Wire the stages together: load → observe → plan → apply → record. No printing, no clock."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from functools import partial
from pathlib import Path

from reconciler import apply as apply_stage
from reconciler import layout, pem, pki, render
from reconciler import record as record_stage
from reconciler.desired import load_desired, parse_desired
from reconciler.errors import DesiredStateError, SecretError, StateError, UsageError
from reconciler.model import (
    CreateCa,
    Desired,
    Found,
    Held,
    Ledger,
    Observed,
    Plan,
    RetireCa,
    TrustRoot,
    format_time,
)
from reconciler.observe import observe
from reconciler.plan import plan as make_plan
from reconciler.plan import status as make_status
from reconciler.secrets import Passphrase, SecretSources, Which
from reconciler.store import FileRead, LockTimeout, StateDir


@dataclasses.dataclass(frozen=True)
class Snapshot:
    store: StateDir
    desired: Desired
    observed: Observed


@dataclasses.dataclass(frozen=True)
class ApplyReport:
    plan: Plan
    outcome: apply_stage.Outcome
    bootstrapped: tuple[tuple[Which, Passphrase], ...] = ()


def validate(state_dir: Path) -> Desired:
    return load_desired(StateDir(state_dir))


def snapshot(state_dir: Path) -> Snapshot:
    store = StateDir(state_dir)
    desired = load_desired(store)
    return Snapshot(store=store, desired=desired, observed=observe(store))


def plan_state(
    state_dir: Path,
    now: datetime,
    base: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Plan:
    """The plan; with base (a pull request's target branch), every path but users.yaml that
    differs from it blocks."""
    snap = snapshot(state_dir)
    observed = snap.observed
    if base is not None:
        repo = record_stage.find_repo(state_dir, environ)
        if repo is None:
            raise UsageError("--base needs the state directory inside a git work tree")
        changed = record_stage.changed_since(repo, state_dir, base)
        observed = dataclasses.replace(
            observed,
            changed_from_base=changed,
            base=base,
            base_trust=_trust_at(partial(record_stage.file_at, repo, state_dir, base))
            if any(how == "deleted" for _, how in changed)
            else (),
        )
    return make_plan(snap.desired, observed, now=now)


def _trust_at(file_at: Callable[[str], bytes | None]) -> tuple[TrustRoot, ...]:
    """The trust roots users.yaml lists at the base revision file_at reads, by the one loader:
    a pull request may delete those files. None when that users.yaml does not load (nothing
    may be deleted then)."""

    def read(relative: str) -> FileRead:
        data = file_at(relative)
        return FileRead(Found.MISSING) if data is None else FileRead(Found.OK, data)

    users = read(layout.USERS_YAML)
    try:
        return parse_desired(users.data.decode(), read=read).trust
    except (DesiredStateError, UnicodeDecodeError):
        return ()


def status(state_dir: Path, now: datetime) -> tuple[Held, ...]:
    snap = snapshot(state_dir)
    return make_status(snap.desired, snap.observed, now=now)


def _passphrases(
    plan: Plan, sources: SecretSources
) -> tuple[Passphrase, Passphrase | None, list[tuple[Which, Passphrase]]]:
    """The passphrases an apply needs: always the CA's (every apply proves that ca.key opens
    with it), the key passphrase when it makes keys; generated ones only for a new CA."""
    if not any(isinstance(a, CreateCa) and not a.rotation for a in plan.changes):
        ca = sources.require(Which.CA, "every apply proves that ca/ca.key opens with it")
        key = sources.require(Which.KEY, "this apply makes new keys") if plan.makes_keys else None
        return ca, key, []
    found_ca, found_key = sources.find(Which.CA), sources.find(Which.KEY)
    if (found_ca is None or found_key is None) and sources.environ.get("CI") == "true":
        raise SecretError(
            "no passphrase is configured, and CI=true: passphrases generated on a CI "
            "runner would be lost with it, leaving a CA nobody can unlock; set "
            f"{Which.CA.env} and {Which.KEY.env} in the CI secret store (nothing was written)"
        )
    bootstrapped = []
    if found_ca is None:
        found_ca = sources.bootstrap(Which.CA)
        bootstrapped.append((Which.CA, found_ca))
    if found_key is None:
        found_key = sources.bootstrap(Which.KEY)
        bootstrapped.append((Which.KEY, found_key))
    return found_ca, found_key, bootstrapped


def reconcile(
    state_dir: Path,
    now: datetime,
    sources: SecretSources,
    progress: apply_stage.ProgressFactory | None = None,
) -> ApplyReport:
    """Plan and apply. Passphrases are generated only when a new CA is about to be created."""
    snap = snapshot(state_dir)
    plan = make_plan(snap.desired, snap.observed, now=now)
    if plan.blockers:
        raise StateError(" ".join(b if b.endswith(".") else f"{b}." for b in plan.blockers))
    ca, key, bootstrapped = _passphrases(plan, sources)
    outcome = apply_stage.apply(
        plan, snap.observed, snap.store, ca_passphrase=ca, key_passphrase=key, progress=progress
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
    waiting: Callable[[], None] = lambda: None,
    progress: apply_stage.ProgressFactory | None = None,
) -> RunReport:
    """apply, under the state directory's lock: reconcile, commit what changed when inside
    git, and push with retries. waiting() is called once if another apply holds the lock.

    When the push is rejected because the remote moved, this run's own commit is discarded (its
    certificates were never committed anywhere else nor distributed), the branch moves onto the
    remote head, and the whole reconcile runs again against the remote's desired state: ledger
    and CRL are never merged as text. Any other commit is never discarded.
    """
    if push and not commit:
        raise UsageError("--push and --no-commit contradict each other; drop one")
    with _locked(state_dir, lock_timeout, waiting):
        return _run_locked(state_dir, now, sources, commit, push, environ, progress)


@contextlib.contextmanager
def _locked(state_dir: Path, lock_timeout: float, waiting: Callable[[], None]) -> Iterator[None]:
    if not state_dir.is_dir():
        validate(state_dir)  # says what is wrong with the path
    try:
        with StateDir(state_dir).locked(lock_timeout, waiting):
            yield
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
    repo = record_stage.find_repo(state_dir, environ) if commit else None
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
    record_stage.fast_forward(repo, target)
    for attempt in range(1, MAX_PUSH_ATTEMPTS + 1):
        start = record_stage.head(repo)
        report = reconcile(state_dir, now, sources, progress)
        recorded = _record(repo, state_dir, report)
        if not record_stage.ahead_of(repo, target):
            return RunReport(report, recorded, pushed=False, attempts=attempt, in_git=True)
        if record_stage.push(repo, target):
            return RunReport(report, recorded, pushed=True, attempts=attempt, in_git=True)
        # The remote moved. Only this run's own commit may be redone on top of it: every
        # commit before it must already be on the remote, or it would be thrown away.
        remote = record_stage.fetch(repo, target)
        if not record_stage.contains(repo, start, remote):
            if recorded.sha is not None:
                record_stage.reset_to(repo, start)  # undo only the commit this run made
            raise record_stage.GitError(
                f"{target.ref} moved, and this branch has commits that are not on it and are "
                "not the reconciler's; nothing was pushed and this run's own commit was "
                f"undone: push those commits first (git pull --rebase {target.remote} "
                f"{target.branch}, then git push), and run the job again"
            )
        record_stage.reset_to(repo, remote)
    raise record_stage.GitError(
        f"gave up after {MAX_PUSH_ATTEMPTS} attempts: {target.ref} kept moving while this job "
        "ran; nothing of these attempts was pushed, so run the job again"
    )


@dataclasses.dataclass(frozen=True)
class Rotation:
    rewritten: tuple[str, ...]  # the key files this run re-encrypted
    current: Passphrase  # the one replaced: where it came from is where to replace it
    secret_file: Path | None  # the .secrets/ file that holds the new one now
    recorded: record_stage.Recorded | None


def _pinned(
    before: Ledger, files: Mapping[str, bytes], owners: Mapping[str, int], cas: Mapping[int, str]
) -> Ledger:
    """before, with the pins of the key files in files made true: cas are the CA key files as
    layout.ca_keys gives them, owners maps a leaf key file to the serial of its certificate."""
    sha = {path: pem.file_sha256(data) for path, data in files.items()}
    pins = {owners[path]: sha[path] for path in sha if path in owners}
    entries = (
        replace(e, key_sha256=pins[e.serial]) if e.serial in pins else e for e in before.entries
    )
    newest, previous = [*(sha.get(path) for path in cas.values()), None, None][:2]
    return replace(
        before,
        entries=tuple(entries),
        ca_key_sha256=newest or before.ca_key_sha256,
        previous_key_sha256=previous or before.previous_key_sha256,
    )


def rotate_passphrase(
    state_dir: Path,
    now: datetime,
    which: Which,
    sources: SecretSources,
    *,
    commit: bool = True,
    environ: Mapping[str, str] | None = None,
    waiting: Callable[[], None] = lambda: None,
) -> Rotation:
    """Re-encrypt the CA key (which CA) or every leaf key (KEY) under the new passphrase, make
    the ledger's pins of them true, commit, and only then move .secrets/ on to the new one.
    Every key is opened before the first write; one the new passphrase opens is kept. Keys go
    first, in the order apply checks the key passphrase, the ledger last: a run killed at any
    moment is finished by running it again (docs/state.md#rotating-a-passphrase)."""
    old = sources.require(which, "rotate-passphrase opens the keys with it")
    new = sources.require(Which.NEW, "rotate-passphrase re-encrypts them with it")
    if new.reveal() == old.reveal():
        raise UsageError(f"the new passphrase is the {which.label} one in use; choose another")
    ca_pass = old if which is Which.CA else sources.require(Which.CA, "the ledger is signed")
    with _locked(state_dir, DEFAULT_LOCK_TIMEOUT, waiting):
        repo = record_stage.find_repo(state_dir, environ) if commit else None
        if repo is not None:
            record_stage.clear_stale_locks(repo)
        snap = snapshot(state_dir)
        store, before = snap.store, snap.observed.ledger
        recorded = {(entry.ref, entry.fingerprint): entry.serial for entry in before.entries}
        leaves = {layout.leaf_key(leaf.ref): leaf for leaf in snap.observed.leaves}
        # an external server's pending key too: nothing pins it until its certificate arrives
        pending = [
            path for leaf in snap.observed.leaves for path in leaf.pending if path.endswith(".key")
        ]
        cas = layout.ca_keys(snap.observed)
        files: dict[str, tuple[bytes, bytes, Passphrase]] = {}  # (bytes, under new, opener)
        owners: dict[str, int] = {}  # leaf key file: the serial of the certificate it is the key of
        for path in cas.values() if which is Which.CA else [*leaves, *pending]:
            data = store.read(path).data  # one that is no encrypted key is the plan's to judge
            if pem.key_facts(data).found is not Found.OK:
                continue
            for passphrase in (old, new):
                if (key := pki.open_key(data, passphrase.reveal())) is not None:
                    break
            else:
                raise SecretError(
                    f"{path} opens with neither the current {which.label} passphrase (from "
                    f"{old.origin}) nor the new one: set the current one right, or restore "
                    f"{path} from git; nothing was written"
                )
            rekeyed = data if passphrase is new else pki.encrypt_key(key, new.reveal())
            files[path] = (data, rekeyed, passphrase)
            cert = leaves[path].cert if path in leaves else None
            serial = recorded.get((leaves[path].ref, cert.fingerprint)) if cert else None
            if serial is not None:  # the pin may follow the file only if it is the cert's key
                issued = pki.load_certificates(store.read(layout.leaf_cert(leaves[path].ref)).data)
                if pki.same_public_key(issued[0].public_key(), key.public_key()):
                    owners[path] = serial
        on_disk = _pinned(before, {path: f[0] for path, f in files.items()}, owners, cas)
        plan = make_plan(snap.desired, replace(snap.observed, ledger=on_disk), now=now)
        if plan.blockers or any(isinstance(a, CreateCa | RetireCa) for a in plan.changes):
            raise StateError(" ".join(plan.blockers) or "the plan changes the CA: apply it first")
        rewritten = {path: f[1] for path, f in files.items() if f[1] is not f[0]}
        after = _pinned(before, {path: f[1] for path, f in files.items()}, owners, cas)
        unlock = {g: files[path][2] if path in files else ca_pass for g, path in cas.items()}
        changed = apply_stage.rekey(store, rewritten, after if after != before else None, unlock)
        what = "ca: CA" if which is Which.CA else "keys: leaf"
        message = (
            f"rotate-passphrase {what} key files re-encrypted under a new {which.label} "
            f"passphrase\n\nledger.jsonl pins the new files.\n\nRotated-at: {format_time(now)}\n"
        )
        committed = None
        if repo is not None:
            committed = record_stage.record(repo, state_dir, changed, lambda *_: message)
        secret_file = sources.replace(which, old, new)
    return Rotation(tuple(rewritten), old, secret_file, committed)
