"""`hba --check --pg-version 15` against a real PostgreSQL 15: one table of pg_hba.conf files, each
with the check's verdict and what the server does with the same file, asserted side by side.

One cluster serves the whole table. For each case the server's pg_hba.conf is rewritten and:
- `pg_hba_file_rules` re-reads it from disk and reports the lines the server would refuse
  (without reloading); the check must refuse exactly those lines;
- a file that loads is reloaded, and a client-certificate login shows whether an earlier line
  took the connection first: the earlier lines use `reject`, so a taken connection is refused.

Line 1 of every file is `local all all trust` (the tests' own superuser socket); the case's lines
follow, then alice's generated rule, then the case's trailing lines.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgcluster import Cluster, cluster
from support import run, users_yaml

from reconciler import engine
from reconciler.desired import parse_desired
from reconciler.hba import Problem, check, fragment
from reconciler.model import LedgerEntry

RULE = "    hba: [{database: postgres, address: 127.0.0.1/32}]\n"
SERVER = "  - name: pg.test.example\n"
USERS = users_yaml(f"  - name: alice\n{RULE}")  # bob has left; his certificate is still valid
BOBS_RULE = "hostssl postgres bob 127.0.0.1/32 cert"


class Server(enum.StrEnum):
    """What PostgreSQL 15 does with the file."""

    REFUSES = "refuses to load it"
    ADMITS = "admits the login"
    TURNS_AWAY = "turns the login away"
    NOT_TRIED = "loads it; no login is tried"


@dataclasses.dataclass(frozen=True)
class Case:
    before: str  # lines between line 1 and the generated rule
    verdict: Problem | None  # what the check finds (None: the file passes)
    server: Server
    after: str = ""  # lines after the generated rule
    who: str = "alice"  # whose certificate logs in


def case(id_: str, before: str, verdict: Problem | None, server: Server, **more: str) -> object:
    return pytest.param(Case(before, verdict, server, **more), id=id_)


REFUSED, SHADOWED, UNKNOWN = Problem.REFUSED, Problem.SHADOWED, Problem.UNKNOWN
REFUSES, ADMITS, TURNS_AWAY = Server.REFUSES, Server.ADMITS, Server.TURNS_AWAY
CASES = [
    # lines the server refuses to load, and with them the whole file
    case("cert-on-host", "host all all 127.0.0.1/32 cert", REFUSED, REFUSES),
    case("cert-with-verify-ca", "hostssl all all all cert clientcert=verify-ca", REFUSED, REFUSES),
    case("clientcert-on-host", "host all all all trust clientcert=verify-full", REFUSED, REFUSES),
    case("clientcert-1", "hostssl all all all md5 clientcert=1", REFUSED, REFUSES),
    case("clientname-xx", "hostssl all all all cert clientname=XX", REFUSED, REFUSES),
    case("unknown-method", "host all all all passw0rd", REFUSED, REFUSES),
    case("oauth-is-18", "host all all all oauth issuer=x scope=y", REFUSED, REFUSES),
    case("sspi-is-windows", "host all all all sspi", REFUSED, REFUSES),
    case("peer-on-host", "host all all all peer", REFUSED, REFUSES),
    case("cidr-33", "host all all 10.0.0.0/33 reject", REFUSED, REFUSES),
    case("address-without-mask", "host all all 10.0.0.1 reject", REFUSED, REFUSES),
    case("host-name-with-mask", "host all all db.example.com/24 reject", REFUSED, REFUSES),
    case("mask-of-other-family", "host all all 10.0.0.0 ffff:: reject", REFUSED, REFUSES),
    case("two-addresses", "host all all 10.0.0.0/8,10.1.0.0/16 reject", REFUSED, REFUSES),
    case("missing-fields", "host all all", REFUSED, REFUSES),
    case("unknown-type", "hosts all all all reject", REFUSED, REFUSES),
    case("unknown-option", "hostssl all all all cert foo=bar", REFUSED, REFUSES),
    case("option-not-name-value", "host all all all reject extra", REFUSED, REFUSES),
    case("option-of-another-method", "host all all all reject map=m", REFUSED, REFUSES),
    case("missing-at-file", "host all @nobody.txt all reject", REFUSED, REFUSES),
    case(
        "includes-are-16",
        "include other.conf\ninclude_if_exists other.conf\ninclude_dir conf.d",
        REFUSED,
        REFUSES,
    ),
    case("refused-after-the-rule", "", REFUSED, REFUSES, after="host all all all cert"),
    # earlier lines that take the connection first
    case("cidr", "host all all 127.0.0.0/8 reject", SHADOWED, TURNS_AWAY),
    case("netmask", "hostssl all all 127.0.0.0 255.0.0.0 reject", SHADOWED, TURNS_AWAY),
    case("odd-netmask", "host all all 127.0.0.1 255.0.255.255 reject", SHADOWED, TURNS_AWAY),
    case("short-ipv4", "host all all 127.1 255.255.255.255 reject", SHADOWED, TURNS_AWAY),
    case("lists", "host sales,postgres bob,alice all reject", SHADOWED, TURNS_AWAY),
    case("list-space", 'host sales, "postgres" bob, alice all reject', SHADOWED, TURNS_AWAY),
    case("at-file", "host all @names.txt all reject", SHADOWED, TURNS_AWAY),
    case("continuation", "host all \\\n  all 127.0.0.1/32 \\\n  reject", SHADOWED, TURNS_AWAY),
    case("hostnogssenc", "hostnogssenc all all all reject", SHADOWED, TURNS_AWAY),
    case("group-of-itself", "host all +alice all reject", SHADOWED, TURNS_AWAY),
    case("cert-with-a-map", "hostssl all all all cert map=nomap", SHADOWED, TURNS_AWAY),
    # lines that do not take it
    case("rule-first", "", None, ADMITS, after="host all all all reject"),
    case(
        "managed-block",
        "# BEGIN reconciler managed block",
        None,
        ADMITS,
        after="# END reconciler managed block\nhost all all all reject",
    ),
    case("regex-user-is-a-name", "hostssl all /^a all reject", None, ADMITS),
    case("regex-database-is-a-name", "hostssl /^p all all reject", None, ADMITS),
    case("other-user", "host all bob all reject", None, ADMITS),
    case("hostnossl", "hostnossl all all all reject", None, ADMITS),
    case("replication", "host replication all all reject", None, ADMITS),
    case("other-network", "host all all 10.0.0.0/8 reject", None, ADMITS),
    case("quoted-all-is-a-name", 'host all "all" all reject', None, ADMITS),
    case("quoted-plus-is-a-name", 'host all "+alice" all reject', None, ADMITS),
    case("same-method", "hostssl all all 127.0.0.0/8 cert", None, ADMITS),
    case("comment-continued", "# a note \\\nhost all all all reject", None, ADMITS),
    case("unknown-after-the-rule", "", None, ADMITS, after="host all +staff samehost reject"),
    # lines the check cannot judge: the server may go either way
    case("samehost", "host all all samehost reject", UNKNOWN, TURNS_AWAY),
    case("samenet", "host all all samenet reject", UNKNOWN, TURNS_AWAY),
    case("group-with-alice", "host all +staff all reject", UNKNOWN, TURNS_AWAY),
    case("group-without-alice", "host all +nobodies all reject", UNKNOWN, ADMITS),
    case("samerole", "host samerole all all reject", UNKNOWN, ADMITS),
    # matching a host name takes DNS lookups of the client's address, which tests do not make
    case("host-name", "host all all db.example.com reject", UNKNOWN, Server.NOT_TRIED),
    # a rule for a user who left users.yaml still lets that user in while the certificate lasts
    case("leftover", "", Problem.LEFTOVER, ADMITS, after=BOBS_RULE, who="bob"),
]


@dataclasses.dataclass
class Oracle:
    pg: Cluster
    state: Path
    exports: Path
    issued: tuple[LedgerEntry, ...]  # alice's certificate and bob's

    def install(self, text: str) -> set[int]:
        """Write the server's pg_hba.conf and reload, as a DBA does; return the lines it refuses,
        as pg_hba_file_rules reports them before the reload (it reads the file on disk;
        PostgreSQL 15 leaves the error empty for a few refusals, such as clientname=XX)."""
        self.pg.write_hba(text)
        refused = "from pg_hba_file_rules where error is not null or type is null"
        done = self.pg.sql(f"select array(select line_number {refused})")
        assert done.returncode == 0, done.stderr
        self.pg.reload()
        return {int(line) for line in done.stdout.strip().strip("{}").split(",") if line}

    def login(self, who: str) -> Server:
        files = self.exports / who
        conninfo = (
            f"host=127.0.0.1 port={self.pg.port} dbname=postgres user={who} sslmode=require "
            f"sslcert={files}/postgresql.crt sslkey={files}/postgresql.key connect_timeout=10"
        )
        done = subprocess.run(
            [str(self.pg.bindir / "psql"), conninfo, "-XAtwc", "select current_user"],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(self.exports), "PGPASSWORD": ""},
        )
        if done.returncode == 0:
            assert done.stdout.strip() == who
            return Server.ADMITS
        assert re.search("pg_hba.conf rejects connection|authentication failed", done.stderr), (
            done.stderr
        )
        return Server.TURNS_AWAY


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    base = tmp_path_factory.mktemp("hba-pg")
    state, exports = base / "state", base / "exports"
    state.mkdir()
    (state / "users.yaml").write_text(
        users_yaml(f"  - name: alice\n{RULE}  - name: bob\n{RULE}", SERVER)
    )
    applied = run(state, "apply", "--no-commit")
    assert applied.code == 0, applied.err
    for name, layout in (("alice", "libpq"), ("bob", "libpq"), ("pg.test.example", "server")):
        out = exports / name
        exported = run(state, "export", name, "--layout", layout, "--out", str(out))
        assert exported.code == 0, exported.err
    (state / "users.yaml").write_text(USERS)  # bob leaves users.yaml
    with cluster() as pg:
        pg.install_tls(exports / "pg.test.example")
        (pg.data / "names.txt").write_text("bob, alice\n")
        pg.give(pg.data / "names.txt")
        pg.start()
        for statement in (
            "create role alice login",
            "create role bob login",
            "create role staff",
            "create role nobodies",
            "grant staff to alice",
        ):
            done = pg.sql(statement)
            assert done.returncode == 0, done.stderr
        yield Oracle(pg, state, exports, engine.snapshot(state).observed.ledger.entries)


@pytest.mark.parametrize("case", CASES)
def test_the_check_agrees_with_postgresql_15(oracle: Oracle, case: Case) -> None:
    text = "\n".join(
        ["local all all trust", *case.before.splitlines(), fragment(parse_desired(USERS))]
    )
    errors = oracle.install(text + case.after + "\n")
    hba_file = oracle.pg.data / "pg_hba.conf"
    # the check, as the rollout runs it
    result = run(oracle.state, "hba", "--check", str(hba_file), "--pg-version", "15", environ={})
    version, findings = check(parse_desired(USERS), hba_file, pg_version=15, issued=oracle.issued)
    assert version == 15
    problems = {finding.problem for finding in findings}
    assert problems == ({case.verdict} if case.verdict else set()), result.out
    assert result.code == (0 if case.verdict is None else 1), result.out + result.err
    if case.verdict is UNKNOWN:
        lenient = ("--pg-version", "15", "--lenient")
        assert run(oracle.state, "hba", "--check", str(hba_file), *lenient, environ={}).code == 0
    # the server
    refused = {int(f.where.rsplit(":", 1)[1]) for f in findings if f.problem is REFUSED}
    assert errors == refused
    if case.server is REFUSES:
        assert refused
        return
    if case.server is Server.NOT_TRIED:
        return
    assert oracle.login(case.who) is case.server
    # and what the verdict promises: a line that takes the connection first turns it away
    if case.verdict in (SHADOWED, None, Problem.LEFTOVER):
        assert case.server is (TURNS_AWAY if case.verdict is SHADOWED else ADMITS)


def test_a_refused_file_on_reload_leaves_the_previous_one_in_force(oracle: Oracle) -> None:
    rules = fragment(parse_desired(USERS))
    assert oracle.install(f"local all all trust\n{rules}") == set()
    assert oracle.login("alice") is ADMITS
    logged = len(oracle.pg.log())
    refused = f"local all all trust\nhost all all 127.0.0.1/32 reject\nhosts x\n{rules}"
    assert oracle.install(refused) == {3}
    assert oracle.pg.logs("pg_hba.conf was not reloaded", since=logged)
    assert oracle.login("alice") is ADMITS  # the reject line on line 2 never took effect
