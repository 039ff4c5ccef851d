"""Load state/users.yaml into a Desired value, or explain every problem with its line.

Order: bytes (size, UTF-8) → YAML nodes (safe loader, duplicate keys refused, line of every
value kept) → JSON Schema (schema/users.schema.json) → semantic checks → Desired.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import re
from collections.abc import Callable
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from reconciler import collector, schema_check
from reconciler.errors import DesiredStateError

if TYPE_CHECKING:
    import jsonschema
from reconciler.model import (
    DEFAULT_RENEW_BEFORE,
    CASpec,
    CertKind,
    CRLSpec,
    Desired,
    HbaRule,
    KeyType,
    LeafSpec,
    RenewBefore,
    Subject,
    describe_duration,
)

MAX_FILE_BYTES = 32 * 1024 * 1024
NODES_PER_BYTE = 1  # without aliases a document has fewer nodes than bytes; aliases may not
NODE_ALLOWANCE = 1000  # ... multiply that beyond this slack (alias bombs stop here)
MAX_VALIDITY = timedelta(days=36500)
SUBJECT_ORDER = ("C", "ST", "L", "O", "OU", "CN")
RESERVED_ROLE_NAMES = frozenset({"public", "none", "current_user", "session_user", "current_role"})
HBA_ADDRESS_KEYWORDS = frozenset({"all", "samehost", "samenet"})

DocPath = tuple[str | int, ...]

_SCALAR_TAG = "tag:yaml.org,2002:"
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _QuickResolveLoader(_SAFE_LOADER):  # type: ignore[misc]
    """The safe loader with PyYAML's resolver rewritten for speed; the composer calls it for
    every node. PyYAML's resolve() builds a new list per scalar, tries the implicit resolvers'
    regular expressions on every plain scalar, even on the same key for the ten-thousandth
    time, and checks path resolvers; descend_resolver() and ascend_resolver() too are called
    around every node to do nothing without path resolvers. This one gives every node the same
    tag, as long as the loader has no wildcard and no path resolvers, which _YAML_LOADER checks
    below (the safe loader has neither): a plain scalar's tag depends on its text alone, so it
    is worked out once per distinct text."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.plain_tags: dict[str, str] = {}

    def resolve(self, kind: type[yaml.Node], value: str, implicit: tuple[bool, bool]) -> Any:
        if kind is yaml.ScalarNode:
            if not implicit[0]:
                return self.DEFAULT_SCALAR_TAG
            tag = self.plain_tags.get(value)
            if tag is None:
                tag = self.DEFAULT_SCALAR_TAG
                for candidate, regexp in self.yaml_implicit_resolvers.get(value[:1], ()):
                    if regexp.match(value):
                        tag = candidate
                        break
                self.plain_tags[value] = tag
            return tag
        if kind is yaml.MappingNode:
            return self.DEFAULT_MAPPING_TAG
        return self.DEFAULT_SEQUENCE_TAG

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass


