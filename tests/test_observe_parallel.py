"""The parallel read of observe: a forked child reads and hashes the leaf files while the parent
parses users.yaml. It must observe exactly what the serial read observes, tampering included,
and fall back to reading in the parent when the child fails."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from support import KEY_PASSPHRASE, at, run, users_yaml

from reconciler import observe as observe_module
from reconciler import pki
from reconciler.engine import plan_state, snapshot
from reconciler.errors import DesiredStateError
from reconciler.model import KeyType
from reconciler.observe import Reading, _Forked, observe
from reconciler.store import Listing, StateDir

T = TypeVar("T")
T0 = at("2027-01-01T00:00:00Z")
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """A state where nearly every leaf is wrong in its own way."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "users.yaml").write_text(users_yaml("".join(f"  - name: {n}\n" for n in NAMES)))
    assert run(state, "apply", "--no-commit", now=T0).code == 0
    clients = state / "clients"
    other = pki.generate_key(KeyType.ECDSA_P256)
    (clients / "bob.crt").write_bytes((clients / "bob.crt").read_bytes()[:200])  # truncated
    (clients / "carol.key").write_bytes(pki.unencrypted_key_pem(other))  # plaintext key
    (clients / "dave.key").unlink()  # key missing
    (clients / "erin.crt").unlink()  # certificate missing
    # a certificate the ledger does not know (another name's), parsed on the slow path
    (clients / "frank.crt").write_bytes((clients / "grace.crt").read_bytes())
    # a certificate file with a private key pasted after it
    with (clients / "grace.crt").open("ab") as handle:
        handle.write(pki.unencrypted_key_pem(other))
    (clients / "heidi.key").write_bytes(pki.encrypt_key(other, KEY_PASSPHRASE.encode()))
    os.chmod(clients / "alice.key", 0o644)  # as in a fresh clone
    (clients / "zoe.key").write_bytes(b"not a key\n")  # a key with no certificate or name
    # what an interrupted write leaves, and a stray file holding a plaintext key
    (clients / ".alice.crt.tmp").write_bytes((clients / "alice.crt").read_bytes())
    (clients / "notes.pem").write_bytes(pki.unencrypted_key_pem(other))
    return state


def test_the_parallel_read_observes_exactly_what_the_serial_read_does(damaged: Path) -> None:
    store = StateDir(damaged)
    serial = observe(store, parallel=False)
    parallel = observe(store, parallel=True)
    assert parallel == serial
    leaves = {leaf.name: leaf for leaf in parallel.leaves}
    assert leaves["bob"].cert is None
    assert str(leaves["bob"].cert_problem).startswith("unusable")
    assert leaves["carol"].key.problem == "not encrypted"
    assert leaves["dave"].key.problem == "missing"
    assert leaves["erin"].cert_problem == "missing"
    assert leaves["frank"].cert is not None
    assert leaves["frank"].cert.subject[-1] == ("CN", "grace")
    assert leaves["zoe"].key.problem == "unusable: not an encrypted PKCS#8 PEM key"
    assert set(parallel.plaintext_keys) == {"clients/grace.crt", "clients/notes.pem"}
    assert [temp.path for temp in parallel.temp_files] == ["clients/.alice.crt.tmp"]
    assert dict(parallel.modes)["clients/alice.key"] == 0o644
    heidi = leaves["heidi"].key.sha256
    assert heidi is not None
    assert heidi not in {e.key_sha256 for e in parallel.ledger.entries}


def test_the_parallel_read_runs_in_a_child_process() -> None:
    parent = os.getpid()
    assert _Forked(os.getpid).result() != parent


def test_a_failing_child_falls_back_to_reading_here() -> None:
    parent = os.getpid()

    def work() -> str:
        if os.getpid() != parent:
            raise RuntimeError("the child fails")
        return "read here"

    assert _Forked(work).result() == "read here"


def test_a_child_killed_from_outside_falls_back_to_reading_here() -> None:
    parent = os.getpid()

    def work() -> str:
        if os.getpid() != parent:
            os.kill(os.getpid(), 9)
        return "read here"

    assert _Forked(work).result() == "read here"


def test_cancel_kills_and_reaps_the_child() -> None:
    forked = _Forked(lambda: time.sleep(60))
    pid = forked._pid
    assert pid is not None
    started = time.monotonic()
    forked.cancel()
    assert time.monotonic() - started < 30  # not the child's 60 s
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: no zombie left


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[_Forked[object]]:
    """Make every Reading fork, whatever the machine's cores, and list the children it
    starts."""
    started: list[_Forked[object]] = []

    class Recorded(_Forked[T]):
        def __init__(self, work: Callable[[], T]) -> None:
            super().__init__(work)
            started.append(self)  # type: ignore[arg-type]

    monkeypatch.setattr(observe_module, "_cores", lambda: 2)
    monkeypatch.setattr(observe_module, "_Forked", Recorded)
    return started


