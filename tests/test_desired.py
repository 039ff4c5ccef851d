"""What this file proves about the desired-state loader (reconciler.desired) and its CLI surface.

1. The shipped state/users.yaml validates and reproduces the team's setup (CA subject, RSA 4096,
   CA 3650 days, clients 365 days, the five users, cmdb's hba rule, the one server), and `plan`
   on it needs no secret and writes nothing.
2. Every file in tests/bad_users/ (one problem per file; its first line says
   `# expect: LINE: SUBSTRING`), plus a file over the size limit generated at test time, is
   refused by the real command line, by `validate` (a subprocess), `plan` and
   `apply --no-commit` (in process, through reconciler.cli.main, passphrases set): exit code 1,
   no traceback, one message whose first line names `users.yaml:LINE:` and says what to do,
   and not one byte written anywhere (no ca/, no .secrets/, users.yaml untouched).
3. Hypothesis: parse_desired on arbitrary text, on token soup and on random mutations of the
   shipped file raises nothing but DesiredStateError, and each message line is
   `users.yaml:LINE: ...` with LINE inside the file and the lines sorted.
4. Focused checks: all errors of a file are reported and sorted by line, a YAML `no` as a
   country code gets the "quote it" hint, error paths read like `users[3].validity`.

The test_regression_* tests pin bugs these tests found in reconciler/ (fixed in the same change).
Nothing here reaches the network or mocks project code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reconciler import cli
from reconciler.desired import MAX_FILE_BYTES, format_path, load_desired, parse_desired, schema
from reconciler.errors import DesiredStateError
from reconciler.model import CertKind, Desired, HbaRule, KeyType, LeafSpec, RenewBefore
from reconciler.store import StateDir

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "state" / "users.yaml"
SHIPPED_TEXT = SHIPPED.read_text("utf-8")
CORPUS = Path(__file__).resolve().with_name("bad_users")

PASSPHRASES = {
    "RECONCILER_CA_PASSPHRASE": "correct horse battery staple ca",
    "RECONCILER_KEY_PASSPHRASE": "correct horse battery staple keys",
}
MESSAGE_LINE = re.compile(r"^users\.yaml:(\d+): \S")
CLI_FIRST_LINE = re.compile(r"^reconciler: (?P<file>\S*users\.yaml):(?P<line>\d+): (?P<rest>.+)$")
HEADER = re.compile(rb"\A# expect: (\d+): (.*)\n")

# --------------------------------------------------------------------------- the corpus


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad users.yaml: its bytes (or generated past the size limit), line and words expected."""

    name: str
    line: int
    expect: str
    content: bytes = b""
    oversize: bool = False

    def write(self, path: Path) -> None:
        if not self.oversize:
            path.write_bytes(self.content)
            return
        with path.open("wb") as handle:
            handle.write(b"version: 1\nca:\n  subject: {CN: Acme PostgreSQL CA}\n")
            filler = b"# padding\n" * 100_000
            while handle.tell() <= MAX_FILE_BYTES:
                handle.write(filler)


# Files that cannot carry an `# expect:` header.
NO_HEADER = {"empty": (1, "the file is empty")}

# Corpus files that exposed a bug in reconciler/ once (the fix landed with these tests); an
# entry here marks its case xfail(strict=True) until the bug is fixed.
KNOWN_BUGS: dict[str, str] = {}


def _load_corpus() -> list[Case]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        raw = path.read_bytes()
        header = HEADER.match(raw)
        if header is not None:
            line, expect = int(header.group(1)), header.group(2).decode("utf-8")
        else:
            line, expect = NO_HEADER[path.stem]
        cases.append(Case(path.stem, line, expect, raw))
    cases.append(Case("over_size_limit", 1, "larger than 32 MiB", oversize=True))
    return cases


CASES = _load_corpus()


