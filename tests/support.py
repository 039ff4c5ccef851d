"""Helpers shared by the tests: run the real command line in-process, with time injected."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from reconciler import ledger
from reconciler.cli import main
from reconciler.model import Ledger

CA_PASSPHRASE = "correct horse battery staple CA"
KEY_PASSPHRASE = "correct horse battery staple keys"
SECRETS = {"RECONCILER_CA_PASSPHRASE": CA_PASSPHRASE, "RECONCILER_KEY_PASSPHRASE": KEY_PASSPHRASE}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "CI Bot",
    "GIT_AUTHOR_EMAIL": "ci@example.invalid",
    "GIT_COMMITTER_NAME": "CI Bot",
    "GIT_COMMITTER_EMAIL": "ci@example.invalid",
}


def git(cwd: Path, *args: str) -> str:
    """Run git with an identity of its own; its output, stripped. Fails the test on an error."""
    done = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY}, capture_output=True, text=True
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def run(
    state: Path,
    *args: str,
    now: datetime | None = None,
    environ: Mapping[str, str] | None = None,
) -> Result:
    """Run `reconciler --state STATE [--now NOW] ARGS…` in-process and capture its output."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--state", str(state)]
    if now is not None:
        argv += ["--now", iso(now)]
    code = main(
        [*argv, *args], environ=SECRETS if environ is None else environ, stdout=out, stderr=err
    )
    return Result(code, out.getvalue(), err.getvalue())


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below root, by relative path, with its bytes (a link: where it points; a
    pipe or other special file: what it is), without following links."""
    found = {}
    for directory, dirs, names in os.walk(root):
        for name in [*names, *(d for d in dirs if (Path(directory) / d).is_symlink())]:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = b"link to " + os.readlink(path).encode()
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = b"special file"
    return found


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl_serials(state: Path) -> set[int]:
    crl = x509.load_pem_x509_crl((state / "ca" / "crl.pem").read_bytes())
    return {entry.serial_number for entry in crl}


def users_yaml(
    users: str = "",
    servers: str = "",
    *,
    key: str = "ecdsa-p256",
    ca_key: str = "ecdsa-p256",
    validity: str = "30d",
    renew_before: str = "10d",
    ca_validity: str = "3650d",
    subject_o: str = "Acme",
    crl: str = "{validity: 30d, refresh_before: 20d}",
) -> str:
    """A users.yaml with fast keys; users and servers are YAML list bodies (indented by 2)."""
    return (
        (
            "version: 1\n"
            f"ca:\n  subject: {{CN: Test CA, O: {subject_o}}}\n  key: {ca_key}\n"
            f"  validity: {ca_validity}\n"
            f"defaults:\n  key: {key}\n  validity: {validity}\n  renew_before: {renew_before}\n"
            f"  subject: {{C: NL, O: {subject_o}}}\n"
            f"crl: {crl}\n"
            f"users:\n{users or '  []'}\n"
            f"servers:\n{servers or '  []'}\n"
        )
        .replace("users:\n  []", "users: []")
        .replace("servers:\n  []", "servers: []")
    )


def ledger_of(state: Path) -> Ledger:
    """The state directory's ledger, as the reconciler reads it."""
    return ledger.decode((state / "ledger.jsonl").read_bytes())[0]


def eventually(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Whether check() turns true within seconds: for what a server does a moment after it
    was asked (a reload, a log line written after the client saw the refusal)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_when(argv: Sequence[str], env: Mapping[str, str], reached: Callable[[], bool]) -> bool:
    """Run argv in a process group of its own and SIGKILL the group (git included) as soon as
    reached() says the moment has come: a moment chosen by the command's progress, never by a
    clock. False when the command finished first (it must have succeeded)."""
    process = subprocess.Popen(
        list(argv),
        env=dict(env),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300  # a bound, not a moment: only a hung command reaches it
    while process.poll() is None and not reached():
        assert time.monotonic() < deadline, f"{argv[-1]} made no progress"
        time.sleep(0.001)
    if process.poll() is not None:
        assert process.wait() == 0, process.stderr.read() if process.stderr else ""
        return False
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True
