"""Read the state directory into an immutable Observed value. Needs no passphrase.

A file that cannot be used is an observation ("unusable: …"), never an exception: deciding what
to do about it is plan()'s job. Observed too: file modes, temporary files left by an interrupted
write (and any certificate in them), files holding an unencrypted private key, and whether the
ledger's CA signature verifies.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from reconciler import pem
from reconciler.model import (
    CertFacts,
    CertKind,
    KeyFacts,
    LedgerEntry,
    Observed,
    ObservedCA,
    ObservedCRL,
    ObservedLeaf,
    Subject,
    TempFile,
)
from reconciler.store import TEMP_PREFIX, TEMP_SUFFIX, Listing, StateDir

if TYPE_CHECKING:
    from cryptography import x509

T = TypeVar("T")


def key_facts(data: bytes | None) -> KeyFacts:
    problem, digest = pem.key_problem(data)
    return KeyFacts(problem=problem, sha256=digest)


LeafFile = tuple[str, str | None, str | None, int | None, str | None, int | None, bool]
"""What one name's two files say, as plain values (cheap to send between processes): name, key
problem, key SHA-256, key mode, certificate fingerprint (None when it holds no PEM certificate),
certificate mode (None when there is no certificate file), certificate holds a private key."""


_LeafRead = tuple[Listing, tuple[tuple[int, int], ...], list[list[LeafFile]]]
"""What a reader returns: its listing without the leaf names, their count and hash per leaf
directory, and what the files of its share of the names say."""


def read_leaf_files(store: StateDir, directory: str, names: Sequence[str]) -> list[LeafFile]:
    """Read and hash every name's key and certificate file in one leaf directory."""
    found: list[LeafFile] = []
    fingerprint, search, check_key = pem.fingerprint, pem.PLAINTEXT_KEY.search, pem.key_problem
    for name, key_data, key_mode, data, mode in store.read_pairs(directory, names):
        key_problem, key_sha256 = check_key(key_data)
        if data is None:
            found.append((name, key_problem, key_sha256, key_mode, None, None, False))
            continue
        holds_key = b"PRIVATE KEY" in data and search(data) is not None
        found.append((name, key_problem, key_sha256, key_mode, fingerprint(data), mode, holds_key))
    return found