def _params() -> list[object]:
    return [
        pytest.param(
            case,
            id=case.name,
            marks=[
                pytest.mark.xfail(strict=True, raises=AssertionError, reason=KNOWN_BUGS[case.name])
            ]
            if case.name in KNOWN_BUGS
            else [],
        )
        for case in CASES
    ]


def test_corpus_is_complete() -> None:
    """At least 30 bad files, each with an expectation; every known-bug entry names a file."""
    assert len(CASES) >= 30
    names = {case.name for case in CASES}
    assert set(KNOWN_BUGS) <= names
    assert set(NO_HEADER) <= names
    for case in CASES:
        assert case.line >= 1
        assert case.expect.strip(), case.name


# --------------------------------------------------------------------------- running the CLI


@dataclasses.dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    state: Path


def _listing(top: Path) -> dict[str, str]:
    """Every path under top with the SHA-256 of its content (or 'dir')."""
    result = {}
    for path in sorted(top.rglob("*")):
        key = path.relative_to(top).as_posix()
        result[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}


def _prepare(case: Case, top: Path) -> Path:
    state = top / "state"
    state.mkdir()
    case.write(state / "users.yaml")
    return state


def _run_subprocess(case: Case, top: Path, command: str) -> Run:
    state = _prepare(case, top)
    before = _listing(top)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "reconciler", "--state", str(state), command],
            cwd=top,
            env=_env_without_secrets(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return Run(done.returncode, done.stdout, done.stderr, before, _listing(top), state)
    finally:
        if case.oversize:
            (state / "users.yaml").unlink()


def _run_in_process(case: Case, top: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    state = _prepare(case, top)
    before = _listing(top)
    monkeypatch.chdir(top)  # a stray relative write would land here and show in the listing
    out, err = io.StringIO(), io.StringIO()
    environ = {**_env_without_secrets(), **PASSPHRASES}
    try:
        code = cli.main(["--state", str(state), *argv], environ=environ, stdout=out, stderr=err)
        return Run(code, out.getvalue(), err.getvalue(), before, _listing(top), state)
    finally:
        if case.oversize:
            (state / "users.yaml").unlink()


def _assert_refused(case: Case, run: Run) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    assert run.code == 1, run.stderr
    assert run.after == run.before, "something was written"
    lines = run.stderr.splitlines()
    assert lines, "no message on stderr"
    first = CLI_FIRST_LINE.match(lines[0])
    assert first is not None, lines[0]
    assert first["file"] == str(run.state / "users.yaml")
    assert int(first["line"]) == case.line, lines[0]
    assert case.expect in first["rest"], lines[0]
    assert len(lines) == 1, f"one problem per file, one message expected: {run.stderr}"


@pytest.fixture(scope="module")
def validate_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Run]:
    """`validate` as a subprocess for every selected corpus case, a few at a time."""
    wanted = set()
    for item in request.session.items:
        if isinstance(item, pytest.Function) and item.originalname == "test_validate_refuses":
            case = item.callspec.params["case"]
            assert isinstance(case, Case)
            wanted.add(case.name)
    cases = [case for case in CASES if case.name in wanted]
    # Directories are made here, in one thread: pytest's temporary-directory factory is not
    # thread-safe (its base directory is created on first use).
    tops = [tmp_path_factory.mktemp(case.name) for case in cases]
    workers = min(8, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = pool.map(_run_subprocess, cases, tops, ["validate"] * len(cases))
        return {case.name: run for case, run in zip(cases, runs, strict=True)}


@pytest.mark.parametrize("case", _params())
def test_validate_refuses(case: Case, validate_runs: dict[str, Run]) -> None:
    """`python -m reconciler --state DIR validate` exits 1 with one located message."""
    _assert_refused(case, validate_runs[case.name])


@pytest.mark.parametrize("command", [["plan"], ["apply", "--no-commit"]], ids=["plan", "apply"])
@pytest.mark.parametrize("case", _params())
def test_plan_and_apply_refuse(
    case: Case, command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan` and `apply --no-commit` (passphrases set) refuse the file and write nothing."""
    _assert_refused(case, _run_in_process(case, tmp_path, command, monkeypatch))


# --------------------------------------------------------------------------- the shipped file


def test_shipped_users_yaml_reproduces_the_team_setup() -> None:
    desired = load_desired(StateDir(SHIPPED.parent))
    ca_subject = dict(desired.ca.subject)
    assert ca_subject.pop("CN")
    assert ca_subject == {
        "C": "NL",
        "ST": "Utrecht",
        "L": "Bilthoven",
        "O": "National Institute for Public Health and the Environment (Acme)",
    }
    assert desired.ca.key is KeyType.RSA_4096
    assert desired.ca.validity == timedelta(days=3650)

    clients = [leaf for leaf in desired.leaves if leaf.kind is CertKind.CLIENT]
    servers = [leaf for leaf in desired.leaves if leaf.kind is CertKind.SERVER]
    assert [leaf.name for leaf in clients] == ["postgres", "avchecker", "pgquartz", "pgfga", "cmdb"]
    assert [leaf.name for leaf in servers] == ["acme-vbepr-v01a.acme.corp.com"]
    for leaf in desired.leaves:
        assert leaf.key is KeyType.RSA_4096, leaf.ref
        assert leaf.validity == timedelta(days=365), leaf.ref
        assert leaf.generation == 1, leaf.ref
        assert dict(leaf.subject)["CN"] == leaf.name
        assert {k: v for k, v in leaf.subject if k != "CN"} == ca_subject
    assert servers[0].dns == ("acme-vbepr-v01a.acme.corp.com",)
    cmdb = next(leaf for leaf in clients if leaf.name == "cmdb")
    assert cmdb.hba == (HbaRule(database="cmdbvm", address="10.0.6.188/32"),)
    assert all(leaf.hba == () for leaf in clients if leaf.name != "cmdb")


def test_shipped_users_yaml_passes_validate_and_plan_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = Case("shipped", 0, "", SHIPPED.read_bytes())
    (tmp_path / "validate").mkdir()
    checked = _run_subprocess(shipped, tmp_path / "validate", "validate")
    assert (checked.code, checked.stderr) == (0, "")
    assert re.search(r"is valid: 5 users, 1 servers?\.", checked.stdout), checked.stdout
    assert checked.after == checked.before

    (tmp_path / "plan").mkdir()
    state = _prepare(shipped, tmp_path / "plan")
    before = _listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(
        ["--state", str(state), "plan"], environ=_env_without_secrets(), stdout=out, stderr=err
    )
    assert (code, err.getvalue()) == (0, "")
    assert "client/cmdb" in out.getvalue()
    assert "server/acme-vbepr-v01a.acme.corp.com" in out.getvalue()
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- property tests


def _check_loader(text: str) -> Desired | None:
    """parse_desired either succeeds or raises DesiredStateError with well-formed lines."""
    try:
        return parse_desired(text, "users.yaml")
    except DesiredStateError as exc:
        message = str(exc)
    assert message
    # libyaml places end-of-stream errors on the line after the last one; tolerate that one
    # line (test_regression_unclosed_quote_names_its_line pins that) but nothing further.
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    last_line = max(lines, 1) + 1
    numbers = []
    for line in message.split("\n"):
        match = MESSAGE_LINE.match(line)
        assert match is not None, f"malformed message line: {line!r}"
        numbers.append(int(match.group(1)))
    assert all(1 <= number <= last_line for number in numbers), (numbers, last_line)
    assert numbers == sorted(numbers)
    return None


_CHARS = st.characters(codec="utf-8")
_YAML_CHARS = st.sampled_from(list(":-{}[],&*!|>'\"#%@`? \t\n<.0123456789_/\\"))
_INSERTED = st.one_of(_YAML_CHARS, _YAML_CHARS, _CHARS)

_FUZZ = settings(max_examples=300, deadline=None, database=None)


@_FUZZ
@given(st.text(_CHARS, max_size=300))
@example("")
@example("\x00")
@example("version: 1\nca: {subject: {CN: x}}\nusers: [{name: a}, {name: a}]\n")
def test_fuzz_arbitrary_text(text: str) -> None:
    _check_loader(text)


_TOKENS = [
    *SHIPPED_TEXT.splitlines(keepends=True),
    "version: 1\n",
    "version: 2\n",
    "ca:\n",
    "  subject: {CN: x}\n",
    "users:\n",
    "servers:\n",
    "defaults:\n",
    "crl:\n",
    "  - name: ",
    "    ",
    "  ",
    "\n",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    ", ",
    "&a ",
    "*a",
    "<<: *a\n",
    "!!str ",
    "!!binary ",
    "!!python/object:os.system ",
    "!!set ",
    "? ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "'",
    '"',
    "#",
    "no",
    "365",
    "365d",
    "0d",
    "33%",
    "100%",
    "-1d",
    "1.5",
    "~",
    "null",
    "rsa-1024",
    "pg_x",
    ".x",
    "a/b",
    "\u200b",
    "10.0.6.188/24",
    "10.0.6.300",
    "fe80::1/64",
    "validity: ",
    "renew_before: ",
    "refresh_before: ",
    "generation: ",
    "hba: [{database: d, address: ",
    "ip: [",
    "dns: [",
]


@_FUZZ
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join))
@example("users:\n!!binary version: 1\n")  # a tagged key once hid the schema's problems
@example('"a\\nb": 1\n')  # a key with a line break once made a message two lines
def test_fuzz_token_soup(text: str) -> None:
    _check_loader(text)


@st.composite
def _mutated_shipped(draw: st.DrawFn) -> str:
    """The shipped users.yaml after 1 to 4 character or line edits."""
    text = SHIPPED_TEXT
    for _ in range(draw(st.integers(1, 4))):
        lines = text.splitlines(keepends=True) or [""]
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        row = draw(st.integers(0, len(lines) - 1))
        edit = draw(
            st.sampled_from(
                ["del_char", "dup_char", "ins_char", "del_line", "dup_line", "ins_line", "swap"]
            )
        )
        if edit == "del_char":
            text = text[:at] + text[at + 1 :]
        elif edit == "dup_char":
            text = text[: at + 1] + text[at:]
        elif edit == "ins_char":
            text = text[:at] + draw(_INSERTED) + text[at:]
        elif edit == "del_line":
            text = "".join(lines[:row] + lines[row + 1 :])
        elif edit == "dup_line":
            text = "".join(lines[: row + 1] + lines[row:])
        elif edit == "ins_line":
            new = draw(st.one_of(st.sampled_from(lines), st.text(_INSERTED, max_size=30)))
            text = "".join([*lines[:row], new.rstrip("\n") + "\n", *lines[row:]])
        else:
            other = draw(st.integers(0, len(lines) - 1))
            lines[row], lines[other] = lines[other], lines[row]
            text = "".join(lines)
    return text


@_FUZZ
@given(_mutated_shipped())
@example(SHIPPED_TEXT.replace("rsa-4096", "rsa-1024"))
@example(SHIPPED_TEXT.replace("  - name: pgfga\n", "  - name: pgfga\n  - name: pgfga\n"))
def test_fuzz_mutated_shipped_file(text: str) -> None:
    _check_loader(text)


def test_shipped_file_passes_the_loader_contract() -> None:
    assert _check_loader(SHIPPED_TEXT) is not None


# --------------------------------------------------------------------------- focused unit tests


def _problems(text: str) -> list[str]:
    with pytest.raises(DesiredStateError) as caught:
        parse_desired(text, "users.yaml")
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def test_every_schema_error_is_reported_sorted_by_line() -> None:
    # `users` comes first in the file but after `ca` in the schema, so discovery order and
    # line order differ.
    problems = _problems(
        "users:\n"  # 1
        "  - name: appuser\n"  # 2
        "    validity: 10y\n"  # 3  bad duration
        "version: 1\n"  # 4
        "ca:\n"  # 5
        "  subject: {CN: Acme PostgreSQL CA}\n"  # 6
        "  key: dsa-2048\n"  # 7  bad key type
        "defaults:\n"  # 8
        "  validty: 365d\n"  # 9  unknown key
    )
    assert [p.split(":", 2)[1] for p in problems] == ["3", "7", "9"]
    assert "users[0].validity: '10y' is not valid" in problems[0]
    assert "ca.key: 'dsa-2048' is not valid" in problems[1]
    assert "defaults.validty: unknown key 'validty'; did you mean 'validity'?" in problems[2]


def test_every_semantic_error_is_reported_sorted_by_line() -> None:
    problems = _problems(
        "version: 1\n"  # 1
        "ca:\n"  # 2
        "  subject: {CN: Acme PostgreSQL CA}\n"  # 3
        "servers:\n"  # 4
        "  - name: db1.acme.example\n"  # 5
        "    ip: [10.0.6.300]\n"  # 6  not an address
        "users:\n"  # 7
        "  - name: pg_x\n"  # 8  reserved prefix
        "  - name: cmdb\n"  # 9
        "    hba: [{database: cmdbvm, address: 10.0.6.188/24}]\n"  # 10  host bits
        "  - name: pg_x\n"  # 11  reserved prefix and listed twice
    )
    numbers = [int(p.split(":", 2)[1]) for p in problems]
    assert numbers == [6, 8, 10, 11, 11]
    assert "servers[0].ip[0]" in problems[0]
    assert "users[1].hba[0].address: '10.0.6.188/24' has host bits set" in problems[2]
    assert any("'pg_x' is listed twice (first at line 8)" in p for p in problems[3:])


@pytest.mark.parametrize("country", ["no", "No", "NO"])
def test_yaml_no_as_country_code_says_quote_it(country: str) -> None:
    problems = _problems(
        "version: 1\n"
        "ca:\n"
        "  subject:\n"
        "    CN: Acme PostgreSQL CA\n"
        f"    C: {country}\n"  # 5: YAML 1.1 reads this as false
    )
    assert len(problems) == 1
    assert problems[0].startswith("users.yaml:5: ca.subject.C: must be text, not true/false")
    assert "quote it" in problems[0]
    assert parse_desired(SHIPPED_TEXT.replace("C: NL", f"C: '{country.upper()}'")) is not None


def test_error_path_names_the_entry_index() -> None:
    problems = _problems(
        "version: 1\n"
        "ca: {subject: {CN: Acme PostgreSQL CA}}\n"
        "users:\n"
        "  - name: appuser\n"
        "  - name: avchecker\n"
        "  - name: pgquartz\n"
        "  - name: cmdb\n"  # 7
        "    validity: 10y\n"  # 8
    )
    assert problems == [
        "users.yaml:8: users[3].validity: '10y' is not valid; write a duration as a whole "
        "number of days or hours, such as 365d or 12h"
    ]


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("users", 3, "validity"), "users[3].validity"),
        (("servers", 0, "ip", 1), "servers[0].ip[1]"),
        (("users", 0, "hba", 2, "address"), "users[0].hba[2].address"),
        (("ca", "subject", "C"), "ca.subject.C"),
        ((), "(top level)"),
        (("users", 0, "a\nb"), "users[0]['a\\nb']"),
        (("x.y",), "['x.y']"),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


