"""Benchmark harness: the reconciler against the tools it replaces.

Run it from the project root with the project's virtualenv:

    .venv/bin/python bench/bench.py [--quick] [--users 1000,10000] [--with-100k]
                                    [--json FILE] [--cache DIR] [--profile]

Every figure comes from the real command line run as a subprocess, timed by wall clock, with the
peak resident memory of that process (os.wait4). States are built by the reconciler itself in a
cache directory and reused while their users.yaml is unchanged; see bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # .venv/bin when run as the README says
RECONCILER = BIN / "reconciler"
PYTHON = BIN / "python"
EASYRSA = Path("/usr/share/easy-rsa/easyrsa")
DEFAULT_CACHE = Path(
    os.environ.get("RECONCILER_BENCH_CACHE", Path(tempfile.gettempdir()) / "reconciler-bench")
)
PYCACHE = DEFAULT_CACHE / "pycache"  # set from --cache in main()
CA_PASSPHRASE = "bench-ca-passphrase-not-a-secret-0123"  # noqa: S105 (benchmark fixture)
KEY_PASSPHRASE = "bench-key-passphrase-not-a-secret-4567"  # noqa: S105 (benchmark fixture)
CHECKEND_SECONDS = 2_592_000  # 30 days, as the cron job has it
SLOW_RUN_SECONDS = 60.0  # a run slower than this is measured once, not best of three
STATE_FORMAT = 1  # bump to invalidate cached states when the generator below changes

# Targets (issue 11; issue 6 set the issuance ones). Time per user, plan and validate against
# the no-op are printed for information.
NOOP_VS_PARSE_MAX = 3.0
NOOP_VS_OPENSSL_MIN = 30.0
NOOP_RSS_MAX_MIB = 200.0
FLAT_ROUNDS_MIN = 5  # rounds of the no-op at every size, for the flatness figure
ECDSA_VS_EASYRSA_MIN = 20.0
RSA_PER_CORE_MIN = 0.8

PARSE_SCRIPT = """\
import os, sys
from cryptography import x509
count = 0
for directory in sys.argv[1:]:
    for name in os.listdir(directory):
        if name.endswith(".crt"):
            with open(os.path.join(directory, name), "rb") as handle:
                x509.load_pem_x509_certificate(handle.read())
            count += 1
print(count)
"""

CRYPTOGRAPHY_VERSION = """\
import cryptography
from cryptography.hazmat.backends.openssl import backend
print(cryptography.__version__, "with", backend.openssl_version_text())
"""

CHECKEND_LOOP = f"""\
while IFS= read -r f; do
    openssl x509 -checkend {CHECKEND_SECONDS} -noout -in "$f" >/dev/null || echo "expiring: $f"
done < "$1"
"""

EASYRSA_LOOP = """\
for i in $(seq 1 "$1"); do
    "$2" build-client-full "user$i" nopass >/dev/null 2>&1 || { echo "easyrsa failed" >&2; exit 1; }
done
"""

OPENSSL_RSA_LOOP = """\
cd "$2"
for i in $(seq 1 "$1"); do
    openssl genrsa -out "user$i.key" 4096 2>/dev/null
    openssl req -new -key "user$i.key" -subj "/C=NL/O=Bench/CN=user$i" -out "user$i.csr"
    openssl x509 -req -in "user$i.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \\
        -days 365 -sha256 -out "user$i.crt" 2>/dev/null
done
"""


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished subprocess: wall clock, CPU (with waited-for descendants), peak RSS."""

    wall: float
    cpu: float
    max_rss_mib: float
    stdout: str


class BenchError(Exception):
    pass


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every measured process.

    Bytecode is cached under the cache directory (PYTHONPYCACHEPREFIX), as an installed package
    has it, without writing into the source tree; PYTHONDONTWRITEBYTECODE would otherwise make
    every run of the editable install compile reconciler/ again.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RECONCILER_", "EASYRSA"))
        and k not in ("CI", "PYTHONPROFILE", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    }
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["RECONCILER_CA_PASSPHRASE"] = CA_PASSPHRASE
    env["RECONCILER_KEY_PASSPHRASE"] = KEY_PASSPHRASE
    env["LC_ALL"] = "C"
    env.update(extra or {})
    return env


# Linux carries the peak RSS of the process that spawns a child over into that child's
# ru_maxrss (the pre-exec image counts), so a child spawned by this harness would report at least
# the harness's own peak. Each measured command is therefore spawned by this small trampoline,
# started afresh, which times it and waits for it. The trampoline is also a child subreaper:
# descendants that outlive their parent (a forkserver's workers, say) are re-parented to it and
# reaped by it, so the CPU time reported is that of the whole process tree, and CPU / wall says
# how many cores the command kept busy.
TRAMPOLINE = """\
import ctypes, json, os, resource, sys, time
report, argv = sys.argv[1], sys.argv[2:]
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (OSError, AttributeError):
    pass
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, _ = os.wait4(pid, 0)
wall = time.perf_counter() - start
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(report, "w") as handle:
    json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
               "maxrss_kib": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status)}, handle)
"""
KEEP_OUTPUT = 64 * 1024  # bytes of stdout kept from each end; the checks need no more


