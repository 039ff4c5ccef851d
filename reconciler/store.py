"""The only module that touches the state directory's files: layout, atomic writes, ledger.

Writes go to a temporary file beside the target, created with its final mode, fsynced and
renamed over the target, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

import orjson

from reconciler.model import (
    CertKind,
    CertStatus,
    KeyType,
    Ledger,
    LedgerEntry,
    RevocationReason,
    Subject,
    format_serial,
    format_time,
)

KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o755
LEDGER_FORMAT = 1
NEWLINE = ord("\n")
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
LEAF_DIRS = ("clients", "servers")
LEAF_SUFFIXES = (".crt", ".key")  # their modes come from fstat when observe reads them
MANAGED_DIRS = ("ca", "clients", "servers")
MANAGED_FILES = ("ca/ca.crt", "ca/ca.key", "ca/crl.pem", "ledger.jsonl")
LOCAL_FILES = ("users.yaml",)


class LockTimeout(Exception):
    """Another process holds the state directory's lock."""


@dataclasses.dataclass
class Listing:
    """What scan() found below the state directory."""

    # leaf directory -> the names that have a .crt or a .key file directly in it
    leaf_names: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    modes: dict[str, int] = dataclasses.field(default_factory=dict)  # managed paths
    temp_files: list[str] = dataclasses.field(default_factory=list)
    other_files: list[str] = dataclasses.field(default_factory=list)

    def merge(self, other: Listing) -> Listing:
        """Both listings in one, in path order (scan's order when both cover the whole tree)."""
        return Listing(
            leaf_names={**self.leaf_names, **other.leaf_names},
            modes={**self.modes, **other.modes},
            temp_files=sorted([*self.temp_files, *other.temp_files]),
            other_files=sorted([*self.other_files, *other.other_files]),
        )


def expected_mode(relative: str) -> int:
    if relative in MANAGED_DIRS:
        return DIR_MODE
    return KEY_MODE if relative.endswith(".key") else PUBLIC_MODE