def test_display_name_is_used_in_every_line(tmp_path: Path) -> None:
    target = tmp_path / "users.yaml"
    target.write_text("version: 2\nca: {subject: {CN: x}}\nbogus: 1\n", "utf-8")
    with pytest.raises(DesiredStateError) as caught:
        load_desired(StateDir(tmp_path))
    assert [p.split(": ", 1)[0] for p in caught.value.problems] == [
        f"{target}:1",
        f"{target}:3",
    ]


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(DesiredStateError, match=r"no such file; create it with `reconciler init`"):
        load_desired(StateDir(tmp_path))


def test_utf8_bom_is_accepted() -> None:
    assert parse_desired("\ufeff" + SHIPPED_TEXT) == parse_desired(SHIPPED_TEXT)


def test_crlf_line_endings_keep_line_numbers() -> None:
    text = "version: 1\r\nca: {subject: {CN: x}}\r\n\r\nbogus: 1\r\n"
    assert _problems(text) == [
        "users.yaml:4: bogus: unknown key 'bogus'; "
        "allowed here: ca, crl, defaults, servers, superusers, trust, users, version"
    ]


# --------------------------------------------------------------------------- regressions

_BASE = "version: 1\nca:\n  subject: {CN: Acme PostgreSQL CA}\n"


@pytest.mark.parametrize(
    "text",
    [
        "version: !!int one\nca: {subject: {CN: x}}\n",
        _BASE + "users:\n  - name: a\n    generation: !!float many\n",
        "%TAG ! tag:yaml.org,2002:\n---\nversion: !int one\nca: {subject: {CN: x}}\n",
    ],
    ids=["int", "float", "tag-directive"],
)
def test_regression_numeric_tag_on_text_raises_value_error(text: str) -> None:
    _check_loader(text)


