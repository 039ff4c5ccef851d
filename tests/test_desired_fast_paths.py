"""What this file proves about the shortcuts reconciler.desired takes for valid files.

Each shortcut is checked against the general code it stands in for, on the inputs where they
could part ways:

1. The loader's tag resolution gives every scalar, mapping and list the tag PyYAML's own
   resolver gives it.
2. Parsing leaves the garbage collector as it found it, also when the file is refused, and the
   first control character or lone CR is found whether or not the file has CRs elsewhere.
3. reconciler/schema_check.py is what reconciler/schema_codegen.py writes for the shipped
   schema (so the two cannot drift apart), its `valid` answers as jsonschema's `is_valid` on
   the corpus and on random near-valid documents, and the generator refuses keywords it does
   not know rather than ignore them.
4. The per-entry shortcuts: role_name_problem's ASCII shortcut answers as the full check (kept
   below as the reference); values parsed once and reused (durations, windows, keys,
   addresses) still give each entry its own problem; leaves made without LeafSpec's __init__
   equal leaves made with it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import unicodedata
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import desired, schema_check, schema_codegen
from reconciler.errors import DesiredStateError
from reconciler.model import CertKind, HbaRule, KeyType, LeafSpec, RenewBefore

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


def test_tag_resolution_remembers_nothing_it_should_not() -> None:
    """One loader, every value twice, quoted and plain in turn: each time PyYAML's tag."""
    ours, theirs = desired._YAML_LOADER(""), desired._SAFE_LOADER("")
    for _ in range(2):
        for value in _SCALARS:
            for implicit in [(True, False), (False, True), (True, False), (False, False)]:
                for kind in (yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode):
                    assert ours.resolve(kind, value, implicit) == theirs.resolve(
                        kind, value, implicit
                    ), (kind, value, implicit)


def test_composed_tree_matches_pyyaml() -> None:
    text = (
        "r: [yes, 'yes', yes, \"yes\", ~, '~', ~, 1, '1', 1, !!str 1, 1, x, 'x', x]\n"
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


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("a: 1\nb: x\x07\n", "users.yaml:2: the file contains the control character '\\x07'"),
        ("a: 1\r\nb: x\x07\r\n", "users.yaml:2: the file contains the control character '\\x07'"),
        ("a: 1\r\nb: x\rc: 1\x07\n", "users.yaml:2: the file contains the line break '\\r'"),
        ("a: 1\x07\r\nb: x\rc\n", "users.yaml:1: the file contains the control character '\\x07'"),
        ("a: 1\nb: \u2028\r\n", "users.yaml:2: the file contains the line break '\\u2028'"),
        ("a: 1\r\nb: 2\r", "users.yaml:2: the file contains the line break '\\r'"),
    ],
)
def test_first_odd_character_is_found_with_or_without_crs(text: str, first: str) -> None:
    with pytest.raises(DesiredStateError) as caught:
        desired.parse_desired(text)
    assert caught.value.problems[0].startswith(first), caught.value.problems


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


# --------------------------------------------------------------------------- per-entry shortcuts


def _role_name_problem_reference(name: str) -> str | None:
    """role_name_problem as it was before the ASCII shortcut."""
    if len(name.encode("utf-8")) > 63:
        return (
            f"the role name is {len(name.encode('utf-8'))} bytes of UTF-8, more than "
            "PostgreSQL's 63; shorten it"
        )
    if "/" in name or name.startswith("."):
        return "a role name must not contain '/' or start with '.'; rename it"
    for char in name:
        if unicodedata.category(char) in {"Cc", "Cf"}:
            return (
                f"the role name contains the control or format character U+{ord(char):04X}; "
                "remove it"
            )
    if name.startswith("pg_"):
        return "role names starting with 'pg_' are reserved by PostgreSQL; rename it"
    if name in desired.RESERVED_ROLE_NAMES:
        return f"{name!r} is reserved by PostgreSQL and cannot be a role; rename it"
    return None


_NAME_CHARS = st.one_of(
    st.sampled_from(list("aZ09_-.$ /\x00\x1f\x7f\x85\u00ad\u200b\u202e\u00e9~")),
    st.characters(max_codepoint=0x7F),
    st.characters(),
)


@pytest.mark.parametrize(
    "name",
    [
        "postgres",
        "",
        "x" * 63,
        "x" * 64,
        "\u00e9" * 31,
        "\u00e9" * 32,
        ".x",
        "a/b",
        "pg_x",
        "pg",
        "public",
        "Public",
        "none",
        "a b",
        "a\tb",
        "a\x7f",
        "a\u200bb",
        "~!@#",
    ],
)
def test_role_name_shortcut_answers_as_the_full_check(name: str) -> None:
    assert desired.role_name_problem(name) == _role_name_problem_reference(name)


