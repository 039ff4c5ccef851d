"""The state directory's layout (DESIGN.md, "State directory"), written down once.

store reads and writes these paths, record commits them, and cli names them; paths are relative
to the state directory and use "/".
"""

from __future__ import annotations

from reconciler.model import CertKind, LeafRef, Observed

USERS_YAML = "users.yaml"
LEDGER = "ledger.jsonl"
PENDING_DIR = "servers/pending"  # a pending key: never NAME.something.key, which is a name
DIRECTORIES = ("ca", *(kind.directory for kind in CertKind), PENDING_DIR)
SECRETS_DIR = ".secrets"  # beside the state directory, never inside it; git-ignored

KEY_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o755

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"


def ca_dir(generation: int) -> str:
    """Generation 1's CA lives in ca/ (where every state before rotations kept it); a later
    one in ca/gN/, so a rotation never moves a file."""
    return "ca" if generation == 1 else f"ca/g{generation}"


def ca_cert(generation: int) -> str:
    return f"{ca_dir(generation)}/ca.crt"


def ca_key(generation: int) -> str:
    return f"{ca_dir(generation)}/ca.key"


def crl(generation: int) -> str:
    return f"{ca_dir(generation)}/crl.pem"


def ca_generation(relative_dir: str) -> int | None:
    """The generation whose CA files relative_dir holds (ca_dir's inverse), or None."""
    if relative_dir == "ca":
        return 1
    head, _, tail = relative_dir.partition("/g")
    return int(tail) if head == "ca" and tail.isdigit() and int(tail) > 1 else None


def leaf_cert(ref: LeafRef) -> str:
    return f"{ref.kind.directory}/{ref.name}.crt"


def leaf_key(ref: LeafRef) -> str:
    return f"{ref.kind.directory}/{ref.name}.key"


def leaf_request(ref: LeafRef) -> str:
    """An external server's CSR: NAME.csr (leaf files end in .crt or .key, so no clash)."""
    return f"{ref.kind.directory}/{ref.name}.csr"


def pending_key(ref: LeafRef) -> str:
    """The key of a CSR while the key in use (leaf_key) keeps serving."""
    return f"{PENDING_DIR}/{ref.name}.key"


def request_files(ref: LeafRef) -> tuple[str, str]:
    return leaf_request(ref), pending_key(ref)


def ca_keys(observed: Observed) -> dict[int, str]:
    """Each CA generation's key file, newest first, as the ledger's header pins them (ca_key,
    then during a CA rotation previous.ca_key)."""
    return {ca.generation: ca_key(ca.generation) for ca in (observed.ca, observed.previous) if ca}


def temp_path(relative: str) -> str:
    """Where an atomic write of relative puts its bytes before the rename."""
    directory, _, name = relative.rpartition("/")
    temp = f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"
    return f"{directory}/{temp}" if directory else temp


def is_temp(relative: str) -> bool:
    name = relative.rpartition("/")[2]
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def leaf_of(relative: str) -> tuple[LeafRef, str] | None:
    """The leaf and suffix (".crt" or ".key") of a leaf file, or of the temporary file an
    atomic write of one leaves; None for any other path."""
    directory, _, name = relative.rpartition("/")
    if is_temp(relative):
        name = name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
    kind = next((kind for kind in CertKind if kind.directory == directory), None)
    stem, dot, suffix = name.rpartition(".")
    if kind is None or not dot or f".{suffix}" not in (".crt", ".key") or not stem:
        return None
    if stem.startswith(TEMP_PREFIX):
        return None
    return LeafRef(kind, stem), f".{suffix}"


def is_ca_file(relative: str) -> bool:
    directory, _, name = relative.rpartition("/")
    return name in ("ca.crt", "ca.key", "crl.pem") and ca_generation(directory) is not None


def is_managed(relative: str) -> bool:
    """A file apply writes: the CAs' files, the ledger, leaf certificates and keys, and an
    external server's CSR and pending key."""
    directory, _, name = relative.rpartition("/")
    request = (directory, name[-4:]) in ((CertKind.SERVER.directory, ".csr"), (PENDING_DIR, ".key"))
    return (
        relative == LEDGER
        or is_ca_file(relative)
        or (not is_temp(relative) and (leaf_of(relative) is not None or request))
    )


def expected_mode(relative: str) -> int:
    if relative in DIRECTORIES or ca_generation(relative) is not None:
        return DIR_MODE
    return KEY_MODE if relative.endswith(".key") else PUBLIC_MODE