@pytest.mark.parametrize("digits", ["1" + "0" * 5000, "0x" + "f" * 5000], ids=["dec", "hex"])
def test_regression_huge_integer_raises_value_error(digits: str) -> None:
    _check_loader(_BASE + f"users:\n  - name: a\n    generation: {digits}\n")


@pytest.mark.parametrize("char", ["\x80", "\x9f", "\ufffe"], ids=["U+0080", "U+009F", "U+FFFE"])
def test_regression_non_printable_character_is_located(char: str) -> None:
    problems = _problems(_BASE + f"users:\n  - name: bad{char}name\n")
    assert len(problems) == 1
    assert problems[0].startswith("users.yaml:5: ")


@pytest.mark.parametrize("char", ["\r", "\x85", "\u2028", "\u2029"], ids=["CR", "NEL", "LS", "PS"])
def test_regression_unusual_line_break_shifts_line_numbers(char: str) -> None:
    # The odd character sits in a comment on line 1; the real problem is on line 5.
    problems = _problems(f"# owner: DBA{char}team\n" + _BASE + "bogus: 1\n")
    assert [p.split(":", 2)[1] for p in problems] in (["1"], ["5"])
    assert problems[0].startswith(("users.yaml:1: ", "users.yaml:5: bogus"))


def test_regression_recursive_alias_is_located() -> None:
    problems = _problems(_BASE + "users: &all [*all]\n")
    assert len(problems) == 1
    assert problems[0].startswith("users.yaml:4: ")
    assert "alias" in problems[0]


