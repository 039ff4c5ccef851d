"""PEM files looked at as bytes, without parsing them: what observe's hot loop and the commit
guard need, importing nothing heavier than hashlib (observe forks its reader before the
cryptography package is imported)."""

from __future__ import annotations

import binascii
import hashlib
import re

PLAINTEXT_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH )?PRIVATE KEY-----")
"""The PEM header of an unencrypted private key, in any of the usual formats."""

_ENCRYPTED_PEM = re.compile(
    rb"\A\s*-----BEGIN ENCRYPTED PRIVATE KEY-----\r?\n([A-Za-z0-9+/=\r\n]+)"
    rb"-----END ENCRYPTED PRIVATE KEY-----\s*\Z"
)
_KEY_BEGIN = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"
_KEY_END = b"-----END ENCRYPTED PRIVATE KEY-----\n"
_BASE64_LINES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n"
_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_CERT_END = b"-----END CERTIFICATE-----"


def _canonical_encrypted_key(data: bytes) -> bool:
    """The PEM this tool writes, checked without a regular expression: the same answer as
    _ENCRYPTED_PEM for such files, which is what every key file is on a no-op."""
    body = data[len(_KEY_BEGIN) : -len(_KEY_END)]
    return (
        data.startswith(_KEY_BEGIN)
        and data.endswith(_KEY_END)
        and len(data) > len(_KEY_BEGIN) + len(_KEY_END)
        and not body.translate(None, _BASE64_LINES)
    )


def key_problem(data: bytes | None) -> tuple[str | None, str | None]:
    """(problem, SHA-256) of a key file's bytes; the problem is None for an encrypted key."""
    if data is None:
        return "missing", None
    digest = hashlib.sha256(data).hexdigest()
    if _canonical_encrypted_key(data) or _ENCRYPTED_PEM.match(data):
        return None, digest
    if PLAINTEXT_KEY.search(data):
        return "not encrypted", digest
    return "unusable: not an encrypted PKCS#8 PEM key", digest


def fingerprint(data: bytes) -> str | None:
    """SHA-256 of the DER of the first certificate in PEM data, without parsing it: the key
    under which the ledger records a certificate it has already checked."""
    start = data.find(_CERT_BEGIN)
    end = data.find(_CERT_END, start)
    if start < 0 or end < 0:
        return None
    try:
        der = binascii.a2b_base64(data[start + len(_CERT_BEGIN) : end])
    except (binascii.Error, ValueError):
        return None
    return hashlib.sha256(der).hexdigest()
