"""pg_hba.conf: the generated fragment, and the check of a real file as the server's major version
reads it: lines it would refuse, rules an earlier line takes first, lines it cannot judge, rules
left behind. (tests/test_hba_pg.py shows a real PostgreSQL 15 agrees.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import SECRETS, run, users_yaml

from reconciler.desired import parse_desired
from reconciler.hba import Problem, check, fragment

USERS = (
    "  - name: cmdb\n    hba: [{database: cmdbvm, address: 10.0.6.188/32}]\n"
    '  - name: "app user"\n    hba: [{database: all, address: 10.1.0.0/16}]\n'
    "  - name: alice\n    hba: [{database: sales, address: 192.168.1.7}, "
    "{database: sameuser, address: '2001:db8::/32'}]\n"
)
DESIRED = parse_desired(users_yaml(USERS))
FRAGMENT = fragment(DESIRED)


def role(message: str) -> str:
    """The role of the generated rule a message is about."""
    match = re.search(r'(?:for |of )`hostssl \S+ ("[^"]+"|\S+) ', message)
    assert match
    return match.group(1).strip('"')


def findings_for(tmp_path: Path, text: str, version: int = 15) -> list[tuple[Problem, str, str]]:
    """(problem, line number, message) of each finding for a pg_hba.conf holding text."""
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(text)
    found = check(DESIRED, conf, pg_version=version)[1]
    return [(f.problem, f.where.removeprefix(str(conf)).lstrip(":"), f.message) for f in found]


def state_dir(tmp_path: Path, users: str = USERS) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "users.yaml").write_text(users_yaml(users))
    return state


def test_fragment_is_ordered_by_role_and_quotes_what_needs_it() -> None:
    lines = [line for line in FRAGMENT.splitlines() if not line.startswith("#")]
    assert lines == [
        "hostssl sales alice 192.168.1.7/32 cert",
        "hostssl sameuser alice 2001:db8::/32 cert",
        'hostssl all "app user" 10.1.0.0/16 cert',
        "hostssl cmdbvm cmdb 10.0.6.188/32 cert",
    ]


def test_the_command_prints_the_same_fragment_whatever_the_order_of_users(
    tmp_path: Path,
) -> None:
    state = state_dir(tmp_path)
    first, again = run(state, "hba", environ={}), run(state, "hba", environ={})
    assert (first.code, first.out) == (0, FRAGMENT)
    assert again.out == first.out
    users = USERS.split("  - name: ")
    state = state_dir(tmp_path, "  - name: ".join([users[0], *reversed(users[1:])]))
    assert run(state, "hba", environ={}).out == FRAGMENT


def test_a_file_with_the_fragment_first_passes(tmp_path: Path) -> None:
    text = "# comment\nlocal all all peer\n" + FRAGMENT + "host all all 0.0.0.0/0 md5\n"
    assert findings_for(tmp_path, text) == []


def test_a_managed_block_at_the_top_passes_on_the_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "pg_hba.conf"
    block = f"# BEGIN reconciler managed block\n{FRAGMENT}# END reconciler managed block\n"
    conf.write_text(block + "local all all peer\nhost all all all scram-sha-256\n")
    result = run(state_dir(tmp_path), "hba", "--check", str(conf), "--pg-version", "15", environ={})
    assert (result.code, result.err) == (0, "")
    assert (
        result.out
        == f"{conf}: PostgreSQL 15 loads it, and all 4 generated rules are reached first.\n"
    )


@pytest.mark.parametrize(
    ("earlier", "shadows"),
    [
        pytest.param("host all all 10.0.0.0/8 scram-sha-256", {"cmdb", "app user"}, id="cidr"),
        pytest.param("host all all 10.0.0.0 255.0.0.0 md5", {"cmdb", "app user"}, id="netmask"),
        pytest.param(
            "host all all 10.0.0.188 255.0.0.255 md5", {"cmdb", "app user"}, id="odd-netmask"
        ),
        pytest.param("hostssl cmdbvm all all reject", {"cmdb", "app user"}, id="all-addresses"),
        pytest.param('host "cmdbvm" "cmdb" 10.0.6.188/32 md5', {"cmdb"}, id="quoted-names"),
        pytest.param("host sales,cmdbvm cmdb,alice all trust", {"cmdb", "alice"}, id="lists"),
        pytest.param(
            'host sales, "cmdbvm" cmdb, alice all trust',
            {"cmdb", "alice"},
            id="list-space-after-comma",
        ),
        pytest.param("host sameuser alice ::/0 md5", {"alice"}, id="sameuser"),
        pytest.param("host all +cmdb 10.0.6.188/32 md5", {"cmdb"}, id="group-of-itself"),
        pytest.param(
            "hostnogssenc all all all password", {"cmdb", "app user", "alice"}, id="hostnogssenc"
        ),
        pytest.param("host all \\\n  all 10.0.6.0/24 \\\n  md5", {"cmdb"}, id="continuation"),
        pytest.param("host all all 10.1.2.0/24 md5", {"app user"}, id="part-of-the-network"),
        pytest.param(
            "hostssl all all all cert map=certmap", {"cmdb", "app user", "alice"}, id="map"
        ),
    ],
)
def test_earlier_lines_with_another_method_shadow(
    tmp_path: Path, earlier: str, shadows: set[str]
) -> None:
    found = findings_for(tmp_path, f"{earlier}\n{FRAGMENT}")
    assert {problem for problem, _, _ in found} == {Problem.SHADOWED}
    assert {role(message) for _, _, message in found} == shadows
    assert {line for _, line, _ in found} == {"1"}


@pytest.mark.parametrize(
    "earlier",
    [
        pytest.param("local all all trust", id="local"),
        pytest.param("hostnossl all all all md5", id="hostnossl"),
        pytest.param("hostgssenc all all all gss", id="hostgssenc"),
        pytest.param("host replication all all md5", id="replication"),
        pytest.param("host otherdb cmdb 10.0.6.188/32 md5", id="other-database"),
        pytest.param("host all bob 10.0.0.0/8 md5", id="other-user"),
        pytest.param("host all all 172.16.0.0/12 md5", id="other-network"),
        pytest.param("host all all ::1/128 md5", id="other-family"),
        pytest.param("hostssl all all all cert clientcert=verify-full", id="same-method"),
        pytest.param('host all "CMDB" all md5', id="names-are-case-sensitive"),
        pytest.param('host all "all" all md5', id="quoted-all-is-a-name"),
        pytest.param('host all "+cmdb" all md5', id="quoted-plus-is-a-name"),
    ],
)
def test_lines_that_do_not_take_the_connections(tmp_path: Path, earlier: str) -> None:
    assert findings_for(tmp_path, f"{earlier}\n{FRAGMENT}") == []


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("host all all 10.0.6.188/32 cert", "cert authentication is only supported on hostssl"),
        ("hostssl all all all cert clientcert=verify-ca", 'clientcert can only be "verify-full"'),
        ("hostssl all all all md5 clientcert=1", 'invalid value for clientcert: "1"'),
        ("host all all all md5 clientcert=verify-ca", 'only be configured for "hostssl" rows'),
        ("hostssl all all all cert clientname=XX", 'invalid value for clientname: "XX"'),
        ("host all all all passw0rd", 'invalid authentication method "passw0rd"'),
        ("host all all all sspi", 'invalid authentication method "sspi"'),
        ("host all all all oauth issuer=x scope=y", 'invalid authentication method "oauth"'),
        ("host all all all peer", "peer authentication is only supported on local sockets"),
        ("local all all gss", "gssapi authentication is not supported on local sockets"),
        ("host all all 10.0.0.0/33 md5", 'invalid CIDR mask in address "10.0.0.0/33"'),
        ("host all all 10.0.0.1 md5", 'invalid IP mask "md5"'),
        ("host all all 10.0.0.0 ffff:: md5", "IP address and mask do not match"),
        ("host all all db.example.com/24 md5", "specifying both host name and CIDR mask"),
        ("host all all 10.0.0.0/8,10.1.0.0/16 md5", "multiple values specified for host address"),
        ("host all all all md5,trust", "multiple values specified for authentication type"),
        ("host all", "end-of-line before role specification"),
        ("host all all", "end-of-line before IP address specification"),
        ("host all all all", "end-of-line before authentication method"),
        ("hosts all all all md5", 'invalid connection type "hosts"'),
        ("host all all all md5 foo=bar", 'unrecognized authentication option name: "foo"'),
        ("host all all all md5 extra", "authentication option not in name=value format: extra"),
        ("host all all all md5 map=m", 'option "map" is only valid for methods cert, gss, ident'),
        ("host all @nobody.txt all md5", 'could not open secondary authentication file "@nobody'),
    ],
)
def test_a_line_the_server_refuses_is_an_error_in_its_words(
    tmp_path: Path, line: str, says: str
) -> None:
    found = findings_for(tmp_path, f"{FRAGMENT}{line}\n")
    assert [(problem, number) for problem, number, _ in found] == [(Problem.REFUSED, "8")]
    message = found[0][2]
    assert message.startswith(f"cannot load `{line}` (")
    assert says in message
    assert "PostgreSQL 15 refuses the whole file: a reload keeps the previous one" in message


def test_lines_that_look_odd_but_load(tmp_path: Path) -> None:
    text = (
        'local all all ident map=m\nhost "" all all md5\nhost all all all "md5"\n'
        "host all all 127.1 255.255.255.255 reject\nhost all all 127.0.0.1/+8 reject\n"
        "ho\\\nst all all all ldap ldapserver=x ldapbasedn=y ldapport=389\n"
        "# a comment \\\nhost all all all no-such-method\n"
    )
    refused = [f for f in findings_for(tmp_path, FRAGMENT + text) if f[0] is Problem.REFUSED]
    assert refused == []


@pytest.mark.parametrize(
    "earlier",
    [
        pytest.param("host all +dba all md5", id="group"),
        pytest.param("host all all samenet md5", id="samenet"),
        pytest.param("host all all samehost md5", id="samehost"),
        pytest.param("host all all db.example.com md5", id="hostname"),
        pytest.param("host samerole all 10.0.6.0/24 md5", id="samerole"),
    ],
)
def test_lines_it_cannot_judge_fail_unless_lenient(tmp_path: Path, earlier: str) -> None:
    found = findings_for(tmp_path, f"{earlier}\n{FRAGMENT}")
    assert found
    assert {(problem, line) for problem, line, _ in found} == {(Problem.UNKNOWN, "1")}
    state, conf = state_dir(tmp_path), str(tmp_path / "pg_hba.conf")
    strict = run(state, "hba", "--check", conf, "--pg-version", "15", environ={})
    assert strict.code == 1
    assert f"{conf}:1: cannot judge whether `{earlier}` takes connections of" in strict.out
    assert strict.err.count("\n") == 1
    lenient = run(state, "hba", "--check", conf, "--pg-version", "15", "--lenient", environ={})
    assert lenient.code == 0
    assert f"{conf}:1: warning: cannot judge whether `{earlier}`" in lenient.out


def test_lines_it_cannot_judge_after_the_rules_do_not_matter(tmp_path: Path) -> None:
    assert findings_for(tmp_path, f"{FRAGMENT}host all +dba samehost md5\n") == []


def test_at_file_is_read_relative_to_the_hba_file(tmp_path: Path) -> None:
    (tmp_path / "admins").write_text("# who\nbob, cmdb\n")
    found = findings_for(tmp_path, f"host all @admins 10.0.0.0/8 md5\n{FRAGMENT}")
    assert [(problem, role(message)) for problem, _, message in found] == [
        (Problem.SHADOWED, "cmdb")
    ]


@pytest.mark.parametrize(
    ("earlier", "on_15", "on_16"),
    [
        pytest.param("host all /^c.*b$ 10.0.0.0/8 md5", set(), {"cmdb"}, id="regex-user"),
        # a line for one database takes part of the connections of a rule for all of them
        pytest.param("host /vm$ all all md5", {"app user"}, {"cmdb", "app user"}, id="regex-db"),
        pytest.param('host all "/^c.*b$" all md5', set(), set(), id="quoted-is-a-name"),
    ],
)
def test_regular_expressions_from_16_are_names_before(
    tmp_path: Path, earlier: str, on_15: set[str], on_16: set[str]
) -> None:
    for version, shadows in ((15, on_15), (16, on_16)):
        found = findings_for(tmp_path, f"{earlier}\n{FRAGMENT}", version=version)
        assert {role(message) for _, _, message in found} == shadows


def includes(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-legacy.conf").write_text("\n\nhost all all 10.0.6.0/24 md5\n")
    (tmp_path / "conf.d" / "ignored.txt").write_text("host all all all trust\n")
    (tmp_path / "conf.d" / ".hidden.conf").write_text("host all all all trust\n")
    (tmp_path / "fragment.conf").write_text(FRAGMENT)
    conf = tmp_path / "pg_hba.conf"
    conf.write_text("include_if_exists absent.conf\ninclude_dir conf.d\ninclude fragment.conf\n")
    return conf


def test_includes_are_followed_from_16_with_their_own_line_numbers(tmp_path: Path) -> None:
    version, found = check(DESIRED, includes(tmp_path), pg_version=16)
    assert version == 16
    assert [(f.problem, f.where) for f in found] == [
        (Problem.SHADOWED, f"{tmp_path / 'conf.d' / '10-legacy.conf'}:3")
    ]
    (tmp_path / "pg_hba.conf").write_text("include absent.conf\ninclude_dir nowhere\n")
    found = check(DESIRED, tmp_path / "pg_hba.conf", pg_version=16)[1]
    refused = [(f.problem, f.where.rsplit(":", 1)[1]) for f in found[:2]]
    assert refused == [(Problem.REFUSED, "1"), (Problem.REFUSED, "2")]
    assert 'could not open file "' in found[0].message
    assert 'could not open directory "' in found[1].message


def test_includes_are_load_errors_before_16(tmp_path: Path) -> None:
    found = check(DESIRED, includes(tmp_path), pg_version=15)[1]
    refused = [
        (f.where.rsplit(":", 1)[1], f.message) for f in found if f.problem is Problem.REFUSED
    ]
    assert [line for line, _ in refused] == ["1", "2", "3"]
    assert 'invalid connection type "include_if_exists"' in refused[0][1]
    assert {f.problem for f in found} == {Problem.REFUSED, Problem.MISSING}


def test_an_include_loop_is_refused_not_followed_forever(tmp_path: Path) -> None:
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(f"include pg_hba.conf\n{FRAGMENT}")
    found = check(DESIRED, conf, pg_version=17)[1]
    assert {f.problem for f in found} == {Problem.REFUSED}
    assert any("maximum nesting depth exceeded" in f.message for f in found)


def test_the_version_comes_from_pg_version_beside_the_file(tmp_path: Path) -> None:
    state, conf = state_dir(tmp_path), tmp_path / "pg_hba.conf"
    conf.write_text(f"host all /^c all md5\n{FRAGMENT}")
    (tmp_path / "PG_VERSION").write_text("15\n")
    on_15 = run(state, "hba", "--check", str(conf), environ={})
    assert on_15.code == 0
    assert "PostgreSQL 15 loads it" in on_15.out
    (tmp_path / "PG_VERSION").write_text("16\n")
    on_16 = run(state, "hba", "--check", str(conf), environ={})
    assert on_16.code == 1
    assert f"{conf}:1: `host all /^c all md5` matches first for `hostssl cmdbvm" in on_16.out
    assert (
        on_16.err
        == f"reconciler: {conf} is not ready for PostgreSQL 16 (see above); fix it "
        + ("and check again.\n")
    )
    agreeing = run(state, "hba", "--check", str(conf), "--pg-version", "16", environ={})
    assert agreeing.code == 1
    disagreeing = run(state, "hba", "--check", str(conf), "--pg-version", "15", environ={})
    assert disagreeing.code == 1
    assert disagreeing.out == ""
    assert "says 16, but --pg-version 15; drop or correct it" in disagreeing.err


def test_without_pg_version_the_flag_is_needed(tmp_path: Path) -> None:
    state, conf = state_dir(tmp_path), tmp_path / "pg_hba.conf"
    conf.write_text(FRAGMENT)
    missing = run(state, "hba", "--check", str(conf), environ={})
    assert missing.code == 1
    assert missing.err.endswith("; pass --pg-version N (its major version, such as 15)\n")
    assert missing.err.count("\n") == 1
    assert run(state, "hba", "--check", str(conf), "--pg-version", "15", environ={}).code == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pg-version", "13"], "hba --check knows PostgreSQL 14 and newer, not 13"),
        (["--pg-version", "fifteen"], "invalid int value"),
        (["--pg-version", "15", "--check", "absent.conf"], "absent.conf is not a file"),
        (["--pg-version", "15", "--check=."], "is not a file; check the path"),
        (["--lenient"], "--pg-version and --lenient go with --check FILE"),
    ],
)
def test_bad_usage_is_one_sentence(tmp_path: Path, args: list[str], says: str) -> None:
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(FRAGMENT)
    check_args = (
        [] if "--check" in " ".join(args) or "--lenient" in args else ["--check", str(conf)]
    )
    result = run(state_dir(tmp_path), "hba", *check_args, *args, environ={})
    assert result.code == 1
    assert says in result.err
    assert result.err.count("\n") == 1
    assert "Traceback" not in result.err


def test_a_pg_version_file_that_holds_no_version_is_an_error(tmp_path: Path) -> None:
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(FRAGMENT)
    (tmp_path / "PG_VERSION").write_text("fifteen\n")
    result = run(state_dir(tmp_path), "hba", "--check", str(conf), environ={})
    assert result.code == 1
    assert "PG_VERSION does not hold a PostgreSQL version" in result.err


def test_a_version_newer_than_known_is_judged_by_the_newest_rules(tmp_path: Path) -> None:
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(f"{FRAGMENT}host all all all oauth issuer=x scope=y\n")
    result = run(state_dir(tmp_path), "hba", "--check", str(conf), "--pg-version", "19", environ={})
    assert result.code == 0
    assert result.err == "reconciler: note: PostgreSQL 19 is judged by the rules of 18.\n"


def test_a_rule_missing_from_the_file_fails(tmp_path: Path) -> None:
    state, conf = state_dir(tmp_path), tmp_path / "pg_hba.conf"
    conf.write_text("local all all peer\n")
    result = run(state, "hba", "--check", str(conf), "--pg-version", "15", environ={})
    assert result.code == 1
    assert f"{conf}: `hostssl cmdbvm cmdb 10.0.6.188/32 cert` is not in the file" in result.out
    shadowed = tmp_path / "shadowed.conf"
    shadowed.write_text("host all all all md5\n" + FRAGMENT)
    result = run(state, "hba", "--check", str(shadowed), "--pg-version", "15", environ={})
    assert result.code == 1
    assert f"{shadowed}:1: `host all all all md5` matches first" in result.out


def test_every_message_carries_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "legacy.conf").write_text("host all all 10.0.0.0/8 md5\n")
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(
        "host all all all cert\nhost all +dba all md5\ninclude legacy.conf\n"
        "hostssl sales alice 192.168.1.7/32 cert\n"
    )
    result = run(state_dir(tmp_path), "hba", "--check", str(conf), "--pg-version", "16", environ={})
    assert result.code == 1
    legacy = tmp_path / "legacy.conf"
    for line in result.out.splitlines():
        where, message = line.split(": ", 1)
        if message.endswith("is not in the file: add the fragment (`reconciler hba`) to it"):
            assert where == str(conf)  # a missing rule has no line of its own
        else:
            assert re.fullmatch(rf"({re.escape(str(conf))}|{re.escape(str(legacy))}):[0-9]+", where)
    assert f"{legacy}:1: `host all all 10.0.0.0/8 md5` matches first" in result.out
    assert f"{conf}:1: cannot load `host all all all cert`" in result.out
    assert f"{conf}:2: cannot judge whether `host all +dba all md5`" in result.out


def test_a_rule_left_for_a_user_no_longer_in_users_yaml_is_reported(tmp_path: Path) -> None:
    bob = "  - name: bob\n    hba: [{database: sales, address: 10.9.0.0/16}]\n"
    state = state_dir(tmp_path, USERS + bob)
    assert run(state, "apply", "--no-commit", environ=SECRETS).code == 0
    bob_rule = "hostssl sales bob 10.9.0.0/16 cert"
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(f"{FRAGMENT}local all all peer\n{bob_rule}\n")
    still_there = run(state, "hba", "--check", str(conf), "--pg-version", "15", environ={})
    assert still_there.code == 0, still_there.out  # bob is still in users.yaml
    (state / "users.yaml").write_text(users_yaml(USERS))
    conf.write_text(f"{FRAGMENT}local all all peer\n{bob_rule}\n")
    result = run(state, "hba", "--check", str(conf), "--pg-version", "15", environ={})
    assert result.code == 1
    assert result.out == (
        f"{conf}:9: `{bob_rule}` is a generated rule for bob, who left users.yaml; remove it\n"
    )
    conf.write_text(f"{FRAGMENT}hostssl sales bob 10.9.0.0/16 cert clientcert=verify-full\n")
    hand_written = run(state, "hba", "--check", str(conf), "--pg-version", "15", environ={})
    assert hand_written.code == 0