def test_plan_through_the_parallel_read_equals_plan_through_the_serial_one(
    damaged: Path, forks: list[_Forked[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    parallel = plan_state(damaged, T0)
    assert len(forks) == 2  # two cores: two readers, each reading every other name
    monkeypatch.setattr(observe_module, "_cores", lambda: 1)
    serial = plan_state(damaged, T0)
    assert len(forks) == 2
    assert parallel == serial
    changed = {a.subject for a in parallel.changes}
    assert changed >= {f"client/{n}" for n in ("bob", "carol", "dave", "erin", "frank", "heidi")}
    assert any(b.startswith("clients/grace.crt holds an unencrypted") for b in parallel.blockers)


def test_a_bad_users_yaml_leaves_no_child_behind(
    damaged: Path, forks: list[_Forked[object]]
) -> None:
    (damaged / "users.yaml").write_text("version: [\n")
    before = _children()
    with pytest.raises(DesiredStateError, match="YAML syntax error"):
        snapshot(damaged)
    assert len(forks) == 2
    assert _children() == before


@pytest.mark.parametrize("why", ["one core", "another thread"])
def test_one_core_or_another_thread_reads_here(
    damaged: Path, forks: list[_Forked[object]], monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    if why == "one core":
        monkeypatch.setattr(observe_module, "_cores", lambda: 1)
        assert observe(StateDir(damaged)) == observe(StateDir(damaged), parallel=False)
    else:  # a forked child could inherit a lock the other thread holds: never fork then
        release = threading.Event()
        other = threading.Thread(target=release.wait)
        other.start()
        try:
            assert observe(StateDir(damaged)) == observe(StateDir(damaged), parallel=False)
        finally:
            release.set()
            other.join()
    assert forks == []
    assert observe(StateDir(damaged)) is not None
    assert len(forks) == (2 if why == "another thread" else 0)


def _children() -> set[int]:
    """This process's live child processes, from /proc."""
    me = str(os.getpid())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.add(int(entry.name))
    return found


@pytest.mark.parametrize("skew", ["a name", "another file"])
def test_readers_that_list_different_names_fall_back_to_reading_here(
    damaged: Path, forks: list[_Forked[object]], monkeypatch: pytest.MonkeyPatch, skew: str
) -> None:
    """A file that appears between two readers' listings: their shards do not fit together,
    so the parent reads every file itself rather than merging them."""
    real = Reading._read_leaf_dirs
    here: list[tuple[int, int]] = []  # calls made in this process (a child's are its own)

    def skewed(self: Reading, shard: int = 0, readers: int = 1) -> object:
        if os.getpid() == parent:
            here.append((shard, readers))
        elif shard == 1:  # the second reader sees one more file than the first
            scan = self.store.scan_leaf_dirs

            def scan_later() -> Listing:
                listing = scan()
                if skew == "a name":
                    listing.leaf_names["clients"].add("appeared-meanwhile")
                else:
                    listing.other_files.append("clients/appeared-meanwhile")
                return listing

            setattr(self.store, "scan_leaf_dirs", scan_later)  # noqa: B010 (only in the child)
        return real(self, shard, readers)

    parent = os.getpid()
    monkeypatch.setattr(Reading, "_read_leaf_dirs", skewed)
    observed = observe(StateDir(damaged))
    assert len(forks) == 2
    assert here == [(0, 1)]  # the parent read everything itself, once
    assert observed == observe(StateDir(damaged), parallel=False)
    assert "appeared-meanwhile" not in {leaf.name for leaf in observed.leaves}


def test_readers_split_the_names_between_them(damaged: Path) -> None:
    """Each name is read by exactly one reader, and the parent gets them back in order."""
    reading = Reading(StateDir(damaged), parallel=False)
    shards = [reading._read_leaf_dirs(shard, 2) for shard in range(2)]
    names = [[found[0] for found in files[0]] for _, _, files in shards]
    assert names[0] == sorted(names[0])
    assert names[1] == sorted(names[1])
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == [*sorted(NAMES), "zoe"]
    assert shards[0][1] == shards[1][1]  # the same listing, as count and hash
    assert shards[0][0].leaf_names == {}  # the names travel with the files only


@pytest.mark.parametrize("failing", ["fork", "pipe"])
def test_when_no_child_can_be_started_the_parent_reads(
    damaged: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def refuse() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    expected = observe(StateDir(damaged), parallel=False)
    monkeypatch.setattr(os, failing, refuse)
    assert observe(StateDir(damaged), parallel=True) == expected
