"""Export one certificate with its key, the CA and the CRL in the layout libpq or a PostgreSQL
server expects. Reads the state directory; writes only into the output directory.

libpq:  postgresql.crt, postgresql.key (0600), root.crt, root.crl
server: server.crt (leaf, then any intermediates), server.key (0600), root.crt, root.crl
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from pathlib import Path

from reconciler import pki
from reconciler.errors import SecretError, StateError, UsageError
from reconciler.model import CertKind, CertStatus, format_serial, format_time
from reconciler.observe import observe
from reconciler.secrets import Passphrase
from reconciler.store import KEY_MODE, PUBLIC_MODE, StateDir, atomic_write

LAYOUTS = {
    "libpq": (CertKind.CLIENT, "postgresql.crt", "postgresql.key"),
    "server": (CertKind.SERVER, "server.crt", "server.key"),
}
OUT_DIR_MODE = 0o700


@dataclasses.dataclass(frozen=True)
class Exported:
    written: tuple[Path, ...]
    unchanged: tuple[Path, ...]
    warnings: tuple[str, ...]


def export(
    state_dir: Path,
    name: str,
    layout: str,
    out_dir: Path,
    *,
    now: datetime,
    key_passphrase: Passphrase | None,
    encrypted: bool = False,
    force: bool = False,
) -> Exported:
    kind, cert_file, key_file = LAYOUTS[layout]
    store = StateDir(state_dir)
    observed = observe(store)
    ref = f"{kind.value}/{name}"
    entries = [e for e in observed.ledger.entries if e.ref == ref]
    leaf = next((o for o in observed.leaves if o.ref == ref), None)
    if leaf is None or leaf.cert is None:
        if entries and all(e.status is CertStatus.REVOKED for e in entries):
            raise UsageError(f"{ref} was revoked (it left users.yaml); there is nothing to export")
        if entries:
            raise UsageError(f"{ref} has no usable certificate on disk; run `reconciler apply`")
        raise UsageError(
            f"there is no {kind.value} named {name!r}; `reconciler status` lists "
            f"them (--layout {layout} exports a {kind.value} certificate)"
        )
    cert = leaf.cert
    entry = observed.ledger.by_serial().get(cert.serial)
    if entry is not None and entry.status is CertStatus.REVOKED:
        raise UsageError(
            f"{ref} serial {format_serial(cert.serial)} is revoked; run "
            "`reconciler apply` to issue a new one"
        )
    if entry is None or not cert.signed_by_ca or leaf.key.problem is not None:
        raise StateError(
            f"{ref} is not usable as it is on disk; `reconciler plan` says why, and "
            "`reconciler apply` repairs it"
        )
    warnings = []
    if cert.not_after <= now:
        warnings.append(
            f"{ref} expired on {format_time(cert.not_after)}: PostgreSQL will refuse "
            "it; run `reconciler apply` to renew it"
        )
    crl = store.read(store.crl)
    ca = store.read(store.ca_cert)
    cert_pem = store.read(store.leaf_cert(kind, name))
    key_pem = store.read(store.leaf_key(kind, name))
    if crl is None or ca is None or cert_pem is None or key_pem is None:
        raise StateError("the state directory changed while exporting; run the command again")
    if not encrypted:
        if key_passphrase is None:
            raise SecretError(
                "exporting a decrypted key needs the key passphrase: set "
                "RECONCILER_KEY_PASSPHRASE or --key-passphrase-file, or export "
                "it still encrypted with --encrypted"
            )
        try:
            key = pki.decrypt_key(key_pem, key_passphrase.reveal())
        except (ValueError, TypeError):
            raise SecretError(
                f"the key passphrase from {key_passphrase.origin} does not unlock "
                f"{kind.directory}/{name}.key; nothing was written"
            ) from None
        key_pem = pki.unencrypted_key_pem(key)
    files = [
        (out_dir / cert_file, cert_pem, PUBLIC_MODE),
        (out_dir / key_file, key_pem, KEY_MODE),
        (out_dir / "root.crt", ca, PUBLIC_MODE),
        (out_dir / "root.crl", crl, PUBLIC_MODE),
    ]
    unchanged = [path for path, data, _ in files if _same(path, data)]
    clashes = [path for path, _, _ in files if path.exists() and path not in unchanged]
    if clashes and not force:
        raise UsageError(
            f"{clashes[0]} exists and differs; pass --force to replace "
            f"{'it' if len(clashes) == 1 else 'them'} (nothing was written)"
        )
    if not out_dir.exists():
        out_dir.mkdir(mode=OUT_DIR_MODE, parents=True)
    written = []
    for path, data, mode in files:
        if path in unchanged:
            if (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
            continue
        atomic_write(path, data, mode)
        written.append(path)
    return Exported(written=tuple(written), unchanged=tuple(unchanged), warnings=tuple(warnings))


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False
