"""Property tests: for random desired states, apply then plan gives no changes, and every serial
that is no longer wanted but still valid is in the CRL."""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import at, crl_serials, ledger_of, run, users_yaml

from reconciler.engine import plan_state
from reconciler.model import CertStatus

T0 = at("2027-01-01T00:00:00Z")
NAMES = ["alice", "bob", "carol", "dave", "eve", "ünïcødé", "app.reader", "x"]
SERVERS = ["db1.acme.example", "db2.acme.example"]

user = st.fixed_dictionaries(
    {
        "name": st.sampled_from(NAMES),
        "key": st.sampled_from(["ecdsa-p256", "ed25519", "ecdsa-p384"]),
        "validity": st.sampled_from(["20d", "30d", "400h"]),
        "generation": st.integers(min_value=1, max_value=3),
        "ou": st.sampled_from([None, "DBA", "Apps"]),
    }
)


def _server(number: int) -> st.SearchStrategy[dict[str, object]]:
    """A server with names of its own: two servers never claim one name."""
    dns = [f"pg{number}.acme.example", f"vip{number}.acme.example"]
    return st.fixed_dictionaries(
        {
            "name": st.just(SERVERS[number - 1]),
            "dns": st.lists(st.sampled_from(dns), unique=True),
            "ip": st.lists(
                st.sampled_from([f"10.0.0.{number}", f"2001:db8::{number}"]), unique=True
            ),
        }
    )


server = st.one_of(_server(1), _server(2))
desired_state = st.tuples(
    st.lists(user, max_size=5, unique_by=lambda u: u["name"]),
    st.lists(server, max_size=2, unique_by=lambda s: s["name"]),
)


def render(state: tuple[list[dict[str, object]], list[dict[str, object]]]) -> str:
    users, servers = state
    user_lines = ""
    for u in users:
        user_lines += (
            f'  - name: "{u["name"]}"\n    key: {u["key"]}\n    validity: {u["validity"]}\n'
            f"    generation: {u['generation']}\n"
        )
        if u["ou"]:
            user_lines += f"    subject: {{OU: {u['ou']}}}\n"
    server_lines = ""
    for s in servers:
        server_lines += f"  - name: {s['name']}\n    dns: {s['dns']}\n    ip: {s['ip']}\n"
    return users_yaml(user_lines, server_lines.replace("'", ""), renew_before="5d")


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with a CA and nothing else, copied for every example."""
    state = tmp_path_factory.mktemp("template") / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml())
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    return state


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=desired_state, second=desired_state, days=st.integers(min_value=0, max_value=40))
def test_apply_then_plan_has_no_changes_and_unwanted_serials_are_revoked(
    bootstrapped: Path,
    first: tuple[list[dict[str, object]], list[dict[str, object]]],
    second: tuple[list[dict[str, object]], list[dict[str, object]]],
    days: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        shutil.copytree(bootstrapped, state)
        (state / "users.yaml").write_text(render(first))
        result = run(state, "apply", "--no-commit", now=T0)
        assert result.code == 0, result.err
        assert not plan_state(state, T0).changes

        later = T0 + timedelta(days=days)
        (state / "users.yaml").write_text(render(second))
        result = run(state, "apply", "--no-commit", now=later)
        assert result.code == 0, result.err
        after = plan_state(state, later)
        assert not after.changes, [a for a in after.changes]

        ledger = ledger_of(state)
        wanted = {f"client/{u['name']}" for u in second[0]} | {
            f"server/{s['name']}" for s in second[1]
        }
        current = {e.serial for e in ledger.entries if e.status is CertStatus.VALID}
        revoked_live = {
            e.serial
            for e in ledger.entries
            if e.status is CertStatus.REVOKED and e.not_after > later
        }
        assert revoked_live <= crl_serials(state)
        for entry in ledger.entries:
            if str(entry.ref) not in wanted and entry.not_after > later:
                assert entry.status is CertStatus.REVOKED, entry
                assert entry.serial in crl_serials(state)
        assert not current & crl_serials(state)
