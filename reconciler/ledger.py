"""The ledger's file format: JSON Lines, signed by the CA.

A header line ({"ledger": 1, "crl_number": N, "ca": …, "ca_key": …}), then one line per
certificate ever issued, in issuance order, then a line with the CA's signature over everything
before it. New certificates append a line and a status change edits one, so git diffs stay
small. Lines end at "\\n" only: a subject may hold U+2028, which str.splitlines() would split.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import datetime

from reconciler.model import (
    CertKind,
    CertStatus,
    Ledger,
    LedgerEntry,
    RevocationReason,
    format_serial,
    format_time,
)

FORMAT = 1


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
    if entry.ca_generation != 1:
        record["ca_generation"] = entry.ca_generation
    if entry.issuer is not None:
        record["issuer"] = entry.issuer
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def encode(ledger: Ledger, sign: Callable[[bytes], bytes]) -> bytes:
    """The ledger's bytes, ending in a line with the CA's signature over everything before."""
    header: dict[str, object] = {
        "ledger": FORMAT,
        "crl_number": ledger.crl_number,
        "ca": ledger.ca_fingerprint,
        "ca_key": ledger.ca_key_sha256,
    }
    if ledger.previous_fingerprint is not None:
        header["previous"] = {
            "ca": ledger.previous_fingerprint,
            "ca_key": ledger.previous_key_sha256,
        }
    lines = [json.dumps(header, separators=(", ", ": "))]
    lines.extend(encode_entry(entry) for entry in ledger.entries)
    body = ("\n".join(lines) + "\n").encode("utf-8")
    signature = base64.b64encode(sign(body)).decode("ascii")
    return body + json.dumps({"signature": signature}).encode("ascii") + b"\n"


def decode(data: bytes) -> tuple[Ledger, bytes, bytes | None]:
    """The ledger, the bytes its signature covers, and the signature (None when unsigned).
    Lines may end in CRLF (a checkout that converts line ends): they are read, and verified,
    as the LF lines the reconciler wrote. Raises ValueError, saying which line, when the file
    is not a ledger."""
    data = data.replace(b"\r\n", b"\n")
    body = data.rstrip(b"\n")
    start = body.rfind(b"\n") + 1
    signed, signature = data, None
    if body[start:].startswith(b'{"signature"'):
        signed = data[:start]
        try:
            signature = base64.b64decode(json.loads(body[start:])["signature"], validate=True)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"the signature line is broken ({exc})") from None
    try:
        lines = signed.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"byte {exc.start} is not UTF-8") from None
    try:
        header = json.loads(lines[0])
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get("ledger") != FORMAT:
        raise ValueError(f"line 1 is not a ledger header of format {FORMAT}")
    crl_number = header.get("crl_number")
    if not isinstance(crl_number, int) or crl_number < 0:
        raise ValueError("line 1: crl_number is not a whole number")
    previous = header.get("previous") or {}
    if not isinstance(previous, dict):
        raise ValueError("line 1: previous is not an object")
    ledger = Ledger(
        entries=tuple(_entries(lines)),
        crl_number=crl_number,
        ca_fingerprint=header.get("ca"),
        ca_key_sha256=header.get("ca_key"),
        previous_fingerprint=previous.get("ca"),
        previous_key_sha256=previous.get("ca_key"),
    )
    return ledger, signed, signature


def _time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return moment


def _entries(lines: list[str]) -> Iterator[LedgerEntry]:
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            revoked_at, reason = record.get("revoked_at"), record.get("reason")
            entry = LedgerEntry(
                serial=int(record["serial"], 16),
                kind=CertKind(record["kind"]),
                name=str(record["name"]),
                status=CertStatus(record["status"]),
                not_before=_time(record["not_before"]),
                not_after=_time(record["not_after"]),
                key=str(record["key"]),
                generation=int(record["generation"]),
                spec=str(record["spec"]),
                fingerprint=str(record["fingerprint"]),
                key_sha256=str(record["key_sha256"]),
                revoked_at=_time(revoked_at) if revoked_at else None,
                reason=RevocationReason(reason) if reason else None,
                subject=tuple((str(a), str(v)) for a, v in record["subject"])
                if "subject" in record
                else None,
                dns=tuple(map(str, record.get("dns", ()))),
                ips=tuple(map(str, record.get("ips", ()))),
                ca_generation=int(record.get("ca_generation", 1)),
                issuer=str(record["issuer"]) if "issuer" in record else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ValueError(f"line {number}: {exc!r}") from None
        if entry.serial in seen:
            raise ValueError(f"line {number}: serial {record['serial']} appears twice")
        seen.add(entry.serial)
        yield entry