class StateDir:
    """Paths of the layout DESIGN.md fixes, and the only reads and writes below it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = os.fspath(root) + os.sep  # for read_relative's hot loop

    @property
    def users_yaml(self) -> Path:
        return self.root / "users.yaml"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    def leaf_cert(self, kind: CertKind, name: str) -> Path:
        return self.root / kind.directory / f"{name}.crt"

    def leaf_key(self, kind: CertKind, name: str) -> Path:
        return self.root / kind.directory / f"{name}.key"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def scan(self) -> Listing:
        """Every file and directory below the state directory but clients/ and servers/
        (scan_leaf_dirs lists those), classified, with its mode."""
        listing = Listing()
        for directory, dirs, files in os.walk(self.root):
            where = Path(directory)
            relative_dir = "" if where == self.root else str(where.relative_to(self.root))
            if not relative_dir:
                dirs[:] = [d for d in dirs if d not in LEAF_DIRS]
            self._classify(listing, relative_dir, dirs, files)
        return listing

    def scan_leaf_dirs(self) -> Listing:
        """What scan() finds in clients/ and servers/ (where nearly all files are)."""
        listing = Listing()
        for leaf_dir in LEAF_DIRS:
            for directory, dirs, files in os.walk(self.root / leaf_dir):
                relative_dir = str(Path(directory).relative_to(self.root))
                if relative_dir == leaf_dir:
                    # the leaf files themselves: 200,000 at 100,000 names, so neither sorted
                    # nor given a path here; observe sorts the names it reads
                    names: set[str] = set()
                    rest: list[str] = []
                    for file in files:
                        if file.endswith(LEAF_SUFFIXES) and len(file) > 4 and file[0] != ".":
                            names.add(file[:-4])
                        else:
                            rest.append(file)
                    listing.leaf_names[leaf_dir] = names
                    files = rest
                self._classify(listing, relative_dir, dirs, files)
        return listing

    def _classify(
        self, listing: Listing, relative_dir: str, dirs: list[str], files: list[str]
    ) -> None:
        dirs.sort()
        if relative_dir in MANAGED_DIRS:
            listing.modes[relative_dir] = os.stat(self.root / relative_dir).st_mode & 0o7777
        for file in sorted(files):
            relative = f"{relative_dir}/{file}" if relative_dir else file
            if file.endswith(TEMP_SUFFIX) and file.startswith(TEMP_PREFIX):
                listing.temp_files.append(relative)
            elif relative in MANAGED_FILES:
                listing.modes[relative] = os.lstat(self.root / relative).st_mode & 0o7777
            elif relative not in LOCAL_FILES:
                listing.other_files.append(relative)

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the state directory's lock, waiting up to timeout seconds. The lock is a flock
        on the directory itself, so taking it writes nothing."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ------------------------------------------------------------------ reading

    @staticmethod
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def read_relative(self, relative: str) -> tuple[bytes | None, int | None]:
        """A file relative to the state directory and its permission bits, in one open and one
        fstat (the hot loop of observe); (None, None) when it does not exist."""
        try:
            fd = os.open(self._prefix + relative, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, OSError):
            return None, None
        try:
            return _read_fd(fd)
        finally:
            os.close(fd)

    def read_pairs(
        self, directory: str, names: Iterable[str]
    ) -> Iterator[tuple[str, bytes | None, int | None, bytes | None, int | None]]:
        """(name, key bytes, key mode, certificate bytes, certificate mode) for each name in one
        leaf directory, None where a file is absent. The hot loop of a no-op, written out: each
        file is opened relative to the directory's descriptor (no path walk), its mode and size
        come from one fstat, and it is read in one call unless it grew meanwhile."""
        try:
            dir_fd = os.open(self._prefix + directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            for name in names:
                yield name, None, None, None, None
            return
        flags, open_, fstat, read, close = (
            os.O_RDONLY | os.O_NOFOLLOW,
            os.open,
            os.fstat,
            os.read,
            os.close,
        )
        try:
            for name in names:
                found: list[bytes | int | None] = []
                for file in (f"{name}.key", f"{name}.crt"):
                    try:
                        fd = open_(file, flags, dir_fd=dir_fd)
                    except OSError:
                        found += (None, None)
                        continue
                    try:
                        stat = fstat(fd)
                        data = read(fd, stat.st_size + 1)
                        if len(data) > stat.st_size:  # it grew since fstat: read the rest
                            data += _read_rest(fd)
                    finally:
                        close(fd)
                    found += (data, stat.st_mode & 0o7777)
                yield (name, *found)  # type: ignore[misc]
        finally:
            close(dir_fd)

    # ------------------------------------------------------------------ writing

    def write(self, path: Path, data: bytes, *, secret: bool = False) -> None:
        """Atomically replace path with data; secret files are 0600 from their first byte."""
        atomic_write(path, data, KEY_MODE if secret else PUBLIC_MODE)

    @staticmethod
    def chmod(path: Path, mode: int) -> None:
        os.chmod(path, mode, follow_symlinks=False)

    @staticmethod
    def remove(path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_directory(path.parent)
        return True

    # ------------------------------------------------------------------ ledger

    def load_ledger(self, verify: Callable[[bytes, bytes], bool] | None = None) -> Ledger:
        """The ledger; verify(signed bytes, signature) checks its CA signature when given."""
        data = self.read(self.ledger)
        if data is None:
            return Ledger(problem="missing")
        try:
            ledger, signed, signature = decode_ledger(data)
        except (ValueError, KeyError, TypeError) as exc:
            return Ledger(problem=f"unusable: {exc}")
        if verify is None:
            return ledger
        ok = signature is not None and verify(signed, signature)
        return dataclasses.replace(ledger, signature_ok=ok)


def _read_rest(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_fd(fd: int) -> tuple[bytes, int]:
    """All of an open file, and its permission bits, in one fstat and (usually) one read."""
    stat = os.fstat(fd)
    data = os.read(fd, stat.st_size + 1)
    if len(data) > stat.st_size:  # it grew since fstat: read the rest
        chunks = [data]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
        data = b"".join(chunks)
    return data, stat.st_mode & 0o7777


def _make_dirs(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # the umask may have narrowed it


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write NAME.tmp beside path with its final mode, fsync it, rename it over path."""
    _make_dirs(path.parent)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}{TEMP_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed a public file; never widens a key
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- ledger format
# JSON Lines: a header line, then one line per certificate ever issued, in issuance order.
# New certificates append a line and a status change edits one, so git diffs stay small.


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return moment


def encode_entry(entry: LedgerEntry) -> str:
    record: dict[str, object] = {
        "serial": format_serial(entry.serial),
        "kind": entry.kind.value,
        "name": entry.name,
        "status": entry.status.value,
        "not_before": format_time(entry.not_before),
        "not_after": format_time(entry.not_after),
        "key": entry.key,
        "generation": entry.generation,
        "spec": entry.spec,
        "fingerprint": entry.fingerprint,
        "key_sha256": entry.key_sha256,
    }
    if entry.revoked_at is not None:
        record["revoked_at"] = format_time(entry.revoked_at)
    if entry.reason is not None:
        record["reason"] = entry.reason.value
    if entry.subject is not None:
        record["subject"] = [list(pair) for pair in entry.subject]
    if entry.dns:
        record["dns"] = list(entry.dns)
    if entry.ips:
        record["ips"] = list(entry.ips)
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def encode_ledger(ledger: Ledger, sign: Callable[[bytes], bytes]) -> bytes:
    """The ledger's bytes, ending in a line with the CA's signature over everything before."""
    header = {
        "ledger": LEDGER_FORMAT,
        "crl_number": ledger.crl_number,
        "ca": ledger.ca_fingerprint,
        "ca_key": ledger.ca_key_sha256,
    }
    lines = [json.dumps(header, separators=(", ", ": "))]
    lines.extend(encode_entry(entry) for entry in ledger.entries)
    body = ("\n".join(lines) + "\n").encode("utf-8")
    signature = base64.b64encode(sign(body)).decode("ascii")
    return body + json.dumps({"signature": signature}).encode("ascii") + b"\n"


def decode_ledger(data: bytes) -> tuple[Ledger, bytes, bytes | None]:
    """The ledger, the bytes its signature covers, and the signature (None when unsigned)."""
    signature: bytes | None = None
    signed = data
    end = len(data)
    while end and data[end - 1] == NEWLINE:  # not data.rstrip(): that copies megabytes
        end -= 1
    last_start = data.rfind(b"\n", 0, end) + 1
    last = data[last_start:].strip()
    if last.startswith(b'{"signature"'):
        record = json.loads(last)
        signature = base64.b64decode(record["signature"], validate=True)
        signed = data[:last_start]
    # Lines end at "\n" only, as encode_ledger joins them: a subject may hold U+2028 or U+2029
    # (written as escapes in users.yaml), which json.dumps(ensure_ascii=False) leaves as they
    # are and str.splitlines() took for line ends. orjson checks each line's UTF-8.
    lines = signed.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if not lines:
        raise ValueError("the file is empty")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("ledger") != LEDGER_FORMAT:
        raise ValueError("line 1 is not a ledger header of format 1")
    crl_number = header["crl_number"]
    if not isinstance(crl_number, int) or crl_number < 0:
        raise ValueError("line 1: crl_number is not a whole number")
    ledger = Ledger(
        entries=tuple(_decode_lines(lines)),
        crl_number=crl_number,
        ca_fingerprint=header.get("ca"),
        ca_key_sha256=header.get("ca_key"),
    )
    return ledger, signed, signature


def _subject(value: object, pairs: dict[tuple[str, ...], tuple[str, ...]]) -> Subject:
    """The subject's pairs, each shared with every equal pair decoded before (most certificates
    have the same C and O: at 100,000 entries that is tens of megabytes)."""
    subject = (
        tuple([pairs.setdefault(pair, pair) for pair in map(tuple, value)])
        if isinstance(value, list)
        else None
    )
    if subject is None or not set(map(len, subject)) <= {2}:
        raise ValueError("subject is not a list of [attribute, value] pairs")
    return subject  # type: ignore[return-value]


_KINDS = {kind.value: kind for kind in CertKind}
_STATUSES = {status.value: status for status in CertStatus}
_REASONS = {reason.value: reason for reason in RevocationReason}


def _decode_lines(lines: list[bytes]) -> Iterator[LedgerEntry]:
    # one line at a time: each parsed dict is freed before the next, which keeps the peak
    # memory of a 100,000-entry ledger at the entries themselves
    seen: set[int] = set()
    # certificates issued by one apply share their times: parse each distinct one once
    times: dict[str, datetime] = {}
    pairs: dict[tuple[str, ...], tuple[str, ...]] = {}
    keys = {key.value: key.value for key in KeyType}  # one string object per key type

    def moment(text: str) -> datetime:
        parsed = times.get(text)
        if parsed is None:
            parsed = times[text] = _parse_time(text)
        return parsed

    # orjson decodes a ledger line about five times faster than json: on a no-op over 10,000
    # names that is most of the time spent on the ledger
    loads = orjson.loads
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = loads(line)
        except ValueError as exc:
            if not line.strip():
                continue
            raise ValueError(f"line {number}: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number}: not a JSON object")
        try:
            serial = int(record["serial"], 16)
            revoked_at = record.get("revoked_at")
            reason = record.get("reason")
            subject = record.get("subject")
            dns = record.get("dns")
            ips = record.get("ips")
            entry = LedgerEntry(
                serial=serial,
                kind=_KINDS[record["kind"]],
                name=str(record["name"]),
                status=_STATUSES[record["status"]],
                not_before=moment(record["not_before"]),
                not_after=moment(record["not_after"]),
                key=keys.get(record["key"]) or str(record["key"]),
                generation=int(record["generation"]),
                spec=str(record["spec"]),
                fingerprint=str(record["fingerprint"]),
                key_sha256=str(record["key_sha256"]),
                revoked_at=moment(revoked_at) if revoked_at else None,
                reason=_REASONS[reason] if reason else None,
                subject=_subject(subject, pairs) if subject is not None else None,
                dns=tuple(map(str, dns)) if dns else (),
                ips=tuple(map(str, ips)) if ips else (),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {number}: {exc!r}") from None
        if serial in seen:
            raise ValueError(f"line {number}: serial {record['serial']} appears twice")
        seen.add(serial)
        yield entry