def _ends(handle: IO[bytes]) -> str:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    if size <= 2 * KEEP_OUTPUT:
        return handle.read().decode("utf-8", "replace")
    head = handle.read(KEEP_OUTPUT)
    handle.seek(size - KEEP_OUTPUT)
    return (head + b"\n[...]\n" + handle.read()).decode("utf-8", "replace")


def run(argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None) -> Run:
    """Run argv to completion; raise BenchError with its stderr when it fails."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as report,
    ):
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", TRAMPOLINE, report.name, *map(str, argv)],
            stdout=out,
            stderr=err,
            env=dict(env or child_env()),
            check=False,
        )
        stdout, stderr = _ends(out), _ends(err)
        try:
            facts = json.loads(Path(report.name).read_text() or "null")
        except json.JSONDecodeError:
            facts = None
    if not isinstance(facts, dict) or facts["exit"] != 0:
        shown = " ".join(str(a) for a in argv)
        code = facts["exit"] if isinstance(facts, dict) else "?"
        raise BenchError(f"`{shown}` exited {code}:\n{stderr[-2000:]}")
    return Run(
        wall=float(facts["wall"]),
        cpu=float(facts["cpu"]),
        max_rss_mib=int(facts["maxrss_kib"]) / 1024,  # Linux reports KiB
        stdout=stdout,
    )


@dataclasses.dataclass(frozen=True)
class Best:
    """The fastest of several runs (wall clock) and the highest peak RSS seen."""

    wall: float
    cpu: float
    max_rss_mib: float
    runs: tuple[float, ...]
    stdout: str

    def as_json(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall, 4),
            "cpu_s": round(self.cpu, 4),
            "max_rss_mib": round(self.max_rss_mib, 1),
            "runs_s": [round(r, 4) for r in self.runs],
        }


def best_of(
    make_run: Callable[[], Run], repeats: int, *, check: Callable[[Run], None] | None = None
) -> Best:
    """Best wall clock of up to `repeats` runs; one run only when the first is slow."""
    return best_of_each({"run": make_run}, repeats, checks={"run": check} if check else None)["run"]


def best_of_each(
    makers: Mapping[str, Callable[[], Run]],
    repeats: int,
    *,
    checks: Mapping[str, Callable[[Run], None]] | None = None,
) -> dict[str, Best]:
    """best_of() for several commands, their runs interleaved (a b c, a b c, ...): this VM has
    slow stretches lasting from seconds to minutes (page cache reclaimed, the second core
    taken), and commands measured one after the other can land in different stretches; taken
    in turns, each gets its share of both. Slow scenarios (over a minute) are run once."""
    runs: dict[str, list[Run]] = {name: [] for name in makers}
    for _ in range(repeats):
        for name, make_run in makers.items():
            if runs[name] and runs[name][-1].wall > SLOW_RUN_SECONDS:
                continue
            result = make_run()
            if checks and name in checks:
                checks[name](result)
            runs[name].append(result)
    best: dict[str, Best] = {}
    for name, done in runs.items():
        fastest = min(done, key=lambda r: r.wall)
        best[name] = Best(
            wall=fastest.wall,
            cpu=fastest.cpu,
            max_rss_mib=max(r.max_rss_mib for r in done),
            runs=tuple(r.wall for r in done),
            stdout=fastest.stdout,
        )
    return best


def log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- states


def users_yaml(users: int, *, key: str, ca_key: str, prefix: str = "user") -> str:
    """A valid users.yaml: a CA, `users` client entries, validity 365d, CRL 30d/20d."""
    lines = [
        "# generated by bench/bench.py",
        "version: 1",
        "ca:",
        "  subject: {CN: Bench PostgreSQL CA, C: NL, O: Bench}",
        f"  key: {ca_key}",
        "  validity: 3650d",
        "defaults:",
        f"  key: {key}",
        "  validity: 365d",
        "  renew_before: 33%",
        "  subject: {C: NL, O: Bench}",
        "crl:",
        "  validity: 30d",
        "  refresh_before: 20d",
    ]
    if users:
        lines.append("users:")
        lines.extend(f"  - name: {prefix}{i:06d}" for i in range(users))
    else:
        lines.append("users: []")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class State:
    """A built state directory and how it was built."""

    name: str
    users: int
    directory: Path  # the state directory (holds users.yaml)
    now: str  # the --now it was built at; every run against it uses the same
    build_s: float
    build_rss_mib: float
    built_at: str
    built_by: str  # source_digest() of the reconciler that built it
    cached: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "directory": str(self.directory),
            "now": self.now,
            "build_s": round(self.build_s, 2),
            "build_rss_mib": round(self.build_rss_mib, 1),
            "built_at": self.built_at,
            "built_by_reconciler_source": self.built_by,
            "reused_from_cache": self.cached,
        }


def reconciler(state: Path, now: str, *command: str) -> list[str | Path]:
    return [RECONCILER, "--state", state, "--now", now, *command]


def ensure_state(cache: Path, name: str, text: str, users: int, *, rebuild: bool = False) -> State:
    """Build the state with the reconciler itself, or reuse the cached one for the same text."""
    home = cache / name
    state_dir, meta_path = home / "state", home / "meta.json"
    digest = hashlib.sha256(f"{STATE_FORMAT}\n{text}".encode()).hexdigest()
    if not rebuild and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        users_file = state_dir / "users.yaml"
        if (
            meta.get("digest") == digest
            and meta.get("complete")
            and users_file.exists()
            and users_file.read_text() == text
        ):
            return State(
                name=name,
                users=users,
                directory=state_dir,
                now=meta["now"],
                build_s=meta["build_s"],
                build_rss_mib=meta["build_rss_mib"],
                built_at=meta["built_at"],
                built_by=meta.get("built_by", "unknown"),
                cached=True,
            )
    if home.exists():
        shutil.rmtree(home)
    state_dir.mkdir(parents=True)
    (state_dir / "users.yaml").write_text(text)
    now = datetime.now(UTC).replace(second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    log(f"building state {name} ({users:,} users) with the reconciler; this is paid once")
    result = run(reconciler(state_dir, now, "apply", "--no-commit"))
    meta = {
        "digest": digest,
        "complete": True,
        "users": users,
        "now": now,
        "build_s": result.wall,
        "build_rss_mib": result.max_rss_mib,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_by": source_digest(),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built {name} in {result.wall:.1f} s ({result.max_rss_mib:.0f} MiB peak)")
    return State(
        name=name,
        users=users,
        directory=state_dir,
        now=now,
        build_s=result.wall,
        build_rss_mib=result.max_rss_mib,
        built_at=meta["built_at"],
        built_by=meta["built_by"],
        cached=False,
    )


def noop_state(cache: Path, users: int, *, rebuild: bool = False) -> State:
    text = users_yaml(users, key="ecdsa-p256", ca_key="ecdsa-p256")
    return ensure_state(cache, f"noop-{users}", text, users, rebuild=rebuild)


def wait_unlocked(state: Path, limit: float = 600.0) -> None:
    """Wait while another process holds the state directory's lock (apply takes a flock on the
    directory), so that time spent waiting for someone else's apply is never measured."""
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > limit:
                    raise BenchError(f"{state} stayed locked by another process") from None
                time.sleep(0.2)
        waited = time.monotonic() - start
        if waited > 0.1:
            log(f"waited {waited:.1f} s for another process's lock on {state}")
    finally:
        os.close(fd)  # releases the lock at once


