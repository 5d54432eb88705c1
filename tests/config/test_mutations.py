"""mutations.yml's Actions, read by config/mutations.parse_actions: Capacitor's spellings, the
2024 names, defaults, and one clear error (the key's path and the reason) for each mistake."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from capacitor_trio.config.filter_errors import FilterEntryError
from capacitor_trio.config.mutations import parse_actions
from capacitor_trio.config.values import _Loader
from capacitor_trio.domain.filtering import OnError
from capacitor_trio.domain.mutate import (
    AddOrUpdate,
    Anonymize,
    ExcludeResult,
    Query,
    Remove,
    TagMapping,
)
from capacitor_trio.domain.value_template import Group, Text, Token


def actions(text: str) -> Any:
    return parse_actions(yaml.load(text, Loader=_Loader))


def error(raw: object) -> FilterEntryError:
    with pytest.raises(FilterEntryError) as info:
        parse_actions(raw)
    return info.value


def test_add_or_update_with_source_and_destination() -> None:
    (action,) = actions(
        r"""
- Type: add_or_update
  Description: Last^First -> First^Last
  Source: {Tag: '0010,0010', Expression: '^(.+)\^(.+)$'}
  Destination: {Tag: '0010,0010', Value: '$2^$1'}
  OnError: skip_action
"""
    )
    assert isinstance(action, AddOrUpdate)
    assert action.source == action.destination == 0x00100010
    assert action.expression is not None and action.expression.pattern == r"^(.+)\^(.+)$"
    assert action.value.parts == (Group(2), Text("^"), Group(1))
    assert action.on_error is OnError.SKIP_ACTION
    assert action.description == "Last^First -> First^Last"


def test_defaults_type_expression_value_and_on_error() -> None:
    (action,) = actions("- {Source: {Tag: '8,50'}, Destination: {Tag: '20,10'}}")
    assert isinstance(action, AddOrUpdate)
    assert action.expression is not None and action.expression.pattern == "^(.+)$"
    assert action.value.text == "$1"
    assert action.on_error is OnError.FAIL  # the documented default (docs/behaviour.md)


def test_without_source_the_value_is_literal_but_tokens_expand() -> None:
    (action,) = actions("- {Destination: {Tag: '0008,1010', Value: 'A$1 :today:'}}")
    assert isinstance(action, AddOrUpdate) and action.source is None and action.expression is None
    assert action.value.parts == (Text("A$1 "), Token("today"))


def test_legacy_field_names() -> None:
    add, remove = actions(
        """
- SourceTag: '0010,0020'
  Expression: '^(\\d+)$'
  DestinationTag: '0010,1000'
  DestinationValue: 'OLD$1'
- Type: remove
  Tag: '0008,0080'
"""
    )
    assert isinstance(add, AddOrUpdate)
    assert (add.source, add.destination, add.value.text) == (0x00100020, 0x00101000, "OLD$1")
    assert add.expression is not None and add.expression.pattern == r"^(\d+)$"
    assert remove == Remove(0x00080080)


def test_a_field_given_both_ways_is_an_error() -> None:
    e = error([{"Destination": {"Tag": "8,80"}, "DestinationTag": "8,81", "Type": "remove"}])
    assert e.key == "Actions[0].DestinationTag" and "given twice" in e.message


@pytest.mark.parametrize(
    ("text", "tag"),
    [("0008,0060", 0x00080060), ("8,60", 0x00080060), ("20,d", 0x0020000D),
     ("(0010,0010)", 0x00100010), ("0008,103E", 0x0008103E), ("8, 103e", 0x0008103E)],
)  # fmt: skip
def test_tag_forms(text: str, tag: int) -> None:
    assert parse_actions([{"Type": "remove", "Tag": text}]) == (Remove(tag),)


def test_remove_anonymize_query_and_exclude_result() -> None:
    remove, anonymize, query, exclude = actions(
        """
- {Type: remove, Destination: {Tag: '0008,0080'}, Description: no institution}
- {Type: anonymize, Destination: {Value: research.csv}}
- Type: query
  Node: RIS
  OnError: retry
  Request: [{Source: {Tag: '0010,0020'}, Destination: {Tag: '0010,0020'}}]
  Response: [{Source: {Tag: '0008,0050'}, Destination: {Tag: '0008,0050'}}]
