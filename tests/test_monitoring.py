"""Monitoring for the scheduled job: status --warn-days and the node_exporter textfile."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from support import at, cert, run, users_yaml

T0 = at("2027-01-01T00:00:00Z")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "users.yaml").write_text(users_yaml('  - name: alice\n  - name: "o\\"q"\n'))
    assert run(directory, "apply", "--no-commit", now=T0).code == 0
    return directory


ENV = 'environment="state"'  # the state directory's name (the fixture's is "state")
LAST_SUCCESS = f"reconciler_last_success_timestamp_seconds{{{ENV}}}"


def metrics(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_warn_days_watches_certificates_and_the_crl(state: Path) -> None:
    assert run(state, "status", "--warn-days", "7", now=T0).code == 0
    # certificates run for 30 days, the CRL's next update is 30 days out as well
    warned = run(state, "status", "--warn-days", "7", now=T0 + timedelta(days=24))
    assert warned.code == 1
    assert "client/alice" in warned.err
    assert "crl/crl" in warned.err
    # a refreshed CRL and renewed certificates end the warning
    assert run(state, "apply", "--no-commit", now=T0 + timedelta(days=24)).code == 0
    assert run(state, "status", "--warn-days", "7", now=T0 + timedelta(days=24)).code == 0


def test_prometheus_textfile_has_expiry_crl_and_last_success(state: Path, tmp_path: Path) -> None:
    textfile = tmp_path / "reconciler.prom"
    applied = run(
        state, "apply", "--no-commit", "--prometheus", str(textfile), now=T0 + timedelta(hours=1)
    )
    assert applied.code == 0, applied.err
    values = metrics(textfile.read_text())
    alice = cert(state / "clients" / "alice.crt")
    serial = format(alice.serial_number, "040x")
    key = (
        f'reconciler_certificate_expiry_timestamp_seconds{{{ENV},kind="client",name="alice",'
        f'serial="{serial}",state="valid"}}'
    )
    assert values[key] == alice.not_valid_after_utc.timestamp()
    assert any('name="o\\"q"' in name for name in values)  # label values are escaped
    assert (
        values[f'reconciler_crl_next_update_timestamp_seconds{{{ENV},name="crl"}}']
        == (T0 + timedelta(days=30)).timestamp()
    )
    assert values[LAST_SUCCESS] == (T0 + timedelta(hours=1)).timestamp()
    assert textfile.stat().st_mode & 0o777 == 0o644
    assert re.search(
        r"^# TYPE reconciler_crl_next_update_timestamp_seconds gauge$",
        textfile.read_text(),
        re.MULTILINE,
    )

    # status rewrites the file and keeps the last success of the apply before it
    assert run(state, "status", "--prometheus", str(textfile), now=T0 + timedelta(days=2)).code == 0
    again = metrics(textfile.read_text())
    assert again[LAST_SUCCESS] == (T0 + timedelta(hours=1)).timestamp()
    assert not list(tmp_path.glob(".*.tmp"))
