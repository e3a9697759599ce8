"""The benchmark's sizes are data (``bench/profiles.toml``): every profile loads, and a
table the ``Profile`` class does not describe is refused with the field's name."""

from __future__ import annotations

import dataclasses

import pytest

from bench.profiles import PROFILES, PROFILES_FILE, Profile, load_profiles


def test_the_shipped_file_holds_the_three_profiles_each_complete() -> None:
    assert sorted(PROFILES) == ["full", "quick", "smoke"]
    assert load_profiles(PROFILES_FILE.read_text()) == PROFILES
    for name, profile in PROFILES.items():
        assert profile.name == name
        assert isinstance(profile.backlog_sizes, tuple)
        assert all(isinstance(getattr(profile, f.name), int | float | tuple | str)
                   for f in dataclasses.fields(Profile))
    assert PROFILES["smoke"].ingest_records < PROFILES["quick"].ingest_records


def _table(**changes: object) -> str:
    fields = {f.name: getattr(PROFILES["smoke"], f.name) for f in dataclasses.fields(Profile)}
    del fields["name"]
    fields.update(changes)
    lines = ["[p]"]
    for key, value in fields.items():
        if value is None:
            continue
        shown = list(value) if isinstance(value, tuple) else value
        text = str(shown).lower() if isinstance(shown, bool) else repr(shown)
        lines.append(f"{key} = {text}".replace("'", '"'))
    return "\n".join(lines)


def test_a_complete_table_loads_with_lists_as_tuples() -> None:
    loaded = load_profiles(_table())["p"]
    assert dataclasses.replace(loaded, name="smoke") == PROFILES["smoke"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"ingest_recrods": 5}, "unknown field 'ingest_recrods'"),
    ({"name": "x"}, "unknown field 'name'"),
    ({"ingest_records": None}, "ingest_records"),
    ({"ingest_records": 1.5}, "ingest_records = 1.5 is not of type int"),
    ({"ingest_records": "many"}, "ingest_records = 'many' is not of type int"),
    ({"backlog_sizes": [1, "x"]}, "backlog_sizes"),
    ({"latency_rate": True}, "latency_rate = True is not of type float"),
])
def test_a_table_the_profile_does_not_describe_is_refused_by_field(
    changes: dict[str, object], message: str,
) -> None:
    with pytest.raises(ValueError, match="profile 'p'") as caught:
        load_profiles(_table(**changes))
    assert message in str(caught.value)