- {Type: exclude_result}
"""
    )
    assert remove == Remove(0x00080080, "no institution")
    assert anonymize == Anonymize("research.csv")
    assert query == Query(
        "RIS", (TagMapping(0x00100020, 0x00100020),), (TagMapping(0x00080050, 0x00080050),), OnError.RETRY
    )
    assert exclude == ExcludeResult()


def test_a_yaml_number_value_keeps_its_text() -> None:
    (action,) = actions("- {Destination: {Tag: '0020,0010', Value: 0012}}")
    assert isinstance(action, AddOrUpdate) and action.value.text == "0012"


@pytest.mark.parametrize(
    ("raw", "key", "says"),
    [
        ([], "Actions", "one or more"),
        ("remove", "Actions", "list"),
        (["remove"], "Actions[0]", "mapping"),
        ([{"Type": "stamp", "Destination": {"Tag": "8,80"}}], "Actions[0].Type", "not supported yet"),
        ([{"Type": "rename"}], "Actions[0].Type", "not one of"),
        ([{"Type": "remove", "Tag": "8,80", "OnError": "fail"}], "Actions[0].OnError", "only add_or_update and query"),
        ([{"Type": "anonymize", "Destination": {"Value": "m.csv"}, "OnError": "fail"}], "Actions[0].OnError", "only"),
        ([{"Destination": {"Tag": "8,80", "Value": "x"}, "OnError": "ignore"}], "Actions[0].OnError", "not one of"),
        ([{"Destination": {"Tag": "8,80", "Value": "x"}, "OnEror": "fail"}], "Actions[0].OnEror", "unknown key"),
        ([{"Destination": {"Tag": "8,80", "Valeu": "x"}}], "Actions[0].Destination.Valeu", "unknown key"),
        ([{"Destination": {"Value": "x"}}], "Actions[0].Destination.Tag", "required"),
        ([{"Destination": {"Tag": "8,80"}}], "Actions[0].Destination.Value", "required without a Source"),
        ([{"Destination": {"Tag": "PatientName", "Value": "x"}}], "Actions[0].Destination.Tag", "not a tag"),
        ([{"Destination": {"Tag": "10010,0010", "Value": "x"}}], "Actions[0].Destination.Tag", "not a tag"),
        ([{"Destination": {"Tag": "0009,1001", "Value": "x"}}], "Actions[0].Destination.Tag", "private tag"),
        ([{"Type": "remove", "Tag": "0029,1010"}], "Actions[0].Destination.Tag", "private tag"),
        ([{"Destination": {"Tag": "0002,0013", "Value": "x"}}], "Actions[0].Destination.Tag", "file meta"),
        ([{"Destination": {"Tag": "7fe0,0010", "Value": "x"}}], "Actions[0].Destination.Tag", "VR OB"),
        ([{"Destination": {"Tag": "0008,1140", "Value": "x"}}], "Actions[0].Destination.Tag", "VR SQ"),
        ([{"Destination": {"Tag": "0008,0002", "Value": "x"}}], "Actions[0].Destination.Tag", "not in the DICOM dictionary"),
        ([{"Source": {"Tag": "8,50", "Expression": "(unclosed"}, "Destination": {"Tag": "8,50"}}],
         "Actions[0].Source.Expression", "is not valid here"),
        ([{"Source": {"Tag": "8,50", "Expression": "(?<g>.)"}, "Destination": {"Tag": "8,50"}}],
         "Actions[0].Source.Expression", "write named groups as (?P<name>...)"),
        ([{"Source": {"Tag": "8,50", "Expression": "^(.*)\\Z"}, "Destination": {"Tag": "8,50"}}],
         "Actions[0].Source.Expression", "anchors differ between .NET and Python"),
        ([{"Source": {"Tag": "8,50", "Expression": "^(.)(.)"}, "Destination": {"Tag": "8,50", "Value": "$3"}}],
         "Actions[0].Destination.Value", "group 3 but the Expression has 2"),
        ([{"Source": {"Expression": "^(.)"}, "Destination": {"Tag": "8,50", "Value": "x"}}],
         "Actions[0].Source.Tag", "without a Tag"),
        ([{"Destination": {"Tag": "8,50", "Value": ":hash(0010,0020):"}}], "Actions[0].Destination.Value", ":hash("),
        ([{"Destination": {"Tag": "8,50", "Value": ":hash(10,20,53):"}}], "Actions[0].Destination.Value", "1 to 52"),
        ([{"Destination": {"Tag": "8,50", "Value": True}}], "Actions[0].Destination.Value", "must be text"),
        ([{"Type": "remove"}], "Actions[0].Destination.Tag", "required"),
        ([{"Destination": {"Tag": "8,50", "Value": None}}], "Actions[0].Destination.Value", "is empty"),
        ([{"Type": None, "Tag": "8,50"}], "Actions[0].Type", "is empty"),
        ([{"Type": "remove", "Tag": "8,50", "Destination": {"Tag": "8,51"}}], "Actions[0].Tag", "given twice"),
        ([{"Type": "remove", "Destination": {"Tag": "8,50", "Value": "x"}}], "Actions[0].Destination.Value", "remove takes no"),
        ([{"Type": "anonymize"}], "Actions[0].Destination.Value", "mapping file"),
        ([{"Type": "anonymize", "Destination": {"Value": " "}}], "Actions[0].Destination.Value", "mapping file"),
        ([{"Type": "anonymize", "Destination": {"Tag": "8,50", "Value": "m.csv"}}], "Actions[0].Destination.Tag", "takes no"),
        ([{"Type": "query"}], "Actions[0].Node", "required"),
        ([{"Type": "query", "Node": "RIS", "Request": [{"Source": {"Tag": "8,50"}}]}], "Actions[0].Request[0]", "must be"),
        ([{"Type": "exclude_result", "Tag": "8,50"}], "Actions[0].Destination.Tag", "takes no"),
        ([{"Type": "remove", "Tag": "8,50"}, {"Type": "remove", "Tag": "x"}], "Actions[1].Destination.Tag", "not a tag"),
    ],
)  # fmt: skip
def test_each_mistake_names_its_key(raw: object, key: str, says: str) -> None:
    e = error(raw)
    assert e.key == key
    assert re.search(re.escape(says), e.message), e.message
    assert str(e).startswith(f"{key}: ")


def test_the_documented_examples_load() -> None:
    root = Path(__file__).parents[2]
    blocks = [
        block
        for doc in ("README.md", "docs/configuration.md")
        for block in re.findall(r"```yaml\n(.*?)```", (root / doc).read_text(), re.S)
        if "Actions:" in block and "Type: anonymize" in block
    ]
    assert len(blocks) == 2
    for block in blocks:
        for entry in yaml.load(block, Loader=_Loader):
            assert parse_actions(entry["Actions"])


def test_an_empty_description_is_none_given() -> None:
    assert parse_actions([{"Type": "remove", "Tag": "8,50", "Description": None}]) == (Remove(0x00080050),)