def warm_cache(state: Path) -> None:
    """Read every file of the state once, so no scenario pays for bringing it into the page
    cache (or for pages the kernel reclaimed while other scenarios ran) and the others do not."""
    for directory, _, files in os.walk(state):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                while handle.read(1 << 20):
                    pass


def expect_noop(result: Run) -> None:
    if not result.stdout.startswith("Nothing to do"):
        first = result.stdout.splitlines()[:3]
        raise BenchError(f"the no-op apply had something to do: {first}")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: what we measured, against what, and whether the target holds."""

    scenario: str
    ours: str
    baseline: str
    ratio: str
    target: str
    passed: bool | None  # None: informational
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "info" if self.passed is None else "PASS" if self.passed else "FAIL"


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def per_unit(value: float, unit: str) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.1f} µs/{unit}"
    if value < 1:
        return f"{value * 1e3:.2f} ms/{unit}"
    return f"{value:.2f} s/{unit}"


def table(rows: Sequence[Row]) -> str:
    header = ("scenario", "ours", "baseline", "ratio", "target", "result")
    cells = [header] + [
        (r.scenario, r.ours, r.baseline, r.ratio, r.target, r.verdict) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class Config:
    sizes: list[int]
    cache: Path
    repeats: int
    openssl_sample: int  # at most this many files in the openssl loop; more is extrapolated
    ecdsa_certs: int
    easyrsa_certs: int
    rsa_certs: int
    cores: int
    rebuild: bool
    profile: bool
    skip_issuance: bool

    @property
    def profile_size(self) -> int:
        """Profiles run at 10,000 users, or at the largest size when 10,000 is not measured."""
        return 10_000 if 10_000 in self.sizes else max(self.sizes)


def measure_size(cfg: Config, users: int, zero: Best) -> tuple[list[Row], dict[str, Any], State]:
    """No-op apply, plan, validate and the two baselines over one built state."""
    state = noop_state(cfg.cache, users, rebuild=cfg.rebuild)
    out: dict[str, Any] = {"state": state.as_json(), "loadavg_at_start": os.getloadavg()}
    rows: list[Row] = []
    sdir, now = state.directory, state.now

    def noop_once() -> Run:
        wait_unlocked(sdir)
        return run(reconciler(sdir, now, "apply", "--no-commit"))

    log(f"{users:,} users: no-op apply (a first run checks the cached state)")
    warm_cache(sdir)
    try:
        expect_noop(noop_once())
    except BenchError as exc:
        if state.cached:  # the reconciler changed under a cached state: rebuild it once
            log(f"cached state is stale ({exc}); rebuilding it")
            state = noop_state(cfg.cache, users, rebuild=True)
            out["state"] = state.as_json()
            sdir, now = state.directory, state.now
        else:
            raise

    log(f"{users:,} users: no-op apply, plan, validate and the bare parse, runs interleaved")
    warm_cache(sdir)
    cert_dirs = [d for d in (sdir / "clients", sdir / "servers") if d.is_dir()]
    measured = best_of_each(
        {
            "noop": noop_once,
            "plan": lambda: run(reconciler(sdir, now, "plan")),
            "validate": lambda: run(reconciler(sdir, now, "validate")),
            "parse": lambda: run([PYTHON, "-c", PARSE_SCRIPT, *cert_dirs]),
        },
        cfg.repeats,
        checks={"noop": expect_noop},
    )
    noop, plan, validate = measured["noop"], measured["plan"], measured["validate"]
    parse = measured["parse"]
    out["noop_apply"] = noop.as_json()
    out["plan"], out["validate"] = plan.as_json(), validate.as_json()
    if int(parse.stdout.strip()) != users:
        raise BenchError(f"the parse baseline found {parse.stdout.strip()} certificates")
    out["baseline_parse"] = parse.as_json()

    files = sorted((sdir / "clients").glob("*.crt"))
    sample = files[: cfg.openssl_sample]
    log(f"{users:,} users: baseline, openssl -checkend loop over {len(sample):,} files")
    with tempfile.NamedTemporaryFile("w", suffix=".list", delete=False) as listing:
        listing.write("".join(f"{f}\n" for f in sample))
    try:
        loop = run(["bash", "-c", CHECKEND_LOOP, "checkend", listing.name])
    finally:
        os.unlink(listing.name)
    if loop.stdout.strip():
        raise BenchError(f"the openssl loop found expiring certificates: {loop.stdout[:200]}")
    scale = len(files) / len(sample)
    loop_wall = loop.wall * scale
    estimated = scale != 1
    out["baseline_openssl_loop"] = {
        "files_run": len(sample),
        "files_total": len(files),
        "wall_s_measured": round(loop.wall, 3),
        "wall_s": round(loop_wall, 3),
        "extrapolated": estimated,
        "max_rss_mib": round(loop.max_rss_mib, 1),
    }

    k = f"{users // 1000}k" if users >= 1000 else str(users)
    ratio = noop.wall / parse.wall
    rows.append(
        Row(
            f"no-op apply {k} vs bare parse",
            seconds(noop.wall),
            seconds(parse.wall),
            f"{ratio:.1f}x slower",
            f"<= {NOOP_VS_PARSE_MAX:g}x",
            ratio <= NOOP_VS_PARSE_MAX,
            {"ours_s": noop.wall, "baseline_s": parse.wall, "ratio": ratio},
        )
    )
    speedup = loop_wall / noop.wall
    rows.append(
        Row(
            f"no-op apply {k} vs openssl -checkend loop",
            seconds(noop.wall),
            seconds(loop_wall) + (f" (est. from {len(sample):,})" if estimated else ""),
            f"{speedup:.1f}x faster",
            f">= {NOOP_VS_OPENSSL_MIN:g}x faster",
            speedup >= NOOP_VS_OPENSSL_MIN,
            {"ours_s": noop.wall, "baseline_s": loop_wall, "speedup": speedup},
        )
    )
    rows.append(
        Row(
            f"no-op apply {k} peak RSS",
            f"{noop.max_rss_mib:.0f} MiB",
            f"{parse.max_rss_mib:.0f} MiB (parse)",
            "",
            f"<= {NOOP_RSS_MAX_MIB:g} MiB",
            noop.max_rss_mib <= NOOP_RSS_MAX_MIB,
            {"ours_mib": noop.max_rss_mib, "baseline_mib": parse.max_rss_mib},
        )
    )
    for label, best in (("plan", plan), ("validate", validate)):
        ratio = best.wall / noop.wall
        rows.append(
            Row(
                f"{label} {k} vs no-op apply",
                seconds(best.wall),
                seconds(noop.wall),
                f"{ratio:.2f}x",
                "(information)",
                None,
                {"ours_s": best.wall, "baseline_s": noop.wall, "ratio": ratio},
            )
        )
    marginal = max(noop.wall - zero.wall, 0.0) / users
    out["noop_marginal_s_per_user"] = marginal
    rows.append(
        Row(
            f"no-op apply {k} time per user",
            per_unit(marginal, "user"),
            seconds(zero.wall) + " fixed",
            "",
            "(see flatness)",
            None,
            {"marginal_s_per_user": marginal, "fixed_s": zero.wall},
        )
    )
    if cfg.profile and users == cfg.profile_size:
        out["profiles"] = profile(cfg, state)
    return rows, out, state


def profile(cfg: Config, state: State) -> dict[str, str]:
    """cProfile the no-op apply and plan; print the top 25 by cumulative and by own time."""
    import pstats  # only here: the harness itself needs no profiler

    written: dict[str, str] = {}
    for label, command in (("noop", ("apply", "--no-commit")), ("plan", ("plan",))):
        target = cfg.cache / f"{label}-{state.users}.prof"
        argv: list[str | Path] = [PYTHON, "-m", "cProfile", "-o", target, "-m", "reconciler"]
        argv += ["--state", state.directory, "--now", state.now, *command]
        log(f"profiling {label} at {state.users:,} users -> {target}")
        wait_unlocked(state.directory)
        run(argv)
        for order in ("cumulative", "tottime"):
            print(f"\n=== {label} {state.users:,} users: top 25 by {order} ===", flush=True)
            pstats.Stats(str(target), stream=sys.stdout).sort_stats(order).print_stats(25)
        written[label] = str(target)
    return written


def fixed_cost(cfg: Config) -> tuple[State, Best]:
    """The no-op over a CA-only state: start-up, imports, CA and CRL; subtracted per user."""
    state = ensure_state(
        cfg.cache,
        "ca-ecdsa",
        users_yaml(0, key="ecdsa-p256", ca_key="ecdsa-p256"),
        0,
        rebuild=cfg.rebuild,
    )
    best = best_of(
        lambda: run(reconciler(state.directory, state.now, "apply", "--no-commit")),
        max(cfg.repeats, 3),
        check=expect_noop,
    )
    return state, best


def flatness(cfg: Config, states: Mapping[int, State]) -> tuple[list[Row], dict[str, Any]]:
    """Time per added user: the slope from the second-largest to the largest size against the
    slope between the two smallest. Each slope spans thousands of users, so it is not drowned
    by run-to-run noise, and start-up cancels out; a time per user taken against the CA-only
    state at 1,000 users divides a noise of tens of milliseconds by 1,000. Needs three sizes.

    The no-op runs in rounds, every size once per round (1k, 10k, 100k, 1k, ...): a round
    lasts seconds, and this VM's slow stretches last minutes, so the sizes of one round see the
    same machine. The figure is the median over rounds of each round's ratio; best-of walls
    taken per size at different times had moved the ratio between 0.80x and 1.49x. The slope
    of CPU time (every process of the run) is printed too: the work per added user, which
    parallelism and the machine's stretches do not change."""
    sizes = sorted(states)
    if len(sizes) < 3:
        return [], {}
    count = max(cfg.repeats, FLAT_ROUNDS_MIN)
    shown = ", ".join(f"{n:,}" for n in sizes)
    log(f"flatness: the no-op at {shown} users in turns, {count} rounds")
    rounds: list[dict[int, Run]] = []
    for _ in range(count):
        done: dict[int, Run] = {}
        for users in sizes:
            state = states[users]
            wait_unlocked(state.directory)
            done[users] = run(reconciler(state.directory, state.now, "apply", "--no-commit"))
            expect_noop(done[users])
        rounds.append(done)

    def slopes(values: Mapping[int, float]) -> list[float]:
        return [
            (values[high] - values[low]) / (high - low) for low, high in itertools.pairwise(sizes)
        ]

    def ratio(found: Sequence[float]) -> float:
        return found[-1] / found[0] if found[0] > 0 else float("inf")

    wall_slopes = [slopes({n: r.wall for n, r in done.items()}) for done in rounds]
    ratios = [ratio(found) for found in wall_slopes]
    median_ratio = statistics.median(ratios)
    first = statistics.median(found[0] for found in wall_slopes)
    last = statistics.median(found[-1] for found in wall_slopes)
    cpu = slopes({n: min(done[n].cpu for done in rounds) for n in sizes})
    span = f"{sizes[-2]:,}->{sizes[-1]:,} vs {sizes[0]:,}->{sizes[1]:,}"
    data = {
        "rounds_wall_s": [{str(n): r.wall for n, r in done.items()} for done in rounds],
        "rounds_cpu_s": [{str(n): r.cpu for n, r in done.items()} for done in rounds],
        "round_ratios": ratios,
        "median_ratio": median_ratio,
        "median_slopes_s_per_user": [first, last],
        "cpu_slopes_s_per_user": cpu,
        "cpu_ratio": ratio(cpu),
    }
    rows = [
        Row(
            f"no-op per added user {span} (median of {count} rounds)",
            per_unit(last, "user"),
            per_unit(first, "user"),
            f"{median_ratio:.2f}x",
            "(information: 1.00x is flat)",
            None,
            {"ratio": median_ratio, "round_ratios": ratios},
        ),
        Row(
            f"no-op CPU per added user {span} (all processes)",
            per_unit(cpu[-1], "user"),
            per_unit(cpu[0], "user"),
            f"{ratio(cpu):.2f}x",
            "(work per user)",
            None,
            {"slopes_s_per_user": cpu, "ratio": ratio(cpu)},
        ),
    ]
    return rows, data


