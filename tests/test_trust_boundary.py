"""The pull request is the trust boundary: every attack a hostile contributor (no secrets) or a
hostile world (a full disk, a clock gone back, a remote that refuses) can mount, tried for real.

Each test builds the hostile state with the tools an attacker has (git, openssl, the
cryptography package, the reconciler itself with passphrases of their own) in real git
repositories with a bare remote, then runs the real command line: `plan --base` in the pull
request's job, and `apply` with the real secrets after the merge. SECURITY.md names each test.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from support import (
    CA_PASSPHRASE,
    GIT_IDENTITY,
    KEY_PASSPHRASE,
    SECRETS,
    at,
    crl_serials,
    files_under,
    git,
    iso,
    kill_when,
    ledger_of,
    run,
    users_yaml,
)

from reconciler.model import CertStatus

T0 = at("2027-01-01T00:00:00Z")
USERS = "  - name: alice\n  - name: bob\n  - name: carol\n"
ENV = {**SECRETS, **GIT_IDENTITY}
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("isolated_git")


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare remote whose main has been issued by the merge job: three users."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(bare))
    seed = clone(bare, "seed")
    (seed / ".gitignore").write_text(".secrets/\n")
    shutil.copy(ROOT / ".gitattributes", seed / ".gitattributes")
    (seed / "state").mkdir()
    (seed / "state" / "users.yaml").write_text(users_yaml(USERS))
    git(seed, "add", ".")
    git(seed, "commit", "--quiet", "-m", "users.yaml: three users")
    git(seed, "push", "--quiet", "origin", "main")
    job = clone(bare, "merge-job")
    assert run(job / "state", "apply", "--push", now=T0, environ=ENV).code == 0
    return bare


def clone(remote: Path, name: str) -> Path:
    target = remote.parent / name
    git(remote.parent, "clone", "--quiet", str(remote), str(target))
    return target


def pull_request(remote: Path, name: str) -> Path:
    work = clone(remote, name)
    git(work, "checkout", "--quiet", "-b", name)
    return work


def merge(work: Path) -> None:
    """The reviewer merges the request as it is (a fast-forward of main)."""
    git(work, "add", "-A")
    git(work, "commit", "--quiet", "-m", "a pull request")
    git(work, "push", "--quiet", "origin", "HEAD:main")


def plan_base(work: Path) -> tuple[int, str]:
    result = run(work / "state", "plan", "--base", "origin/main", now=T0, environ={})
    return result.code, result.out + result.err


def forged_state(tmp_path: Path, text: str) -> Path:
    """What an attacker with the reconciler and passphrases of their own can make."""
    forged = tmp_path / "forged" / "state"
    forged.mkdir(parents=True)
    (forged / "users.yaml").write_text(text)
    theirs = {
        "RECONCILER_CA_PASSPHRASE": "the attacker's own CA passphrase",
        "RECONCILER_KEY_PASSPHRASE": "the attacker's own key passphrase",
    }
    assert run(forged, "apply", "--no-commit", now=T0, environ=theirs).code == 0
    return forged


# --------------------------------------------------------------------------- 1. the CA


def test_pr_swapping_the_ca_is_refused(remote: Path, tmp_path: Path) -> None:
    """A CA of the attacker's with the same subject, every leaf, the ledger and a CRL valid for
    a hundred years re-signed under it: the PR's plan lists every replaced file; after a merge,
    plan is blocked by the CRL, export refuses, and the first apply fails on ca.key."""
    work = pull_request(remote, "swap-ca")
    forged = forged_state(
        tmp_path, users_yaml(USERS, crl="{validity: 36500d, refresh_before: 20d}")
    )
    for part in ("ca", "clients", "ledger.jsonl"):
        target = work / "state" / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        copy = shutil.copytree if (forged / part).is_dir() else shutil.copy
        copy(forged / part, target)
    code, said = plan_base(work)
    assert code == 1
    for path in ("ca/ca.crt", "ca/ca.key", "ca/crl.pem", "clients/alice.crt", "ledger.jsonl"):
        assert f"{path}: changed, compared with origin/main" in said, path
    assert "only users.yaml may change in a pull request" in said

    merge(work)
    job = clone(remote, "after-merge")
    planned = run(job / "state", "plan", now=T0, environ={})
    assert planned.code == 1
    assert "ca/crl.pem is valid for 36500d, longer than crl.validity (30d)" in planned.out
    exported = run(
        job / "state", "export", "alice", "--layout", "libpq", "--encrypted",
        "--out", str(tmp_path / "out"), now=T0, environ={},
    )  # fmt: skip
    assert exported.code == 1
    assert not (tmp_path / "out").exists()
    # without the forged CRL the state is consistent: the CA passphrase is what catches it
    shutil.copy(forged / "ca" / "crl.pem", job / "state" / "ca" / "crl.pem")
    (job / "state" / "users.yaml").write_text(users_yaml(USERS))
    forged_crl_state = forged_state(tmp_path / "again", users_yaml(USERS))
    for part in ("ca", "clients", "ledger.jsonl"):
        target = job / "state" / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        copy = shutil.copytree if (forged_crl_state / part).is_dir() else shutil.copy
        copy(forged_crl_state / part, target)
    git(job, "commit", "--quiet", "-am", "a consistent forged state")
    assert run(job / "state", "plan", now=T0, environ={}).code == 0  # nothing to see
    applied = run(job / "state", "apply", "--push", now=T0, environ=ENV)
    assert applied.code == 1
    assert "does not unlock ca/ca.key" in applied.err
    assert "ca/ca.key was replaced" in applied.err


# --------------------------------------------------------------------------- 2. plan --base


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param("gitattributes", ".gitattributes (in the repository): changed", id="attr"),
        pytest.param("certificate", "clients/alice.crt: changed", id="certificate"),
        pytest.param("deleted", "ledger.jsonl: deleted", id="deleted"),
        pytest.param("symlink", "clients/bob.crt: was a file, is a symbolic link", id="link"),
        pytest.param("mode", "ca/crl.pem: was a file, is an executable file", id="mode"),
        pytest.param("untracked", "notes.txt: added (a file, not committed)", id="untracked"),
        pytest.param("added", "servers/x.example.com.crt: added (a file)", id="added"),
    ],
)
def test_pr_changing_anything_but_users_yaml_fails_the_plan(
    remote: Path, change: str, expected: str
) -> None:
    work = pull_request(remote, "sneaky")
    state = work / "state"
    if change == "gitattributes":
        (work / ".gitattributes").write_text("state/** text eol=crlf\n")
    elif change == "certificate":
        (state / "clients/alice.crt").write_bytes((state / "clients/bob.crt").read_bytes())
    elif change == "deleted":
        (state / "ledger.jsonl").unlink()
    elif change == "symlink":
        (state / "clients/bob.crt").unlink()
        (state / "clients/bob.crt").symlink_to("alice.crt")
    elif change == "mode":
        (state / "ca/crl.pem").chmod(0o755)
    elif change == "untracked":
        (state / "notes.txt").write_text("hello\n")
    else:
        (state / "servers").mkdir()
        (state / "servers/x.example.com.crt").write_text("x\n")
    if change != "untracked":
        git(work, "add", "-A")
        git(work, "commit", "--quiet", "-m", "sneaky")
    code, said = plan_base(work)
    assert code == 1
    assert expected in said


def test_pr_changing_only_users_yaml_plans(remote: Path) -> None:
    work = pull_request(remote, "add-dave")
    (work / "state" / "users.yaml").write_text(users_yaml(USERS + "  - name: dave\n"))
    git(work, "commit", "--quiet", "-am", "users.yaml: dave")
    result = run(work / "state", "plan", "--base", "origin/main", "--detailed-exitcode", now=T0)
    assert result.code == 2, result.out + result.err
    assert "client/dave" in result.out
    unknown = run(work / "state", "plan", "--base", "origin/nope", now=T0, environ={})
    assert unknown.code == 1
    assert "git knows no such revision" in unknown.err


# --------------------------------------------------------------------------- 3. links


def test_pr_linking_a_leaf_directory_outside_writes_nothing_there(
    remote: Path, tmp_path: Path
) -> None:
    """servers/ replaced by a link to a directory outside, with a file the apply would delete
    and one it would write: the apply (with every secret) blocks and touches neither."""
    work = pull_request(remote, "link-dir")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.crt").write_text("precious\n")
    (work / "state" / "servers").symlink_to(outside)
    text = users_yaml(USERS, "  - name: db.example.com\n")
    (work / "state" / "users.yaml").write_text(text)
    code, said = plan_base(work)
    assert code == 1
    assert "servers: added (a symbolic link, not committed)" in said
    merge(work)
    job = clone(remote, "after-merge")
    before = files_under(outside)
    applied = run(job / "state", "apply", "--push", now=T0, environ=ENV)
    assert applied.code == 1
    assert "servers cannot be read (it is a symbolic link)" in applied.err
    assert files_under(outside) == before


@pytest.mark.parametrize("target", ["secret", "/dev/zero"])
def test_users_yaml_linked_elsewhere_is_not_read(tmp_path: Path, target: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$saltsalt$hashhashhash:19000:0:99999:7:::\n")
    (state / "users.yaml").symlink_to(secret if target == "secret" else target)
    for command in ("validate", "plan"):
        result = run(state, command, now=T0, environ={})
        assert result.code == 1
        assert "it is a symbolic link" in result.err
        assert "root:" not in result.err + result.out


# --------------------------------------------------------------------------- 4. the ledger


def test_restoring_an_older_ledger_cannot_unrevoke(remote: Path) -> None:
    """carol is removed (revoked); a PR restores the ledger of before, validly signed, with
    carol's files: plan --base lists it, and after a merge the plan blocks, because the ledger
    knows an older CRL number than the CRL. Each later CRL still lists carol's serial."""
    job = clone(remote, "remove-carol")
    (job / "state" / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: bob\n"))
    git(job, "commit", "--quiet", "-am", "users.yaml: carol leaves")
    git(job, "push", "--quiet", "origin", "main")
    assert run(job / "state", "apply", "--push", now=T0, environ=ENV).code == 0
    carol = next(e for e in ledger_of(job / "state").entries if e.name == "carol")
    assert carol.status is CertStatus.REVOKED
    assert carol.serial in crl_serials(job / "state")

    work = pull_request(remote, "rollback")
    old = git(work, "log", "--format=%H", "-n", "1", "HEAD~1")
    git(work, "checkout", "--quiet", old, "--", "state/ledger.jsonl", "state/clients")
    (work / "state" / "users.yaml").write_text(users_yaml(USERS))
    code, said = plan_base(work)
    assert code == 1
    assert "ledger.jsonl: changed" in said
    merge(work)
    after = clone(remote, "after-merge")
    planned = run(after / "state", "plan", now=T0 + timedelta(days=1), environ={})
    assert planned.code == 1
    assert "ledger.jsonl is older than ca/crl.pem" in planned.out
    applied = run(after / "state", "apply", "--push", now=T0 + timedelta(days=1), environ=ENV)
    assert applied.code == 1
    assert carol.serial in crl_serials(after / "state")


def test_a_crl_keeps_every_revoked_serial_the_ledger_forgot(remote: Path) -> None:
    """Even a ledger that is not behind (the same CRL number) cannot drop a serial the CRL in
    place lists: the next CRL carries it until the ledger says it expired."""
    job = clone(remote, "job")
    (job / "state" / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: bob\n"))
    git(job, "commit", "--quiet", "-am", "users.yaml: carol leaves")
    assert run(job / "state", "apply", "--no-commit", now=T0, environ=ENV).code == 0
    carol = next(e for e in ledger_of(job / "state").entries if e.name == "carol")
    later = T0 + timedelta(days=15)  # inside the CRL's refresh window
    assert run(job / "state", "apply", "--no-commit", now=later, environ=ENV).code == 0
    assert carol.serial in crl_serials(job / "state")
    expired = carol.not_after + timedelta(days=1)
    assert run(job / "state", "apply", "--no-commit", now=expired, environ=ENV).code == 0
    assert carol.serial not in crl_serials(job / "state")  # gone once it expired


# --------------------------------------------------------------------------- 5, 6. pushing


def test_push_never_discards_someone_elses_unpushed_commit(remote: Path) -> None:
    """A DBA's local issuance, not yet pushed; then the remote moves; then the scheduled job
    runs in that clone: it must not reset the DBA's commit away."""
    dba = clone(remote, "dba")
    (dba / "state" / "users.yaml").write_text(users_yaml(USERS + "  - name: dave\n"))
    assert run(dba / "state", "apply", now=T0, environ=ENV).code == 0
    theirs = git(dba, "rev-parse", "HEAD")
    other = clone(remote, "other")
    (other / "README.md").write_text("moved\n")
    git(other, "add", "README.md")
    git(other, "commit", "--quiet", "-m", "the remote moves")
    git(other, "push", "--quiet", "origin", "main")
    renewed = run(dba / "state", "apply", "--push", now=T0 + timedelta(days=21), environ=ENV)
    assert renewed.code == 1
    assert "has commits that are not on it and are not the reconciler's" in renewed.err
    assert "git pull --rebase origin main" in renewed.err
    assert git(dba, "rev-parse", "HEAD") == theirs  # the DBA's commit stays, ours is undone
    assert git(dba, "status", "--porcelain") == ""


def test_a_push_the_remote_refuses_is_one_attempt_and_says_why(remote: Path) -> None:
    hook = remote / "hooks" / "pre-receive"
    log = remote.parent / "hook.log"
    hook.write_text(f'#!/bin/sh\necho run >> "{log}"\necho "main is protected" >&2\nexit 1\n')
    hook.chmod(0o755)
    job = clone(remote, "job")
    result = run(job / "state", "apply", "--push", now=T0 + timedelta(days=21), environ=ENV)
    assert result.code == 1
    assert "git push to origin was refused: main is protected" in result.err
    assert "kept moving" not in result.err
    assert log.read_text().count("run") == 1


def test_stale_lock_cleanup_removes_only_the_reconcilers_own_locks(remote: Path) -> None:
    job = clone(remote, "job")
    git_dir = job / ".git"
    (git_dir / "reconciler-git-operation.pid").write_text("999999999\n")  # a dead process
    (git_dir / "index.lock").write_text("")
    (git_dir / "refs" / "heads" / "someone-else.lock").write_text("")
    result = run(job / "state", "apply", now=T0, environ=ENV)
    assert result.code == 0, result.err
    assert not (git_dir / "index.lock").exists()
    assert (git_dir / "refs" / "heads" / "someone-else.lock").exists()


# --------------------------------------------------------------------------- 7. line endings


@pytest.mark.parametrize("how", ["autocrlf", "attributes"])
def test_a_checkout_that_converts_line_ends_still_plans_and_applies(
    remote: Path, tmp_path: Path, how: str
) -> None:
    """core.autocrlf=true does nothing to state/ (the shipped -text attribute); an eol=crlf
    attribute that wins over it does convert: the key pins and the ledger signature read CRLF
    as LF, so nothing blocks and a no-op stays a no-op."""
    target = tmp_path / how
    git(tmp_path, "clone", "--quiet", "-c", "core.autocrlf=true", str(remote), str(target))
    if how == "attributes":
        (target / ".git" / "info" / "attributes").write_text("* text eol=crlf\n")
        git(target, "rm", "--quiet", "-r", "--cached", ".")
        git(target, "reset", "--quiet", "--hard")
        assert b"\r\n" in (target / "state" / "ca" / "ca.key").read_bytes()
    else:
        assert b"\r\n" not in (target / "state" / "ca" / "ca.key").read_bytes()
    planned = run(target / "state", "plan", "--detailed-exitcode", now=T0, environ={})
    assert planned.code == 0, planned.out
    assert run(target / "state", "apply", "--no-commit", now=T0, environ=ENV).code == 0


# --------------------------------------------------------------------------- 8. the clock


def test_a_clock_gone_back_re_signs_the_crl_and_re_issues(tmp_path: Path) -> None:
    """A drill ran with --now forty days ahead (renewals, a new CRL); back at the real time,
    the CRL and the certificates it issued are not valid yet: PostgreSQL would refuse
    everyone. A CA made in the future blocks, since nothing it signs is valid yet."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    ahead, back = T0 + timedelta(days=40), T0 + timedelta(days=1)
    assert run(state, "apply", "--no-commit", now=ahead).code == 0
    status = run(state, "status", "--warn-days", "7", now=back, environ={})
    assert status.code == 1
    assert "not valid before" in status.out
    planned = run(state, "plan", now=back, environ={})
    assert "CRL not valid before" in planned.out
    assert "not valid before" in planned.out.split("client/alice", 1)[1]
    assert run(state, "apply", "--no-commit", now=back).code == 0
    crl = x509.load_pem_x509_crl((state / "ca" / "crl.pem").read_bytes())
    assert crl.last_update_utc <= back
    leaf = x509.load_pem_x509_certificate((state / "clients" / "alice.crt").read_bytes())
    assert leaf.not_valid_before_utc <= back

    future = tmp_path / "future"
    future.mkdir()
    (future / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    assert run(future, "apply", "--no-commit", now=ahead).code == 0
    blocked = run(future, "plan", now=T0, environ={})
    assert blocked.code == 1
    assert "the CA is not valid before" in blocked.out
    warned = run(future, "status", "--warn-days", "7", now=T0, environ={})
    assert warned.code == 1
    assert "ca/Test CA (unusable, 3690 days left)" in warned.err


# --------------------------------------------------------------------------- 9. a first apply


def test_a_first_apply_killed_after_the_ca_converges(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS))
    env = {**os.environ, **SECRETS}
    argv = [sys.executable, "-m", "reconciler", "--state", str(state), "--now", iso(T0)]
    kill_when([*argv, "apply", "--no-commit"], env, (state / "ca" / "ca.crt").exists)
    # killed once ca.crt is there: at once, or (the kill takes a moment to land) a few files
    # later; either way the next apply must finish what the first began
    assert (state / "ca" / "ca.crt").exists()
    result = run(state, "apply", "--no-commit", now=T0)
    assert result.code == 0, result.err
    assert not run(state, "plan", "--detailed-exitcode", now=T0, environ={}).code


def test_a_first_apply_killed_while_writing_its_first_ledger_converges(tmp_path: Path) -> None:
    """The moment the test above hits now and then: the CA is written, and the empty ledger is
    still in its temporary file. That file is no certificate: the next apply finishes."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS))
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    half = (state / "ledger.jsonl").read_bytes()[:40]
    for path in (state / "ledger.jsonl", state / "ca" / "crl.pem"):
        path.unlink()
    shutil.rmtree(state / "clients")
    (state / ".ledger.jsonl.tmp").write_bytes(half)
    result = run(state, "apply", "--no-commit", now=T0)
    assert result.code == 0, result.err
    assert not (state / ".ledger.jsonl.tmp").exists()
    assert not run(state, "plan", "--detailed-exitcode", now=T0, environ={}).code


# --------------------------------------------------------------------------- 10. the world


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real full disk. Needs root (CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {done.stderr!r}")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_sentence_and_the_next_apply_finishes(small_disk: Path) -> None:
    state = small_disk / "state"
    state.mkdir()
    many = "".join(f"  - name: user{i:03d}\n" for i in range(300))
    (state / "users.yaml").write_text(users_yaml(many))
    secrets_dir = small_disk.parent / "secrets"
    full = run(state, "--secrets-dir", str(secrets_dir), "apply", "--no-commit", now=T0)
    assert full.code == 1
    assert "Traceback" not in full.err
    assert len(full.err.strip().splitlines()) == 1
    assert "No space left on device" in full.err
    assert "free some space" in full.err
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    again = run(state, "apply", "--no-commit", now=T0)
    assert again.code == 0, again.err
    assert not run(state, "plan", "--detailed-exitcode", now=T0, environ={}).code
    assert not list(state.rglob("*.tmp"))


def test_a_read_only_state_is_one_sentence(small_disk: Path) -> None:
    state = small_disk / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: bob\n"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run(state, "apply", "--no-commit", now=T0)
    assert result.code == 1
    assert "Read-only file system" in result.err
    assert "Traceback" not in result.err


def test_an_unwritable_textfile_and_a_missing_git_are_one_sentence(
    tmp_path: Path, remote: Path
) -> None:
    job = clone(remote, "job")
    nowhere = tmp_path / "no" / "such" / "dir" / "x.prom"
    result = run(job / "state", "status", "--prometheus", str(nowhere), now=T0, environ={})
    assert result.code == 1
    assert "cannot write" in result.err
    assert "Traceback" not in result.err
    python_only = tmp_path / "bin"
    python_only.mkdir()
    (python_only / "python3").symlink_to(sys.executable)
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "--state", str(job / "state"), "apply"],
        env={"PATH": str(python_only), **SECRETS, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    assert "git is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_passphrase_that_is_not_utf8_is_one_sentence(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    env = {
        b"PATH": os.environb[b"PATH"],
        b"RECONCILER_CA_PASSPHRASE": b"\xff\xfe not utf-8 at all, long enough",
        b"RECONCILER_KEY_PASSPHRASE": KEY_PASSPHRASE.encode(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "--state", str(state), "apply", "--no-commit"],
        env=env,
        capture_output=True,
    )
    assert done.returncode == 1
    assert b"$RECONCILER_CA_PASSPHRASE is not UTF-8 text" in done.stderr
    assert b"Traceback" not in done.stderr
    assert not (state / "ca").exists()


# --------------------------------------------------------------------------- 11. git's env


def test_no_git_process_ever_sees_a_passphrase(remote: Path, tmp_path: Path) -> None:
    """A git on PATH that writes down its environment, then runs the real git: GitPython's
    `git version` at import, `git var`, and every commit and push."""
    spy = tmp_path / "spy"
    spy.mkdir()
    seen = tmp_path / "seen"
    real = shutil.which("git")
    (spy / "git").write_text(f'#!/bin/sh\nenv >> "{seen}"\nexec "{real}" "$@"\n')
    (spy / "git").chmod(0o755)
    job = clone(remote, "job")
    later = iso(T0 + timedelta(days=21))
    env = {**os.environ, **ENV, "PATH": f"{spy}:{os.environ['PATH']}"}
    argv = [sys.executable, "-m", "reconciler", "--state", str(job / "state"), "--now", later]
    done = subprocess.run(
        [*argv, "apply", "--push"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    environments = seen.read_text()
    assert environments.count("PATH=") >= 3  # git version, git var, commit, push, ...
    assert CA_PASSPHRASE not in environments
    assert KEY_PASSPHRASE not in environments


# --------------------------------------------------------------------------- 12. input


def test_passphrase_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("  - name: alice\n"))
    ca_file = tmp_path / "ca.pass"
    ca_file.write_text(CA_PASSPHRASE)
    ca_file.chmod(0o644)
    environ = {"RECONCILER_KEY_PASSPHRASE": KEY_PASSPHRASE}
    result = run(state, "apply", "--no-commit", "--ca-passphrase-file", str(ca_file), now=T0,
                 environ=environ)  # fmt: skip
    assert result.code == 1
    assert "open to its group or others" in result.err
    ca_file.chmod(0o600)
    assert run(state, "apply", "--no-commit", "--ca-passphrase-file", str(ca_file), now=T0,
               environ=environ).code == 0  # fmt: skip
    assert stat.S_IMODE(ca_file.stat().st_mode) == 0o600


def test_names_that_look_alike_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    composed, decomposed = "jos\u00e9", "jose\u0301"  # one name, two Unicode spellings
    (state / "users.yaml").write_text(
        users_yaml(f'  - name: "{composed}"\n  - name: "{decomposed}"\n  - name: "alice "\n'),
        "utf-8",
    )
    result = run(state, "validate", environ={})
    assert result.code == 1
    assert "is listed twice (first at line 13, spelled otherwise)" in result.err
    assert "starts or ends with a space" in result.err


def test_two_servers_cannot_claim_one_name(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    servers = (
        "  - {name: db1.example.com, dns: [pg.example.com], ip: [10.0.0.5]}\n"
        "  - {name: db2.example.com, dns: [pg.example.com], ip: [10.0.0.5]}\n"
    )
    (state / "users.yaml").write_text(users_yaml("", servers))
    result = run(state, "validate", environ={})
    assert result.code == 1
    assert "'pg.example.com' is already a name of servers[0]" in result.err
    assert "'10.0.0.5' is already a name of servers[0]" in result.err


def test_the_markdown_plan_escapes_what_it_quotes(tmp_path: Path) -> None:
    """A role name is whatever a pull request writes: in the plan posted on it, it must not
    become HTML, a link, an image or a broken table."""
    state = tmp_path / "state"
    state.mkdir()
    names = ['"<img src=x onerror=alert(1)>"', '"[pay here](https:evil.example)"', '"a|b`c"']
    (state / "users.yaml").write_text(users_yaml("".join(f"  - name: {n}\n" for n in names)))
    result = run(state, "plan", "--markdown", now=T0, environ={})
    assert result.code == 0, result.err
    assert "<img" not in result.out
    assert "](" not in result.out
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in result.out
    rows = [line for line in result.out.splitlines() if line.startswith("| **issue**")]
    assert len(rows) == 3
    assert all(line.count("|") - line.count("\\|") == 5 for line in rows)  # four cells each


def test_a_superuser_role_needs_to_say_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("  - name: postgres\n  - name: alice\n"))
    refused = run(state, "validate", environ={})
    assert refused.code == 1
    assert "'postgres' is a superuser role" in refused.err
    assert "superuser: true" in refused.err
    allowed = users_yaml("  - {name: postgres, superuser: true}\n  - name: alice\n")
    (state / "users.yaml").write_text(allowed)
    assert run(state, "validate", environ={}).code == 0
    listed = allowed.replace("users:", "superusers: [postgres, dba]\nusers:") + ""
    (state / "users.yaml").write_text(listed.replace("name: alice", "name: dba"))
    again = run(state, "validate", environ={})
    assert again.code == 1
    assert "'dba' is a superuser role" in again.err


# --------------------------------------------------------------------------- three more


def test_pr_planting_a_certificate_for_a_new_user_is_never_adopted(
    remote: Path, tmp_path: Path
) -> None:
    """The attacker adds dave to users.yaml with a certificate and key of their own making
    already in place: the PR's plan refuses the files, and after a merge apply issues dave's
    own certificate over them and never records the planted serial."""
    work = pull_request(remote, "plant")
    text = users_yaml(USERS + "  - name: dave\n")
    forged = forged_state(tmp_path, text)
    (work / "state" / "users.yaml").write_text(text)
    for suffix in (".crt", ".key"):
        shutil.copy(forged / "clients" / f"dave{suffix}", work / "state" / "clients")
    code, said = plan_base(work)
    assert code == 1
    assert "clients/dave.crt: added" in said
    planted = x509.load_pem_x509_certificate((forged / "clients" / "dave.crt").read_bytes())
    merge(work)
    job = clone(remote, "after-merge")
    assert run(job / "state", "apply", "--push", now=T0, environ=ENV).code == 0
    serials = {entry.serial for entry in ledger_of(job / "state").entries}
    assert planted.serial_number not in serials
    issued = x509.load_pem_x509_certificate((job / "state" / "clients" / "dave.crt").read_bytes())
    assert issued.serial_number in serials
    assert (
        issued.issuer
        == x509.load_pem_x509_certificate((job / "state" / "ca" / "ca.crt").read_bytes()).subject
    )


def test_a_ledger_nested_too_deeply_blocks_instead_of_crashing(remote: Path) -> None:
    """JSON nested a hundred thousand deep makes Python's parser recurse out: found by this
    test (the plan job died with a traceback); now it is a damaged ledger, exit 1."""
    work = pull_request(remote, "deep")
    ledger = work / "state" / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(lines[0] + "[" * 100_000 + "\n" + "".join(lines[1:]))
    result = run(work / "state", "plan", now=T0, environ={})
    assert result.code == 1
    assert "ledger.jsonl is unusable" in result.out
    assert "Traceback" not in result.err


def test_users_yaml_as_a_pipe_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO (or a device) where users.yaml belongs would hang a reader for ever."""
    state = tmp_path / "state"
    state.mkdir()
    os.mkfifo(state / "users.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "--state", str(state), "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "it is not a regular file" in done.stderr