_YAML_LOADER: Any = (
    _QuickResolveLoader
    if not _SAFE_LOADER.yaml_path_resolvers and None not in _SAFE_LOADER.yaml_implicit_resolvers
    else _SAFE_LOADER
)


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema of format version 1 (schema/users.schema.json, shipped in the package)."""
    from importlib import resources  # needed only to explain an invalid file: imported then

    text = resources.files("reconciler").joinpath("users.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def format_path(path: DocPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


@dataclasses.dataclass
class _Problems:
    """Collects 'FILE:LINE: PATH: message' lines, each with the line of the offending value."""

    display: str
    line_source: Callable[[], dict[DocPath, int]]  # called only once a problem needs a line
    found: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    _lines: dict[DocPath, int] | None = None
    _seen: set[tuple[int, str]] = dataclasses.field(default_factory=set)  # found, for lookups

    @property
    def lines(self) -> dict[DocPath, int]:
        if self._lines is None:
            self._lines = self.line_source()
        return self._lines

    def line_of(self, path: DocPath) -> int:
        lines = self.lines
        while path not in lines and path:
            path = path[:-1]
        return lines.get(path, 1)

    def add(self, path: DocPath, message: str) -> None:
        line = self.line_of(path)
        entry = (line, f"{self.display}:{line}: {format_path(path)}: {message}")
        if entry not in self._seen:  # a set: a file with thousands of problems stays linear
            self._seen.add(entry)
            self.found.append(entry)

    def raise_if_any(self) -> None:
        if self.found:
            raise DesiredStateError([text for _, text in sorted(self.found, key=lambda f: f[0])])


# --------------------------------------------------------------------------- YAML


class _NodeBudgetExceeded(Exception):
    pass


class _Builder:
    """Turns composed YAML nodes into plain Python values, remembering each value's line."""

    def __init__(self, display: str, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.lines: dict[DocPath, int] = {}
        self.problems: list[tuple[int, str]] = []
        self.display = display
        self.nodes = 0
        self.active: set[int] = set()
        self.constructor = yaml.constructor.SafeConstructor()

    def _problem(self, node: yaml.Node, path: DocPath, message: str) -> None:
        line = node.start_mark.line + 1
        self.problems.append((line, f"{self.display}:{line}: {format_path(path)}: {message}"))

    def build(self, node: yaml.Node, path: DocPath) -> Any:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise _NodeBudgetExceeded
        self.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self.active:
            self._problem(
                node, path, "this YAML alias refers to the value that contains it; write it out"
            )
            return None
        if isinstance(node, yaml.MappingNode):
            self.active.add(id(node))
            try:
                return self._mapping(node, path)
            finally:
                self.active.discard(id(node))
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SCALAR_TAG + "seq":
                self._problem(node, path, f"unsupported YAML tag {node.tag}; remove the tag")
                return None
            self.active.add(id(node))
            try:
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            finally:
                self.active.discard(id(node))
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: DocPath) -> Any:
        if node.tag != _SCALAR_TAG + "map":
            self._problem(node, path, f"unsupported YAML tag {node.tag}; remove the tag")
            return None
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _SCALAR_TAG + "merge":
                self._problem(
                    key_node,
                    path,
                    "YAML merge keys (<<) are not supported; "
                    "write the keys out, or move shared values under defaults",
                )
                continue
            key = self._scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self._problem(
                    key_node, path, "a mapping key must be plain text; quote it or rename it"
                )
                continue
            key_line = key_node.start_mark.line + 1
            if key in result:
                self._problem(
                    key_node,
                    (*path, key),
                    f"duplicate key {key!r} (first at line {first_line[key]}); keep one of them",
                )
                continue
            first_line[key] = key_line
            self.lines[(*path, key)] = key_line
            result[key] = self.build(value_node, (*path, key))
        return result

    def _scalar(self, node: yaml.ScalarNode, path: DocPath) -> Any:
        tag = node.tag
        constructors = {
            "str": self.constructor.construct_yaml_str,
            "int": self.constructor.construct_yaml_int,
            "float": self.constructor.construct_yaml_float,
            "bool": self.constructor.construct_yaml_bool,
            "null": self.constructor.construct_yaml_null,
            "timestamp": self.constructor.construct_yaml_str,  # kept as written; never valid here
        }
        kind = tag.removeprefix(_SCALAR_TAG) if tag.startswith(_SCALAR_TAG) else None
        if kind not in constructors:
            self._problem(
                node,
                path,
                f"unsupported YAML tag {tag}; users.yaml holds only "
                "mappings, lists, text and numbers, so remove the tag",
            )
            return None
        shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        try:
            value = constructors[kind](node)
        except ValueError:
            self._problem(
                node, path, f"{shown!r} cannot be read as a {kind}; write one, or remove the tag"
            )
            return None
        if isinstance(value, int) and value.bit_length() > 64:
            self._problem(node, path, f"{shown} is far too large a number; write a smaller one")
            return None
        return value


