"""Export one certificate with its key, the CA and the CRL in the layout libpq or a PostgreSQL
server expects. Which certificate is usable is the plan's decision; this module only copies.

libpq:  postgresql.crt, postgresql.key (0600), root.crt, root.crl
server: server.crt (leaf, then any intermediates), server.key (0600), root.crt, root.crl
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from reconciler import layout, pki
from reconciler.errors import SecretError, StateError, UsageError
from reconciler.model import (
    CertKind,
    Found,
    Held,
    Issue,
    LeafRef,
    Plan,
    Reissue,
    Renew,
    Revoke,
    Standing,
    format_time,
)
from reconciler.secrets import Passphrase
from reconciler.store import StateDir, atomic_write

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
    if isinstance(action, Issue):
        raise UsageError(
            f"{ref} has no usable certificate on disk ({'; '.join(action.reasons)}); "
            "run `reconciler apply`"
        )
    warnings = []
    expired = next((row for row in rows if row.standing is Standing.EXPIRED), None)
    if expired is not None and expired.not_after is not None:
        warnings.append(
            f"{ref} expired on {format_time(expired.not_after)}: PostgreSQL will refuse it; "
            "run `reconciler apply` to renew it"
        )
    elif isinstance(action, Renew | Reissue):
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
    key_passphrase: Passphrase | None,
    encrypted: bool = False,
    force: bool = False,
) -> Exported:
    kind, cert_file, key_file = LAYOUTS[layout_name]
    ref = LeafRef(kind, name)
    warnings = _refusal_and_warnings(plan, status, ref, layout_name)
    reads = [
        store.read(path)
        for path in (layout.leaf_cert(ref), layout.leaf_key(ref), layout.CA_CERT, layout.CRL)
    ]
    if any(read.found is not Found.OK for read in reads):
        raise StateError("the state directory changed while exporting; run the command again")
    cert_pem, key_pem, ca_pem, crl_pem = (read.data for read in reads)
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
                f"{layout.leaf_key(ref)}; nothing was written"
            ) from None
        key_pem = pki.unencrypted_key_pem(key)
    files = [
        (out_dir / cert_file, cert_pem, layout.PUBLIC_MODE),
        (out_dir / key_file, key_pem, layout.KEY_MODE),
        (out_dir / "root.crt", ca_pem, layout.PUBLIC_MODE),
        (out_dir / "root.crl", crl_pem, layout.PUBLIC_MODE),
    ]
    unchanged = [path for path, data, _ in files if _same(path, data)]
    clashes = [path for path, _, _ in files if path.exists() and path not in unchanged]
    if clashes and not force:
        raise UsageError(
            f"{clashes[0]} exists and differs; pass --force to replace "
            f"{'it' if len(clashes) == 1 else 'them'} (nothing was written)"
        )
    out_dir.mkdir(mode=OUT_DIR_MODE, parents=True, exist_ok=True)
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