def fresh_copy(template: State, work: Path, text: str) -> Path:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(template.directory, work / "state")
    (work / "state" / "users.yaml").write_text(text)
    return work / "state"


def issuance_ecdsa(cfg: Config, ca: State) -> tuple[list[Row], dict[str, Any]]:
    """N new ECDSA P-256 users in one apply (existing CA) vs easy-rsa build-client-full."""
    n = cfg.ecdsa_certs
    work = cfg.cache / "work-issue-ecdsa"

    def ours_once(count: int) -> Run:
        text = users_yaml(count, key="ecdsa-p256", ca_key="ecdsa-p256", prefix="new")
        state = fresh_copy(ca, work, text)
        result = run(reconciler(state, ca.now, "apply", "--no-commit"))
        if f"{count} issued" not in result.stdout:
            raise BenchError(f"expected {count} issued: {result.stdout[-300:]}")
        return result

    log(f"issuance: {n:,} ECDSA certificates with the reconciler")
    ours = best_of(lambda: ours_once(n), cfg.repeats)
    log("issuance: 1 ECDSA certificate with the reconciler (one apply)")
    single = best_of(lambda: ours_once(1), cfg.repeats)
    shutil.rmtree(work, ignore_errors=True)

    m = cfg.easyrsa_certs
    pki_home = cfg.cache / "work-easyrsa"
    env = child_env(
        {
            "EASYRSA": str(EASYRSA.parent),
            "EASYRSA_PKI": str(pki_home / "pki"),
            "EASYRSA_BATCH": "1",
            "EASYRSA_ALGO": "ec",
            "EASYRSA_CURVE": "prime256v1",
        }
    )

    def easyrsa_once() -> Run:
        if pki_home.exists():
            shutil.rmtree(pki_home)
        pki_home.mkdir(parents=True)
        run([EASYRSA, "init-pki"], env=env)
        run([EASYRSA, "build-ca", "nopass"], env={**env, "EASYRSA_REQ_CN": "Bench CA"})
        result = run(["bash", "-c", EASYRSA_LOOP, "easyrsa", str(m), str(EASYRSA)], env=env)
        issued = len(list((pki_home / "pki" / "issued").glob("user*.crt")))
        if issued != m:
            raise BenchError(f"easy-rsa issued {issued} of {m} certificates")
        return result

    log(f"issuance: {m} ECDSA certificates with easy-rsa build-client-full")
    base = best_of(easyrsa_once, cfg.repeats)
    shutil.rmtree(pki_home, ignore_errors=True)
    ours_each, base_each = ours.wall / n, base.wall / m
    speedup = base_each / ours_each
    row = Row(
        "issue ECDSA P-256, per certificate",
        per_unit(ours_each, "cert") + f" (n={n:,})",
        per_unit(base_each, "cert") + f" (easy-rsa, n={m})",
        f"{speedup:.1f}x faster",
        f">= {ECDSA_VS_EASYRSA_MIN:g}x faster",
        speedup >= ECDSA_VS_EASYRSA_MIN,
        {"ours_s_per_cert": ours_each, "baseline_s_per_cert": base_each, "speedup": speedup},
    )
    one = Row(
        "issue 1 ECDSA P-256 (one apply, start-up included)",
        seconds(single.wall),
        per_unit(base_each, "cert") + " (easy-rsa)",
        f"{base_each / single.wall:.2f}x faster",
        "(informational)",
        None,
        {"ours_s": single.wall, "baseline_s_per_cert": base_each},
    )
    return [row, one], {
        "ours": ours.as_json(),
        "ours_n": n,
        "ours_single": single.as_json(),
        "easyrsa": base.as_json(),
        "easyrsa_n": m,
    }


