"""model.quick_init: the faster __init__ of the values made once per certificate must build
exactly what the dataclass's own __init__ builds, and leave them frozen."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime
from typing import Any

import pytest

from reconciler import model
from reconciler.model import (
    Action,
    ActionKind,
    CertKind,
    CertStatus,
    LedgerEntry,
    Revocation,
    RevocationReason,
    quick_init,
)

NOW = datetime(2027, 1, 1, tzinfo=UTC)
QUICK = [
    model.LeafSpec,
    model.CertFacts,
    model.KeyFacts,
    model.ObservedLeaf,
    model.LedgerEntry,
    model.Revocation,
    model.Action,
]


def _reference(cls: type[Any]) -> type[Any]:
    """The same fields as a plain frozen dataclass, built by dataclasses' own __init__."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default))
        if f.default is not dataclasses.MISSING
        else (f.name, f.type)
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass(f"Reference{cls.__name__}", fields, frozen=True, slots=True)


@pytest.mark.parametrize("cls", QUICK, ids=lambda cls: cls.__name__)
def test_every_field_is_set_from_arguments_keywords_and_defaults(cls: type[Any]) -> None:
    fields = dataclasses.fields(cls)
    reference = _reference(cls)
    required = [f for f in fields if f.default is dataclasses.MISSING]
    values = {f.name: object() for f in required}  # distinct markers: a swap would show
    others = {f.name: object() for f in fields if f not in required}
    for built, expected in [
        (cls(**values), reference(**values)),
        (cls(*values.values()), reference(*values.values())),
        (cls(**values, **others), reference(**values, **others)),
        (cls(*values.values(), *others.values()), reference(**values, **others)),
    ]:
        for f in fields:
            assert getattr(built, f.name) is getattr(expected, f.name), f.name
    with pytest.raises(TypeError):
        cls()  # required arguments stay required
    with pytest.raises(TypeError):
        cls(**values, no_such_field=1)


@pytest.mark.parametrize("cls", QUICK, ids=lambda cls: cls.__name__)
def test_instances_stay_frozen(cls: type[Any]) -> None:
    required = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    instance = cls(**{f.name: f.name for f in required})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(instance, required[0].name, "changed")


def test_equality_hashing_replace_and_pickle_work_as_before() -> None:
    entry = LedgerEntry(
        serial=7,
        kind=CertKind.CLIENT,
        name="alice",
        not_before=NOW,
        not_after=NOW,
        key="ecdsa-p256",
        spec="s",
        generation=1,
        fingerprint="f",
        key_sha256="k",
        subject=(("CN", "alice"),),
    )
    revoked = dataclasses.replace(entry, status=CertStatus.REVOKED)
    assert revoked.status is CertStatus.REVOKED
    assert revoked.name == "alice"
    assert entry.status is CertStatus.VALID
    assert pickle.loads(pickle.dumps(entry)) == entry  # noqa: S301 -- our own bytes
    revocation = Revocation(7, NOW, RevocationReason.SUPERSEDED)
    assert {revocation, Revocation(7, NOW, RevocationReason.SUPERSEDED)} == {revocation}
    action = Action(kind=ActionKind.NOOP, subject="client/alice", revoke=(revocation,))
    assert action == Action(ActionKind.NOOP, "client/alice", revoke=(revocation,))
    assert action != dataclasses.replace(action, subject="client/bob")


def test_classes_it_cannot_build_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True)
    class WithPostInit:
        value: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class WithoutSlots:
        value: int

    for cls in (WithFactory, WithPostInit, WithoutSlots):
        with pytest.raises(TypeError, match="quick_init cannot build"):
            quick_init(cls)