def _read_text(path: Path, display: str) -> str:
    try:
        with path.open("rb") as handle:
            # read(n) allocates n bytes first: ask for the file's size, not the 32 MiB limit
            limit = MAX_FILE_BYTES + 1
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(min(size + 1, limit))
            if size + 1 == len(raw) < limit:  # it grew since fstat: read the rest
                raw += handle.read(limit - len(raw))
    except FileNotFoundError:
        raise DesiredStateError(
            [
                f"{display}: no such file; create it with `reconciler init` "
                "or point --state at the directory that holds it"
            ]
        ) from None
    except OSError as exc:
        raise DesiredStateError(
            [f"{display}: cannot read it ({exc.strerror}); check the path and its permissions"]
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise DesiredStateError(
            [
                f"{display}:1: the file is larger than "
                f"{MAX_FILE_BYTES // (1024 * 1024)} MiB, more than any desired state needs; "
                "check that the right file is being read"
            ]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DesiredStateError(
            [f"{display}:{line}: byte {exc.start} is not UTF-8; save the file as UTF-8"]
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def parse_yaml(text: str, display: str) -> tuple[Any, dict[DocPath, int]]:
    """Parse YAML text into plain values and a map from document path to line number."""
    return _build_tracked(_compose(text, display), display, _node_budget(text))


def _node_budget(text: str) -> int:
    return len(text) * NODES_PER_BYTE + NODE_ALLOWANCE


_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufffe\uffff]"
_CONTROL_OR_LONE_CR = _CONTROL + r"|\r(?!\n)"


def _compose(text: str, display: str) -> yaml.Node:
    _check_characters(text, display)
    return _compose_checked(text, display)


def _check_characters(text: str, display: str) -> None:
    # Without a CR the second alternative cannot match, and a bare character class is
    # searched several times faster than the alternation.
    bad = re.search(_CONTROL_OR_LONE_CR if "\r" in text else _CONTROL, text)
    if bad:
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


def _compose_checked(text: str, display: str) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
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


class _Fallback(Exception):
    """The fast build met something unusual: the tracked build will say what."""


def _load_fast(text: str) -> Any:
    """Plain values straight from the parser's events, for the common, valid case: no node
    tree is built, which is most of the time and nearly all of the memory of loading a large
    file (about 3 KB of nodes per user). The values are those _build_fast(compose(text))
    gives; raises _Fallback on anything else that path may have to handle or report: a YAML
    error, anchors and aliases, tags other than the plain ones, duplicate or non-text keys,
    odd numbers, more than one document, none at all."""
    loader = _YAML_LOADER(text)
    get, resolve = loader.get_event, loader.resolve
    constructor = yaml.constructor.SafeConstructor()
    str_tag, map_tag, seq_tag = _SCALAR_TAG + "str", _SCALAR_TAG + "map", _SCALAR_TAG + "seq"
    scalar_node = yaml.ScalarNode
    scalar, mapping_start, mapping_end = (
        yaml.ScalarEvent,
        yaml.MappingStartEvent,
        yaml.MappingEndEvent,
    )
    sequence_start, sequence_end = yaml.SequenceStartEvent, yaml.SequenceEndEvent
    quoted = (False, True)  # a quoted scalar without a tag: text

    def scalar_value(event: yaml.ScalarEvent) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = resolve(scalar_node, event.value, event.implicit)
        if tag == str_tag:
            return event.value
        if tag not in _PLAIN_TAGS:
            raise _Fallback
        make = _PLAIN_TAGS[tag]
        assert make is not None
        value = make(constructor, scalar_node(tag, event.value))
        if isinstance(value, int) and value.bit_length() > 64:
            raise _Fallback
        return value

    def value(event: yaml.Event) -> Any:
        kind = type(event)
        if getattr(event, "anchor", None) is not None:
            raise _Fallback
        if kind is scalar:
            return scalar_value(event)  # type: ignore[arg-type]
        if kind is mapping_start:
            if event.tag not in (None, "!", map_tag):  # type: ignore[attr-defined]
                raise _Fallback
            result: dict[str, Any] = {}
            while True:
                key_event = get()
                if type(key_event) is mapping_end:
                    return result
                if type(key_event) is not scalar or key_event.anchor is not None:
                    raise _Fallback
                key = key_event.value
                tag = key_event.tag
                if tag is None or tag == "!":
                    tag = resolve(scalar_node, key, key_event.implicit)
                if tag != str_tag or key in result:
                    raise _Fallback
                item = get()
                if (
                    type(item) is scalar
                    and item.implicit == quoted
                    and item.tag is None
                    and item.anchor is None
                ):
                    result[key] = item.value  # quoted text, the most common value
                else:
                    result[key] = value(item)
        if kind is sequence_start:
            if event.tag not in (None, "!", seq_tag):  # type: ignore[attr-defined]
                raise _Fallback
            items = []
            while type(event := get()) is not sequence_end:
                items.append(value(event))
            return items
        raise _Fallback  # an alias, or an event out of place

    try:
        if type(get()) is not yaml.StreamStartEvent or type(get()) is not yaml.DocumentStartEvent:
            raise _Fallback
        document = value(get())
        if type(get()) is not yaml.DocumentEndEvent or type(get()) is not yaml.StreamEndEvent:
            raise _Fallback
        return document
    except (yaml.YAMLError, ValueError, RecursionError):
        raise _Fallback from None
    finally:
        loader.dispose()


_PLAIN_TAGS = {
    _SCALAR_TAG + "str": None,
    _SCALAR_TAG + "int": yaml.constructor.SafeConstructor.construct_yaml_int,
    _SCALAR_TAG + "bool": yaml.constructor.SafeConstructor.construct_yaml_bool,
    _SCALAR_TAG + "null": yaml.constructor.SafeConstructor.construct_yaml_null,
    _SCALAR_TAG + "float": yaml.constructor.SafeConstructor.construct_yaml_float,
}


def _build_fast(root: yaml.Node, max_nodes: int) -> Any:
    """Plain values from the node tree without tracking lines, for the common, valid case.
    Raises _Fallback on anything the tracked build reports (tags, merge and duplicate keys,
    non-text keys, alias expansion, odd numbers)."""
    constructor = yaml.constructor.SafeConstructor()
    count = 0
    map_tag, seq_tag, str_tag = _SCALAR_TAG + "map", _SCALAR_TAG + "seq", _SCALAR_TAG + "str"
    scalar_node, mapping_node = yaml.ScalarNode, yaml.MappingNode

    def build(node: yaml.Node) -> Any:
        nonlocal count
        count += 1
        if count > max_nodes:
            raise _Fallback
        if isinstance(node, scalar_node):
            if node.tag not in _PLAIN_TAGS:
                raise _Fallback
            make = _PLAIN_TAGS[node.tag]
            if make is None:
                return node.value
            value = make(constructor, node)
            if isinstance(value, int) and value.bit_length() > 64:
                raise _Fallback
            return value
        if isinstance(node, mapping_node):
            if node.tag != map_tag:
                raise _Fallback
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag != str_tag or not isinstance(key_node, scalar_node):
                    raise _Fallback
                key = key_node.value
                if key in result:
                    raise _Fallback
                if value_node.tag == str_tag and isinstance(value_node, scalar_node):
                    count += 1  # text, the most common value: what build() does, inline
                    if count > max_nodes:
                        raise _Fallback
                    result[key] = value_node.value
                else:
                    result[key] = build(value_node)
            return result
        if node.tag != seq_tag:
            raise _Fallback
        return [build(item) for item in node.value]

    try:
        return build(root)
    except (ValueError, RecursionError):
        raise _Fallback from None


def _build_tracked(root: yaml.Node, display: str, max_nodes: int) -> tuple[Any, dict[DocPath, int]]:
    builder = _Builder(display, max_nodes)
    try:
        document = builder.build(root, ())
    except _NodeBudgetExceeded:
        raise DesiredStateError(
            [
                f"{display}:1: YAML aliases expand the document to more "
                f"than {builder.max_nodes} values; write the entries out "
                "instead of using aliases"
            ]
        ) from None
    except RecursionError:
        raise DesiredStateError(
            [f"{display}:1: the document is nested too deeply; users.yaml needs only a few levels"]
        ) from None
    if builder.problems:
        raise DesiredStateError([text for _, text in sorted(builder.problems)])
    return document, builder.lines


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
    if isinstance(value, list):
        return "a list"
    return "a mapping"


_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
}


def _schema_problems(document: Any, problems: _Problems) -> None:
    if schema_check.valid(document):  # generated from the schema; jsonschema only for errors
        return
    from difflib import get_close_matches

    for error in _validator().iter_errors(document):
        path: DocPath = tuple(error.absolute_path)
        hint = error.schema.get("x-hint") if isinstance(error.schema, dict) else None
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed)):
                close = get_close_matches(key, allowed, n=1)
                advice = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else f"allowed here: {', '.join(allowed)}"
                )
                problems.add((*path, key), f"unknown key {key!r}; {advice}")
        elif error.validator == "required":
            for key in error.validator_value:
                if isinstance(error.instance, dict) and key not in error.instance:
                    problems.add(path, f"the required key {key!r} is missing; add it")
        elif error.validator == "type":
            expected = _TYPE_WORDS.get(str(error.validator_value), str(error.validator_value))
            message = f"must be {expected}, not {_describe_value(error.instance)}"
            if isinstance(error.instance, bool | int | float) and error.validator_value == "string":
                message += " (quote it: YAML reads yes, no, on, off and bare numbers as values)"
            problems.add(path, message + (f"; {hint}" if hint else ""))
        elif error.validator == "const" and hint:
            problems.add(path, f"{error.instance!r} is not supported; {hint}")
        elif hint and error.validator in {
            "pattern",
            "minLength",
            "maxLength",
            "minimum",
            "maximum",
            "enum",
        }:
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


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]*\Z")  # no control or format character possible


