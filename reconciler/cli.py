"""The command line: parses arguments, reads the clock (here only), prints, maps exit codes.

Exit codes: 0 success; 1 the user must act (one message on stderr); 2 `plan
--detailed-exitcode` found changes; 70 a bug (with a traceback, please report it); 141 the
reader of the output went away (`reconciler plan | head`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn, TextIO

from reconciler import __version__, engine, layout, render
from reconciler import desired as desired_stage
from reconciler import export as export_stage
from reconciler import hba as hba_stage
from reconciler.apply import Progress, ProgressFactory
from reconciler.errors import ReconcilerError, UsageError
from reconciler.model import Held, format_serial
from reconciler.plan import needs_attention
from reconciler.plan import plan as make_plan
from reconciler.plan import status as make_status
from reconciler.secrets import SecretSources, Which, default_secrets_dir
from reconciler.store import atomic_write

EXIT_OK, EXIT_USER, EXIT_CHANGES, EXIT_BUG = 0, 1, 2, 70
EXIT_SIGPIPE = 141  # what a shell reports for a command killed by SIGPIPE, as git's
_LOSS = {
    Which.CA: "without it the CA can never sign again.",
    Which.KEY: "without it the stored client and server keys cannot be exported.",
}


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; here 2 means 'changes found', so usage errors exit 1."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `reconciler --help`")


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)  # the one place the clock is read
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--now {text!r} is not an ISO-8601 time; write one such as 2027-01-31T12:00:00Z"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name. Below the top they default
    to SUPPRESS, so that a value given before the command is not overwritten."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--state",
        type=Path,
        default=default(None),
        metavar="DIR",
        help="the state directory holding users.yaml (default: state, or . when it holds "
        "users.yaml)",
    )
    parser.add_argument(
        "--now",
        default=default(None),
        metavar="ISO-8601",
        help="pretend it is this time (tests, simulation, drills)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="no progress bar (there is one on a terminal during long runs)",
    )
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        default=default(None),
        metavar="DIR",
        help="where local passphrase files live (default: .secrets beside the state directory)",
    )


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="reconciler",
        description="Reconcile PostgreSQL client and server certificates with state/users.yaml.",
    )
    parser.add_argument("--version", action="version", version=f"reconciler {__version__}")
    _common_options(parser, top=True)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        _common_options(sub, top=False)
        return sub

    command("init", "scaffold a state directory with an example users.yaml")
    command("validate", "check users.yaml; needs no secret")
    plan = command("plan", "show what apply would do; needs no secret")
    form = plan.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the plan as JSON")
    form.add_argument("--markdown", action="store_true", help="print the plan as Markdown")
    plan.add_argument(
        "--base",
        metavar="REF",
        help="a pull request's target branch: every path but users.yaml that differs from it "
        "is listed and blocks (exit 1)",
    )
    plan.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 2 when there are changes, 0 when there are none",
    )
    for name in ("apply", "reconcile"):
        apply = command(name, "carry out the plan" if name == "apply" else "alias of apply")
        apply.add_argument(
            "--no-commit",
            action="store_true",
            help="write the state directory but make no git commit",
        )
        apply.add_argument(
            "--push",
            action="store_true",
            help="push the commit to the upstream; retry on top of it when it moved",
        )
        apply.add_argument(
            "--lock-timeout",
            type=float,
            default=engine.DEFAULT_LOCK_TIMEOUT,
            metavar="SECONDS",
            help="wait this long for another apply on the same state directory (default 60)",
        )
        apply.add_argument(
            "--prometheus",
            type=Path,
            metavar="FILE",
            help="write a node_exporter textfile with expiries and this success",
        )
        _passphrase_files(apply, Which.CA, Which.KEY)
    export = command("export", "write one certificate, its key, the CA and the CRL for PostgreSQL")
    export.add_argument("name", help="a user (--layout libpq, jdbc) or a server (--layout server)")
    export.add_argument("--layout", choices=sorted(export_stage.LAYOUTS), required=True)
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    export.add_argument(
        "--encrypted",
        action="store_true",
        help="keep the key encrypted: under the export passphrase when one is set, else as "
        "stored, under the key passphrase, which opens every stored key",
    )
    export.add_argument(
        "--with-crl",
        action="store_true",
        help="libpq: also write root.crl; once that copy is stale libpq refuses every server",
    )
    export.add_argument(
        "--owner", metavar="USER[:GROUP]", help="give DIR and its files to USER (and GROUP)"
    )
    export.add_argument("--force", action="store_true", help="replace files that differ")
    _passphrase_files(export, Which.KEY, Which.EXPORT)
    hba = command("hba", "print the pg_hba.conf fragment, or check a file")
    hba.add_argument(
        "--check",
        type=Path,
        metavar="FILE",
        help="exit 1 when the server would refuse FILE, or a line takes a generated rule's place",
    )
    hba.add_argument(
        "--pg-version",
        type=int,
        metavar="N",
        help="the PostgreSQL major version that reads FILE, when no PG_VERSION is beside it",
    )
    hba.add_argument(
        "--lenient", action="store_true", help="only warn about earlier lines it cannot judge"
    )
    rotate = command("rotate-passphrase", "re-encrypt the CA key or every leaf key, and commit")
    rotate.add_argument("what", choices=("ca", "keys"), help="ca/ca.key, or every leaf key")
    rotate.add_argument("--no-commit", action="store_true", help="make no git commit")
    _passphrase_files(rotate, Which.CA, Which.KEY, Which.NEW)
    status = command("status", "what is on disk, with days left")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    status.add_argument(
        "--warn-days",
        type=int,
        metavar="N",
        help="exit 1 when a certificate or the CRL runs out within N days",
    )
    status.add_argument(
        "--prometheus", type=Path, metavar="FILE", help="write a node_exporter textfile"
    )
    return parser


def _passphrase_files(parser: argparse.ArgumentParser, *whiches: Which) -> None:
    for which in whiches:
        parser.add_argument(
            which.flag,
            type=Path,
            metavar="FILE",
            help=f"read the {which.label} passphrase from FILE instead of ${which.env}",
        )


def _state_dir(args: argparse.Namespace) -> Path:
    """--state, or the default: ./state, or the current directory when it holds users.yaml
    (run inside a state directory) and ./state does not."""
    if args.state is not None:
        return Path(args.state)
    here, default = Path("."), Path("state")
    if (here / layout.USERS_YAML).is_file() and not (default / layout.USERS_YAML).exists():
        return here
    return default


def _sources(args: argparse.Namespace, environ: Mapping[str, str]) -> SecretSources:
    files = {}
    for which in Which:
        given = getattr(args, which.flag.removeprefix("--").replace("-", "_"), None)
        if given is not None:
            files[which] = given
    secrets_dir = args.secrets_dir or default_secrets_dir(args.state)
    return SecretSources(secrets_dir=secrets_dir, environ=environ, files=files)


def _say(err: TextIO, message: str) -> None:
    err.write(f"reconciler: {message}\n")
    err.flush()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _init(args: argparse.Namespace, out: TextIO) -> int:
    target = args.state / layout.USERS_YAML
    if target.exists():
        raise UsageError(f"{target} already exists; edit it, or choose another --state")
    from importlib import resources

    example = resources.files("reconciler").joinpath("example-users.yaml").read_text("utf-8")
    args.state.mkdir(parents=True, exist_ok=True)
    target.write_text(example, encoding="utf-8")
    out.write(
        f"Wrote {target}. Edit it, check it with `reconciler validate`, see the changes "
        "with `reconciler plan`, then run `reconciler apply`.\n"
    )
    return EXIT_OK


def _validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    desired = engine.validate(args.state)
    warning = desired_stage.tls12_warning(desired)
    if warning is not None:
        err.write(f"warning: {warning}\n")
    users = sum(1 for leaf in desired.leaves if leaf.kind.value == "client")
    servers = len(desired.leaves) - users
    out.write(
        f"{args.state / 'users.yaml'} is valid: {_count(users, 'user')}, "
        f"{_count(servers, 'server')}.\n"
    )
    return EXIT_OK


def _plan(
    args: argparse.Namespace, now: datetime, environ: Mapping[str, str], out: TextIO, err: TextIO
) -> int:
    plan = engine.plan_state(args.state, now, args.base, environ)
    out.write(
        render.plan_json(plan)
        if args.json
        else render.plan_markdown(plan)
        if args.markdown
        else render.plan_text(plan)
    )
    if plan.blockers:
        err.write("reconciler: apply is blocked until the problems above are fixed.\n")
        return EXIT_USER
    return EXIT_CHANGES if args.detailed_exitcode and plan.changes else EXIT_OK


def _write_prometheus(
    path: Path, state: Path, rows: Sequence[Held], success: datetime | None
) -> None:
    last = success.timestamp() if success is not None else None
    if last is None and path.exists():
        last = render.last_success_in(path.read_text("utf-8", errors="replace"))
    text = render.prometheus(rows, last, environment=state.absolute().name)
    atomic_write(path, text.encode(), 0o644)


def _progress(args: argparse.Namespace, err: TextIO) -> ProgressFactory | None:
    """A tqdm bar on stderr (count, rate, ETA) when it is a terminal; none otherwise."""
    if args.quiet or not err.isatty():
        return None
    from tqdm import tqdm  # only on a terminal

    def bar(total: int, what: str) -> Progress:
        # delay: runs that end within a second never show a bar
        return tqdm(total=total, desc=what, unit="cert", file=err, leave=False, delay=1.0)

    return bar


def _apply(
    args: argparse.Namespace,
    now: datetime,
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO,
) -> int:
    result = engine.run(
        args.state,
        now,
        _sources(args, environ),
        commit=not args.no_commit,
        push=args.push,
        environ=environ,
        lock_timeout=args.lock_timeout,
        waiting=lambda: _say(
            err,
            f"another apply is running on {args.state}; waiting up to "
            f"{args.lock_timeout:g} s for it to finish",
        ),
        progress=_progress(args, err),
    )
    report = result.applied
    for which, passphrase in report.bootstrapped:
        err.write(
            f"reconciler: generated a new {which.label} passphrase in {passphrase.origin} "
            f"(mode 0600). Store it in your CI secret store as {which.env} and in your "
            f"password manager: {_LOSS[which]}\n"
        )
    if not report.plan.changes:
        out.write(f"Nothing to do: {render.summary(report.plan)}.\n")
    else:
        out.write(render.plan_text(report.plan))
        for subject, serial in report.outcome.issued:
            out.write(f"  {subject}: new serial {format_serial(serial)}\n")
        out.write(
            f"Done: {render.done_summary(report.plan)}; "
            f"{len(report.outcome.changed)} files changed under {args.state}.\n"
        )
    recorded = result.recorded
    if recorded is not None and recorded.sha is not None:
        out.write(f"Committed {recorded.sha[:12]} ({len(recorded.paths)} paths).\n")
    if recorded is not None and recorded.ignored:
        out.write(
            f"Not committed: .gitignore keeps {len(recorded.ignored)} issued files out of git "
            f"(first: {recorded.ignored[0]}). In a clone of the reconciler's own repository "
            "that is on purpose; to make it your state repository, run `make adopt` "
            "(docs/git.md#adopting-this-repository).\n"
        )
    if report.plan.changes and not args.no_commit and not result.in_git:
        out.write(f"{args.state} is not inside a git work tree: nothing committed.\n")
    if result.pushed:
        retried = f" after {result.attempts} attempts" if result.attempts > 1 else ""
        out.write(f"Pushed{retried}.\n")
    elif result.attempts > 1:
        out.write(
            "The remote moved while this job ran; it re-ran on top of it and found nothing "
            "left to push. Certificates made in the discarded attempt were never committed.\n"
        )
    if args.prometheus is not None:
        _write_prometheus(args.prometheus, args.state, engine.status(args.state, now), now)
    return EXIT_OK


def _export(
    args: argparse.Namespace, now: datetime, environ: Mapping[str, str], out: TextIO, err: TextIO
) -> int:
    snap = engine.snapshot(args.state)
    result = export_stage.export(
        make_plan(snap.desired, snap.observed, now=now),
        make_status(snap.desired, snap.observed, now=now),
        snap.store,
        args.name,
        args.layout,
        args.out,
        sources=_sources(args, environ),
        encrypted=args.encrypted,
        with_crl=args.with_crl,
        owner=args.owner,
        force=args.force,
    )
    for warning in result.warnings:
        err.write(f"reconciler: warning: {warning}\n")
    for path in result.written:
        out.write(f"wrote {path}\n")
    for path in result.unchanged:
        out.write(f"unchanged {path}\n")
    return EXIT_OK


def _hba(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.check is None:
        if args.pg_version is not None or args.lenient:
            raise UsageError("--pg-version and --lenient go with --check FILE")
        out.write(hba_stage.fragment(engine.validate(args.state)))
        return EXIT_OK
    snap = engine.snapshot(args.state)  # the ledger names the users who left users.yaml
    version, findings = hba_stage.check(
        snap.desired, args.check, pg_version=args.pg_version, issued=snap.observed.ledger.entries
    )
    if version > hba_stage.NEWEST:
        newest = hba_stage.NEWEST
        err.write(f"reconciler: note: PostgreSQL {version} is judged by the rules of {newest}.\n")
    warned = hba_stage.Problem.UNKNOWN if args.lenient else None
    for finding in findings:
        label = "warning: " if finding.problem is warned else ""
        out.write(f"{finding.where}: {label}{finding.message}\n")
    if any(finding.problem is not warned for finding in findings):
        err.write(
            f"reconciler: {args.check} is not ready for PostgreSQL {version} (see above); "
            "fix it and check again.\n"
        )
        return EXIT_USER
    total = len(hba_stage.generated_rules(snap.desired))
    out.write(
        f"{args.check}: PostgreSQL {version} loads it, and all {total} generated rules are "
        "reached first.\n"
    )
    return EXIT_OK


def _rotate(
    args: argparse.Namespace, now: datetime, environ: Mapping[str, str], out: TextIO, err: TextIO
) -> int:
    which = Which.CA if args.what == "ca" else Which.KEY
    done = engine.rotate_passphrase(
        args.state,
        now,
        which,
        _sources(args, environ),
        commit=not args.no_commit,
        environ=environ,
        waiting=lambda: _say(err, f"another apply is running on {args.state}; waiting for it"),
    )
    out.write(f"Re-encrypted {_count(len(done.rewritten), 'key file')} under the new passphrase.\n")
    if done.recorded is not None and done.recorded.sha is not None:
        out.write(f"Committed {done.recorded.sha[:12]}; push it.\n")
    _say(
        err,
        f"{done.secret_file} holds the new {which.label} passphrase now (mode 0600)"
        if done.secret_file is not None
        else f"the {which.label} passphrase came from {done.current.origin}: put the new one "
        f"there (and in the CI secret store, as {which.env}) now; the old one opens nothing",
    )
    return EXIT_OK


def _status(args: argparse.Namespace, now: datetime, out: TextIO, err: TextIO) -> int:
    rows = engine.status(args.state, now)
    out.write(render.status_json(rows, now) if args.json else render.status_text(rows, now))
    if args.prometheus is not None:
        _write_prometheus(args.prometheus, args.state, rows, None)
    if args.warn_days is None:
        return EXIT_OK
    soon = [
        f"{row.kind}/{row.name} ({row.standing}"
        + (f", {days} days left)" if (days := render.days_left(row, now)) is not None else ")")
        for row in needs_attention(rows, now, args.warn_days)
    ]
    if soon:
        err.write(
            f"reconciler: unusable, or running out within {args.warn_days} days: "
            f"{', '.join(soon)}; run `make renew`.\n"
        )
        return EXIT_USER
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; returns the exit code. Tests call this directly."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    env = os.environ if environ is None else environ
    try:
        args = _build_parser().parse_args(argv)
        args.state = _state_dir(args)
        now = _parse_now(args.now)
        handlers: dict[str, Callable[[], int]] = {
            "init": lambda: _init(args, out),
            "validate": lambda: _validate(args, out, err),
            "plan": lambda: _plan(args, now, env, out, err),
            "apply": lambda: _apply(args, now, env, out, err),
            "reconcile": lambda: _apply(args, now, env, out, err),
            "status": lambda: _status(args, now, out, err),
            "export": lambda: _export(args, now, env, out, err),
            "hba": lambda: _hba(args, out, err),
            "rotate-passphrase": lambda: _rotate(args, now, env, out, err),
        }
        return handlers[args.command]()
    except ReconcilerError as exc:
        err.write(f"reconciler: {exc}\n")
        return EXIT_USER
    except KeyboardInterrupt:
        err.write("reconciler: interrupted\n")
        return 130
    except BrokenPipeError:  # `reconciler plan | head`: the reader has all it wanted
        if out is sys.stdout:  # what is still buffered goes nowhere, quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except Exception:
        import traceback

        traceback.print_exc(file=err)
        err.write("reconciler: this is a bug; please report it with the lines above.\n")
        return EXIT_BUG


def console(environ: Mapping[str, str]) -> NoReturn:
    """The `reconciler` command: main(), with its output flushed before the exit code."""
    try:
        code = main(environ=environ)
    except SystemExit as exc:  # argparse: --help, --version
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or EXIT_SIGPIPE
    sys.exit(code)
