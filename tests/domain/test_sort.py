"""issue 21: the sort filter's keys and order (§2.5): last action wins, a missing tag goes last
whatever the direction, string ordinal, integer with a parse failure as 0."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from capacitor_trio.domain.conditions import Condition, compile_pattern
from capacitor_trio.domain.sort import (
    SortDirection,
    SortEntry,
    SortKey,
    SortRule,
    SortType,
    order,
    rule_for,
    sort_key,
)

INSTANCE_NUMBER = 0x00200013
SERIES_DESCRIPTION = 0x0008103E
ASC_INT = SortRule(INSTANCE_NUMBER, SortType.INTEGER, SortDirection.ASC)
DESC_INT = SortRule(INSTANCE_NUMBER, SortType.INTEGER, SortDirection.DESC)
ASC_STR = SortRule(SERIES_DESCRIPTION, SortType.STRING, SortDirection.ASC)


def instance(number: str | None = None, description: str | None = None, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    if number is not None:
        ds.InstanceNumber = number
    if description is not None:
        ds.SeriesDescription = description
    return ds


def keys(rule: SortRule, datasets: list[Dataset]) -> list[SortKey]:
    return [sort_key(rule, ds) for ds in datasets]


def test_integer_keys_and_parse_failure_as_zero() -> None:
    assert sort_key(ASC_INT, instance("12")).value == 12
    assert sort_key(ASC_INT, instance(" 7 ")).value == 7
    assert sort_key(ASC_INT, instance("-3")).value == -3
    ds = Dataset()
    ds.add_new(INSTANCE_NUMBER, "LO", "abc")
    assert sort_key(ASC_INT, ds) == SortKey(ASC_INT, False, 0)
    ds.add_new(INSTANCE_NUMBER, "LO", "12.5")
    assert sort_key(ASC_INT, ds).value == 0
    ds.add_new(INSTANCE_NUMBER, "LO", "")
    assert sort_key(ASC_INT, ds) == SortKey(ASC_INT, False, 0)  # present, empty: 0, not missing
    assert sort_key(ASC_INT, instance()).missing


def test_order_ascending_descending_missing_last() -> None:
    series = [instance("3"), instance(None), instance("10"), instance("1"), instance(None), instance("2")]
    assert order(ASC_INT, keys(ASC_INT, series)) == [3, 5, 0, 2, 1, 4]
    assert order(DESC_INT, keys(DESC_INT, series)) == [2, 0, 5, 3, 1, 4]


def test_integer_is_numeric_string_is_ordinal() -> None:
    series = [instance("10"), instance("9"), instance("100")]
    assert order(ASC_INT, keys(ASC_INT, series)) == [1, 0, 2]
    str_rule = SortRule(INSTANCE_NUMBER, SortType.STRING, SortDirection.ASC)
    assert order(str_rule, keys(str_rule, series)) == [0, 2, 1]  # "10" < "100" < "9"
    named = [instance(description=d) for d in ("b", "B", "a", "A")]
    assert order(ASC_STR, keys(ASC_STR, named)) == [3, 1, 2, 0]  # case-sensitive ordinal: A B a b


def test_ties_keep_arrival_order_in_both_directions() -> None:
    series = [instance("1"), instance("2"), instance("1"), instance("2")]
    assert order(ASC_INT, keys(ASC_INT, series)) == [0, 2, 1, 3]
    assert order(DESC_INT, keys(DESC_INT, series)) == [1, 3, 0, 2]


def test_keys_of_another_rule_go_last() -> None:
    ks = [sort_key(ASC_INT, instance("5")), sort_key(ASC_STR, instance("1", "x")), sort_key(ASC_INT, instance("2"))]
    assert order(ASC_INT, ks) == [2, 0, 1]


def test_last_action_of_the_last_matching_entry_wins() -> None:
    ct_only = (Condition(0x00080060, compile_pattern("CT")),)
    entries = [
        SortEntry(0, "first", (), (), (ASC_STR, DESC_INT)),
        SortEntry(1, "ct", (), ct_only, (ASC_INT,)),
        SortEntry(2, "other destination", ("ELSEWHERE",), (), (ASC_STR,)),
    ]
    found = rule_for(entries, instance("1", modality="CT"), "PACS")
    assert found is not None and found[1] == ASC_INT and found[0].index == 1
    found = rule_for(entries, instance("1", modality="MR"), "PACS")
    assert found is not None and found[1] == DESC_INT
    found = rule_for(entries, instance("1", modality="MR"), "ELSEWHERE")
    assert found is not None and found[1] == ASC_STR
    assert rule_for(entries[1:2], instance("1", modality="MR"), "PACS") is None


@settings(deadline=None)  # builds up to 30 data sets: no wall-clock bound on a loaded machine
@given(st.lists(st.one_of(st.none(), st.integers(-1000, 1000)), max_size=30), st.sampled_from([ASC_INT, DESC_INT]))
def test_order_is_a_stable_sort_with_missing_last(numbers: list[int | None], rule: SortRule) -> None:
    series = [instance(None if n is None else str(n)) for n in numbers]
    result = order(rule, keys(rule, series))
    assert sorted(result) == list(range(len(numbers)))
    present = [i for i in result if numbers[i] is not None]
    assert result[: len(present)] == present  # every missing one after every present one
    values = [numbers[i] for i in present]
    assert values == sorted(values, reverse=rule.direction is SortDirection.DESC)  # type: ignore[type-var]
    for a, b in itertools.pairwise(present):
        if numbers[a] == numbers[b]:
            assert a < b


@given(st.sampled_from([ASC_INT, DESC_INT, ASC_STR]), st.booleans(), st.one_of(st.integers(), st.text()))
def test_key_text_round_trip(rule: SortRule, missing: bool, value: int | str) -> None:
    key = SortKey(rule, missing, value)
    assert SortKey.from_text(key.to_text()) == key
    assert "\n" not in key.to_text()


def test_key_text_refuses_other_text() -> None:
    for text in ("", "{}", "[1]", '{"tag":1,"type":"float","direction":"asc","missing":false,"value":1}'):
        with pytest.raises(ValueError):
            SortKey.from_text(text)