def _answer(check: Any, name: str) -> object:
    """What check says of name, or the kind of exception it raises (a lone surrogate cannot be
    encoded; no file can hold one, but both checks must still agree)."""
    try:
        return check(name)
    except UnicodeError as exc:
        return type(exc)


@_FAST
@given(st.one_of(st.text(_NAME_CHARS, max_size=70), st.sampled_from(["pg_", ".", "\ud800"])))
def test_role_name_shortcut_answers_as_the_full_check_on_any_name(name: str) -> None:
    assert _answer(desired.role_name_problem, name) == _answer(_role_name_problem_reference, name)


_HEAD = "version: 1\nca: {subject: {CN: x}}\n"  # lines 1-2


def _problems(text: str) -> list[str]:
    with pytest.raises(DesiredStateError) as caught:
        desired.parse_desired(text)
    return caught.value.problems


def test_a_repeated_bad_value_is_reported_for_every_entry() -> None:
    problems = _problems(
        _HEAD + "users:\n"  # 3
        "  - {name: a, validity: 36501d}\n"  # 4
        "  - {name: b, validity: 36501d}\n"  # 5
        "  - {name: c, key: rsa-1024}\n"  # 6
        "  - {name: d, key: rsa-1024}\n"  # 7
        "  - {name: e, hba: [{database: x, address: 10.0.0.1/8}]}\n"  # 8
        "  - {name: f, hba: [{database: x, address: 10.0.0.1/8}]}\n"  # 9
        "servers:\n"  # 10
        "  - {name: a.example.com, ip: [10.0.0.300]}\n"  # 11
        "  - {name: b.example.com, ip: [10.0.0.300]}\n"  # 12
        "  - {name: c.example.com, ip: [10.0.0.1, 10.0.0.1]}\n"  # 13
        "  - {name: d.example.com, ip: [10.0.0.1, 10.0.0.1]}\n"  # 14
    )
    lines = [int(problem.split(":")[1]) for problem in problems]
    assert lines == [4, 5, 6, 7, 8, 9, 11, 12, 13, 14], problems


def test_a_repeated_window_problem_is_reported_for_every_entry() -> None:
    problems = _problems(
        _HEAD + "users:\n"  # 3
        "  - {name: a, validity: 10d, renew_before: 10d}\n"  # 4
        "  - {name: b, validity: 10d, renew_before: 10d}\n"  # 5
        "  - {name: c, validity: 10d, renew_before: 9d}\n"  # 6
    )
    assert [int(problem.split(":")[1]) for problem in problems] == [4, 5], problems


_ENTRIES = (
    _HEAD + "defaults: {key: ed25519, validity: 90d, renew_before: 30d, subject: {C: NL, O: A}}\n"
    "users:\n"
    "  - name: a\n"
    "  - {name: b, key: rsa-3072, validity: 10d, renew_before: 20%, generation: 3}\n"
    "  - {name: c, key: rsa-3072, validity: 10d, renew_before: 20%, subject: {OU: T, O: B}}\n"
    "  - {name: d, hba: [{database: x, address: 10.0.0.0/8}, {database: y, address: all}]}\n"
    "  - {name: e, hba: [{database: x, address: 10.0.0.0/8}], generation: 2.0}\n"
    "servers:\n"
    "  - {name: a.example.com, dns: [b.example.com, a.example.com], ip: ['fd00::01', 1.2.3.4]}\n"
    "  - {name: b.example.com, ip: ['fd00::1'], validity: 48h, renew_before: 12h}\n"
)


