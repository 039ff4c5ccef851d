"""Load state/users.yaml into a Desired value, or explain every problem with its line.

One path: bytes (size, UTF-8, characters) → YAML nodes (libyaml's safe composer, which keeps
every node's line) → plain values (tags, merge keys, duplicate keys and alias loops refused) →
JSON Schema (schema/users.schema.json: fastjsonschema says yes or no, jsonschema explains a no)
→ semantic checks → Desired. Every problem is reported, each as FILE:LINE: PATH: what to do;
a part of the file with a problem is left out of the checks that would only repeat it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import ipaddress
import json
import re
import unicodedata
from collections.abc import Callable
from datetime import timedelta
from fractions import Fraction
from importlib import resources
from typing import Any, ClassVar

import fastjsonschema
import yaml

from reconciler import layout, pki
from reconciler.errors import DesiredStateError
from reconciler.model import (
    DEFAULT_RENEW_BEFORE,
    CASpec,
    CertKind,
    CRLSpec,
    Desired,
    Found,
    HbaRule,
    KeyType,
    LeafSpec,
    RenewBefore,
    Subject,
    TrustRoot,
    describe_duration,
)
from reconciler.store import FileRead, StateDir

MAX_FILE_BYTES = 32 * 1024 * 1024
NODE_ALLOWANCE = 1000  # values beyond one per byte of the file: only aliases get there
MAX_VALIDITY = timedelta(days=36500)
SUBJECT_ORDER = ("C", "ST", "L", "O", "OU", "CN")
RESERVED_ROLE_NAMES = frozenset({"public", "none", "current_user", "session_user", "current_role"})
DEFAULT_SUPERUSERS = ("postgres",)
HBA_ADDRESS_KEYWORDS = frozenset({"all", "samehost", "samenet"})

DocPath = tuple[str | int, ...]

_TAG = "tag:yaml.org,2002:"
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufffe\uffff]|\r(?!\n)")


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema of format version 1 (schema/users.schema.json, shipped in the package)."""
    text = resources.files("reconciler").joinpath("users.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _is_valid() -> Callable[[Any], Any]:
    return fastjsonschema.compile(copy.deepcopy(schema()))  # it rewrites the $refs it is given


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: DocPath) -> str:
    """users[3].validity; a key that is not plain (a dot, a space, a line break) is quoted, so
    a message stays one line that says exactly which key."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(part):
            text += f"[{part!r}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _line_of(root: yaml.Node | None, path: DocPath) -> int:
    """The line of the value at path (of its key, for a mapping's value), or of the nearest
    enclosing value the document has."""
    node, line = root, (root.start_mark.line + 1 if root is not None else 1)
    for part in path:
        if isinstance(node, yaml.MappingNode):
            pair = next((p for p in node.value if p[0].value == part), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


class _Problems:
    """Collects 'FILE:LINE: PATH: message' lines, and which parts of the document they touch."""

    def __init__(self, display: str, root: yaml.Node | None) -> None:
        self.display = display
        self.root = root
        self.found: dict[str, int] = {}  # message line → its line number, in discovery order
        self.broken: set[DocPath] = set()  # where a problem is
        self.touched: set[DocPath] = set()  # every enclosing path of those

    def add(
        self, path: DocPath, message: str, *, where: DocPath | None = None, line: int = 0
    ) -> None:
        """Report message at path (on line, when the path alone cannot tell it); where
        (default: path) is the part of the document it makes unusable."""
        line = line or _line_of(self.root, path)
        self.found.setdefault(f"{self.display}:{line}: {format_path(path)}: {message}", line)
        where = path if where is None else where
        self.broken.add(where)
        self.touched.update(where[:i] for i in range(len(where) + 1))

    def clean(self, path: DocPath) -> bool:
        """No problem inside the value at path, nor at any value that holds it."""
        if not self.broken:
            return True
        return path not in self.touched and not any(
            path[:i] in self.broken for i in range(len(path))
        )

    def raise_if_any(self) -> None:
        if self.found:
            ordered = sorted(self.found, key=self.found.__getitem__)  # stable: by line
            raise DesiredStateError(ordered)


# --------------------------------------------------------------------------- bytes and YAML


def _decode(raw: bytes, display: str) -> str:
    if len(raw) > MAX_FILE_BYTES:
        raise DesiredStateError(
            [
                f"{display}:1: the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, "
                "more than any desired state needs; check that the right file is being read"
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DesiredStateError(
            [f"{display}:{line}: byte {exc.start} is not UTF-8; save the file as UTF-8"]
        ) from None


def _check_characters(text: str, display: str) -> None:
    bad = _CONTROL.search(text)
    if bad is None:
        return
    line = text.count("\n", 0, bad.start()) + 1
    if bad.group() in ("\r", "\x85", "\u2028", "\u2029"):
        raise DesiredStateError(
            [
                f"{display}:{line}: the file contains the line break {bad.group()!r}, "
                "which YAML counts as a new line and most editors do not; save the file "
                "with LF (or CRLF) line endings only"
            ]
        )
    raise DesiredStateError(
        [
            f"{display}:{line}: the file contains the control character "
            f"{bad.group()!r}; remove it (write \\t, \\0 and the like "
            "only as escapes inside double quotes)"
        ]
    )


def _compose(text: str, display: str) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark is not None and "end of stream" in (exc.problem or ""):
            mark = exc.context_mark
        last = max(text.count("\n") + (0 if text.endswith("\n") else 1), 1)
        line = min(mark.line + 1, last) if mark is not None else 1
        what = exc.problem or exc.context or "not valid YAML"
        if exc.problem and exc.context:
            what = f"{exc.problem} {exc.context}"
        raise DesiredStateError(
            [
                f"{display}:{line}: YAML syntax error: {what}; fix the "
                "syntax (indent with spaces, put a space after each ':')"
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise DesiredStateError([f"{display}:1: not valid YAML ({exc}); fix the syntax"]) from None
    except RecursionError:
        raise DesiredStateError(
            [f"{display}:1: the document is nested too deeply; users.yaml needs only a few levels"]
        ) from None
    if root is None:
        raise DesiredStateError(
            [
                f"{display}:1: the file is empty; start it with `version: 1` "
                "and a `ca:` section (see `reconciler init`)"
            ]
        )
    return root


class _Builder:
    """Turns composed YAML nodes into plain Python values; what it refuses goes to problems
    (and the value becomes None)."""

    _SCALARS: ClassVar[dict[str, Callable[[Any, yaml.ScalarNode], Any]]] = {
        "int": yaml.constructor.SafeConstructor.construct_yaml_int,
        "float": yaml.constructor.SafeConstructor.construct_yaml_float,
        "bool": yaml.constructor.SafeConstructor.construct_yaml_bool,
        "null": yaml.constructor.SafeConstructor.construct_yaml_null,
    }

    def __init__(self, problems: _Problems, max_nodes: int) -> None:
        self.problems = problems
        self.max_nodes = max_nodes
        self.nodes = 0
        self.active: set[int] = set()  # mappings and lists being built: an alias loop
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: DocPath) -> Any:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise DesiredStateError(
                [
                    f"{self.problems.display}:1: YAML aliases expand the document to more than "
                    f"{self.max_nodes} values; write the entries out instead of using aliases"
                ]
            )
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        line = node.start_mark.line + 1
        if id(node) in self.active:
            self.problems.add(
                path,
                "this YAML alias refers to the value that contains it; write it out",
                line=line,
            )
            return None
        expected = _TAG + ("map" if isinstance(node, yaml.MappingNode) else "seq")
        if node.tag != expected:
            self.problems.add(path, f"unsupported YAML tag {node.tag}; remove the tag", line=line)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: DocPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _TAG + "merge":
                self.problems.add(
                    path,
                    "YAML merge keys (<<) are not supported; "
                    "write the keys out, or move shared values under defaults",
                    where=(*path, "<<"),
                    line=line,
                )
                continue
            key = key_node.value if key_node.tag == _TAG + "str" else None
            if not isinstance(key, str):
                self.problems.add(
                    path,
                    "a mapping key must be plain text; quote it or rename it",
                    where=(*path, f"line {line}"),
                    line=line,
                )
                continue
            if key in result:
                self.problems.add(
                    (*path, key),
                    f"duplicate key {key!r} (first at line {first_line[key]}); keep one of them",
                    line=line,
                )
                continue
            first_line[key] = line
            result[key] = self.build(value_node, (*path, key))
        return result

    def _scalar(self, node: yaml.ScalarNode, path: DocPath) -> Any:
        line = node.start_mark.line + 1
        kind = node.tag.removeprefix(_TAG)
        if kind in ("str", "timestamp"):  # a timestamp is kept as written; never valid here
            return node.value
        make = self._SCALARS.get(kind) if node.tag.startswith(_TAG) else None
        if make is None:
            self.problems.add(
                path,
                f"unsupported YAML tag {node.tag}; users.yaml holds only "
                "mappings, lists, text and numbers, so remove the tag",
                line=line,
            )
            return None
        shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        try:
            value = make(self.constructor, node)
        except ValueError:
            self.problems.add(
                path,
                f"{shown!r} cannot be read as a {kind}; write one, or remove the tag",
                line=line,
            )
            return None
        if isinstance(value, int) and value.bit_length() > 64:
            self.problems.add(
                path, f"{shown} is far too large a number; write a smaller one", line=line
            )
            return None
        return value


# --------------------------------------------------------------------------- schema


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "empty"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "a mapping"


_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
}
# the validators whose refusal is explained by the schema's x-hint alone
_HINTED = frozenset({"pattern", "minLength", "maxLength", "minimum", "maximum", "enum"})


def _schema_problems(document: Any, problems: _Problems, refused: set[DocPath]) -> None:
    """Schema errors as problems, but none inside a value the YAML step refused (it is None
    there, and its schema error would only repeat that)."""
    try:
        _is_valid()(document)
        return
    except fastjsonschema.JsonSchemaException:
        pass
    import difflib  # only to explain a file the schema refuses

    import jsonschema

    for error in jsonschema.Draft202012Validator(schema()).iter_errors(document):
        path: DocPath = tuple(error.absolute_path)
        if any(path[:i] in refused for i in range(len(path) + 1)):
            continue
        hint = error.schema.get("x-hint") if isinstance(error.schema, dict) else None
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed)):
                close = difflib.get_close_matches(key, allowed, n=1)
                advice = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else f"allowed here: {', '.join(allowed)}"
                )
                problems.add((*path, key), f"unknown key {key!r}; {advice}")
        elif error.validator == "required":
            for key in error.validator_value:
                if isinstance(error.instance, dict) and key not in error.instance:
                    problems.add(
                        path, f"the required key {key!r} is missing; add it", where=(*path, key)
                    )
        elif error.validator == "type":
            expected = _TYPE_WORDS.get(str(error.validator_value), str(error.validator_value))
            message = f"must be {expected}, not {_describe_value(error.instance)}"
            if isinstance(error.instance, bool | int | float) and error.validator_value == "string":
                message += " (quote it: YAML reads yes, no, on, off and bare numbers as values)"
            problems.add(path, message + (f"; {hint}" if hint else ""))
        elif error.validator == "const" and hint:
            problems.add(path, f"{error.instance!r} is not supported; {hint}")
        elif hint and error.validator in _HINTED:
            problems.add(path, f"{error.instance!r} is not valid; {hint}")
        else:
            problems.add(path, f"{error.message}; fix this value")


# --------------------------------------------------------------------------- semantic checks


def parse_duration(text: str) -> timedelta:
    number, unit = int(text[:-1]), text[-1]
    return timedelta(days=number) if unit == "d" else timedelta(hours=number)


def parse_renew_before(text: str) -> RenewBefore:
    if text.endswith("%"):
        return RenewBefore(share=Fraction(int(text[:-1]), 100))
    return RenewBefore(duration=parse_duration(text))


def role_name_problem(name: str) -> str | None:
    """Why a role name cannot become a certificate CN and a file name, or None."""
    size = len(name.encode("utf-8"))
    if size > 63:
        return f"the role name is {size} bytes of UTF-8, more than PostgreSQL's 63; shorten it"
    if "/" in name or name.startswith("."):
        return "a role name must not contain '/' or start with '.'; rename it"
    if name != name.strip():
        return "the role name starts or ends with a space, which looks like another name; remove it"
    for char in "" if name.isprintable() else name:  # printable: no Cc or Cf character
        if unicodedata.category(char) in {"Cc", "Cf"}:
            return (
                f"the role name contains the control or format character U+{ord(char):04X}; "
                "remove it"
            )
    if name.startswith("pg_"):
        return "role names starting with 'pg_' are reserved by PostgreSQL; rename it"
    if name in RESERVED_ROLE_NAMES:
        return f"{name!r} is reserved by PostgreSQL and cannot be a role; rename it"
    return None


def _key_type_problem(text: str) -> str | None:
    if text in {key.value for key in KeyType}:
        return None
    if text.startswith("rsa-") and int(text.removeprefix("rsa-")) < 2048:
        return f"{text} is too weak: RSA keys shorter than 2048 bits are refused; use rsa-3072"
    return (
        f"{text} is not supported; use rsa-2048, rsa-3072, rsa-4096, ecdsa-p256, ecdsa-p384 "
        "or ed25519"
    )


def _hba_address_problem(address: str) -> str | None:
    if address in HBA_ADDRESS_KEYWORDS:
        return None
    try:
        if "/" not in address:
            ipaddress.ip_address(address)
        else:
            ipaddress.ip_network(address, strict=True)
        return None
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return (
            f"{address!r} is not an IP address or CIDR; write one such as 10.0.6.188/32, "
            "or all, samehost, samenet"
        )
    host = address.split("/", 1)[0]
    return (
        f"{address!r} has host bits set; write {network} for the network or "
        f"{host}/{network.max_prefixlen} for the one host"
    )


def _ip_text(text: str) -> str | None:
    """The address as ipaddress writes it, or None unless text is one IPv4 or IPv6 address
    without a zone (fe80::1%eth0 is refused)."""
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id is not None:
        return None
    return str(parsed)


def _subject(attributes: dict[str, str], common_name: str | None) -> Subject:
    merged = dict(attributes)
    if common_name is not None:
        merged["CN"] = common_name
    return tuple((attr, merged[attr]) for attr in SUBJECT_ORDER if attr in merged)


@dataclasses.dataclass(frozen=True)
class _Defaults:
    key: KeyType
    validity: timedelta
    renew_before: RenewBefore
    renew_path: DocPath | None  # where renew_before was written, if it was
    subject: dict[str, str]
    checked: bool  # the defaults section had no problem: windows can be judged against it

    @functools.cached_property
    def common_subject(self) -> Subject:
        """The subject of an entry without its own, but for its CN (which comes last)."""
        return _subject(self.subject, None)


class _Checker:
    """Checks a schema cannot express, on the parts of the document the schema accepted."""

    def __init__(
        self,
        document: dict[str, Any],
        problems: _Problems,
        read: Callable[[str], FileRead] | None = None,
    ) -> None:
        self.doc = document
        self.problems = problems
        self.read = read  # reads a trust file in the state directory; None: not checked
        self.sans: dict[str, DocPath] = {}  # every server's DNS and IP names: whose they are
        self.superusers = frozenset(
            document.get("superusers", DEFAULT_SUPERUSERS)
            if problems.clean(("superusers",))
            else ()
        )

    def key(self, text: str, path: DocPath) -> KeyType:
        problem = _key_type_problem(text)
        if problem is None:
            return KeyType(text)
        self.problems.add(path, problem)
        return KeyType.ECDSA_P256

    def validity(self, text: str, path: DocPath) -> timedelta:
        duration = parse_duration(text)
        if duration > MAX_VALIDITY:
            self.problems.add(path, f"{text} is longer than 100 years; shorten it")
        return duration

    def check_window(
        self,
        renew: RenewBefore,
        renew_path: DocPath | None,
        validity: timedelta,
        where: DocPath,
        validity_path: DocPath | None = None,
    ) -> None:
        if renew.duration is None or renew.duration < validity:
            return
        own_renew = renew_path is not None and renew_path[: len(where)] == where
        if validity_path is not None and not own_renew:
            self.problems.add(
                validity_path,
                f"validity {describe_duration(validity)} is not longer than renew_before "
                f"{renew.describe()} from {format_path(renew_path or ('defaults',))}; "
                "lengthen it, or give this entry its own renew_before",
            )
            return
        self.problems.add(
            renew_path or where,
            "renew_before must be shorter than validity "
            f"({renew.describe()} is not shorter than {describe_duration(validity)}); "
            "shorten it or write a share such as 33%",
        )

    def run(self) -> Desired | None:
        """The Desired value; None when a part it needs had a problem (reported already)."""
        clean = self.problems.clean
        doc = self.doc
        ca = crl = None
        if clean(("ca",)):
            ca_doc = doc["ca"]
            ca = CASpec(
                subject=_subject(ca_doc["subject"], None),
                key=self.key(ca_doc.get("key", "rsa-4096"), ("ca", "key")),
                validity=self.validity(ca_doc.get("validity", "3650d"), ("ca", "validity")),
                generation=ca_doc.get("generation", 1),
                overlap=self.validity(ca_doc.get("overlap", "30d"), ("ca", "overlap")),
            )
            if 2 * ca.overlap >= ca.validity:
                self.problems.add(
                    ("ca", "overlap"),
                    f"ca.overlap ({describe_duration(ca.overlap)}) must be less than half of "
                    f"ca.validity ({describe_duration(ca.validity)}): a rotation lasts twice it",
                )
        if clean(("crl",)):
            crl_doc = doc.get("crl", {})
            crl = CRLSpec(
                validity=self.validity(crl_doc.get("validity", "30d"), ("crl", "validity")),
                refresh_before=parse_duration(crl_doc.get("refresh_before", "20d")),
            )
            if crl.refresh_before >= crl.validity:
                self.problems.add(
                    ("crl", "refresh_before" if "refresh_before" in crl_doc else "validity"),
                    "crl.refresh_before must be shorter than crl.validity; shorten it",
                )
        defaults = self._defaults()
        leaves = [
            *self._entries("users", CertKind.CLIENT, defaults),
            *self._entries("servers", CertKind.SERVER, defaults),
        ]
        trust = self._trust()
        if not trust and self.read is not None and clean(("trust",)) and clean(("servers",)):
            for index, entry in enumerate(self.doc.get("servers", [])):
                if entry.get("issuer") == "external":
                    self.problems.add(
                        ("servers", index, "issuer"),
                        "an external issuer needs the root its certificates chain to: list "
                        "its PEM file under trust (docs/users-yaml.md#trust)",
                    )
        if ca is None or crl is None:
            return None
        return Desired(ca=ca, crl=crl, leaves=tuple(leaves), trust=trust)

    def _trust(self) -> tuple[TrustRoot, ...]:
        """The trust roots, each read through the state directory (never through a link)."""
        roots: dict[str, TrustRoot] = {}
        for index, path in enumerate(
            self.doc.get("trust", []) if self.problems.clean(("trust",)) else []
        ):
            where: DocPath = ("trust", index)
            parts = path.split("/")
            if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
                self.problems.add(
                    where,
                    f"{path!r} must be a plain relative path inside the state directory, "
                    "such as trust/corp-root.pem (no '..', no leading '/')",
                )
            elif (
                path == layout.USERS_YAML
                or parts[0] in layout.DIRECTORIES
                or layout.is_managed(path)
            ):
                self.problems.add(
                    where,
                    f"{path!r} is a file the reconciler writes or users.yaml itself; keep "
                    "trust roots in a directory of their own, such as trust/",
                )
            elif path in roots:
                self.problems.add(where, f"{path!r} is listed twice; keep one")
            elif self.read is not None:
                root = self._root(path, where, self.read(path))
                if root is not None:
                    roots[path] = root
        return tuple(roots.values())

    def _root(self, path: str, where: DocPath, read: FileRead) -> TrustRoot | None:
        if read.found is not Found.OK:
            self.problems.add(
                where,
                f"{path} "
                + (
                    "does not exist in the state directory; add the root's PEM "
                    "file there (and commit it)"
                    if read.found is Found.MISSING
                    else f"cannot be read ({read.detail}); make it a regular file"
                ),
            )
            return None
        try:
            certs = pki.load_certificates(read.data)
        except ValueError:
            certs = []
        if len(certs) != 1:
            self.problems.add(
                where, f"{path} is not a PEM file holding one certificate; put one root in it"
            )
            return None
        facts = pki.certificate_facts(certs[0])
        if not facts.is_ca:
            self.problems.add(
                where,
                f"{path} is not a CA certificate (it lacks basicConstraints CA:TRUE): "
                "list the root of the chain, not a server's certificate",
            )
            return None
        return TrustRoot(path, read.data, facts.subject, facts.fingerprint, facts.not_after)

    def _defaults(self) -> _Defaults:
        checked = self.problems.clean(("defaults",))
        doc: dict[str, Any] = self.doc.get("defaults", {}) if checked else {}
        renew_path: DocPath | None = ("defaults", "renew_before") if "renew_before" in doc else None
        defaults = _Defaults(
            key=self.key(doc.get("key", "ecdsa-p256"), ("defaults", "key")),
            validity=self.validity(doc.get("validity", "365d"), ("defaults", "validity")),
            renew_before=parse_renew_before(doc["renew_before"])
            if renew_path
            else DEFAULT_RENEW_BEFORE,
            renew_path=renew_path,
            subject=dict(doc.get("subject", {})),
            checked=checked,
        )
        self.check_window(
            defaults.renew_before,
            renew_path,
            defaults.validity,
            ("defaults",),
            ("defaults", "validity") if "validity" in doc else None,
        )
        return defaults

    def _entries(self, section: str, kind: CertKind, defaults: _Defaults) -> list[LeafSpec]:
        if (section,) in self.problems.broken:
            return []  # the section itself is not a list
        leaves: list[LeafSpec] = []
        seen: dict[str, int] = {}
        entry_names: dict[str, str] = {}
        for index, entry in enumerate(self.doc.get(section, [])):
            path: DocPath = (section, index)
            if not self.problems.clean(path):
                continue
            name: str = entry["name"]
            spelling = unicodedata.normalize("NFC", name)  # two spellings of one name are one
            listed_twice = spelling in seen
            if listed_twice:
                self.problems.add(
                    (*path, "name"),
                    f"{name!r} is listed twice (first at line "
                    f"{_line_of(self.problems.root, (section, seen[spelling], 'name'))}"
                    f"{', spelled otherwise' if name != entry_names[spelling] else ''}); "
                    "keep one entry",
                )
            else:
                seen[spelling], entry_names[spelling] = index, name
            if kind is CertKind.CLIENT:
                problem = role_name_problem(name)
                if problem:
                    self.problems.add((*path, "name"), problem)
                elif name in self.superusers and entry.get("superuser") is not True:
                    self.problems.add(
                        (*path, "name"),
                        f"{name!r} is a superuser role (superusers lists it): its certificate "
                        "logs in as a superuser; if that is intended, add `superuser: true` to "
                        "this entry",
                    )
            validity = (
                self.validity(entry["validity"], (*path, "validity"))
                if "validity" in entry
                else defaults.validity
            )
            renew, renew_path = defaults.renew_before, defaults.renew_path
            if "renew_before" in entry:
                renew, renew_path = (
                    parse_renew_before(entry["renew_before"]),
                    (*path, "renew_before"),
                )
            if defaults.checked or "renew_before" in entry:
                self.check_window(
                    renew,
                    renew_path,
                    validity,
                    path,
                    (*path, "validity") if "validity" in entry else None,
                )
            leaves.append(
                LeafSpec(
                    kind=kind,
                    name=name,
                    key=self.key(entry["key"], (*path, "key")) if "key" in entry else defaults.key,
                    validity=validity,
                    renew_before=renew,
                    subject=_subject({**defaults.subject, **entry["subject"]}, name)
                    if "subject" in entry
                    else (*defaults.common_subject, ("CN", name)),
                    generation=int(entry.get("generation", 1)),
                    dns=self._dns(name, entry, path, listed_twice)
                    if kind is CertKind.SERVER
                    else (),
                    ips=self._ips(entry, path),
                    hba=self._hba(entry, path),
                    external=entry.get("issuer") == "external",
                )
            )
        return leaves

    def _claim(self, san: str, path: DocPath) -> None:
        """Refuse a DNS or IP name another server already has: one name, one server."""
        owner = self.sans.setdefault(san, path)
        if owner[:2] != path[:2]:
            self.problems.add(
                path,
                f"{san!r} is already a name of {format_path(owner[:2])} (line "
                f"{_line_of(self.problems.root, owner)}); two servers cannot claim one name",
            )

    def _dns(
        self, name: str, entry: dict[str, Any], path: DocPath, listed_twice: bool
    ) -> tuple[str, ...]:
        names = [name]
        if not listed_twice:  # reported as such already
            self._claim(name, (*path, "name"))
        for index, dns in enumerate(entry.get("dns", [])):
            if dns in names[1:]:
                self.problems.add((*path, "dns", index), f"{dns!r} is listed twice; keep one")
            elif dns != name:
                names.append(dns)
                self._claim(dns, (*path, "dns", index))
        return tuple(names)

    def _ips(self, entry: dict[str, Any], path: DocPath) -> tuple[str, ...]:
        result: list[str] = []
        for index, text in enumerate(entry.get("ip", [])):
            address = _ip_text(text)
            if address is None:
                self.problems.add(
                    (*path, "ip", index),
                    f"{text!r} is not an IPv4 or IPv6 address; write one such as 10.0.6.188 "
                    "(no prefix length)",
                )
            elif address in result:
                self.problems.add((*path, "ip", index), f"{text!r} is listed twice; keep one")
            else:
                result.append(address)
                self._claim(address, (*path, "ip", index))
        return tuple(result)

    def _hba(self, entry: dict[str, Any], path: DocPath) -> tuple[HbaRule, ...]:
        rules: list[HbaRule] = []
        for index, rule in enumerate(entry.get("hba", [])):
            problem = _hba_address_problem(rule["address"])
            if problem:
                self.problems.add((*path, "hba", index, "address"), problem)
                continue
            hba = HbaRule(database=rule["database"], address=rule["address"])
            if hba in rules:
                self.problems.add((*path, "hba", index), "this rule is listed twice; keep one")
            rules.append(hba)
        return tuple(rules)


# --------------------------------------------------------------------------- entry points


def parse_desired(
    text: str, display: str = "users.yaml", read: Callable[[str], FileRead] | None = None
) -> Desired:
    """Validate users.yaml text; raise DesiredStateError listing every problem found. read
    reads the trust files (StateDir.read); without it they are not read."""
    text = text.removeprefix("\ufeff")
    _check_characters(text, display)
    root = _compose(text, display)
    problems = _Problems(display, root)
    document = _Builder(problems, len(text) + NODE_ALLOWANCE).build(root, ())
    _schema_problems(document, problems, refused=set(problems.broken))
    desired = _Checker(document, problems, read).run() if isinstance(document, dict) else None
    problems.raise_if_any()
    assert desired is not None  # every part it needs was clean
    return desired


def tls12_warning(desired: Desired) -> str | None:
    """PostgreSQL up to 17 offers one key-exchange curve (ssl_ecdh_curve, prime256v1 unless
    set), and on TLS 1.2 OpenSSL refuses a client certificate on another curve ("wrong
    curve"); TLS 1.3 does not tie the two. tests/test_curves.py shows it on PostgreSQL 15."""
    p384 = [
        leaf.name
        for leaf in desired.leaves
        if leaf.kind is CertKind.CLIENT and leaf.key is KeyType.ECDSA_P384
    ]
    if not p384:
        return None
    return (
        f"users on ecdsa-p384 ({', '.join(p384[:5])}{', …' if len(p384) > 5 else ''}) fail "
        "on TLS 1.2 unless the server's ssl_ecdh_curve is secp384r1, which fails ecdsa-p256 "
        "users instead; set ssl_min_protocol_version = 'TLSv1.3' on the servers "
        "(docs/postgresql.md#ecdsa-p-384-clients-and-tls-12)"
    )


def load_desired(store: StateDir) -> Desired:
    """Read (never through a link) and validate the state directory's users.yaml."""
    display = str(store.path(layout.USERS_YAML))
    read = store.read(layout.USERS_YAML)
    if read.found is Found.MISSING:
        raise DesiredStateError(
            [
                f"{display}: no such file; create it with `reconciler init` "
                "or point --state at the directory that holds it"
            ]
        )
    if read.found is not Found.OK:
        raise DesiredStateError(
            [f"{display}: cannot read it ({read.detail}); it must be a regular file you can read"]
        )
    return parse_desired(_decode(read.data, display), display, store.read)