def issuance_rsa(cfg: Config) -> tuple[list[Row], dict[str, Any]]:
    """N RSA-4096 users in one apply vs a serial genrsa/req/x509 loop; both with an RSA CA."""
    ca = ensure_state(
        cfg.cache,
        "ca-rsa4096",
        users_yaml(0, key="rsa-4096", ca_key="rsa-4096"),
        0,
        rebuild=cfg.rebuild,
    )
    n = cfg.rsa_certs
    text = users_yaml(n, key="rsa-4096", ca_key="rsa-4096", prefix="new")
    work = cfg.cache / "work-issue-rsa"
    state = fresh_copy(ca, work, text)
    log(f"issuance: {n} RSA-4096 certificates with the reconciler")
    ours = run(reconciler(state, ca.now, "apply", "--no-commit"))
    if f"{n} issued" not in ours.stdout:
        raise BenchError(f"expected {n} issued: {ours.stdout[-300:]}")
    shutil.rmtree(work, ignore_errors=True)

    base_dir = cfg.cache / "work-openssl-rsa"
    if base_dir.exists():
        shutil.rmtree(base_dir)
    base_dir.mkdir(parents=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:4096",
            "-nodes",
            "-keyout",
            base_dir / "ca.key",
            "-out",
            base_dir / "ca.crt",
            "-subj",
            "/C=NL/O=Bench/CN=Bench RSA CA",
            "-days",
            "3650",
        ]
    )
    log(f"issuance: {n} RSA-4096 certificates with a serial openssl loop")
    base = run(["bash", "-c", OPENSSL_RSA_LOOP, "openssl-rsa", str(n), str(base_dir)])
    if len(list(base_dir.glob("user*.crt"))) != n:
        raise BenchError("the openssl RSA loop did not issue every certificate")
    shutil.rmtree(base_dir, ignore_errors=True)
    ours_each, base_each = ours.wall / n, base.wall / n
    speedup = base_each / ours_each
    needed = RSA_PER_CORE_MIN * cfg.cores
    row = Row(
        "issue RSA-4096, per certificate",
        per_unit(ours_each, "cert") + f" (n={n}, cpu {ours.cpu / ours.wall:.2f} cores)",
        per_unit(base_each, "cert") + f" (serial openssl, n={n})",
        f"{speedup:.2f}x faster",
        f">= {needed:.1f}x (0.8 x {cfg.cores} cores)",
        speedup >= needed,
        {"ours_s_per_cert": ours_each, "baseline_s_per_cert": base_each, "speedup": speedup},
    )
    busy = ours.cpu / ours.wall
    cores_row = Row(
        "issue RSA-4096, cores kept busy (cpu / wall)",
        f"{busy:.2f} cores",
        f"{base.cpu / base.wall:.2f} cores (serial openssl)",
        f"{busy / cfg.cores:.0%} of {cfg.cores}",
        f">= {needed:.1f} cores (every core busy)",
        busy >= needed,
        {"ours_cores": busy, "baseline_cores": base.cpu / base.wall, "cores": cfg.cores},
    )
    return [row, cores_row], {
        "ca_state": ca.as_json(),
        "ours": {**Best(ours.wall, ours.cpu, ours.max_rss_mib, (ours.wall,), "").as_json()},
        "openssl_loop": {**Best(base.wall, base.cpu, base.max_rss_mib, (base.wall,), "").as_json()},
        "n": n,
    }


