"""contrib/ansible/rollout.yml against a real PostgreSQL 15, with ansible-core and
ansible_connection=local: one inventory holds the server (`db`) and a client host (`app`).

The module's fixture issues a state in a git repository, rolls it out (at -vvv) and starts the
server on the deployed files. Each later test runs the playbook again itself; the ones that
change the deployment come last. Under CI=true a missing ansible-playbook or PostgreSQL fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pgcluster import Cluster, cluster
from support import GIT_IDENTITY, KEY_PASSPHRASE, SECRETS, eventually, git, run, users_yaml

from reconciler.desired import load_desired
from reconciler.pem import PLAINTEXT_KEY
from reconciler.store import StateDir

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "contrib" / "ansible" / "rollout.yml"
BIN = Path(sys.executable).parent  # the venv's bin, not resolved: ansible-playbook lives there
SERVER = "pg.test.example"  # clients connect with hostaddr=127.0.0.1 and verify this name
BEGIN, END = "# BEGIN reconciler managed block", "# END reconciler managed block"
HBA = "    hba: [{database: postgres, address: 127.0.0.1/32}]\n"
HBA_BEFORE = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
ENV = {**SECRETS, **GIT_IDENTITY}

pytestmark = pytest.mark.slow  # each ansible-playbook run takes 5 to 20 seconds


def ansible_playbook() -> Path:
    found = BIN / "ansible-playbook"
    if not found.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{found} is missing, and CI=true: ansible-core is in the dev extra")
        pytest.skip("ansible-core is not installed (pip install -e '.[dev]')")
    return found


def state_yaml(users: tuple[str, ...]) -> str:
    body = "".join(f"  - name: {user}\n{HBA}" for user in users)
    # the server's validity differs from the CRL's, so the textfile cannot mix up the two
    return users_yaml(body, f"  - name: {SERVER}\n    validity: 60d\n")


@dataclasses.dataclass
class Fleet:
    base: Path
    state: Path
    pg: Cluster
    clients: Path
    textfiles: Path
    controller_tmp: Path
    inventory: Path
    runs: dict[str, subprocess.CompletedProcess[str]] = dataclasses.field(default_factory=dict)

    def write_inventory(self, users: list[str]) -> None:
        local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        ctl = f"{self.pg.bindir / 'pg_ctl'} -D {self.pg.data}"
        # reload when it runs; a stopped server reads the files when it starts
        reload = f"cd / && {ctl} status >/dev/null; [ $? -eq 3 ] || {ctl} reload"
        if self.pg.user is not None:
            reload = f"runuser -u {self.pg.user} -- /bin/sh -c {shlex.quote(reload)}"
        owner = self.pg.user or os.environ.get("USER") or "root"
        inventory = {
            "postgresql_servers": {
                "hosts": {
                    "db": {
                        **local,
                        "reconciler_server": SERVER,
                        "pg_tls_dir": str(self.pg.tls),
                        "pg_hba_file": str(self.pg.data / "pg_hba.conf"),
                        "pg_data_dir": str(self.pg.data),  # its PG_VERSION says 15
                        "pg_owner": owner,
                        "pg_reload_command": reload,
                        "node_exporter_textfile_dir": str(self.textfiles),
                    }
                }
            },
            "postgresql_clients": {
                "hosts": {
                    "app": {
                        **local,
                        "reconciler_users": users,
                        "client_dir": str(self.clients),
                        "client_owner": "root" if os.geteuid() == 0 else owner,
                        "client_layouts": ["libpq", "jdbc"],
                    }
                }
            },
        }
        self.inventory.write_text(yaml.safe_dump(inventory))

    def rollout(self, *args: str) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        done = subprocess.run(
            [
                str(ansible_playbook()),
                "-i",
                str(self.inventory),
                str(PLAYBOOK),
                "-e",
                f"reconciler_state={self.state}",
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=self.base,
            env={
                **os.environ,
                **SECRETS,
                "ANSIBLE_CONFIG": str(self.base / "ansible.cfg"),
                "ANSIBLE_HOME": str(self.base / "ansible-home"),
                "ANSIBLE_NOCOLOR": "1",
                "TMPDIR": str(self.controller_tmp),
            },
        )
        print(f"rollout {' '.join(args)}: {time.monotonic() - started:.1f}s")
        left = list(self.controller_tmp.iterdir())
        assert not left, f"left on the controller: {left}\n{done.stdout[-6000:]}{done.stderr}"
        return done

    def psql(self, role: str, *, files_of: str | None = None) -> subprocess.CompletedProcess[str]:
        """Log in as role over TLS with verify-full, with the files deployed for role (or for
        files_of) on the client host."""
        return self.pg.login(self.clients / (files_of or role), role, host=SERVER)


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP's counters, by host."""
    hosts = {}
    for line in output.split("PLAY RECAP")[-1].splitlines():
        match = re.match(r"(\S+)\s+:\s+(.*)$", line)
        if match:
            counters = re.findall(r"(\w+)=(\d+)", match.group(2))
            hosts[match.group(1)] = {name: int(value) for name, value in counters}
    return hosts