def role_name_problem(name: str) -> str | None:
    """Why a role name cannot become a certificate CN and a file name, or None."""
    if (  # the common case, decided without encoding or regex: short printable ASCII
        len(name) <= 63
        and name.isascii()
        and name.isprintable()
        and "/" not in name
        and not name.startswith((".", "pg_"))
        and name not in RESERVED_ROLE_NAMES
    ):
        return None
    if len(name.encode("utf-8")) > 63:
        return (
            f"the role name is {len(name.encode('utf-8'))} bytes of UTF-8, more than "
            "PostgreSQL's 63; shorten it"
        )
    if "/" in name or name.startswith("."):
        return "a role name must not contain '/' or start with '.'; rename it"
    import unicodedata  # names outside printable ASCII, and refused ones, get this far

    for char in "" if _PLAIN_NAME.match(name) else name:
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


_KEY_TYPES = {key.value: key for key in KeyType}


def _key_type(text: str) -> KeyType | str:
    """The KeyType, or a sentence saying why the text is refused."""
    try:
        return KeyType(text)
    except ValueError:
        pass
    bits = int(text.removeprefix("rsa-")) if text.startswith("rsa-") else None
    if bits is not None and bits < 2048:
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
            return None
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


@dataclasses.dataclass(frozen=True)
class _Defaults:
    key: KeyType
    validity: timedelta
    renew_before: RenewBefore
    renew_path: DocPath | None
    subject: dict[str, str]

    @functools.cached_property
    def subject_without_cn(self) -> Subject:
        return _subject(self.subject, None)  # CN comes last in SUBJECT_ORDER


