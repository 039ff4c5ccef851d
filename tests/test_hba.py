"""pg_hba.conf: the generated fragment, and the check of a real file for rules that an earlier
line would take first with another method. (tests/test_postgres.py shows a real server agrees.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import run, users_yaml

from reconciler.desired import parse_desired
from reconciler.hba import check, fragment

USERS = (
    "  - name: cmdb\n    hba: [{database: cmdbvm, address: 10.0.6.188/32}]\n"
    '  - name: "app user"\n    hba: [{database: all, address: 10.1.0.0/16}]\n'
    "  - name: alice\n    hba: [{database: sales, address: 192.168.1.7}, "
    "{database: sameuser, address: '2001:db8::/32'}]\n"
)
DESIRED = parse_desired(users_yaml(USERS))


def role(rule: str) -> str:
    match = re.match(r'hostssl \S+ ("[^"]+"|\S+) ', rule)
    assert match
    return match.group(1).strip('"')


def findings_for(tmp_path: Path, text: str) -> list[tuple[str, str, str]]:
    conf = tmp_path / "pg_hba.conf"
    conf.write_text(text)
    found, _ = check(DESIRED, conf)
    return [(f.kind, f.line.rsplit(":", 1)[-1] if f.line else "", f.rule) for f in found]


def test_fragment_is_ordered_by_role_and_quotes_what_needs_it() -> None:
    lines = [line for line in fragment(DESIRED).splitlines() if not line.startswith("#")]
    assert lines == [
        "hostssl sales alice 192.168.1.7/32 cert",
        "hostssl sameuser alice 2001:db8::/32 cert",
        'hostssl all "app user" 10.1.0.0/16 cert',
        "hostssl cmdbvm cmdb 10.0.6.188/32 cert",
    ]


def test_the_command_prints_the_fragment(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS))
    result = run(state, "hba", environ={})
    assert result.code == 0
    assert result.out == fragment(DESIRED)


def test_a_file_with_the_fragment_first_passes(tmp_path: Path) -> None:
    text = "# comment\nlocal all all peer\n" + fragment(DESIRED) + "host all all 0.0.0.0/0 md5\n"
    assert findings_for(tmp_path, text) == []


@pytest.mark.parametrize(
    ("earlier", "shadows"),
    [
        pytest.param("host all all 10.0.0.0/8 scram-sha-256", {"cmdb", "app user"}, id="cidr"),
        pytest.param("host all all 10.0.0.0 255.0.0.0 md5", {"cmdb", "app user"}, id="netmask"),
        pytest.param("hostssl cmdbvm all all reject", {"cmdb", "app user"}, id="all-addresses"),
        pytest.param('host "cmdbvm" "cmdb" 10.0.6.188/32 md5', {"cmdb"}, id="quoted-names"),
        pytest.param("host sales,cmdbvm cmdb,alice all trust", {"cmdb", "alice"}, id="lists"),
        pytest.param(
            "host sales, cmdbvm cmdb, alice all trust",
            {"cmdb", "alice"},
            id="list-space-after-comma",
        ),
        pytest.param("host sameuser alice ::/0 md5", {"alice"}, id="sameuser"),
        pytest.param("host all +cmdb 10.0.6.188/32 md5", {"cmdb"}, id="group-of-itself"),
        pytest.param("host all /^c.*b$ 10.0.0.0/8 md5", {"cmdb"}, id="regex"),
        pytest.param(
            "hostnogssenc all all all password", {"cmdb", "app user", "alice"}, id="hostnogssenc"
        ),
        pytest.param("host all \\\n  all 10.0.6.0/24 \\\n  md5", {"cmdb"}, id="continuation"),
        pytest.param("host all all 10.1.2.0/24 md5", {"app user"}, id="part-of-the-network"),
    ],
)
def test_earlier_lines_with_another_method_shadow(
    tmp_path: Path, earlier: str, shadows: set[str]
) -> None:
    found = findings_for(tmp_path, f"{earlier}\n{fragment(DESIRED)}")
    shadowed = {role(rule) for kind, _, rule in found if kind == "shadowed"}
    assert shadowed == shadows
    assert all(line == "1" for kind, line, _ in found if kind == "shadowed")


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
    ],
)
def test_lines_that_do_not_take_the_connections(tmp_path: Path, earlier: str) -> None:
    assert findings_for(tmp_path, f"{earlier}\n{fragment(DESIRED)}") == []


@pytest.mark.parametrize(
    "earlier",
    [
        pytest.param("host all +dba all md5", id="group"),
        pytest.param("host all @missing.txt all md5", id="missing-file"),
        pytest.param("host all all samenet md5", id="samenet"),
        pytest.param("host all all db.example.com md5", id="hostname"),
        pytest.param("host samerole all 10.0.0.0/8 md5", id="samerole"),
    ],
)
def test_lines_it_cannot_judge_are_named_and_fail_only_with_strict(
    tmp_path: Path, earlier: str
) -> None:
    found = findings_for(tmp_path, f"{earlier}\n{fragment(DESIRED)}")
    assert found
    assert {kind for kind, _, _ in found} == {"unknown"}
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS))
    conf = str(tmp_path / "pg_hba.conf")
    lenient = run(state, "hba", "--check", conf, environ={})
    assert lenient.code == 0
    assert "could not judge" in lenient.out
    assert run(state, "hba", "--check", conf, "--strict", environ={}).code == 1


def test_at_file_is_read_relative_to_the_hba_file(tmp_path: Path) -> None:
    (tmp_path / "admins").write_text("# who\nbob, cmdb\n")
    found = findings_for(tmp_path, f"host all @admins 10.0.0.0/8 md5\n{fragment(DESIRED)}")
    assert [(kind, role(rule)) for kind, _, rule in found] == [("shadowed", "cmdb")]


def test_includes_are_followed_with_their_own_line_numbers(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-legacy.conf").write_text("\n\nhost all all 10.0.6.0/24 md5\n")
    (tmp_path / "conf.d" / "ignored.txt").write_text("host all all all trust\n")
    (tmp_path / "fragment.conf").write_text(fragment(DESIRED))
    conf = tmp_path / "pg_hba.conf"
    conf.write_text("include_if_exists absent.conf\ninclude_dir conf.d\ninclude fragment.conf\n")
    found, notes = check(DESIRED, conf)
    assert notes == []
    assert [(f.kind, f.line) for f in found] == [
        ("shadowed", f"{tmp_path / 'conf.d' / '10-legacy.conf'}:3")
    ]


def test_a_rule_missing_from_the_file_fails(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS))
    conf = tmp_path / "pg_hba.conf"
    conf.write_text("local all all peer\n")
    result = run(state, "hba", "--check", str(conf), environ={})
    assert result.code == 1
    assert "`hostssl cmdbvm cmdb 10.0.6.188/32 cert` is not in the file" in result.out
    shadowed = tmp_path / "shadowed.conf"
    shadowed.write_text("host all all all md5\n" + fragment(DESIRED))
    result = run(state, "hba", "--check", str(shadowed), environ={})
    assert result.code == 1
    assert f"{shadowed}:1: `host all all all md5` matches first" in result.out