def _problem(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"unusable: {text}"


class _Observer:
    def __init__(self, store: StateDir, listing: Listing) -> None:
        self.store = store
        self.plaintext: list[str] = []
        self.modes: dict[str, int] = dict(listing.modes)
        self.ca_subject: Subject = ()

    def read(self, relative: str) -> bytes | None:
        """Read a file that must not hold a private key, noting it when it does."""
        data, _ = self.store.read_relative(relative)
        if data is not None and b"PRIVATE KEY" in data and pem.PLAINTEXT_KEY.search(data):
            self.plaintext.append(relative)
        return data

    def ca(self) -> tuple[ObservedCA, x509.Certificate | None]:
        from reconciler import pki  # imports cryptography: after the reader forked

        key = key_facts(self.store.read(self.store.ca_key))
        data = self.read("ca/ca.crt")
        if data is None:
            return ObservedCA(cert=None, cert_problem="missing", key=key), None
        try:
            cert = pki.load_certificates(data)[0]
            facts = pki.certificate_facts(cert, cert)
        except ValueError as exc:
            return ObservedCA(cert=None, cert_problem=_problem(exc), key=key), None
        if not facts.is_ca or not facts.signed_by_ca:
            return (
                ObservedCA(
                    cert=facts,
                    cert_problem="not a self-signed CA certificate",
                    key=key,
                ),
                None,
            )
        ca = ObservedCA(cert=facts, cert_problem=None, key=key)
        self.ca_subject = facts.subject
        return ca, cert

    def leaves(
        self,
        kind: CertKind,
        files: list[LeafFile],
        ca_cert: x509.Certificate | None,
        known: Mapping[str, LedgerEntry],
    ) -> Iterator[ObservedLeaf]:
        """Every name of one directory, from what read_leaf_files found: the hot loop of a
        no-op, so a certificate the ledger knows costs a dictionary lookup."""
        from reconciler import pki

        directory = kind.directory
        modes, plaintext, ca_subject = self.modes, self.plaintext, self.ca_subject
        for name, key_problem, key_sha256, key_mode, fingerprint, mode, holds_key in files:
            key = KeyFacts(key_problem, key_sha256)
            if key_mode is not None:
                modes[f"{directory}/{name}.key"] = key_mode
            if mode is None:
                yield ObservedLeaf(kind, name, None, "missing", key)
                continue
            relative = f"{directory}/{name}.crt"
            modes[relative] = mode
            if holds_key:
                plaintext.append(relative)
            # A certificate the CA-signed ledger records by fingerprint was checked when it was
            # issued: its facts come from the ledger, without parsing or verifying it again.
            entry = known.get(fingerprint or "")
            if (
                entry is not None
                and entry.subject is not None
                and entry.kind is kind
                and entry.name == name
            ):
                facts = CertFacts(  # positionally: this runs once per certificate
                    entry.serial,
                    entry.subject,
                    ca_subject,
                    entry.dns,
                    entry.ips,
                    entry.key,
                    entry.not_before,
                    entry.not_after,
                    entry.fingerprint,
                    True,  # signed_by_ca: checked when it was issued and recorded
                    False,  # is_ca
                )
                yield ObservedLeaf(kind, name, facts, None, key)
                continue
            data = self.store.read_relative(relative)[0]
            if data is None:  # deleted since it was read
                yield ObservedLeaf(kind, name, None, "missing", key)
                continue
            try:
                facts = pki.certificate_facts(pki.load_certificates(data)[0], ca_cert)
            except ValueError as exc:
                yield ObservedLeaf(kind, name, None, _problem(exc), key)
                continue
            yield ObservedLeaf(kind, name, facts, None, key)

    def crl(self, ca_cert: x509.Certificate | None) -> ObservedCRL:
        from cryptography import x509

        data = self.read("ca/crl.pem")
        if data is None:
            return ObservedCRL(
                problem="missing",
                number=None,
                this_update=None,
                next_update=None,
                serials=frozenset(),
            )
        try:
            crl = x509.load_pem_x509_crl(data)
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            serials = frozenset(entry.serial_number for entry in crl)
            this_update, next_update = crl.last_update_utc, crl.next_update_utc
        except (ValueError, x509.ExtensionNotFound) as exc:
            return ObservedCRL(
                problem=_problem(exc),
                number=None,
                this_update=None,
                next_update=None,
                serials=frozenset(),
            )
        problem = None
        if ca_cert is None or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            problem = "not signed by the current CA"
        return ObservedCRL(
            problem=problem,
            number=number,
            this_update=this_update,
            next_update=next_update,
            serials=serials,
        )

    def temp_file(self, relative: str, ca_cert: x509.Certificate | None) -> TempFile:
        from reconciler import pki

        data = self.store.read_relative(relative)[0] or b""
        directory, _, file = relative.rpartition("/")
        target = file[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
        kind = next((k for k in CertKind if k.directory == directory), None)
        cert = None
        if target.endswith(".crt"):
            try:
                cert = pki.certificate_facts(pki.load_certificates(data)[0], ca_cert)
            except ValueError:
                cert = None
        if pem.PLAINTEXT_KEY.search(data):
            self.plaintext.append(relative)
        name = target[:-4] if kind is not None and target.endswith((".crt", ".key")) else None
        return TempFile(path=relative, cert=cert, kind=kind, name=name)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


class _Forked(Generic[T]):
    """work() run in a forked child while this process goes on; result() returns its value.

    The child only reads and hashes files and sends plain values back through a pipe. When it
    cannot be started or fails in any way, result() runs work() here: the answer is the same,
    only later."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._pid: int | None = None
        try:
            read_fd, write_fd = os.pipe()
        except OSError:  # out of descriptors: result() reads here
            return
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: result() reads here
            os.close(read_fd)
            os.close(write_fd)
            return
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                os.close(read_fd)
                view = memoryview(pickle.dumps(work(), protocol=pickle.HIGHEST_PROTOCOL))
                while view:
                    view = view[os.write(write_fd, view) :]
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        self._pid, self._fd = pid, read_fd

    def result(self) -> T:
        if self._pid is None:
            return self._work()
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        self._reap()
        if self._status == 0:
            with contextlib.suppress(Exception):
                # our own child, through a pipe only the two of us hold
                value: T = pickle.loads(b"".join(chunks))  # noqa: S301
                return value
        return self._work()

    def cancel(self) -> None:
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._reap()

    def _reap(self) -> None:
        assert self._pid is not None
        os.close(self._fd)
        _, status = os.waitpid(self._pid, 0)
        self._status = os.waitstatus_to_exitcode(status)
        self._pid = None


MAX_READERS = 4
"""At most this many forked readers, each reading its share of the names; never more than
cores."""


class Reading:
    """observe() in two steps, so that the caller can parse users.yaml meanwhile: on a machine
    with more than one core, forked children list clients/ and servers/ and read and hash the
    key and certificate files in them (nearly all of a no-op's system calls), each child those
    of the names whose hash falls in its share, while this process goes on. It forks only
    while this process runs a single thread, so no child can inherit a lock another thread
    holds."""

    def __init__(self, store: StateDir, *, parallel: bool | None = None) -> None:
        self.store = store
        self.listing = store.scan()
        cores = _cores()
        if parallel is None:
            parallel = cores > 1 and threading.active_count() == 1
        readers = min(max(cores, 2), MAX_READERS)
        self._shards: list[_Forked[_LeafRead]] = (
            [
                _Forked(functools.partial(self._read_leaf_dirs, shard, readers))
                for shard in range(readers)
            ]
            if parallel
            else []
        )

    def _read_leaf_dirs(self, shard: int = 0, readers: int = 1) -> _LeafRead:
        """The leaf directories' listing and what the files of the names whose hash is shard
        modulo readers say, in name order. The forked readers share this process's string
        hashes, so their shards do not overlap; the listing they return leaves out the names
        themselves (the files carry them), keeping only their count and hash, by which the
        parent checks that all readers listed the same names."""
        listing = self.store.scan_leaf_dirs()
        files: list[list[LeafFile]] = []
        seen: list[tuple[int, int]] = []
        for kind in CertKind:
            names = listing.leaf_names.pop(kind.directory, set())
            mine = names if readers == 1 else [n for n in names if hash(n) % readers == shard]
            files.append(read_leaf_files(self.store, kind.directory, sorted(mine)))
            seen.append((len(names), hash(frozenset(names))))
        return listing, tuple(seen), files

    def _leaf_dirs(self) -> tuple[Listing, list[list[LeafFile]]]:
        if not self._shards:
            listing, _, files = self._read_leaf_dirs()
            return listing, files
        results = [shard.result() for shard in self._shards]
        listing, seen, _ = results[0]
        if any((other, names) != (listing, seen) for other, names, _ in results[1:]):
            listing, _, files = self._read_leaf_dirs()  # names came or went while they listed
            return listing, files
        by_name = operator.itemgetter(0)
        files = [  # each shard is in name order: sorting their concatenation merges them
            sorted(itertools.chain.from_iterable(found[i] for *_, found in results), key=by_name)
            for i in range(len(CertKind))
        ]
        return listing, files

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for shard in self._shards:
            shard.cancel()

    def observe(self) -> Observed:
        """Everything plan() needs to know about the state directory, read once."""
        from reconciler import pki

        store = self.store
        observer = _Observer(store, self.listing)
        ca, ca_cert = observer.ca()
        verify = None
        if ca_cert is not None:
            public_key = ca_cert.public_key()

            def verify(data: bytes, signature: bytes) -> bool:
                return pki.verify(public_key, data, signature)

        ledger = store.load_ledger(verify)
        known = (
            {entry.fingerprint: entry for entry in ledger.entries} if ledger.signature_ok else {}
        )
        # only now wait for the child: the CA and the ledger were read meanwhile
        leaf_listing, files = self._leaf_dirs()
        listing = self.listing.merge(leaf_listing)
        observer.modes.update(leaf_listing.modes)
        leaves = tuple(
            leaf
            for kind, found in zip(CertKind, files, strict=True)
            for leaf in observer.leaves(kind, found, ca_cert, known)
        )
        crl = observer.crl(ca_cert)
        temp_files = tuple(observer.temp_file(path, ca_cert) for path in listing.temp_files)
        for relative in [*listing.other_files, "users.yaml"]:
            observer.read(relative)
        return Observed(
            ca=ca,
            crl=crl,
            leaves=leaves,
            ledger=ledger,
            modes=tuple(sorted(observer.modes.items())),
            temp_files=temp_files,
            plaintext_keys=tuple(sorted(set(observer.plaintext))),
        )


def observe(store: StateDir, *, parallel: bool | None = None) -> Observed:
    """Everything plan() needs to know about the state directory, read once."""
    with Reading(store, parallel=parallel) as reading:
        return reading.observe()
