"""Token strength and scope rules: what may guard the API, and what each scope allows."""

from __future__ import annotations

import secrets

import pytest

from broker.errors import InvalidInput
from broker.token_strength import check_token_strength, estimated_bits
from cloud_ingest.operators import Operator, command_scope, mint_token, parse_scopes


@pytest.mark.parametrize("token", [
    "", "changeme", "a" * 64, "ab" * 20, "password1234567890123456", "0123456789" * 3])
def test_short_or_predictable_tokens_are_refused_with_advice(token: str) -> None:
    with pytest.raises(InvalidInput, match=r"too weak.*token_urlsafe") as refused:
        check_token_strength(token)
    assert refused.value.code == "weak_token"


def test_random_tokens_pass_and_minted_ones_score_high() -> None:
    """32 random URL-safe or hex characters pass; a minted token scores ~250 bits."""
    for _ in range(200):
        check_token_strength(secrets.token_urlsafe(24))
        check_token_strength(secrets.token_hex(16))
    assert estimated_bits(mint_token()) > 200


def test_scopes_imply_what_the_table_says() -> None:
    reader = Operator("r", frozenset({"read"}))
    scaler = Operator("s", frozenset({"operate:deployment.scale"}))
    ops = Operator("o", frozenset({"operate"}))
    admin = Operator("a", frozenset({"admin"}))
    consumer = Operator("c", frozenset({"consume"}))
    scale, configure = command_scope("deployment.scale"), command_scope("bridge.configure")
    assert [reader.allows(s) for s in ("read", "consume", scale, "operate", "admin")] == [
        True, False, False, False, False]
    assert [consumer.allows(s) for s in ("read", "consume", scale, "operate", "admin")] == [
        True, True, False, False, False]
    assert not ops.allows("consume")  # commands are not a consumer's checkpoints
    assert [scaler.allows(s) for s in ("read", scale, configure, "admin")] == [
        True, True, False, False]
    assert [ops.allows(s) for s in ("read", scale, configure, "admin")] == [
        True, True, True, False]
    assert all(admin.allows(s)
               for s in ("read", "consume", scale, configure, "operate", "admin"))


def test_unknown_scopes_are_refused_listing_the_valid_ones() -> None:
    assert parse_scopes(["read", " operate:bridge.configure "]) == {
        "read", "operate:bridge.configure"}
    for bad in (["root"], [], ["operate:deployment.delete"]):
        with pytest.raises(InvalidInput, match="valid are read, consume, operate, admin"):
            parse_scopes(bad)
