"""Destination.Value templates: `$n`, `${n}`, `$$`, the tokens, and their expansion."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capacitor_trio.domain.value_template import (
    Group,
    Hash,
    Text,
    Token,
    expand,
    hash_text,
    parse_template,
)


def parts(text: str, references: bool = True) -> tuple[object, ...]:
    return parse_template(text, references=references).parts


def no_tokens(part: Token | Hash) -> str:
    raise AssertionError(part)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1", (Group(1),)),
        ("$18", (Group(1), Text("8"))),  # group 1, then "8" (one digit per `$`)
        ("${1}8", (Group(1), Text("8"))),
        ("${12}", (Group(12),)),
        ("$0", (Group(0),)),
        ("$2^$1", (Group(2), Text("^"), Group(1))),
        ("$$1", (Text("$1"),)),  # `$$` is a dollar sign
        ("a$b", (Text("a$b"),)),
        ("${x}", (Text("${x}"),)),
        ("$", (Text("$"),)),
        ("$1_:timestamp:", (Group(1), Text("_"), Token("timestamp"))),
        (":uid::today::value:", (Token("uid"), Token("today"), Token("value"))),
        ("12:30:00", (Text("12:30:00"),)),  # other `:word:` is text
        (":hash(0010,0020,8):", (Hash(0x00100020, 8),)),
        (":hash(10,20,8):", (Hash(0x00100020, 8),)),
        (":hash(0008,103E,4):", (Hash(0x0008103E, 4),)),
        ("", ()),
    ],
)
def test_parse(text: str, expected: tuple[object, ...]) -> None:
    assert parts(text) == expected


def test_without_a_source_every_dollar_is_text() -> None:
    assert parts("$1 $$ ${2} :uid:", references=False) == (Text("$1 $$ ${2} "), Token("uid"))


def test_max_group() -> None:
    assert parse_template("$2${11}$1", references=True).max_group == 11
    assert parse_template("plain", references=True).max_group == -1


@pytest.mark.parametrize("bad", [":hash(0010,0020):", ":hash(PatientID,8):", ":hash(10,20,0):", ":hash(10,20,53):"])
def test_a_malformed_hash_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="hash"):
        parse_template(bad, references=True)


def test_expand_groups_and_tokens() -> None:
    template = parse_template("$2^$1-${1}8-$3:value:", references=True)
    assert expand(template, ["Doe^John", "Doe", "John"], lambda p: "<v>") == "John^Doe-Doe8-<v>"


def test_hash_text_is_sha256_base32() -> None:
    assert hash_text("123", 12) == "UZS2IWJAIIXZ"  # stable: the same on every machine and version
    value = hash_text("123", 8)
    assert len(value) == 8 and re.fullmatch(r"[A-Z2-7]{8}", value)
    assert hash_text("123", 8) == hash_text("123", 20)[:8]
    assert hash_text("123", 8) != hash_text("124", 8)


_plain = st.text(alphabet=st.characters(blacklist_characters="$:"), max_size=30)


@given(st.lists(st.one_of(_plain, st.integers(0, 9), st.integers(10, 99)), max_size=8), st.lists(_plain, min_size=100, max_size=100))
def test_expansion_is_the_pieces_in_order(pieces: list[str | int], groups: list[str]) -> None:
    """A template written from text and group numbers (`${n}` for two digits, `$n` for one)
    expands to the same text with group n's value in place of each reference."""
    written = "".join(p if isinstance(p, str) else (f"${p}" if p < 10 else f"${{{p}}}") for p in pieces)
    expected = "".join(p if isinstance(p, str) else groups[p] for p in pieces)
    assert expand(parse_template(written, references=True), groups, no_tokens) == expected


@given(st.text(max_size=40))
def test_text_without_a_source_expands_to_itself_unless_a_token(text: str) -> None:
    template = parse_template(text, references=False)
    out = expand(template, [], lambda p: "\0")
    if "\0" not in out and "\0" not in text:
        assert out == text