def _subject(attributes: dict[str, str], common_name: str | None) -> Subject:
    merged = dict(attributes)
    if common_name is not None:
        merged["CN"] = common_name
    return tuple((attr, merged[attr]) for attr in SUBJECT_ORDER if attr in merged)


class _SemanticChecker:
    def __init__(self, document: dict[str, Any], problems: _Problems) -> None:
        self.doc = document
        self.problems = problems
        # Addresses repeat across entries (the same subnets, the same hosts); parse each once.
        self.ip_texts: dict[str, str | None] = {}
        self.hba_address_problems: dict[str, str | None] = {}

    def key(self, text: str, path: DocPath) -> KeyType:
        result = _key_type(text)
        if isinstance(result, KeyType):
            return result
        self.problems.add(path, result)
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

    def run(self) -> Desired:
        doc = self.doc
        ca_doc = doc["ca"]
        ca = CASpec(
            subject=_subject(ca_doc["subject"], None),
            key=self.key(ca_doc.get("key", "rsa-4096"), ("ca", "key")),
            validity=self.validity(ca_doc.get("validity", "3650d"), ("ca", "validity")),
        )
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
        defaults_doc = doc.get("defaults", {})
        defaults = _Defaults(
            key=self.key(defaults_doc.get("key", "ecdsa-p256"), ("defaults", "key")),
            validity=self.validity(defaults_doc.get("validity", "365d"), ("defaults", "validity")),
            renew_before=(
                parse_renew_before(defaults_doc["renew_before"])
                if "renew_before" in defaults_doc
                else DEFAULT_RENEW_BEFORE
            ),
            renew_path=("defaults", "renew_before") if "renew_before" in defaults_doc else None,
            subject=dict(defaults_doc.get("subject", {})),
        )
        self.check_window(
            defaults.renew_before,
            defaults.renew_path,
            defaults.validity,
            ("defaults",),
            ("defaults", "validity") if "validity" in defaults_doc else None,
        )
        leaves = [
            *self._entries("users", CertKind.CLIENT, defaults),
            *self._entries("servers", CertKind.SERVER, defaults),
        ]
        return Desired(ca=ca, crl=crl, leaves=tuple(leaves))

    def _entries(self, section: str, kind: CertKind, defaults: _Defaults) -> list[LeafSpec]:
        """The section's leaves. Runs once per entry, so the common case (no own value, or one
        already seen) costs a dictionary lookup; anything else goes through the same methods
        as the defaults, in the same order, so problems come out as they always have."""
        leaves: list[LeafSpec] = []
        seen: dict[str, int] = {}
        client = kind is CertKind.CLIENT
        durations: dict[str, timedelta] = {}
        windows: dict[str, RenewBefore] = {}
        common_subject = defaults.subject_without_cn
        for index, entry in enumerate(self.doc.get(section, [])):
            path: DocPath = (section, index)
            name: str = entry["name"]
            if name in seen:
                self.problems.add(
                    (*path, "name"),
                    f"{name!r} is listed twice (first at line "
                    f"{self.problems.line_of((section, seen[name], 'name'))}); "
                    "keep one entry",
                )
            else:
                seen[name] = index
            if client:
                problem = role_name_problem(name)
                if problem:
                    self.problems.add((*path, "name"), problem)
            text = entry.get("validity")
            if text is None:
                validity = defaults.validity
            elif text in durations:
                validity = durations[text]
            else:
                validity = self.validity(text, (*path, "validity"))
                if validity <= MAX_VALIDITY:
                    durations[text] = validity
            renew, renew_path = defaults.renew_before, defaults.renew_path
            text = entry.get("renew_before")
            if text is not None:
                renew = windows.get(text) or windows.setdefault(text, parse_renew_before(text))
                renew_path = (*path, "renew_before")
            if renew.duration is not None and renew.duration >= validity:
                self.check_window(
                    renew,
                    renew_path,
                    validity,
                    path,
                    (*path, "validity") if "validity" in entry else None,
                )
            text = entry.get("key")
            leaves.append(
                LeafSpec(  # model.quick_init: no object.__setattr__ per field
                    kind=kind,
                    name=name,
                    key=(
                        defaults.key
                        if text is None
                        else _KEY_TYPES.get(text) or self.key(text, (*path, "key"))
                    ),
                    validity=validity,
                    renew_before=renew,
                    subject=(
                        (*common_subject, ("CN", name))
                        if "subject" not in entry
                        else _subject({**defaults.subject, **entry["subject"]}, name)
                    ),
                    generation=int(entry.get("generation", 1)),
                    dns=() if client else self._dns(name, entry, path),
                    ips=self._ips(entry, path) if "ip" in entry else (),
                    hba=self._hba(entry, path) if "hba" in entry else (),
                )
            )
        return leaves

    def _dns(self, name: str, entry: dict[str, Any], path: DocPath) -> tuple[str, ...]:
        names = [name]
        for index, dns in enumerate(entry.get("dns", [])):
            if dns in names[1:]:
                self.problems.add((*path, "dns", index), f"{dns!r} is listed twice; keep one")
            elif dns != name:
                names.append(dns)
        return tuple(names)

    def _ips(self, entry: dict[str, Any], path: DocPath) -> tuple[str, ...]:
        result: list[str] = []
        for index, text in enumerate(entry.get("ip", [])):
            if text in self.ip_texts:
                address = self.ip_texts[text]
            else:
                address = self.ip_texts[text] = _ip_text(text)
            if address is None:
                self.problems.add(
                    (*path, "ip", index),
                    f"{text!r} is not an IPv4 or IPv6 "
                    "address; write one such as 10.0.6.188 (no prefix length)",
                )
                continue
            if address in result:
                self.problems.add((*path, "ip", index), f"{text!r} is listed twice; keep one")
            result.append(address)
        return tuple(result)

    def _hba(self, entry: dict[str, Any], path: DocPath) -> tuple[HbaRule, ...]:
        rules: list[HbaRule] = []
        for index, rule in enumerate(entry.get("hba", [])):
            address = rule["address"]
            if address in self.hba_address_problems:
                problem = self.hba_address_problems[address]
            else:
                problem = self.hba_address_problems[address] = _hba_address_problem(address)
            if problem:
                self.problems.add((*path, "hba", index, "address"), problem)
                continue
            hba = HbaRule(database=rule["database"], address=address)
            if hba in rules:
                self.problems.add((*path, "hba", index), "this rule is listed twice; keep one")
            rules.append(hba)
        return tuple(rules)


