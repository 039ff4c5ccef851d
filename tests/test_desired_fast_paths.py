"""What this file proves about the shortcuts reconciler.desired takes for valid files.

Each shortcut is checked against the general code it stands in for, on the inputs where they
could part ways:

1. The loader's tag resolution gives every scalar, mapping and list the tag PyYAML's own
   resolver gives it.
2. Parsing leaves the garbage collector as it found it, also when the file is refused.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import desired
from reconciler.errors import DesiredStateError

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
