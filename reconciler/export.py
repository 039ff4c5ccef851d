"""Export one certificate with its key, the CA and the CRL in the layout libpq, pgjdbc or a
PostgreSQL server expects. Which certificate to use is the plan's decision; this module copies
it, with the key decrypted, re-encrypted under a one-time export passphrase, or as DER.

libpq:  postgresql.crt, postgresql.key (0600), root.crt; root.crl only with --with-crl
jdbc:   postgresql.crt, postgresql.pk8 (PKCS#8 DER, 0600), root.crt
server: server.crt (leaf, then any intermediates), server.key (0600), root.crt, root.crl
A client's root.crt holds our CA(s) and users.yaml's trust roots; a server's, only our CA(s).
"""

from __future__ import annotations

import base64
import dataclasses
import grp
import os
import pwd
from collections.abc import Sequence
from pathlib import Path

from reconciler import layout, pki
from reconciler.errors import SecretError, StateError, UsageError
from reconciler.model import (
    Accept,
    CertKind,
    Found,
    Held,
    Issue,
    LeafRef,
    Plan,
    Reissue,
    Renew,
    Request,
    Revoke,
    Standing,
    Waiting,
    format_time,
)
from reconciler.secrets import SecretSources, Which
from reconciler.store import StateDir, atomic_write

LAYOUTS = {  # kind, certificate file, key file; a .pk8 key is PKCS#8 DER
    "libpq": (CertKind.CLIENT, "postgresql.crt", "postgresql.key"),
    "jdbc": (CertKind.CLIENT, "postgresql.crt", "postgresql.pk8"),
    "server": (CertKind.SERVER, "server.crt", "server.key"),
}
OUT_DIR_MODE = 0o700


@dataclasses.dataclass(frozen=True)
class Exported:
    written: tuple[Path, ...]
    unchanged: tuple[Path, ...]
    warnings: tuple[str, ...]


def _refusal_and_warnings(
    plan: Plan, status: Sequence[Held], ref: LeafRef, layout_name: str
) -> list[str]:
    """Warnings for the certificate in place; UsageError when there is none to export."""
    if plan.blockers:
        raise StateError(
            f"the state is damaged ({plan.blockers[0]}); nothing is exported until "
            "`reconciler plan` is no longer blocked"
        )
    action = next((a for a in plan.actions if a.subject == str(ref)), None)
    rows = [row for row in status if (row.kind, row.name) == (str(ref.kind), ref.name)]
    if action is None:
        if any(row.standing is Standing.REVOKED for row in rows):
            raise UsageError(f"{ref} was revoked (it left users.yaml); there is nothing to export")
        raise UsageError(
            f"there is no {ref.kind} named {ref.name!r}; `reconciler status` lists them "
            f"(--layout {layout_name} exports a {ref.kind} certificate)"
        )
    if isinstance(action, Revoke):
        raise UsageError(f"{ref} left users.yaml and is being revoked; there is nothing to export")
    if isinstance(action, Issue | Accept) or (
        isinstance(action, Request | Waiting) and action.replaces is None
    ):
        raise UsageError(
            f"{ref} has no accepted certificate on disk ({'; '.join(action.reasons)})"
            + ("" if isinstance(action, Waiting) else "; run `reconciler apply`")
        )
    warnings = []
    expired = next((row for row in rows if row.standing is Standing.EXPIRED), None)
    if expired is not None and expired.not_after is not None:
        warnings.append(
            f"{ref} expired on {format_time(expired.not_after)}: PostgreSQL will refuse it; "
            "run `reconciler apply` to renew it"
        )
    elif isinstance(action, Renew | Reissue | Request):
        warnings.append(
            f"{ref} is due to be replaced ({'; '.join(action.reasons)}); run `reconciler apply`"
        )
    return warnings


