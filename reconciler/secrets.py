"""Passphrases: where they come from, and the one-time bootstrap of random ones.

Sources, first match wins: a --*-passphrase-file flag, the RECONCILER_*_PASSPHRASE variable,
the RECONCILER_*_PASSPHRASE_FILE variable, then .secrets/ca.pass or .secrets/keys.pass (the
one-time export passphrase and rotate-passphrase's new one never live in .secrets/).
A passphrase never appears in output, logs, exceptions or process arguments.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import secrets as _random
from collections.abc import Mapping
from pathlib import Path

from reconciler import layout
from reconciler.errors import SecretError
from reconciler.store import atomic_write

MIN_LENGTH = 16
SECRETS_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600


class Which(enum.Enum):
    CA = ("CA", "RECONCILER_CA_PASSPHRASE", "ca.pass", "--ca-passphrase-file")
    KEY = ("key", "RECONCILER_KEY_PASSPHRASE", "keys.pass", "--key-passphrase-file")
    EXPORT = ("export", "RECONCILER_EXPORT_PASSPHRASE", "", "--export-passphrase-file")
    NEW = ("new", "RECONCILER_NEW_PASSPHRASE", "", "--new-passphrase-file")  # rotate-passphrase

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def env(self) -> str:
        return self.value[1]

    @property
    def file_name(self) -> str:
        """Its file in the secrets directory; "" for one that is never kept there."""
        return self.value[2]

    @property
    def flag(self) -> str:
        return self.value[3]


VARIABLES = tuple(name for which in Which for name in (which.env, f"{which.env}_FILE"))
"""Every environment variable a passphrase can come from: git runs with them blanked."""


def default_secrets_dir(state_dir: Path) -> Path:
    """.secrets beside the state directory (never inside it: everything there is committed);
    an environment's, state/ENV, is .secrets/ENV beside state/, so each has its own."""
    state_dir = state_dir.absolute()
    if state_dir.parent.name == "state":
        return state_dir.parent.parent / layout.SECRETS_DIR / state_dir.name
    return state_dir.parent / layout.SECRETS_DIR


class Passphrase:
    """Bytes that refuse to be printed."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: bytes, origin: str) -> None:
        self._value = value
        self.origin = origin

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"Passphrase(from {self.origin})"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class SecretSources:
    secrets_dir: Path
    environ: Mapping[str, str]
    files: Mapping[Which, Path] = dataclasses.field(default_factory=dict)

    def find(self, which: Which) -> Passphrase | None:
        """The configured passphrase, or None when none is configured anywhere."""
        flagged = self.files.get(which)
        if flagged is not None:
            return _from_file(flagged, which, which.flag)
        if self.environ.get(which.env):
            try:
                value = self.environ[which.env].encode("utf-8")
            except UnicodeEncodeError:
                raise SecretError(
                    f"${which.env} is not UTF-8 text; set it again as UTF-8, or put the "
                    f"passphrase in a file named by {which.flag}"
                ) from None
            return _checked(value, which, f"${which.env}")
        env_file = self.environ.get(f"{which.env}_FILE")
        if env_file:
            return _from_file(Path(env_file), which, f"${which.env}_FILE")
        local = self.secrets_dir / which.file_name
        if which.file_name and local.exists():
            return _from_file(local, which, str(local))
        return None

    def require(self, which: Which, why: str) -> Passphrase:
        """The configured passphrase; a SecretError saying where to set it when there is none."""
        found = self.find(which)
        if found is None:
            local = (
                f", or put it in {self.secrets_dir / which.file_name}" if which.file_name else ""
            )
            raise SecretError(
                f"{why}, so the {which.label} passphrase is needed: set {which.env} (or "
                f"{which.flag} FILE{local}); nothing was written"
            )
        return found

    def replace(self, which: Which, current: Passphrase, new: Passphrase) -> Path | None:
        """Write new over the secrets-directory file that current came from (atomically,
        0600); None when current came from elsewhere, which only its keeper can replace."""
        path = self.secrets_dir / which.file_name
        if not which.file_name or current.origin != str(path):
            return None
        atomic_write(path, new.reveal() + b"\n", SECRET_FILE_MODE)
        return path

    def bootstrap(self, which: Which) -> Passphrase:
        """Create a random passphrase in the secrets directory (0700), in a 0600 file."""
        try:
            return self._bootstrap(which)
        except OSError as exc:
            raise SecretError(
                f"cannot write a new passphrase into {self.secrets_dir} ({exc.strerror}); "
                f"make it writable, or set {which.env}; nothing was written"
            ) from None

    def _bootstrap(self, which: Which) -> Passphrase:
        self.secrets_dir.mkdir(mode=SECRETS_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, SECRETS_DIR_MODE)
        ignore = self.secrets_dir / ".gitignore"
        if not ignore.exists():  # git ignores the directory even where .gitignore forgot it
            ignore.write_text("# passphrases: never commit these\n*\n")
        path = self.secrets_dir / which.file_name
        value = _random.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SECRET_FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return Passphrase(value.encode(), str(path))


def _checked(value: bytes, which: Which, origin: str) -> Passphrase:
    if len(value) < MIN_LENGTH:
        raise SecretError(
            f"the {which.label} passphrase from {origin} is shorter than "
            f"{MIN_LENGTH} characters; choose a longer one"
        )
    return Passphrase(value, origin)


def _from_file(path: Path, which: Which, origin: str) -> Passphrase:
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read()
    except OSError as exc:
        raise SecretError(
            f"cannot read the {which.label} passphrase file {path} given by "
            f"{origin} ({exc.strerror}); check the path"
        ) from None
    if mode & 0o077:
        raise SecretError(
            f"the {which.label} passphrase file {path} is open to its group or others (mode "
            f"{mode & 0o777:04o}); make it private (chmod 600 {path}) and run again"
        )
    return _checked(data.rstrip(b"\r\n"), which, str(path))