def test_regression_unclosed_quote_names_its_line() -> None:
    problems = _problems(_BASE + 'users:\n  - name: "appuser\n  - name: cmdb\n')
    assert problems[0].startswith("users.yaml:5: ")
    assert "quoted scalar" in problems[0]


def test_regression_missing_required_keys_reported_once() -> None:
    problems = _problems("users:\n  - name: appuser\n")
    assert problems == [
        "users.yaml:1: (top level): the required key 'version' is missing; add it",
        "users.yaml:1: (top level): the required key 'ca' is missing; add it",
    ]


def test_regression_ipv6_zone_in_server_ip_is_refused() -> None:
    problems = _problems(_BASE + "servers:\n  - name: db1.acme.example\n    ip: ['fe80::1%eth0']\n")
    assert problems[0].startswith("users.yaml:6: servers[0].ip[0]: ")


def test_regression_defaults_window_checked_without_entries() -> None:
    problems = _problems(_BASE + "defaults:\n  validity: 30d\n  renew_before: 30d\n")
    assert problems[0].startswith("users.yaml:6: defaults.renew_before: ")


def test_regression_window_error_names_the_entry() -> None:
    problems = _problems(
        _BASE + "defaults:\n"  # 4
        "  renew_before: 30d\n"  # 5
        "users:\n"  # 6
        "  - name: appuser\n"  # 7
        "    validity: 10d\n"  # 8
        "  - name: cmdb\n"  # 9
        "    validity: 10d\n"  # 10
    )
    assert len(set(problems)) == len(problems) == 2
    assert problems[0].startswith("users.yaml:8: users[0].validity: ")
    assert problems[1].startswith("users.yaml:10: users[1].validity: ")


