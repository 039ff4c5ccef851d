"""Git as the audit trail, with real repositories: a bare remote and clones in tmp_path.

The pull-request flow changes nothing; the merge flow makes one commit of state paths only;
scheduled renewal by time travel; a push race between two jobs converges; the plaintext-key
guard; and a scan of every blob ever committed for an unencrypted private key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from support import GIT_IDENTITY, SECRETS, at, cert, git, run, users_yaml

from reconciler import record
from reconciler.engine import plan_state
from reconciler.errors import StateError
from reconciler.pem import PLAINTEXT_KEY

T0 = at("2027-01-01T00:00:00Z")
USERS = "  - name: alice\n  - name: bob\n"
ENV = {**SECRETS, **GIT_IDENTITY}


pytestmark = pytest.mark.usefixtures("isolated_git")


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare remote whose main holds .gitignore and state/users.yaml."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(bare))
    seed = tmp_path / "seed"
    git(tmp_path, "clone", "--quiet", str(bare), str(seed))
    (seed / ".gitignore").write_text(".secrets/\n")
    (seed / "state").mkdir()
    (seed / "state" / "users.yaml").write_text(users_yaml(USERS))
    (seed / "README.md").write_text("ops repo\n")
    git(seed, "add", ".")
    git(seed, "commit", "--quiet", "-m", "users.yaml: alice and bob")
    git(seed, "push", "--quiet", "origin", "main")
    return bare


def clone(remote: Path, name: str) -> Path:
    target = remote.parent / name
    git(remote.parent, "clone", "--quiet", str(remote), str(target))
    return target


def commits(repo: Path) -> list[str]:
    return git(repo, "log", "--format=%H").splitlines()


def changed_paths(repo: Path, rev: str = "HEAD") -> set[str]:
    return set(git(repo, "show", "--name-only", "--format=", rev).splitlines())


def all_blobs(repo: Path) -> Iterator[bytes]:
    objects = git(repo, "rev-list", "--objects", "--all").splitlines()
    for line in objects:
        sha = line.split()[0]
        if git(repo, "cat-file", "-t", sha) == "blob":
            yield subprocess.run(
                ["git", "cat-file", "blob", sha], cwd=repo, capture_output=True, check=True
            ).stdout


def test_pull_request_plan_changes_nothing(remote: Path) -> None:
    work = clone(remote, "pr")
    git(work, "checkout", "--quiet", "-b", "add-carol")
    (work / "state" / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))
    git(work, "commit", "--quiet", "-am", "add carol")
    head = commits(work)[0]
    result = run(work / "state", "plan", "--markdown", "--detailed-exitcode", now=T0, environ={})
    assert result.code == 2
    assert "| client/carol |" in result.out
    assert run(work / "state", "validate", environ={}).code == 0
    assert commits(work)[0] == head
    assert git(work, "status", "--porcelain", "--untracked-files=all") == ""


def test_merge_flow_commits_only_state_paths_and_leaves_other_work_alone(remote: Path) -> None:
    work = clone(remote, "merge")
    before = commits(work)
    # unrelated work in progress: one staged, one unstaged change
    (work / "README.md").write_text("ops repo, edited and staged\n")
    git(work, "add", "README.md")
    (work / "notes.txt").write_text("untracked notes\n")
    (work / "state" / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))

    result = run(work / "state", "apply", now=T0, environ=ENV)
    assert result.code == 0, result.err
    after = commits(work)
    assert len(after) == len(before) + 1
    paths = changed_paths(work)
    assert all(p.startswith("state/") for p in paths), paths
    assert "state/users.yaml" in paths  # the cause in the same commit as its effect
    assert {
        "state/ca/ca.crt",
        "state/ca/ca.key",
        "state/ca/crl.pem",
        "state/ledger.jsonl",
        "state/clients/carol.crt",
        "state/clients/carol.key",
    } <= paths
    assert "README.md" not in paths
    # the unrelated work is exactly where it was
    assert git(work, "diff", "--cached", "--name-only") == "README.md"
    assert "?? notes.txt" in git(work, "status", "--porcelain")

    message = git(work, "log", "-1", "--format=%B")
    lines = message.splitlines()
    assert lines[0] == "reconcile: CA created, 3 issued, CRL refreshed"
    assert "users.yaml: the edit that caused this change" in lines
    carol_serial = format(cert(work / "state/clients/carol.crt").serial_number, "040x")
    assert f"issue client/carol serial {carol_serial}: no certificate yet" in lines
    assert any(line.startswith("crl number 1: ") for line in lines)
    assert lines[-1] == "Reconciled-at: 2027-01-01T00:00:00Z"
    assert git(work, "log", "-1", "--format=%an <%ae>") == "CI Bot <ci@example.invalid>"
    assert SECRETS["RECONCILER_CA_PASSPHRASE"] not in message

    # no change, no commit
    again = run(work / "state", "apply", now=T0 + timedelta(hours=1), environ=ENV)
    assert again.code == 0, again.err
    assert commits(work) == after


def test_default_identity_when_none_is_configured(remote: Path) -> None:
    work = clone(remote, "anon")
    result = run(work / "state", "apply", now=T0, environ=SECRETS)
    assert result.code == 0, result.err
    assert git(work, "log", "-1", "--format=%an <%ae>|%cn <%ce>") == (
        "reconciler <reconciler@localhost>|reconciler <reconciler@localhost>"
    )


def test_merge_then_scheduled_renewal_by_time_travel_pushes(remote: Path) -> None:
    merge_job = clone(remote, "merge-job")
    assert run(merge_job / "state", "apply", "--push", now=T0, environ=ENV).code == 0
    renewal_job = clone(remote, "renewal-job")
    assert "Reconciled-at" in git(renewal_job, "log", "-1", "--format=%B")
    # nothing due the day after
    quiet = run(renewal_job / "state", "apply", "--push", now=T0 + timedelta(days=1), environ=ENV)
    assert quiet.code == 0, quiet.err
    assert "Nothing to do" in quiet.out
    # 21 days on, the 30-day certificates are inside their 10-day window
    later = T0 + timedelta(days=21)
    renewed = run(renewal_job / "state", "apply", "--push", now=later, environ=ENV)
    assert renewed.code == 0, renewed.err
    assert "Pushed" in renewed.out
    check = clone(remote, "check")
    message = git(check, "log", "-1", "--format=%B")
    assert message.startswith("reconcile: 2 renewed")
    assert "renew client/alice serial" in message
    assert not plan_state(check / "state", later).changes


def test_push_race_between_merge_job_and_renewal_job_converges(
    remote: Path, tmp_path: Path
) -> None:
    first = clone(remote, "bootstrap")
    assert run(first / "state", "apply", "--push", now=T0, environ=ENV).code == 0
    later = T0 + timedelta(days=21)  # alice and bob are due for renewal
    renewal_job = clone(remote, "renewal-job")
    merge_job_dir = remote.parent / "merge-job"
    developer = clone(remote, "developer")
    (developer / "state" / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))
    git(developer, "commit", "--quiet", "-am", "users.yaml: add carol")

    # The race, made deterministic: after the renewal job has committed its renewals and just
    # before its push, the merge lands and the merge job runs to completion and pushes. The
    # pre-push hook makes exactly that happen, once. Passphrases reach the merge job through
    # files: git hooks never see the RECONCILER_* variables.
    ca_file, key_file = tmp_path / "ca.pass", tmp_path / "key.pass"
    ca_file.write_text(SECRETS["RECONCILER_CA_PASSPHRASE"])
    key_file.write_text(SECRETS["RECONCILER_KEY_PASSPHRASE"])
    ca_file.chmod(0o600)
    key_file.chmod(0o600)
    marker = tmp_path / "raced"
    hook = renewal_job / ".git" / "hooks" / "pre-push"
    hook.write_text(
        "#!/bin/sh\n"
        f'[ -e "{marker}" ] && exit 0\n'
        f'touch "{marker}"\n'
        f'[ -z "$RECONCILER_CA_PASSPHRASE" ] || exit 3\n'
        f'cd "{developer}" && git push --quiet origin main || exit 4\n'
        f'git clone --quiet "{remote}" "{merge_job_dir}" || exit 5\n'
        f'cd "{merge_job_dir}" && "{sys.executable}" -m reconciler --state state '
        f'--now {later.isoformat()} apply --push --ca-passphrase-file "{ca_file}" '
        f'--key-passphrase-file "{key_file}" > "{tmp_path}/merge-job.log" 2>&1 || exit 6\n'
    )
    hook.chmod(0o755)

    renewal = run(renewal_job / "state", "apply", "--push", now=later, environ=ENV)
    assert renewal.code == 0, renewal.err
    assert marker.exists()
    merge_log = (tmp_path / "merge-job.log").read_text()
    assert "Pushed." in merge_log, merge_log
    assert "re-ran on top of it" in renewal.out  # the renewal job lost the race and retried

    final = clone(remote, "final")
    subjects = git(final, "log", "--format=%s").splitlines()
    assert subjects[0] == "reconcile: 1 issued, 2 renewed, CRL refreshed"
    assert subjects[1] == "users.yaml: add carol"
    assert (final / "state" / "clients" / "carol.crt").exists()
    assert not plan_state(final / "state", later).changes
    # history is linear: nobody merged ledger or CRL as text
    assert git(final, "rev-list", "--merges", "HEAD") == ""


def test_push_refuses_a_dirty_work_tree_and_a_missing_upstream(remote: Path) -> None:
    work = clone(remote, "dirty")
    (work / "state" / "users.yaml").write_text(users_yaml(USERS + "  - name: carol\n"))
    dirty = run(work / "state", "apply", "--push", now=T0, environ=ENV)
    assert dirty.code == 1
    assert "clean work tree" in dirty.err
    assert not (work / "state" / "ca").exists()
    git(work, "checkout", "--quiet", "--", ".")
    git(work, "checkout", "--quiet", "-b", "local-only")
    lonely = run(work / "state", "apply", "--push", now=T0, environ=ENV)
    assert lonely.code == 1
    assert "no upstream" in lonely.err


def test_guard_refuses_plaintext_keys_and_secrets(remote: Path, tmp_path: Path) -> None:
    work = clone(remote, "guard")
    assert run(work / "state", "apply", now=T0, environ=ENV).code == 0
    head = commits(work)[0]
    # a key pasted into users.yaml: the plan refuses before anything is written
    key = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519"], capture_output=True, check=True
    ).stdout.decode()
    text = users_yaml(USERS + "  - name: carol\n")
    (work / "state" / "users.yaml").write_text(
        text + "".join(f"# {line}\n" for line in key.splitlines())
    )
    before = git(work, "status", "--porcelain")
    refused = run(work / "state", "apply", now=T0, environ=ENV)
    assert refused.code == 1
    assert "users.yaml holds an unencrypted private key: delete it from the file" in refused.err
    assert commits(work)[0] == head
    assert git(work, "status", "--porcelain") == before  # the plan refused: nothing written
    # the guard in front of git catches what the plan could not: here, called directly
    repo = record.find_repo(work / "state")
    assert repo is not None
    secrets = work / ".secrets"
    secrets.mkdir()
    (secrets / "ca.pass").write_text("x" * 20)
    with pytest.raises(StateError, match=r"refusing to commit \.secrets/ca\.pass"):
        record.guard(work, [".secrets/ca.pass"])
    plain = work / "state" / "clients" / "mallory.key"
    plain.write_text(key)
    with pytest.raises(StateError, match=r"refusing to commit state/clients/mallory\.key"):
        record.record(repo, work / "state", ["clients/mallory.key"], lambda edited, left: "x")
    assert commits(work)[0] == head


def test_no_plaintext_private_key_was_ever_committed(remote: Path) -> None:
    first = clone(remote, "history")
    assert run(first / "state", "apply", "--push", now=T0, environ=ENV).code == 0
    (first / "state" / "users.yaml").write_text(users_yaml("  - name: alice\n    generation: 2\n"))
    git(first, "commit", "--quiet", "-am", "users.yaml: rotate alice, remove bob")
    assert (
        run(first / "state", "apply", "--push", now=T0 + timedelta(days=2), environ=ENV).code == 0
    )
    assert (
        run(first / "state", "apply", "--push", now=T0 + timedelta(days=25), environ=ENV).code == 0
    )
    blobs = list(all_blobs(remote))
    encrypted = [b for b in blobs if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in b]
    assert len(encrypted) >= 5  # the scan sees the keys: CA, alice twice, bob, renewals
    for blob in blobs:
        assert not PLAINTEXT_KEY.search(blob)


@pytest.mark.usefixtures("isolated_git")
def test_the_reconciler_git_never_takes_the_index_lock_to_look(tmp_path: Path) -> None:
    """`git status` refreshes a stale index under index.lock; killed at that moment, outside the
    operations marked as ours, it would leave a lock the next run cannot tell from a live one
    (a rotate-passphrase killed before its commit once did). The reconciler's git runs with
    GIT_OPTIONAL_LOCKS=0, so looking never writes the index; plain git does."""
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    git(repo_dir, "init", "--quiet", "-b", "main")
    (repo_dir / "file").write_text("a\n")
    git(repo_dir, "add", "file")
    git(repo_dir, "commit", "--quiet", "-m", "one")
    index = repo_dir / ".git" / "index"

    def stale_then_look(environ: dict[str, str]) -> bool:
        """Whether a `git status` of a stale index wrote the index."""
        os.utime(repo_dir / "file", (1, 1))  # the index's stat data no longer matches
        before = index.stat().st_mtime_ns
        time.sleep(0.01)
        subprocess.run(["git", "status", "--porcelain"], cwd=repo_dir, env=environ, check=True)
        return index.stat().st_mtime_ns != before

    repo = record.find_repo(repo_dir / "file", {})
    assert repo is not None
    ours = {**os.environ, **record.git_environment(repo, {})}
    assert not stale_then_look(ours)
    plain = {k: v for k, v in os.environ.items() if k != "GIT_OPTIONAL_LOCKS"}
    assert stale_then_look(plain)  # so the check above could fail