def test_entries_get_their_values_and_the_defaults() -> None:
    days = timedelta(days=1)
    client, server = CertKind.CLIENT, CertKind.SERVER
    common = (("C", "NL"), ("O", "A"))
    month = RenewBefore(duration=30 * days)
    share = RenewBefore(share=Fraction(20, 100))
    expected = [
        LeafSpec(client, "a", KeyType.ED25519, 90 * days, month, (*common, ("CN", "a"))),
        LeafSpec(client, "b", KeyType.RSA_3072, 10 * days, share, (*common, ("CN", "b")), 3),
        LeafSpec(
            client,
            "c",
            KeyType.RSA_3072,
            10 * days,
            share,
            (("C", "NL"), ("O", "B"), ("OU", "T"), ("CN", "c")),
        ),
        LeafSpec(
            client,
            "d",
            KeyType.ED25519,
            90 * days,
            month,
            (*common, ("CN", "d")),
            hba=(HbaRule("x", "10.0.0.0/8"), HbaRule("y", "all")),
        ),
        LeafSpec(
            client,
            "e",
            KeyType.ED25519,
            90 * days,
            month,
            (*common, ("CN", "e")),
            2,
            hba=(HbaRule("x", "10.0.0.0/8"),),
        ),
        LeafSpec(
            server,
            "a.example.com",
            KeyType.ED25519,
            90 * days,
            month,
            (*common, ("CN", "a.example.com")),
            dns=("a.example.com", "b.example.com"),
            ips=("fd00::1", "1.2.3.4"),
        ),
        LeafSpec(
            server,
            "b.example.com",
            KeyType.ED25519,
            timedelta(hours=48),
            RenewBefore(duration=timedelta(hours=12)),
            (*common, ("CN", "b.example.com")),
            dns=("b.example.com",),
            ips=("fd00::1",),
        ),
    ]
    leaves = desired.parse_desired(_ENTRIES).leaves
    assert list(leaves) == expected
    assert [type(leaf.generation) for leaf in leaves] == [int] * len(leaves)


def _by_nodes(text: str) -> Any:
    """What the node path makes of text: plain values, or _Fallback where it would hand over
    to the tracked build (or a YAML error, which that path reports)."""
    try:
        root = desired._compose_checked(text, "u")
    except DesiredStateError:
        return desired._Fallback
    try:
        return desired._build_fast(root, desired._node_budget(text))
    except desired._Fallback:
        return desired._Fallback


def _by_events(text: str) -> Any:
    try:
        return desired._load_fast(text)
    except desired._Fallback:
        return desired._Fallback


_EVENT_CASES = [
    "version: 1\nca: {subject: {CN: x}}\n",
    "a: [1, 1.5, ~, yes, '1', \"2\", !!str 3, 0x1f, .inf, x]\n",
    "a: 'quoted'\nb: \"double\"\nc: plain\nd: |\n  block\ne: >\n  folded\n",
    "a: !!int '7'\nb: ! x\nc: !!map {d: e}\nd: !!seq [f]\n",
    "users:\n  - name: a\n    dns: [x.example.com]\n  - {name: b, generation: 2}\n",
    "a: 18446744073709551616\n",  # over 64 bits: handed over
    "a: 2001-12-14\n",  # a timestamp: handed over
    "a: &x 1\nb: *x\n",  # anchors and aliases: handed over
    "<<: {a: 1}\n",  # a merge key: handed over
    "a: 1\na: 2\n",  # a duplicate key: handed over
    "1: x\n",  # a key that is not text: handed over
    "? [a]\n: b\n",  # a key that is a list: handed over
    "a: !custom x\n",  # an unknown tag: handed over
    "--- a\n--- b\n",  # two documents: handed over
    "",  # no document: handed over
    "a: [\n",  # a syntax error: handed over
    "- [[[[[[[[[[]]]]]]]]]]\n",
]


@pytest.mark.parametrize("text", _EVENT_CASES)
def test_event_loader_gives_what_the_node_path_gives_or_hands_over(text: str) -> None:
    by_events = _by_events(text)
    if by_events is not desired._Fallback:
        assert by_events == _by_nodes(text)
        assert type(by_events) is type(_by_nodes(text))


def test_event_loader_hands_over_what_it_must() -> None:
    handed_over = [text for text in _EVENT_CASES if _by_events(text) is desired._Fallback]
    assert handed_over == _EVENT_CASES[5:16]


def test_event_loader_agrees_with_the_node_path_on_the_corpus_and_the_examples() -> None:
    files = [*sorted((ROOT / "tests" / "bad_users").glob("*.yaml")), ROOT / "state" / "users.yaml"]
    assert len(files) > 50
    for path in files:
        text = path.read_text("utf-8", errors="replace")
        by_events = _by_events(text)
        if by_events is not desired._Fallback:
            assert by_events == _by_nodes(text), path.name


@_FAST
@given(document=st.deferred(lambda: _near_valid()))
def test_event_loader_agrees_with_the_node_path_on_generated_documents(document: Any) -> None:
    for style in (False, True):
        text = yaml.safe_dump(document, default_flow_style=style, allow_unicode=True)
        by_events = _by_events(text)
        if by_events is not desired._Fallback:
            assert by_events == _by_nodes(text)
        elif "&" not in text:  # anchors (a list dumped twice) are handed over, and only they
            assert _by_nodes(text) is desired._Fallback