def test_regression_generation_is_an_int() -> None:
    desired = parse_desired(_BASE + "users:\n  - name: appuser\n    generation: 2.0\n")
    assert type(desired.leaves[0].generation) is int


def test_fixture_listing_sees_new_files(tmp_path: Path) -> None:
    """The 'nothing written' check would notice a new file, directory or changed byte."""
    (tmp_path / "users.yaml").write_text("a", "utf-8")
    before = _listing(tmp_path)
    (tmp_path / "users.yaml").write_text("b", "utf-8")
    assert _listing(tmp_path) != before
    (tmp_path / ".secrets").mkdir()
    assert ".secrets" in _listing(tmp_path)


# --------------------------------------------------------------------------- values

_HEAD = "version: 1\nca: {subject: {CN: x}}\n"  # lines 1-2


def test_a_repeated_bad_value_is_reported_for_every_entry() -> None:
    problems = _problems(
        _HEAD + "users:\n"  # 3
        "  - {name: a, validity: 36501d}\n"  # 4
        "  - {name: b, validity: 36501d}\n"  # 5
        "  - {name: c, key: rsa-1024}\n"  # 6
        "  - {name: d, key: rsa-1024}\n"  # 7
        "  - {name: e, hba: [{database: x, address: 10.0.0.1/8}]}\n"  # 8
        "  - {name: f, hba: [{database: x, address: 10.0.0.1/8}]}\n"  # 9
        "servers:\n"  # 10
        "  - {name: a.example.com, ip: [10.0.0.300]}\n"  # 11
        "  - {name: b.example.com, ip: [10.0.0.300]}\n"  # 12
        "  - {name: c.example.com, ip: [10.0.0.1, 10.0.0.1]}\n"  # 13
        "  - {name: d.example.com, ip: [10.0.0.2, 10.0.0.2]}\n"  # 14
    )
    lines = [int(problem.split(":")[1]) for problem in problems]
    assert lines == [4, 5, 6, 7, 8, 9, 11, 12, 13, 14], problems


