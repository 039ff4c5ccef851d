"""What this file proves about the shortcuts reconciler.desired takes for valid files.

Each shortcut is checked against the general code it stands in for, on the inputs where they
could part ways:

1. The loader's tag resolution gives every scalar, mapping and list the tag PyYAML's own
   resolver gives it.
2. Parsing leaves the garbage collector as it found it, also when the file is refused.
3. reconciler/schema_check.py is what reconciler/schema_codegen.py writes for the shipped
   schema (so the two cannot drift apart), its `valid` answers as jsonschema's `is_valid` on
   the corpus and on random near-valid documents, and the generator refuses keywords it does
   not know rather than ignore them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import desired, schema_check, schema_codegen
from reconciler.errors import DesiredStateError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "schema" / "users.schema.json").read_text("utf-8"))

_FAST = settings(max_examples=300, deadline=None, database=None)

# Every first character PyYAML keys an implicit resolver on, and the values they decide.
_SCALARS = [
    "",
    "~",
    "null",
    "Null",
    "NULL",
    "true",
    "True",
    "yes",
    "no",
    "On",
    "off",
    "y",
    "n",
    "0",
    "1",
    "-1",
    "+1",
    "0x1f",
    "0o17",
    "0b101",
    "1_000",
    "1:30",
    "1.5",
    ".5",
    "-.inf",
    ".NaN",
    "1e3",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "<<",
    "=",
    "!",
    "&",
    "*",
    "365d",
    "33%",
    "rsa-4096",
    "user000001",
    "10.0.6.188/32",
    "fe80::1",
    "Ünïcode",
]


def _resolved(loader: Any, kind: type[yaml.Node], value: str, implicit: tuple[bool, bool]) -> str:
    return str(loader.resolve(loader(""), kind, value, implicit))


@pytest.mark.parametrize("value", _SCALARS)
@pytest.mark.parametrize("implicit", [(True, False), (False, True), (False, False)])
def test_tag_resolution_matches_pyyaml(value: str, implicit: tuple[bool, bool]) -> None:
    reference = desired._SAFE_LOADER
    assert desired._YAML_LOADER is not reference, "the quick resolver is not in use"
    for kind in (yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode):
        assert _resolved(desired._YAML_LOADER, kind, value, implicit) == _resolved(
            reference, kind, value, implicit
        ), (kind, value, implicit)


_PLAIN = st.sampled_from(list("0123456789.+-_:eExXoObB~nNuUlLtTrRfFyYsS<=!&* aä"))


@_FAST
@given(st.text(_PLAIN, max_size=8))
def test_tag_resolution_matches_pyyaml_on_any_plain_scalar(value: str) -> None:
    got = _resolved(desired._YAML_LOADER, yaml.ScalarNode, value, (True, False))
    assert got == _resolved(desired._SAFE_LOADER, yaml.ScalarNode, value, (True, False))


def test_composed_tree_matches_pyyaml() -> None:
    text = (
        "a: [1, 1.5, ~, yes, '1', !!str 2, 2001-12-14, 0x1f, .inf, <<, =, x]\nb: {c: &x d, e: *x}\n"
    )
    ours = yaml.compose(text, Loader=desired._YAML_LOADER)
    theirs = yaml.compose(text, Loader=desired._SAFE_LOADER)
    assert ours is not None
    assert theirs is not None

    def shape(node: yaml.Node) -> object:
        if isinstance(node, yaml.ScalarNode):
            return (node.tag, node.value)
        if isinstance(node, yaml.SequenceNode):
            return (node.tag, [shape(item) for item in node.value])
        assert isinstance(node, yaml.MappingNode)
        return (node.tag, [(shape(k), shape(v)) for k, v in node.value])

    assert shape(ours) == shape(theirs)


@pytest.mark.parametrize("text", ["version: 1\nca: {subject: {CN: x}}\n", "version: [\n"])
@pytest.mark.parametrize("enabled", [True, False])
def test_parsing_leaves_the_garbage_collector_as_it_was(text: str, enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with contextlib.suppress(DesiredStateError):
            desired.parse_desired(text)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


# --------------------------------------------------------------------------- the schema check


def test_shipped_schema_check_is_generated_from_the_schema() -> None:
    shipped = (ROOT / "reconciler" / "schema_check.py").read_text("utf-8")
    assert shipped == schema_codegen.generate(SCHEMA), (
        "reconciler/schema_check.py is stale: run `make schema-check` and commit the result"
    )


def test_the_package_schema_is_the_schema_file() -> None:
    assert desired.schema() == SCHEMA


_JSONSCHEMA = jsonschema.Draft202012Validator(SCHEMA)

_RICH: dict[str, Any] = {
    "version": 1,
    "ca": {
        "subject": {"CN": "Acme CA", "C": "NL", "ST": "U", "L": "B", "O": "Acme", "OU": "Ops"},
        "key": "rsa-4096",
        "validity": "3650d",
    },
    "defaults": {
        "key": "ecdsa-p256",
        "validity": "365d",
        "renew_before": "33%",
        "subject": {"C": "NL", "O": "Acme"},
    },
    "crl": {"validity": "30d", "refresh_before": "20d"},
    "users": [
        {"name": "postgres"},
        {
            "name": "cmdb",
            "key": "ed25519",
            "validity": "90d",
            "renew_before": "12h",
            "subject": {"OU": "Team", "L": "Bilthoven"},
            "generation": 2,
            "hba": [{"database": "cmdbvm", "address": "10.0.6.188/32"}],
        },
    ],
    "servers": [
        {
            "name": "db1.acme.example",
            "dns": ["db1.internal.example"],
            "ip": ["10.0.6.1", "fd00::1"],
            "key": "rsa-3072",
            "validity": "365d",
            "renew_before": "30d",
            "subject": {"OU": "Servers"},
            "generation": 1,
        }
    ],
}


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


_ODD_TEXT = [
    "",
    "x",
    "NL",
    "nl",
    "1d",
    "0d",
    "1000000d",
    "12h",
    "99%",
    "100%",
    "30d\n",
    "rsa-1024",
    "rsa-99999",
    "ecdsa-p521",
    ".x",
    "a/b",
    "a\nb",
    "a\u200bb",
    "\u0085",
    "x" * 63,
    "x" * 64,
    "x" * 65,
    "1" * 45,
    "1" * 46,
    ".".join(["a" * 63] * 3 + ["b" * 61]),  # 253 characters
    ".".join(["a" * 63] * 3 + ["b" * 62]),  # 254
    "\u00e9" * 32,
    "db1.acme.example",
    "DB1.acme.example",
    "a.b-",
    "a." + "b" * 62 + ".example",
    "db,x",
    "db x",
    "10.0.6.188",
    "fe80::1%eth0",
    "version",
    "name",
    "CN",
    "subject",
]
_ODD = st.one_of(
    st.sampled_from(_ODD_TEXT),
    st.text(max_size=70),
    st.sampled_from([0, 1, 2, -1, 1000000, 1000001, 2**63, 1.0, 2.0, 1.5, True, False, None]),
    st.floats(allow_nan=True),
    st.just([]),
    st.just({}),
    st.lists(st.sampled_from(["a", "db1.acme.example", "10.0.0.1", 1]), max_size=3),
    st.dictionaries(
        st.sampled_from(["name", "CN", "C", "database", "address", "x"]),
        st.sampled_from(["a", "NL", "10.0.0.1", 1]),
        max_size=3,
    ),
)


@st.composite
def _near_valid(draw: st.DrawFn) -> Any:
    """The rich document above with a few values replaced, keys added or keys removed."""
    document = copy.deepcopy(_RICH)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(document)))
        if not path:
            continue
        *parents, last = path
        parent = document
        for part in parents:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(_ODD)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            key = draw(st.sampled_from(["name", "key", "ip", "dns", "hba", "CN", "C", "bogus"]))
            parent[key] = draw(_ODD)
        else:
            parent.append(draw(_ODD))
    return document


_ODD_VALUES: list[Any] = [
    *_ODD_TEXT,
    *[0, 1, 2, -1, 1000000, 1000001, 2**63, 1.0, 2.0, 1.5, float("nan"), True, False, None],
    *[[], {}, ["a"], {"x": 1}],
]


def test_schema_check_agrees_with_jsonschema_on_every_odd_value_everywhere() -> None:
    """Each value above in place of each value of the rich document, one at a time."""
    assert _JSONSCHEMA.is_valid(_RICH)
    answers = set()
    for path in _paths(_RICH)[1:]:
        for value in _ODD_VALUES:
            document = copy.deepcopy(_RICH)
            *parents, last = path
            parent = document
            for part in parents:
                parent = parent[part]
            parent[last] = value
            answer = schema_check.valid(document)
            assert answer == _JSONSCHEMA.is_valid(document), (path, value)
            answers.add(answer)
    assert answers == {True, False}


@settings(max_examples=1500, deadline=None, database=None)
@given(_near_valid())
def test_schema_check_agrees_with_jsonschema(document: Any) -> None:
    assert schema_check.valid(document) == _JSONSCHEMA.is_valid(document), document


def test_schema_check_agrees_with_jsonschema_on_the_corpus() -> None:
    answers = set()
    for path in sorted((ROOT / "tests" / "bad_users").glob("*.yaml")):
        try:
            text = path.read_bytes().decode("utf-8")
            document = desired._build_fast(desired._compose(text, "users.yaml"), 10**6)
        except (UnicodeDecodeError, DesiredStateError, desired._Fallback):
            continue
        answer = schema_check.valid(document)
        assert answer == _JSONSCHEMA.is_valid(document), path.name
        answers.add(answer)
    assert answers == {True, False}  # the corpus has schema errors and semantic ones


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        {"type": "string", "format": "ipv4"},
        {"anyOf": [{"type": "string"}]},
        {"type": ["string", "null"]},
        {"type": "number"},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"properties": {"a": {"type": "string"}}},
        {"minimum": 1},
        {"$ref": "https://example.invalid/other.json"},
        {"$ref": "#/$defs/missing"},
        {"const": [1]},
    ],
)
def test_generator_refuses_what_it_cannot_check(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"extend reconciler/schema_codegen\.py"):
        schema_codegen.generate(schema)
