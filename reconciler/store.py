"""The only module that touches the state directory's files: layout, atomic writes, ledger.

Writes go to a temporary file beside the target, created with its final mode, fsynced and
renamed over the target, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from reconciler.model import (
    CertKind,
    CertStatus,
    Ledger,
    LedgerEntry,
    RevocationReason,
    format_serial,
    format_time,
)

KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o755
LEDGER_FORMAT = 1
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"


class StateDir:
    """Paths of the layout DESIGN.md fixes, and the only reads and writes below it."""

    def __init__(self, root: Path) -> None:
        self.root = root

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

    def leaf_names(self, kind: CertKind) -> list[str]:
        """Names that have a certificate or a key file; temporary files are not names."""
        directory = self.root / kind.directory
        try:
            files = os.listdir(directory)
        except FileNotFoundError:
            return []
        names = set()
        for file in files:
            if file.startswith(TEMP_PREFIX):
                continue
            for suffix in (".crt", ".key"):
                if file.endswith(suffix) and len(file) > len(suffix):
                    names.add(file[: -len(suffix)])
        return sorted(names)

    # ------------------------------------------------------------------ reading

    @staticmethod
    def read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ writing

    def write(self, path: Path, data: bytes, *, secret: bool = False) -> None:
        """Atomically replace path with data; secret files are 0600 from their first byte."""
        atomic_write(path, data, KEY_MODE if secret else PUBLIC_MODE)

    @staticmethod
    def remove(path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_directory(path.parent)
        return True

    # ------------------------------------------------------------------ ledger

    def load_ledger(self) -> Ledger:
        data = self.read(self.ledger)
        if data is None:
            return Ledger(problem="missing")
        try:
            return decode_ledger(data)
        except (ValueError, KeyError, TypeError) as exc:
            return Ledger(problem=f"unusable: {exc}")

    def write_ledger(self, ledger: Ledger) -> None:
        self.write(self.ledger, encode_ledger(ledger))


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write NAME.tmp beside path with its final mode, fsync it, rename it over path."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
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
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def encode_ledger(ledger: Ledger) -> bytes:
    lines = [
        json.dumps(
            {"ledger": LEDGER_FORMAT, "crl_number": ledger.crl_number}, separators=(", ", ": ")
        )
    ]
    lines.extend(encode_entry(entry) for entry in ledger.entries)
    return ("\n".join(lines) + "\n").encode("utf-8")


def decode_ledger(data: bytes) -> Ledger:
    lines = data.decode("utf-8").splitlines()
    if not lines:
        raise ValueError("the file is empty")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("ledger") != LEDGER_FORMAT:
        raise ValueError("line 1 is not a ledger header of format 1")
    crl_number = header["crl_number"]
    if not isinstance(crl_number, int) or crl_number < 0:
        raise ValueError("line 1: crl_number is not a whole number")
    return Ledger(entries=tuple(_decode_lines(lines)), crl_number=crl_number)


def _decode_lines(lines: list[str]) -> Iterator[LedgerEntry]:
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            serial = int(record["serial"], 16)
            revoked_at = record.get("revoked_at")
            reason = record.get("reason")
            entry = LedgerEntry(
                serial=serial,
                kind=CertKind(record["kind"]),
                name=str(record["name"]),
                status=CertStatus(record["status"]),
                not_before=_parse_time(record["not_before"]),
                not_after=_parse_time(record["not_after"]),
                key=str(record["key"]),
                generation=int(record["generation"]),
                spec=str(record["spec"]),
                fingerprint=str(record["fingerprint"]),
                key_sha256=str(record["key_sha256"]),
                revoked_at=_parse_time(revoked_at) if revoked_at else None,
                reason=RevocationReason(reason) if reason else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if serial in seen:
            raise ValueError(f"line {number}: serial {record['serial']} appears twice")
        seen.add(serial)
        yield entry