def succeeded(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout


def der_sequence_body(der: bytes) -> bytes:
    """What the outer DER SEQUENCE holds: PKCS#8 starts with version 0 and an algorithm
    identifier (02 01 00 30), SEC1 with version 1 and an octet string (02 01 01 04)."""
    assert der[0] == 0x30
    header = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    return der[header:]


def deployed_files(fleet: Fleet) -> dict[str, bytes]:
    paths = [*fleet.pg.tls.iterdir(), fleet.pg.data / "pg_hba.conf", *fleet.textfiles.iterdir()]
    paths += [path for path in fleet.clients.rglob("*") if path.is_file()]
    return {str(path): path.read_bytes() for path in paths}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    ansible_playbook()
    base = tmp_path_factory.mktemp("ansible")
    repo = base / "pki"
    state = repo / "state"
    state.mkdir(parents=True)
    git(repo, "init", "--quiet", "-b", "main")
    (state / "users.yaml").write_text(state_yaml(("alice", "bob")))
    applied = run(state, "apply", environ=ENV)
    assert applied.code == 0, applied.err
    assert git(repo, "status", "--porcelain") == ""  # apply committed users.yaml and its effects
    (base / "ansible.cfg").write_text("")
    with cluster() as pg:
        pg.write_hba(HBA_BEFORE)
        fleet = Fleet(
            base=base,
            state=state,
            pg=pg,
            clients=base / "clients",
            textfiles=base / "textfiles",
            controller_tmp=base / "controller-tmp",
            inventory=base / "inventory.yml",
        )
        fleet.textfiles.mkdir()
        fleet.controller_tmp.mkdir()
        fleet.write_inventory(["alice", "bob"])
        fleet.runs["first"] = fleet.rollout("-vvv")
        succeeded(fleet.runs["first"])
        pg.start()
        for role in ("alice", "bob"):
            created = pg.sql(f"create role {role} login")
            assert created.returncode == 0, created.stderr
        yield fleet


def test_each_role_logs_in_with_verify_full_using_its_deployed_files(fleet: Fleet) -> None:
    for role in ("alice", "bob"):
        done = fleet.psql(role)
        assert done.returncode == 0, done.stderr + fleet.pg.log()[-2000:]
        assert done.stdout.strip() == role


def test_a_deployed_certificate_cannot_log_in_as_another_role(fleet: Fleet) -> None:
    done = fleet.psql("bob", files_of="alice")
    assert done.returncode != 0
    assert 'certificate authentication failed for user "bob"' in done.stderr


def test_files_have_their_owner_and_mode_and_keys_are_decrypted_only_on_the_host(
    fleet: Fleet,
) -> None:
    pg_uid = os.stat(fleet.pg.root).st_uid  # the cluster's OS user
    tls = fleet.pg.tls
    assert (tls.stat().st_uid, tls.stat().st_mode & 0o777) == (pg_uid, 0o700)
    modes = {"server.key": 0o600, "server.crt": 0o644, "root.crt": 0o644, "root.crl": 0o644}
    for name, mode in modes.items():
        st = (tls / name).stat()
        assert (name, st.st_uid, st.st_mode & 0o777) == (name, pg_uid, mode)
    assert sorted(path.name for path in tls.iterdir()) == sorted(modes)  # no temporary left
    for role in ("alice", "bob"):
        files = fleet.clients / role
        assert (files.stat().st_uid, files.stat().st_mode & 0o777) == (os.geteuid(), 0o700)
        assert sorted(path.name for path in files.iterdir()) == [
            "postgresql.crt",
            "postgresql.key",
            "postgresql.pk8",
            "root.crt",  # no root.crl: a stale copy would lock the client out
        ]
        for key in (files / "postgresql.key", files / "postgresql.pk8"):
            assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (os.geteuid(), 0o600)
        assert PLAINTEXT_KEY.match((files / "postgresql.key").read_bytes())
        # pgjdbc's key: unencrypted PKCS#8 DER, not the traditional (SEC1 or PKCS#1) form
        der = (files / "postgresql.pk8").read_bytes()
        assert der_sequence_body(der)[:4] == b"\x02\x01\x00\x30"  # version 0, an AlgorithmId
        public = serialization.load_der_private_key(der, None).public_key()
        leaf = x509.load_pem_x509_certificate((files / "postgresql.crt").read_bytes())
        assert public == leaf.public_key()
    # what the controller printed, at -vvv: no key material, no passphrase on a command line
    output = fleet.runs["first"].stdout + fleet.runs["first"].stderr
    assert "PRIVATE KEY" not in output
    assert KEY_PASSPHRASE not in output
    assert "PASSPHRASE=" not in output


def test_the_managed_hba_block_is_at_the_top_above_the_lines_that_were_there(
    fleet: Fleet,
) -> None:
    lines = (fleet.pg.data / "pg_hba.conf").read_text().splitlines()
    assert lines[0] == BEGIN
    end = lines.index(END)
    block = lines[1:end]
    assert "hostssl postgres alice 127.0.0.1/32 cert" in block
    assert "hostssl postgres bob 127.0.0.1/32 cert" in block
    assert "\n".join(lines[end + 1 :]) + "\n" == HBA_BEFORE
    assert lines.count(BEGIN) == 1


def test_the_textfile_holds_the_deployed_crl_next_update_and_certificate_expiry(
    fleet: Fleet,
) -> None:
    crl = x509.load_pem_x509_crl((fleet.pg.tls / "root.crl").read_bytes())
    leaf = x509.load_pem_x509_certificate((fleet.pg.tls / "server.crt").read_bytes())
    assert crl.next_update_utc is not None
    text = (fleet.textfiles / "reconciler_deployed.prom").read_text()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    labels = f'environment="state",server="{SERVER}",path="{fleet.pg.tls}'
    assert samples == {
        f'reconciler_deployed_crl_next_update_timestamp_seconds{{{labels}/root.crl"}}': str(
            int(crl.next_update_utc.timestamp())
        ),
        f'reconciler_deployed_certificate_expiry_timestamp_seconds{{{labels}/server.crt"}}': (
            str(int(leaf.not_valid_after_utc.timestamp()))
        ),
    }
    assert (fleet.textfiles / "reconciler_deployed.prom").stat().st_mode & 0o777 == 0o644


def test_the_example_inventory_keeps_the_contract_for_the_shipped_users_yaml() -> None:
    example = PLAYBOOK.parent / "inventory.example.yml"
    listed = subprocess.run(
        [str(ansible_playbook().with_name("ansible-inventory")), "-i", str(example), "--list"],
        capture_output=True,
        text=True,
        check=True,
    )
    inventory = json.loads(listed.stdout)
    hostvars = inventory["_meta"]["hostvars"]
    servers = inventory["postgresql_servers"]["hosts"]
    clients = inventory["postgresql_clients"]["hosts"]
    desired = load_desired(StateDir(REPO / "state"))
    names = {(str(leaf.kind), leaf.name) for leaf in desired.leaves}
    for host in servers:
        host_vars = hostvars[host]
        assert {"reconciler_server", "pg_tls_dir", "pg_hba_file", "pg_owner"} <= set(host_vars)
        assert {"pg_version", "pg_data_dir"} & set(host_vars)
        assert ("server", host_vars["reconciler_server"]) in names
    for host in clients:
        host_vars = hostvars[host]
        assert {"reconciler_users", "client_dir", "client_owner"} <= set(host_vars)
        assert set(host_vars.get("client_layouts", ["libpq"])) <= {"libpq", "jdbc"}
        assert {("client", user) for user in host_vars["reconciler_users"]} <= names
    checked = subprocess.run(
        [str(ansible_playbook()), "-i", str(example), "--syntax-check", str(PLAYBOOK)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the tests below run the playbook again ------------------------------------------------


def test_a_pg_hba_file_that_fails_the_check_is_not_installed(fleet: Fleet) -> None:
    pg_hba = fleet.pg.data / "pg_hba.conf"
    original = pg_hba.read_text()
    pg_hba.write_text(original + "host all all 127.0.0.1/32 cert\n")  # PostgreSQL refuses it
    refused = pg_hba.read_bytes()
    try:
        done = fleet.rollout()
        assert done.returncode != 0
        assert recap(done.stdout)["db"]["failed"] == 1
        assert "cert authentication is only supported on hostssl connections" in done.stdout
        assert pg_hba.read_bytes() == refused
    finally:
        pg_hba.write_text(original)


def test_a_second_run_changes_nothing(fleet: Fleet) -> None:
    assert recap(succeeded(fleet.runs["first"]))["db"]["changed"] > 0
    assert recap(fleet.runs["first"].stdout)["app"]["changed"] > 0
    before = deployed_files(fleet)
    second = recap(succeeded(fleet.rollout()))
    assert {host: counters["changed"] for host, counters in second.items()} == {
        "localhost": 0,
        "db": 0,
        "app": 0,
    }
    assert deployed_files(fleet) == before


def test_a_removed_user_is_refused_after_the_next_rollout_and_its_rule_is_gone(
    fleet: Fleet,
) -> None:
    (fleet.state / "users.yaml").write_text(state_yaml(("alice",)))
    applied = run(fleet.state, "apply", environ=ENV)
    assert applied.code == 0, applied.err
    assert "revoke" in applied.out
    fleet.write_inventory(["alice"])
    # --check --diff shows what would change, and changes nothing: bob still gets in
    before = deployed_files(fleet)
    checked = fleet.rollout("--check", "--diff")
    counters = recap(succeeded(checked))
    assert counters["db"]["changed"] > 0  # the CRL and pg_hba.conf
    assert counters["app"]["changed"] == 0  # alice's files are what they were
    assert "-hostssl postgres bob 127.0.0.1/32 cert" in checked.stdout
    assert deployed_files(fleet) == before
    assert fleet.psql("bob").returncode == 0
    # the rollout: bob's certificate is on the deployed CRL, alice still logs in
    log_before = len(fleet.pg.log())
    succeeded(fleet.rollout())
    assert eventually(lambda: fleet.psql("bob").returncode != 0), "bob still logs in"
    assert fleet.pg.logs("certificate verify failed", since=log_before)
    alice = fleet.psql("alice")
    assert alice.returncode == 0, alice.stderr
    block = (fleet.pg.data / "pg_hba.conf").read_text().split(END)[0]
    assert "hostssl postgres alice 127.0.0.1/32 cert" in block
    assert " bob " not in block
