"""Several RSA keys are generated in worker processes; each spec still gets a key of its own
type, in order, and the certificates issued with them verify."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support import KEY_PASSPHRASE, at, cert, run, users_yaml

from reconciler import pki
from reconciler.apply import RSA_IN_PARALLEL, _new_keys
from reconciler.model import CertKind, KeyType, LeafSpec, RenewBefore


def spec(name: str, key: KeyType) -> LeafSpec:
    return LeafSpec(
        kind=CertKind.CLIENT,
        name=name,
        key=key,
        validity=timedelta(days=1),
        renew_before=RenewBefore(),
        subject=(("CN", name),),
    )


def test_worker_keys_come_back_in_order_and_of_the_right_type() -> None:
    kinds = [
        KeyType.RSA_2048,
        KeyType.ECDSA_P256,
        KeyType.RSA_2048,
        KeyType.ED25519,
        KeyType.RSA_3072,
    ]
    assert sum(k.is_rsa for k in kinds) >= RSA_IN_PARALLEL
    keys = list(_new_keys([spec(f"u{i}", k) for i, k in enumerate(kinds)]))
    assert isinstance(keys[0], rsa.RSAPrivateKey)
    assert keys[0].key_size == 2048
    assert isinstance(keys[1], ec.EllipticCurvePrivateKey)
    assert isinstance(keys[3], ed25519.Ed25519PrivateKey)
    assert isinstance(keys[4], rsa.RSAPrivateKey)
    assert keys[4].key_size == 3072
    assert len({pki.describe_key(k.public_key()) for k in keys}) == 4


def test_an_apply_issuing_several_rsa_keys_writes_matching_pairs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    users = "".join(f"  - name: u{i}\n" for i in range(3))
    (state / "users.yaml").write_text(users_yaml(users, key="rsa-2048"))
    assert run(state, "apply", "--no-commit", now=at("2027-01-01T00:00:00Z")).code == 0
    for i in range(3):
        key = pki.decrypt_key((state / f"clients/u{i}.key").read_bytes(), KEY_PASSPHRASE.encode())
        assert pki.same_public_key(key.public_key(), cert(state / f"clients/u{i}.crt").public_key())