# --------------------------------------------------------------------------- entry points


def parse_desired(text: str, display: str = "users.yaml") -> Desired:
    """Validate users.yaml text; raise DesiredStateError listing every problem found."""
    with collector.paused():
        return _parse_desired(text, display)


def _parse_desired(text: str, display: str) -> Desired:
    _check_characters(text, display)
    budget = _node_budget(text)
    try:
        document = _load_fast(text)
    except _Fallback:
        root = _compose_checked(text, display)  # says what is wrong with the YAML, if anything
        try:
            document = _build_fast(root, budget)
        except _Fallback:
            document, lines = _build_tracked(root, display, budget)
            problems = _Problems(display, lambda: lines)
        else:
            problems = _Problems(display, lambda: _build_tracked(root, display, budget)[1])
    else:  # lines are looked up (by composing the file again) only if a problem needs one
        problems = _Problems(
            display, lambda: _build_tracked(_compose_checked(text, display), display, budget)[1]
        )
    _schema_problems(document, problems)
    problems.raise_if_any()
    desired = _SemanticChecker(document, problems).run()
    problems.raise_if_any()
    return desired


def load_desired(path: Path, display: str | None = None) -> Desired:
    """Read and validate the desired-state file at path."""
    shown = display or str(path)
    return parse_desired(_read_text(path, shown), shown)