def test_a_repeated_window_problem_is_reported_for_every_entry() -> None:
    problems = _problems(
        _HEAD + "users:\n"  # 3
        "  - {name: a, validity: 10d, renew_before: 10d}\n"  # 4
        "  - {name: b, validity: 10d, renew_before: 10d}\n"  # 5
        "  - {name: c, validity: 10d, renew_before: 9d}\n"  # 6
    )
    assert [int(problem.split(":")[1]) for problem in problems] == [4, 5], problems


_ENTRIES = (
    _HEAD + "defaults: {key: ed25519, validity: 90d, renew_before: 30d, subject: {C: NL, O: A}}\n"
    "users:\n"
    "  - name: a\n"
    "  - {name: b, key: rsa-3072, validity: 10d, renew_before: 20%, generation: 3}\n"
    "  - {name: c, key: rsa-3072, validity: 10d, renew_before: 20%, subject: {OU: T, O: B}}\n"
    "  - {name: d, hba: [{database: x, address: 10.0.0.0/8}, {database: y, address: all}]}\n"
    "  - {name: e, hba: [{database: x, address: 10.0.0.0/8}], generation: 2.0}\n"
    "servers:\n"
    "  - {name: a.example.com, dns: [c.example.com, a.example.com], ip: ['fd00::01', 1.2.3.4]}\n"
    "  - {name: b.example.com, ip: ['fd00::2'], validity: 48h, renew_before: 12h}\n"
)


