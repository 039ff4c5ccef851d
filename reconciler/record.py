"""The only module that talks to git: one commit per apply holding only what apply changed
(plus users.yaml when it has uncommitted edits), and the push that retries on a moved remote.

Other staged or unstaged work in the repository is left alone: the commit is made with
`git commit --only PATHS`, which builds it from HEAD plus those paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

# Without a git executable GitPython refuses to import; with this it imports, and the first
# git command says what is missing (find_repo turns that into one sentence).
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import git

from reconciler import layout, secrets
from reconciler.errors import ReconcilerError, StateError
from reconciler.model import (
    Action,
    CreateCa,
    NewCertificate,
    Plan,
    RetireGeneration,
    Revoke,
    SignCrl,
    format_serial,
    format_time,
)
from reconciler.pem import holds_plaintext_key

DEFAULT_NAME = "reconciler"
DEFAULT_EMAIL = "reconciler@localhost"


Repo = git.Repo


class GitError(ReconcilerError):
    """git refused something the reconciler needs (a commit, a fetch, a push)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    sha: str | None  # None: nothing to commit
    paths: tuple[str, ...] = ()  # repository-relative paths in the commit
    ignored: tuple[str, ...] = ()  # changed paths left out because .gitignore matches them


def find_repo(state_dir: Path, environ: Mapping[str, str] | None = None) -> git.Repo | None:
    """The git work tree holding state_dir, set up to run git with git_environment(), or None
    when state_dir is in no work tree."""
    try:
        repo = git.Repo(state_dir, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    if repo.bare:
        return None
    try:
        repo.git.update_environment(
            **git_environment(repo, os.environ if environ is None else environ)
        )
    except git.GitCommandNotFound:
        raise GitError(
            "git is not installed, or not on PATH, and the state directory is in a git work "
            "tree: install git, or run apply --no-commit; nothing was written"
        ) from None
    return repo


# --------------------------------------------------------------------------- message


def _serial(serial: int | None) -> str:
    return format_serial(serial) if serial is not None else "-"


def _action_line(action: Action, new_serials: Mapping[str, int]) -> str:
    reasons = "; ".join(action.reasons)
    match action:
        case SignCrl(number=number):
            return f"{action.subject} number {number}: {reasons}"
        case CreateCa():
            return f"ca: {reasons}"
        case Revoke(revoke=revoked) | RetireGeneration(revoke=revoked):
            serials = ", ".join(format_serial(r.serial) for r in revoked) or "none"
            return f"revoke {action.subject} serial {serials}: {reasons}"
        case NewCertificate(replaces=replaces):
            serial = _serial(new_serials.get(action.subject))
            replaced = f" (replaces {_serial(replaces)})" if replaces is not None else ""
            return f"{action.kind} {action.subject} serial {serial}{replaced}: {reasons}"
    return f"{action.kind} {action.subject}: {reasons}"


def commit_message(
    summary: str,
    plan: Plan,
    new_serials: Mapping[str, int],
    *,
    users_yaml_edited: bool,
    leftovers: int = 0,
) -> str:
    if leftovers and not plan.changes:
        summary = "files an interrupted apply left uncommitted"
    lines = [f"reconcile: {summary}", ""]
    if users_yaml_edited:
        lines.append("users.yaml: the edit that caused this change")
    if leftovers:
        lines.append(f"recovered: {leftovers} files written by an interrupted apply")
    if plan.rotation is not None:
        lines.append(f"{plan.rotation}.")
    lines += [_action_line(action, new_serials) for action in plan.changes]
    lines += ["", f"Reconciled-at: {format_time(plan.now)}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- a pull request

_MODES = {
    "100644": "a file",
    "100755": "an executable file",
    "120000": "a symbolic link",
    "160000": "a submodule",
    "000000": "nothing",
}


def file_at(repo: git.Repo, state_dir: Path, ref: str, relative: str) -> bytes | None:
    """A file of the state directory as revision ref holds it; None when it holds none there."""
    root = Path(str(repo.working_tree_dir)).resolve()
    path = (state_dir.resolve().relative_to(root) / relative).as_posix()
    try:
        data: bytes = repo.git.show(f"{ref}:{path}", stdout_as_string=False)
    except git.GitCommandError:
        return None
    return data


def changed_since(repo: git.Repo, state_dir: Path, ref: str) -> tuple[tuple[str, str], ...]:
    """Every path under the state directory that differs from revision ref (added, changed,
    deleted, another type or mode, or not committed), relative to the state directory, and
    every .gitattributes of the repository that does (they change how git writes files)."""
    try:
        repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}")
    except git.GitCommandError:
        raise GitError(
            f"--base {ref}: git knows no such revision here; fetch the target branch first "
            f"(git fetch origin main) and name it as origin/main"
        ) from None
    root = Path(str(repo.working_tree_dir)).resolve()
    prefix = state_dir.resolve().relative_to(root).as_posix()
    prefix = "" if prefix == "." else prefix
    where = [prefix or ".", ":(glob)**/.gitattributes"]
    found: dict[str, str] = {}
    raw = repo.git.diff("--raw", "--no-renames", "-z", ref, "--", *where).split("\0")
    for header, path in zip(raw[0::2], raw[1::2], strict=False):
        old_mode, new_mode, *_, status = header.lstrip(":").split()
        if status == "A":
            how = f"added ({_MODES.get(new_mode, new_mode)})"
        elif status == "D":
            how = "deleted"
        elif old_mode != new_mode:
            how = f"was {_MODES.get(old_mode, old_mode)}, is {_MODES.get(new_mode, new_mode)}"
        else:
            how = "changed"
        found[path] = how
    for path in repo.git.ls_files("--others", "-z", "--", *where).split("\0"):
        if path:
            what = "a symbolic link" if (root / path).is_symlink() else "a file"
            found[path] = f"added ({what}, not committed)"
    changes = []
    for path, how in sorted(found.items()):
        inside = prefix == "" or path.startswith(prefix + "/")
        relative = path[len(prefix) + 1 :] if prefix and inside else path
        if not (inside and relative == layout.USERS_YAML):
            changes.append((relative if inside else f"{path} (in the repository)", how))
    return tuple(changes)


# --------------------------------------------------------------------------- commit


def _identity_env(repo: git.Repo, environ: Mapping[str, str]) -> dict[str, str]:
    """GIT_* variables for whichever identity git cannot work out by itself."""
    env: dict[str, str] = {}
    for role in ("AUTHOR", "COMMITTER"):
        status, _, _ = repo.git.var(
            f"GIT_{role}_IDENT", with_extended_output=True, with_exceptions=False, env=environ
        )
        if status != 0:
            env[f"GIT_{role}_NAME"] = environ.get(f"GIT_{role}_NAME") or DEFAULT_NAME
            env[f"GIT_{role}_EMAIL"] = environ.get(f"GIT_{role}_EMAIL") or DEFAULT_EMAIL
    return env


def git_environment(repo: git.Repo, environ: Mapping[str, str]) -> dict[str, str]:
    """What git commands run with on top of this process's environment: the caller's GIT_*
    variables, a default identity where none is configured, the passphrases blanked so that no
    hook or helper git starts can read them, and no optional locks: `git status` would
    otherwise take index.lock to refresh the index, outside the operations marked as ours, and
    a kill at that moment would leave a lock that clear_stale_locks may not remove."""
    env = {name: value for name, value in environ.items() if name.startswith("GIT_")}
    env.update(_identity_env(repo, env))
    env.update(dict.fromkeys(secrets.VARIABLES, ""))
    env["GIT_OPTIONAL_LOCKS"] = "0"
    return env


def _ignored(repo: git.Repo, paths: Sequence[str]) -> set[str]:
    if not paths:
        return set()
    status, out, _ = repo.git.check_ignore(
        "--no-index", "--", *paths, with_extended_output=True, with_exceptions=False
    )
    if status not in (0, 1):
        raise GitError("git check-ignore failed; check the repository")
    tracked = set(repo.git.ls_files("--", *paths).splitlines())
    return {line for line in out.splitlines() if line} - tracked


def guard(root: Path, paths: Iterable[str]) -> None:
    """Refuse to commit anything under .secrets/ or any file holding a plaintext private key."""
    for path in paths:
        if layout.SECRETS_DIR in PurePosixPath(path).parts:
            raise StateError(
                f"refusing to commit {path}: nothing under {layout.SECRETS_DIR}/ is "
                "ever committed; nothing was committed"
            )
        full = root / path
        if full.is_file() and holds_plaintext_key(full.read_bytes()):
            raise StateError(
                f"refusing to commit {path}: it holds an unencrypted private key; "
                "remove it (keys in the state directory are always encrypted); "
                "nothing was committed"
            )


def _uncommitted_state(repo: git.Repo, prefix: str) -> list[str]:
    """Files the reconciler writes that differ from HEAD: what an interrupted apply left."""
    out = repo.git.status("--porcelain", "-z", "--untracked-files=all", "--", prefix or ".")
    found = []
    for item in out.split("\0"):
        path = item[3:]
        relative = path[len(prefix) + 1 :] if prefix else path
        if len(item) > 3 and layout.is_managed(relative):
            found.append(path)
    return found


def record(
    repo: git.Repo,
    state_dir: Path,
    changed: Sequence[str],
    message_for: Callable[[bool, int], str],
) -> Recorded:
    """Commit the state-relative paths in changed, users.yaml when it has edits, and any file
    the reconciler writes that an interrupted apply left uncommitted.

    message_for gets whether users.yaml is part of the commit and how many files were left
    over from an interrupted apply, and returns the message.
    """
    root = Path(str(repo.working_tree_dir)).resolve()
    prefix = state_dir.resolve().relative_to(root).as_posix()
    prefix = "" if prefix == "." else prefix
    paths = [str(PurePosixPath(prefix) / p) for p in changed]
    users = str(PurePosixPath(prefix) / "users.yaml")
    users_edited = bool(repo.git.status("--porcelain", "--", users))
    if users_edited and users not in paths:
        paths.append(users)
    leftovers = [p for p in _uncommitted_state(repo, prefix) if p not in paths]
    paths += leftovers
    ignored = _ignored(repo, paths)
    paths = [p for p in dict.fromkeys(paths) if p not in ignored]
    if not paths:
        return Recorded(sha=None, ignored=tuple(sorted(ignored)))
    guard(root, paths)
    present = [p for p in paths if (root / p).exists()]
    tracked = set(repo.git.ls_files("--", *paths).splitlines())
    paths = [p for p in paths if p in present or p in tracked]
    if not paths:
        return Recorded(sha=None, ignored=tuple(sorted(ignored)))
    message = message_for(users_edited, len([p for p in leftovers if p in paths]))
    try:
        with _git_operation(repo):
            if present:
                repo.git.add("--", *present)
            repo.git.commit("--only", "--quiet", "-m", message, "--", *paths)
    except git.GitCommandError as exc:
        raise GitError(
            f"git commit failed: {_first_line(exc)}; the state directory is "
            "written but not committed: fix git and run apply again"
        ) from None
    return Recorded(sha=repo.head.commit.hexsha, paths=tuple(paths), ignored=tuple(sorted(ignored)))


_MARKER = "reconciler-git-operation.pid"


@contextlib.contextmanager
def _git_operation(repo: git.Repo) -> Iterator[None]:
    """Mark a git operation as ours, so that a lock file it leaves when this process is killed
    can be told apart from the lock of a git command that is still running."""
    marker = Path(repo.git_dir) / _MARKER
    marker.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def clear_stale_locks(repo: git.Repo) -> list[str]:
    """Remove git lock files left by a reconciler that was killed during a git operation."""
    git_dir = Path(repo.git_dir)
    marker = git_dir / _MARKER
    try:
        pid = int(marker.read_text().strip())
    except (OSError, ValueError):
        return []
    try:
        os.kill(pid, 0)
        return []  # still running (another state directory of this repository)
    except ProcessLookupError:
        pass
    except PermissionError:
        return []
    removed = []
    for name in _our_locks(repo):
        lock = git_dir / name
        if lock.exists():
            lock.unlink()
            removed.append(name)
    marker.unlink(missing_ok=True)
    return removed


def _our_locks(repo: git.Repo) -> list[str]:
    """The lock files the git operations the reconciler runs (add, commit, fetch, merge,
    reset, push of the current branch) can leave; no other lock is ever removed."""
    locks = ["index.lock", "HEAD.lock", "ORIG_HEAD.lock", "packed-refs.lock"]
    if not repo.head.is_detached:
        branch = repo.active_branch
        locks.append(f"{branch.path}.lock")  # refs/heads/NAME
        tracking = branch.tracking_branch()
        if tracking is not None:
            locks.append(f"{tracking.path}.lock")  # refs/remotes/REMOTE/NAME
    return locks


def _first_line(exc: git.GitCommandError) -> str:
    text = (exc.stderr or str(exc)).strip().replace("stderr: ", "").strip("' \n")
    return text.splitlines()[0] if text else "unknown error"


# --------------------------------------------------------------------------- push


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    remote: str
    branch: str  # the branch name on the remote

    @property
    def ref(self) -> str:
        return f"{self.remote}/{self.branch}"


def upstream(repo: git.Repo) -> Upstream:
    if repo.head.is_detached:
        raise GitError(
            "HEAD is detached, so there is nothing to push to; check out the branch "
            "first (git checkout -B main origin/main)"
        )
    tracking = repo.active_branch.tracking_branch()
    if tracking is None:
        raise GitError(
            f"branch {repo.active_branch.name} has no upstream; set one with "
            f"git branch --set-upstream-to=origin/{repo.active_branch.name}"
        )
    return Upstream(remote=tracking.remote_name, branch=tracking.remote_head)


def require_clean(repo: git.Repo) -> None:
    if repo.is_dirty(untracked_files=False):
        raise GitError(
            "--push needs a clean work tree, since a push race resets it to the "
            "remote; commit or stash your changes first (users.yaml edits included)"
        )


def head(repo: git.Repo) -> str:
    return str(repo.head.commit.hexsha)


def fetch(repo: git.Repo, target: Upstream) -> str:
    """Fetch the upstream branch; its head."""
    try:
        with _git_operation(repo):
            repo.git.fetch("--quiet", target.remote, target.branch)
    except git.GitCommandError as exc:
        raise GitError(
            f"git fetch from {target.remote} failed: {_first_line(exc)}; "
            "check the remote and your access"
        ) from None
    return str(repo.git.rev_parse(target.ref))


def fast_forward(repo: git.Repo, target: Upstream) -> None:
    """Fetch, and move onto the remote head when this branch is behind it."""
    remote = fetch(repo, target)
    if repo.is_ancestor(repo.head.commit, repo.commit(remote)):
        with _git_operation(repo):
            repo.git.merge("--ff-only", "--quiet", remote)


def contains(repo: git.Repo, ancestor: str, descendant: str) -> bool:
    return bool(repo.is_ancestor(repo.commit(ancestor), repo.commit(descendant)))


def reset_to(repo: git.Repo, sha: str) -> None:
    """Move the branch and work tree to sha: only ever past the reconciler's own commit."""
    with _git_operation(repo):
        repo.git.reset("--hard", "--quiet", sha)


def push(repo: git.Repo, target: Upstream) -> bool:
    """Push HEAD; False when the remote moved (not a fast-forward). A push the remote refuses
    (a protected branch, a hook) is a GitError with git's reason: retrying cannot help."""
    try:
        with _git_operation(repo):
            repo.git.push("--porcelain", target.remote, f"HEAD:refs/heads/{target.branch}")
    except git.GitCommandError as exc:
        text = f"{exc.stdout or ''}\n{exc.stderr or ''}"
        # not a fast-forward, seen before the push or (the ref moved during it) by the remote
        if re.search(
            r"\[rejected\] \((fetch first|non-fast-forward)\)|cannot lock ref .* but expected", text
        ):
            return False
        reason = _refusal(text) or _first_line(exc)
        raise GitError(
            f"git push to {target.remote} was refused: {reason}; the commit stays in this "
            "clone, unpushed: fix what the remote refuses (a protected branch must let this "
            "job push) and run the job again"
        ) from None
    return True


def _refusal(text: str) -> str | None:
    """The remote's own words: what its hook said ('remote:' lines), and the reason git gives."""
    said = [line.strip() for line in re.findall(r"remote: (.*)", text) if line.strip()]
    reason = re.search(r"\[remote rejected\] \((.*?)\)", text)
    parts = [*said[:3], *([reason[1]] if reason else [])]
    return "; ".join(parts) or None


def ahead_of(repo: git.Repo, target: Upstream) -> bool:
    return bool(repo.head.commit.hexsha != repo.git.rev_parse(target.ref))
