"""The life of one state directory in time steps, through the real command line.

Bootstrap; an idempotent second run; renewal exactly at the window's edge; re-issue on a subject
or key-type change; a generation bump; removal and revocation; CRL refresh when it goes stale.
Time is injected with --now; nothing is mocked.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from support import (
    at,
    cert,
    crl_serials,
    files_under,
    run,
    users_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = at("2027-01-01T00:00:00Z")
USERS = "  - name: alice\n  - name: bob\n  - name: carol\n"
SERVERS = "  - name: db1.acme.example\n    dns: [pg.acme.example]\n    ip: [10.0.6.188]\n"


def ledger(state: Path) -> list[dict[str, object]]:
    lines = (state / "ledger.jsonl").read_text().split("\n")  # its only line end
    return [json.loads(line) for line in lines[1:-2]]  # no header, signature, final newline


def serial_of(state: Path, ref: str) -> int:
    kind, name = ref.split("/")
    return cert(state / f"{kind}s" / f"{name}.crt").serial_number


def plan_json(state: Path, now: datetime) -> dict[str, Any]:
    result = run(state, "plan", "--json", now=now)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def by_subject(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {action["subject"]: action for action in plan["actions"]}


def kinds(plan: dict[str, Any]) -> dict[str, str]:
    return {subject: action["kind"] for subject, action in by_subject(plan).items()}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml(USERS, SERVERS))
    return directory


def test_bootstrap_issues_everything_and_second_run_changes_no_byte(state: Path) -> None:
    assert kinds(plan_json(state, T0)) == {
        "ca": "ca",
        "client/alice": "issue",
        "client/bob": "issue",
        "client/carol": "issue",
        "server/db1.acme.example": "issue",
        "crl": "crl",
    }
    first = run(state, "apply", "--no-commit", now=T0)
    assert first.code == 0, first.err
    before = files_under(state)
    assert {
        "ca/ca.crt",
        "ca/ca.key",
        "ca/crl.pem",
        "ledger.jsonl",
        "clients/alice.key",
        "servers/db1.acme.example.crt",
    } <= set(before)
    assert [entry["status"] for entry in ledger(state)] == ["valid"] * 4

    second = run(state, "apply", "--no-commit", now=T0 + timedelta(hours=1))
    assert second.code == 0, second.err
    assert "Nothing to do" in second.out
    assert files_under(state) == before
    detailed = run(state, "plan", "--detailed-exitcode", now=T0 + timedelta(hours=1))
    assert detailed.code == 0, detailed.out


@pytest.mark.parametrize(
    ("renew_before", "window_of"),
    [
        pytest.param("10d", lambda lifetime: timedelta(days=10), id="duration"),
        pytest.param(
            "33%",
            lambda lifetime: timedelta(seconds=int(lifetime.total_seconds()) * 33 // 100),
            id="share",
        ),
    ],
)
def test_renewal_happens_exactly_at_the_window_edge(
    tmp_path: Path, renew_before: str, window_of: object
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml(USERS, renew_before=renew_before))
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    alice = cert(state / "clients" / "alice.crt")
    lifetime = alice.not_valid_after_utc - alice.not_valid_before_utc
    assert callable(window_of)
    edge = alice.not_valid_after_utc - window_of(lifetime)

    just_before = plan_json(state, edge - timedelta(seconds=1))
    assert kinds(just_before)["client/alice"] == "noop"
    at_edge = plan_json(state, edge)
    assert kinds(at_edge)["client/alice"] == "renew"
    assert kinds(plan_json(state, edge + timedelta(seconds=1)))["client/alice"] == "renew"

    assert run(state, "apply", "--no-commit", now=edge).code == 0
    renewed = cert(state / "clients" / "alice.crt")
    assert renewed.serial_number != alice.serial_number
    assert renewed.public_key() != alice.public_key()  # renewal always makes a new key
    assert renewed.not_valid_after_utc == edge.replace(microsecond=0) + timedelta(days=30)
    statuses = {int(str(e["serial"]), 16): e["status"] for e in ledger(state)}
    assert statuses[alice.serial_number] == "superseded"
    assert statuses[renewed.serial_number] == "valid"
    # superseded stays valid until it expires: it is not revoked
    assert alice.serial_number not in crl_serials(state)
    assert kinds(plan_json(state, edge))["client/alice"] == "noop"


def test_expired_certificate_is_renewed(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    later = T0 + timedelta(days=45)
    plan = plan_json(state, later)
    actions = by_subject(plan)
    assert actions["client/bob"]["kind"] == "renew"
    assert any("expired on" in r for r in actions["client/bob"]["reasons"])


def test_subject_and_key_type_changes_reissue(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    old = {ref: serial_of(state, ref) for ref in ("client/alice", "client/bob")}
    users = (
        "  - name: alice\n    key: ed25519\n  - name: bob\n    subject: {OU: DBA}\n"
        "  - name: carol\n"
    )
    (state / "users.yaml").write_text(users_yaml(users, SERVERS))
    plan = plan_json(state, T0 + timedelta(days=1))
    actions = by_subject(plan)
    assert actions["client/alice"]["kind"] == "reissue"
    assert "key type changed: ecdsa-p256 → ed25519" in actions["client/alice"]["reasons"]
    assert actions["client/bob"]["kind"] == "reissue"
    assert any(
        r.startswith("subject changed") and "OU=DBA" in r for r in actions["client/bob"]["reasons"]
    )
    assert actions["client/carol"]["kind"] == "noop"

    assert run(state, "apply", "--no-commit", now=T0 + timedelta(days=1)).code == 0
    assert cert(state / "clients" / "alice.crt").signature_hash_algorithm is not None  # CA signs
    from cryptography.hazmat.primitives.asymmetric import ed25519

    assert isinstance(cert(state / "clients" / "alice.crt").public_key(), ed25519.Ed25519PublicKey)
    bob = cert(state / "clients" / "bob.crt")
    assert bob.subject.rfc4514_string() == "CN=bob,OU=DBA,O=Acme,C=NL"
    statuses = {int(str(e["serial"]), 16): e["status"] for e in ledger(state)}
    assert statuses[old["client/alice"]] == "superseded"
    assert statuses[old["client/bob"]] == "superseded"
    assert not crl_serials(state) & set(old.values())


def test_server_san_change_reissues(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    servers = (
        "  - name: db1.acme.example\n    dns: [pg.acme.example, pg2.acme.example]\n"
        "    ip: [10.0.6.188]\n"
    )
    (state / "users.yaml").write_text(users_yaml(USERS, servers))
    plan = plan_json(state, T0)
    action = by_subject(plan)["server/db1.acme.example"]
    assert action["kind"] == "reissue"
    assert any("DNS names changed" in r for r in action["reasons"])
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    san = (
        cert(state / "servers" / "db1.acme.example.crt")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == [
        "db1.acme.example",
        "pg.acme.example",
        "pg2.acme.example",
    ]


def test_generation_bump_forces_new_key_and_revokes_the_old_certificate(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    first = serial_of(state, "client/alice")
    # renew once, so alice also has a superseded (still valid) certificate
    renew_at = T0 + timedelta(days=21)
    assert run(state, "apply", "--no-commit", now=renew_at).code == 0
    second = serial_of(state, "client/alice")
    assert second != first

    users = "  - name: alice\n    generation: 2\n  - name: bob\n  - name: carol\n"
    (state / "users.yaml").write_text(users_yaml(users, SERVERS))
    plan = plan_json(state, renew_at + timedelta(hours=1))
    action = by_subject(plan)["client/alice"]
    assert action["kind"] == "reissue"
    assert any("generation changed from 1 to 2" in r for r in action["reasons"])
    assert run(state, "apply", "--no-commit", now=renew_at + timedelta(hours=1)).code == 0
    third = serial_of(state, "client/alice")
    statuses = {int(str(e["serial"]), 16): e for e in ledger(state)}
    assert statuses[first]["status"] == "revoked"
    assert statuses[second]["status"] == "revoked"
    assert statuses[third]["status"] == "valid"
    assert statuses[third]["generation"] == 2
    assert {first, second} <= crl_serials(state)
    assert third not in crl_serials(state)
    assert kinds(plan_json(state, renew_at + timedelta(hours=2)))["client/alice"] == "noop"


def test_removal_revokes_every_valid_certificate_and_deletes_the_key(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    first = serial_of(state, "client/bob")
    assert run(state, "apply", "--no-commit", now=T0 + timedelta(days=21)).code == 0
    second = serial_of(state, "client/bob")
    expired_crl_number = x509.load_pem_x509_crl((state / "ca/crl.pem").read_bytes())

    (state / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: carol\n", SERVERS))
    when = T0 + timedelta(days=22)
    plan = plan_json(state, when)
    assert kinds(plan)["client/bob"] == "revoke"
    assert kinds(plan)["crl"] == "crl"
    assert run(state, "apply", "--no-commit", now=when).code == 0
    assert not (state / "clients" / "bob.crt").exists()
    assert not (state / "clients" / "bob.key").exists()
    statuses = {int(str(e["serial"]), 16): e for e in ledger(state)}
    assert statuses[first]["status"] == statuses[second]["status"] == "revoked"
    assert statuses[first]["reason"] == "cessationOfOperation"
    assert {first, second} <= crl_serials(state)
    crl = x509.load_pem_x509_crl((state / "ca/crl.pem").read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    old = expired_crl_number.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > old
    # the name is gone from the plan once nothing of it is left to revoke
    assert "client/bob" not in kinds(plan_json(state, when))


def test_crl_is_resigned_when_it_goes_stale(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    crl = x509.load_pem_x509_crl((state / "ca/crl.pem").read_bytes())
    next_update = crl.next_update_utc
    assert next_update is not None
    assert next_update == T0 + timedelta(days=30)
    assert crl.last_update_utc == T0 - timedelta(minutes=5)  # backdated for clock skew
    stale_from = next_update - timedelta(days=20)  # refresh_before
    assert kinds(plan_json(state, stale_from - timedelta(seconds=1)))["crl"] == "noop"
    assert kinds(plan_json(state, stale_from))["crl"] == "crl"
    assert run(state, "apply", "--no-commit", now=stale_from).code == 0
    fresh = x509.load_pem_x509_crl((state / "ca/crl.pem").read_bytes())
    assert fresh.next_update_utc == stale_from + timedelta(days=30)
    number = fresh.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 2
    assert kinds(plan_json(state, stale_from))["crl"] == "noop"


def test_leaf_never_outlives_its_ca_and_is_not_renewed_in_a_loop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(
        users_yaml("  - name: alice\n", validity="365d", renew_before="30d", ca_validity="100d")
    )
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    ca = cert(state / "ca" / "ca.crt")
    alice = cert(state / "clients" / "alice.crt")
    assert alice.not_valid_after_utc == ca.not_valid_after_utc
    inside_window = ca.not_valid_after_utc - timedelta(days=10)
    plan = plan_json(state, inside_window)
    action = by_subject(plan)["client/alice"]
    assert action["kind"] == "noop"
    assert any("CA expires first" in r for r in action["reasons"])


def test_plan_output_forms_and_detailed_exitcode(state: Path) -> None:
    text = run(state, "plan", now=T0)
    assert text.code == 0
    assert "ACTION" in text.out
    assert "client/alice" in text.out
    markdown = run(state, "plan", "--markdown", now=T0)
    assert "| **issue** | client/alice |" in markdown.out
    assert run(state, "plan", "--detailed-exitcode", now=T0).code == 2
    plan = plan_json(state, T0)
    assert plan["changes"] == 6
    assert all(a["reasons"] for a in plan["actions"])


def test_status_reports_states_and_warns(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    rows = json.loads(run(state, "status", "--json", now=T0).out)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert by_name[("client", "alice")]["state"] == "valid"
    assert by_name[("client", "alice")]["days_left"] == 30
    assert by_name[("crl", "crl")]["state"] == "valid"
    # 25 days on: inside the 10-day window of the 30-day certificates
    later = T0 + timedelta(days=25)
    rows = json.loads(run(state, "status", "--json", now=later).out)
    assert {r["state"] for r in rows if r["kind"] == "client"} == {"expiring"}
    warned = run(state, "status", "--warn-days", "7", now=later)
    assert warned.code == 1
    assert "client/alice" in warned.err
    assert run(state, "status", "--warn-days", "3", now=T0).code == 0

    (state / "users.yaml").write_text(users_yaml("  - name: alice\n  - name: carol\n", SERVERS))
    assert run(state, "apply", "--no-commit", now=T0 + timedelta(days=1)).code == 0
    rows = json.loads(run(state, "status", "--json", now=T0 + timedelta(days=1)).out)
    assert {r["state"] for r in rows if r["name"] == "bob"} == {"revoked"}


def test_unusable_files_are_observed_and_repaired(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    alice = state / "clients" / "alice.crt"
    alice.write_bytes(alice.read_bytes()[:100])
    (state / "clients" / "bob.key").unlink()
    plan = plan_json(state, T0)
    actions = by_subject(plan)
    assert actions["client/alice"]["kind"] == "issue"
    assert actions["client/alice"]["reasons"][0].startswith("certificate file unusable")
    assert actions["client/bob"]["kind"] == "issue"
    assert "private key missing" in actions["client/bob"]["reasons"]
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    assert kinds(plan_json(state, T0)) == dict.fromkeys(kinds(plan), "noop")


def test_atomic_writes_leave_no_temporary_files_and_set_modes(state: Path) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    for path in state.rglob("*"):
        assert not path.name.endswith(".tmp"), path
        if path.is_file() and path.name != "users.yaml":
            expected = 0o600 if path.suffix == ".key" else 0o644
            assert path.stat().st_mode & 0o777 == expected, path
    assert (state / "ca/ca.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param("ledger.jsonl", "ledger.jsonl is missing but a CA exists", id="no-ledger"),
        pytest.param("ca/ca.crt", "ca/ca.key exists but ca/ca.crt does not", id="no-ca-cert"),
    ],
)
def test_missing_ledger_or_ca_blocks_instead_of_starting_over(
    state: Path, damage: str, expected: str
) -> None:
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    (state / damage).unlink()
    before = files_under(state)
    planned = run(state, "plan", now=T0)
    assert planned.code == 1
    assert expected in planned.out
    applied = run(state, "apply", "--no-commit", now=T0)
    assert applied.code == 1
    assert expected in applied.err
    assert files_under(state) == before


def test_init_scaffolds_a_state_directory_that_validates_and_refuses_to_overwrite(
    tmp_path: Path,
) -> None:
    state = tmp_path / "new-state"
    created = run(state, "init")
    assert created.code == 0, created.err
    example = (state / "users.yaml").read_text()
    assert not (state / "users.yaml").is_symlink()
    # a neutral example: not this team's live state (state/users.yaml of this repository)
    assert example != (ROOT / "state" / "users.yaml").read_text()
    assert "Acme" not in example
    assert "example.com" in example
    validated = run(state, "validate")
    assert validated.code == 0, validated.err
    assert "2 users, 1 server." in validated.out
    (state / "users.yaml").write_text("version: 1\n")
    again = run(state, "init")
    assert again.code == 1
    assert "already exists" in again.err
    assert (state / "users.yaml").read_text() == "version: 1\n"


@pytest.mark.parametrize("separator", ["\\u2028", "\\u2029"])
def test_a_subject_holding_a_unicode_line_separator_round_trips_through_the_ledger(
    tmp_path: Path, separator: str
) -> None:
    """users.yaml may spell U+2028 or U+2029 as an escape inside double quotes; the
    ledger keeps them unescaped on one line, and reading it back must not split that line
    (it did: the next run found its own ledger unusable and blocked)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(
        users_yaml("  - name: alice\n", subject_o=f'"Acme{separator}Corp"')
    )
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    raw = (state / "ledger.jsonl").read_bytes()
    value = json.loads(f'"{separator}"')
    assert value.encode() in raw  # kept as it is, inside its line
    again = run(state, "apply", "--no-commit", now=T0)
    assert again.code == 0, again.err
    assert again.out.startswith("Nothing to do")
    organization = cert(state / "clients" / "alice.crt").subject.get_attributes_for_oid(
        x509.NameOID.ORGANIZATION_NAME
    )
    assert organization[0].value == f"Acme{value}Corp"