def test_entries_get_their_values_and_the_defaults() -> None:
    days = timedelta(days=1)
    client, server = CertKind.CLIENT, CertKind.SERVER
    common = (("C", "NL"), ("O", "A"))
    month = RenewBefore(duration=30 * days)
    share = RenewBefore(share=Fraction(20, 100))
    expected = [
        LeafSpec(client, "a", KeyType.ED25519, 90 * days, month, (*common, ("CN", "a"))),
        LeafSpec(client, "b", KeyType.RSA_3072, 10 * days, share, (*common, ("CN", "b")), 3),
        LeafSpec(
            client,
            "c",
            KeyType.RSA_3072,
            10 * days,
            share,
            (("C", "NL"), ("O", "B"), ("OU", "T"), ("CN", "c")),
        ),
        LeafSpec(
            client,
            "d",
            KeyType.ED25519,
            90 * days,
            month,
            (*common, ("CN", "d")),
            hba=(HbaRule("x", "10.0.0.0/8"), HbaRule("y", "all")),
        ),
        LeafSpec(
            client,
            "e",
            KeyType.ED25519,
            90 * days,
            month,
            (*common, ("CN", "e")),
            2,
            hba=(HbaRule("x", "10.0.0.0/8"),),
        ),
        LeafSpec(
            server,
            "a.example.com",
            KeyType.ED25519,
            90 * days,
            month,
            (*common, ("CN", "a.example.com")),
            dns=("a.example.com", "c.example.com"),
            ips=("fd00::1", "1.2.3.4"),
        ),
        LeafSpec(
            server,
            "b.example.com",
            KeyType.ED25519,
            timedelta(hours=48),
            RenewBefore(duration=timedelta(hours=12)),
            (*common, ("CN", "b.example.com")),
            dns=("b.example.com",),
            ips=("fd00::2",),
        ),
    ]
    leaves = parse_desired(_ENTRIES).leaves
    assert list(leaves) == expected
    assert [type(leaf.generation) for leaf in leaves] == [int] * len(leaves)


def test_the_package_schema_is_the_schema_file() -> None:
    assert schema() == json.loads((ROOT / "schema" / "users.schema.json").read_text("utf-8"))


def test_every_problem_is_reported_even_when_the_schema_refuses_part_of_the_file() -> None:
    """A bad server name (a schema error) no longer hides a reserved role name (a semantic
    check) in another entry, nor a window problem in a third."""
    problems = _problems(
        _HEAD + "users:\n"  # 3
        "  - name: public\n"  # 4  reserved by PostgreSQL
        "  - {name: cmdb, validity: 10d, renew_before: 10d}\n"  # 5  window
        "servers:\n"  # 6
        "  - name: Bad_Name\n"  # 7  not a DNS name
    )
    assert [int(p.split(":")[1]) for p in problems] == [4, 5, 7], problems
    assert "'public' is reserved by PostgreSQL" in problems[0]
    assert "renew_before must be shorter than validity" in problems[1]
    assert "servers[0].name: 'Bad_Name' is not valid" in problems[2]


def test_an_entry_the_schema_refuses_is_not_checked_again() -> None:
    """Its semantic checks would only repeat the problem, or trip over the bad value."""
    problems = _problems(_HEAD + "users:\n  - {name: pg_x, validity: 10y}\n")
    assert len(problems) == 1
    assert "users[0].validity: '10y' is not valid" in problems[0]
