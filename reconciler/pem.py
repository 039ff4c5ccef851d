"""PEM files looked at as bytes, without parsing them: what observe and the commit guard need."""

from __future__ import annotations

import binascii
import hashlib
import re

from reconciler.model import Found, KeyFacts

PLAINTEXT_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH )?PRIVATE KEY-----")
"""The PEM header of an unencrypted private key, in any of the usual formats."""

_ENCRYPTED_KEY = re.compile(
    rb"\A\s*-----BEGIN ENCRYPTED PRIVATE KEY-----\r?\n([A-Za-z0-9+/=\r\n]+)"
    rb"-----END ENCRYPTED PRIVATE KEY-----\s*\Z"
)
_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_CERT_END = b"-----END CERTIFICATE-----"


def holds_plaintext_key(data: bytes) -> bool:
    return b"PRIVATE KEY" in data and PLAINTEXT_KEY.search(data) is not None


def file_sha256(data: bytes) -> str:
    """The SHA-256 the ledger pins a key file by, with CRLF read as LF: a checkout that turns
    line ends into CRLF (core.autocrlf, an eol attribute) changes no key's meaning."""
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def key_facts(data: bytes) -> KeyFacts:
    """What a key file's bytes say: encrypted PKCS#8 (OK), a plaintext key, or something else."""
    digest = file_sha256(data)
    if _ENCRYPTED_KEY.match(data):
        return KeyFacts(Found.OK, digest)
    if holds_plaintext_key(data):
        return KeyFacts(Found.PLAINTEXT, digest)
    return KeyFacts(Found.UNUSABLE, digest, "not an encrypted PKCS#8 PEM key")


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