# --------------------------------------------------------------------------- main


def environment(cfg: Config) -> dict[str, Any]:
    def text(argv: Sequence[str | Path], env: Mapping[str, str] | None = None) -> str:
        try:
            return subprocess.run(
                [str(a) for a in argv],
                capture_output=True,
                text=True,
                check=False,
                env=dict(env) if env else None,
            ).stdout.strip()
        except OSError:
            return ""

    read_only_git = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cores": cfg.cores,
        "python": platform.python_version(),
        "openssl": text(["openssl", "version"]),
        "cryptography": text([PYTHON, "-c", CRYPTOGRAPHY_VERSION]),
        "git_head": text(["git", "-C", ROOT, "rev-parse", "HEAD"], read_only_git),
        "reconciler_dirty": bool(
            text(["git", "-C", ROOT, "status", "--porcelain", "--", "reconciler"], read_only_git)
        ),
    }


def source_digest() -> str:
    """A digest of reconciler/*.py, to notice when the code changes during a run."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "reconciler").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1k users, small N: a smoke run")
    parser.add_argument("--users", help="comma-separated state sizes (default 1000,10000)")
    parser.add_argument(
        "--with-100k",
        action="store_true",
        default=os.environ.get("BENCH_WITH_100K") == "1",
        help="also 100,000 users (building that state takes minutes; or BENCH_WITH_100K=1)",
    )
    parser.add_argument("--json", type=Path, help="write the results here (default CACHE/...)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="state cache directory")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached states")
    parser.add_argument("--repeats", type=int, help="runs per fast scenario (default 5)")
    parser.add_argument("--openssl-sample", type=int, help="files run by the openssl loop")
    parser.add_argument("--ecdsa-certs", type=int, help="certificates issued by the reconciler")
    parser.add_argument("--easyrsa-certs", type=int, help="certificates issued by easy-rsa")
    parser.add_argument("--rsa-certs", type=int, help="RSA-4096 certificates, each side")
    parser.add_argument("--no-issuance", action="store_true", help="skip both issuance runs")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile no-op and plan at 10k users"
    )
    parser.add_argument("--check", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    sizes = (
        [int(s.replace("_", "")) for s in args.users.split(",") if s.strip()]
        if args.users
        else [1000]
        if quick
        else [1000, 10000]
    )
    if args.with_100k and 100_000 not in sizes:
        sizes.append(100_000)
    if any(s <= 0 for s in sizes):
        parser.error("--users takes positive sizes")

    def pick(value: int | None, normal: int, fast: int) -> int:
        return value if value is not None else fast if quick else normal

    return (
        Config(
            sizes=sorted(set(sizes)),
            cache=args.cache,
            repeats=pick(args.repeats, 5, 1),
            openssl_sample=pick(args.openssl_sample, 10_000, 1000),
            ecdsa_certs=pick(args.ecdsa_certs, 1000, 200),
            easyrsa_certs=pick(args.easyrsa_certs, 20, 5),
            rsa_certs=pick(args.rsa_certs, 8, 2),
            cores=len(os.sched_getaffinity(0)),
            rebuild=bool(args.rebuild),
            profile=bool(args.profile),
            skip_issuance=bool(args.no_issuance),
        ),
        args.json or args.cache / "results.json",
        bool(args.check),
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path, check = parse_args(argv)
    if not RECONCILER.exists():
        print(
            f"bench: {RECONCILER} not found; run `make bench` (it installs .venv)", file=sys.stderr
        )
        return 1
    cfg.cache.mkdir(parents=True, exist_ok=True)
    global PYCACHE
    PYCACHE = cfg.cache / "pycache"
    run([PYTHON, "-c", "import reconciler.cli"])  # fill the bytecode cache before measuring
    source_before = source_digest()
    results: dict[str, Any] = {"environment": environment(cfg), "sizes": {}, "issuance": {}}
    results["environment"]["reconciler_source"] = source_before
    rows: list[Row] = []
    try:
        ca, zero = fixed_cost(cfg)
        results["fixed_cost"] = {"state": ca.as_json(), "noop_apply": zero.as_json()}
        states: dict[int, State] = {}
        for users in cfg.sizes:
            size_rows, data, states[users] = measure_size(cfg, users, zero)
            rows += size_rows
            results["sizes"][str(users)] = data
        flat_rows, results["flatness"] = flatness(cfg, states)
        rows += flat_rows
        if not cfg.skip_issuance:
            if not EASYRSA.exists():
                raise BenchError(
                    f"{EASYRSA} is missing: apt-get update && apt-get install -y easy-rsa"
                )
            ecdsa_rows, results["issuance"]["ecdsa"] = issuance_ecdsa(cfg, ca)
            rsa_rows, results["issuance"]["rsa4096"] = issuance_rsa(cfg)
            rows += ecdsa_rows + rsa_rows
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if source_digest() != source_before:
        results["environment"]["reconciler_source_changed_during_run"] = True
        print(
            "bench: warning: reconciler/*.py changed during this run; the figures mix versions",
            file=sys.stderr,
        )
    stale = [
        s["state"]["users"]
        for s in results["sizes"].values()
        if s["state"]["built_by_reconciler_source"] != source_before
    ]
    if stale:
        print(
            f"bench: warning: the cached states of {', '.join(f'{n:,}' for n in stale)} users "
            "were built by another version of reconciler/; when it changed what it records "
            "(the ledger format), run again with --rebuild",
            file=sys.stderr,
        )
    builds = [
        f"  {s['state']['users']:>7,} users: {s['state']['build_s']:.1f} s, "
        f"{s['state']['build_rss_mib']:.0f} MiB peak"
        + (f" (cached, built {s['state']['built_at']})" if s["state"]["reused_from_cache"] else "")
        for s in results["sizes"].values()
    ]
    print(flush=True)
    print(table(rows))
    print("\nState build time (reconciler apply, ECDSA P-256, CA + every user + CRL):")
    print("\n".join(builds))
    results["table"] = [
        {
            "scenario": r.scenario,
            "ours": r.ours,
            "baseline": r.baseline,
            "ratio": r.ratio,
            "target": r.target,
            "result": r.verdict,
            **r.data,
        }
        for r in rows
    ]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nWrote {json_path}")
    failed = [r.scenario for r in rows if r.passed is False]
    print(f"{len(failed)} of {sum(r.passed is not None for r in rows)} targets missed.")
    return 3 if check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