def export(
    plan: Plan,
    status: Sequence[Held],
    store: StateDir,
    name: str,
    layout_name: str,
    out_dir: Path,
    *,
    sources: SecretSources,
    encrypted: bool = False,
    with_crl: bool = False,
    owner: str | None = None,
    force: bool = False,
) -> Exported:
    kind, cert_file, key_file = LAYOUTS[layout_name]
    if with_crl and layout_name == "jdbc":
        raise UsageError("pgjdbc cannot read a CRL: leave out --with-crl with --layout jdbc")
    export_passphrase = sources.find(Which.EXPORT)
    if export_passphrase is not None and not encrypted:
        raise UsageError("an export passphrase only applies with --encrypted: add it, or unset it")
    owner_ids = None if owner is None else _owner_ids(owner)
    ref = LeafRef(kind, name)
    warnings = _refusal_and_warnings(plan, status, ref, layout_name)
    # every CA clients and servers trust, newest first: two while a CA rotation overlaps
    paths = [layout.leaf_cert(ref), layout.leaf_key(ref)]
    # clients verify servers: an external server's root (users.yaml's trust) is in their bundle
    roots = [layout.ca_cert(g) for g in plan.trusted] + list(
        plan.trust if kind is CertKind.CLIENT else ()
    )
    paths += [*roots, *(layout.crl(generation) for generation in plan.trusted)]
    reads = [store.read(path) for path in paths]
    if any(read.found is not Found.OK for read in reads):
        raise StateError("the state directory changed while exporting; run the command again")
    cert_pem, key_pem = reads[0].data, reads[1].data
    ca_pem = b"".join(read.data.rstrip(b"\n") + b"\n" for read in reads[2 : 2 + len(roots)])
    crl_pem = b"".join(read.data for read in reads[2 + len(roots) :])
    if not encrypted or export_passphrase is not None:
        why = "the key is exported decrypted or re-encrypted (--encrypted alone keeps it as stored)"
        key_passphrase = sources.require(Which.KEY, why)
        key = pki.open_key(key_pem, key_passphrase.reveal())
        if key is None:
            raise SecretError(
                f"the key passphrase from {key_passphrase.origin} does not unlock "
                f"{layout.leaf_key(ref)}; nothing was written"
            )
        key_pem = (
            pki.unencrypted_key_pem(key)
            if export_passphrase is None
            else pki.encrypt_key(key, export_passphrase.reveal())
        )
    key_data = _der(key_pem) if key_file.endswith(".pk8") else key_pem
    files = [
        (out_dir / cert_file, cert_pem, layout.PUBLIC_MODE),
        (out_dir / key_file, key_data, layout.KEY_MODE),
        (out_dir / "root.crt", ca_pem, layout.PUBLIC_MODE),
    ]
    if with_crl or kind is CertKind.SERVER:  # the server checks client certificates against it
        files.append((out_dir / "root.crl", crl_pem, layout.PUBLIC_MODE))
    unchanged = [path for path, data, _ in files if _same(path, data)]
    clashes = [path for path, _, _ in files if path.exists() and path not in unchanged]
    if clashes and not force:
        raise UsageError(
            f"{clashes[0]} exists and differs; pass --force to replace "
            f"{'it' if len(clashes) == 1 else 'them'} (nothing was written)"
        )
    out_dir.mkdir(mode=OUT_DIR_MODE, parents=True, exist_ok=True)
    if owner_ids is not None:  # the directory first: when that is refused, no file is written
        try:
            os.chown(out_dir, *owner_ids)
        except OSError as exc:
            raise UsageError(
                f"cannot give {out_dir} to {owner} ({exc.strerror}); run the export as root, "
                "or leave out --owner (no file was written)"
            ) from None
    written = []
    for path, data, mode in files:
        if path not in unchanged:
            atomic_write(path, data, mode)
            written.append(path)
        elif (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)
        if owner_ids is not None:
            os.chown(path, *owner_ids, follow_symlinks=False)
    return Exported(written=tuple(written), unchanged=tuple(unchanged), warnings=tuple(warnings))


def _owner_ids(owner: str) -> tuple[int, int]:
    """USER[:GROUP] as ids; the group defaults to the user's primary group."""
    user, _, group = owner.partition(":")
    try:
        entry = pwd.getpwnam(user)
        return entry.pw_uid, grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise UsageError(f"--owner {owner}: no such user or group; name existing ones") from None


def _der(pem: bytes) -> bytes:
    """The DER inside a one-block PEM file: PKCS#8 as pgjdbc reads it, encrypted or not."""
    return base64.b64decode(b"".join(pem.strip().splitlines()[1:-1]))


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False
