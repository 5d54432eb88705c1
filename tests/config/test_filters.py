"""issue 21: the filter files read into the chain: every key of routings.yml and sortings.yml,
the entry level of mutations.yml, conditions in Capacitor's spellings (and the legacy ones), a
missing file (filter off, one warning), an invalid one (one line: file, entry, key; exit 2)."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from capacitor_trio.config import ConfigError, load_settings
from capacitor_trio.config.filters import load_filters
from capacitor_trio.domain.conditions import PatternKind
from capacitor_trio.domain.filters import (
    ChainContext,
    MutateFilter,
    RouteFilter,
    SortFilter,
    describe,
    run_chain,
)
from capacitor_trio.domain.route import Placeholder, RouteActionType
from capacitor_trio.domain.sort import SortDirection, SortType
from tests.config.test_load import run_cli, write

ROUTINGS = """\
# CT dose reports also to the dose registry; scouts never reach the archive
- Description: dose reports
  Conditions:
    - Tag: 0008,0060
      MatchExpression: SR
    - Tag: 0002,0002
      MatchExpression: ^1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.88\\.67$
  Actions:
    - Type: add_destination
      Target: DOSE
      Log: info
- Description: no scouts in the archive
  AeTitles: [ARCHIVE]
  Conditions:
    - Tag: 8,103e
      MatchExpression: (?i)scout|localizer
  Actions:
    - Type: drop
- Description: research copy
  Conditions:
    - Tag: 0040,0100
      SequenceItems:
        - Tag: 0040,0002
          MatchExpression: ^2024.*$
    - MatchTag: 0009,0010
      PrivateTagCreator: SIEMENS CT VA0  COAD
      Expression: ^.*$
      Search: yes
  Actions:
    - Type: save_file
      Target: research/#{10,20}/#{8,20:0000-00}/
      RemoveOriginal: true
      Description: a copy on disk
"""

SORTINGS = """\
- Description: slices in order
  AeTitles: [VIEWER]
  Conditions:
    - Tag: 8,60
      MatchExpression: CT
  Actions:
    - SortTag: 0020,0013
      SortType: integer
      SortDirection: desc
    - Type: sort
      SortTag: 8,103e
      SortType: string
      SortDirection: asc
"""

MUTATIONS = """\
- Description: station name
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,1010
      MatchExpression: NO
  Actions:
    - Type: remove
      Destination:
        Tag: 0008,1010
- Description: worklist only
  Affects: [worklist_query]
  Actions:
    - Type: remove
      Destination:
        Tag: 0008,1010
"""

NODES = "- AeTitle: PACS\n- AeTitle: DOSE\n- AeTitle: ARCHIVE\n- AeTitle: VIEWER\n"


def files(d: Path, **contents: str) -> Path:
    for name, text in contents.items():
        (d / f"{name}.yml").write_text(text)
    return d


def test_routings_every_key(tmp_path: Path) -> None:
    chain = load_filters(files(tmp_path, routings=ROUTINGS), ("route",))
    (step,) = chain.filters
    assert isinstance(step, RouteFilter) and step.file == tmp_path / "routings.yml"
    dose, scouts, research = step.entries
    assert dose.description == "dose reports" and dose.ae_titles == ()
    assert [c.tag for c in dose.conditions] == [0x00080060, 0x00020002]
    assert dose.conditions[0].pattern is not None and dose.conditions[0].pattern.kind is PatternKind.LITERAL
    assert dose.actions[0].type is RouteActionType.ADD_DESTINATION and dose.actions[0].target == "DOSE"
    assert dose.actions[0].log_level == logging.INFO
    assert scouts.ae_titles == ("ARCHIVE",) and scouts.actions[0].type is RouteActionType.DROP
    assert scouts.actions[0].removes
    seq, private = research.conditions
    assert seq.tag == 0x00400100 and seq.sequence_items[0].tag == 0x00400002
    assert private.tag == 0x00090010 and private.private_creator == "SIEMENS CT VA0  COAD" and private.search
    save = research.actions[0]
    assert save.type is RouteActionType.SAVE_FILE and save.remove_original and save.log_level == logging.DEBUG
    assert save.template is not None
    assert save.template.parts[0] == f"{tmp_path}/research/"  # a relative Target is in the data directory
    assert save.template.parts[3] == Placeholder(0x00080020, "0000-00")


def test_sortings_and_mutations_entry_level(tmp_path: Path) -> None:
    chain = load_filters(files(tmp_path, sortings=SORTINGS, mutations=MUTATIONS), ("mutate", "sort"))
    mutate, sort = chain.filters
    assert isinstance(mutate, MutateFilter) and isinstance(sort, SortFilter)
    station, worklist = mutate.entries
    assert station.ae_titles == ("PACS",) and station.affects == ("storage",)
    assert station.conditions[0].pattern is not None and station.conditions[0].pattern.text == "NO"  # not YAML's false
    assert worklist.affects == ("worklist_query",) and not worklist.applies_to("PACS")
    (entry,) = sort.entries
    assert entry.ae_titles == ("VIEWER",)
    assert [(a.tag, a.type, a.direction) for a in entry.actions] == [
        (0x00200013, SortType.INTEGER, SortDirection.DESC),
        (0x0008103E, SortType.STRING, SortDirection.ASC),
    ]


def test_missing_file_turns_the_filter_off_with_one_warning(tmp_path: Path) -> None:
    write(tmp_path, "filters: route, mutate, sort\n", NODES)
    files(tmp_path, sortings=SORTINGS)
    s = load_settings(tmp_path, environ={})
    chain = s.config.filter_chain
    assert chain.names == ("route", "mutate", "sort") and chain.off == ("route", "mutate")
    assert [f.name for f in chain.filters] == ["sort"]
    off = [w for w in s.warnings if "filter is off" in w]
    assert len(off) == 2 and "routings.yml does not exist: the route filter is off" in off[0]


def test_unused_file_is_named(tmp_path: Path) -> None:
    write(tmp_path, "filters: sort\n", NODES)
    files(tmp_path, sortings=SORTINGS, routings=ROUTINGS, lua="[]\n")
    s = load_settings(tmp_path, environ={})
    unused = [w for w in s.warnings if "not used" in w]
    assert len(unused) == 2 and any("routings.yml" in w for w in unused) and any("lua.yml" in w for w in unused)


def test_ae_titles_naming_no_storage_node_warn(tmp_path: Path) -> None:
    write(tmp_path, "filters: route\n", "- AeTitle: PACS\n- AeTitle: DOSE\n- AeTitle: ARCHVE\n  NodeRole: QueryRetrieve\n")
    files(tmp_path, routings="- Description: typo\n  AeTitles: [PACS, ARCHIVE]\n  Actions:\n    - Type: drop\n")
    s = load_settings(tmp_path, environ={})
    (line,) = [w for w in s.warnings if "AeTitles" in w]
    assert line == (
        f"{tmp_path / 'routings.yml'}: entry 1 (typo): AeTitles names ARCHIVE, which no Storage node of "
        "nodes.yml has: the entry does not apply to it"
    )


def test_condition_log_is_debug_or_else_info(tmp_path: Path) -> None:
    text = "- Conditions:\n" + "".join(f"    - Tag: 8,60\n      Log: {v}\n" for v in ("debug", "Debug", "info", "verbose")) + "  Actions:\n    - Type: drop\n"
    chain = load_filters(files(tmp_path, routings=text), ("route",))
    levels = [c.log_level for c in chain.filters[0].entries[0].conditions]
    assert levels == [logging.DEBUG, logging.DEBUG, logging.INFO, logging.INFO]


def test_empty_file_is_a_chain_with_no_entry(tmp_path: Path) -> None:
    chain = load_filters(files(tmp_path, routings=""), ("route",))
    assert chain.filters[0].entries == () and chain.off == ()


def test_the_chain_is_in_the_effective_configuration(tmp_path: Path) -> None:
    write(tmp_path, "filters: route\ndropUnfilteredInstances: true\n", NODES)
    files(tmp_path, routings=ROUTINGS)
    c = load_settings(tmp_path, environ={}).config
    assert c.filter_chain.drop_unfiltered and [f.name for f in c.filter_chain.filters] == ["route"]


# ---- invalid files: one line naming the file, the entry and the key ----

BAD_FILES = [
    ("routings", "- Actions: []\n", "entry 1: Actions", "one or more"),
    ("routings", "- Description: x\n", "entry 1 (x): Actions", "required"),
    ("routings", "- Description: x\n  Actions:\n    - Type: copy\n", "entry 1 (x): Actions[0].Type", "'copy' is not one of"),
    ("routings", "- Actions:\n    - Type: add_destination\n", "Actions[0].Target", "needs a Target"),
    ("routings", "- Actions:\n    - Target: NOWHERE\n", "Actions[0].Target = 'NOWHERE'", "names no Storage node"),
    ("routings", "- Actions:\n    - Type: save_file\n      Target: /x/#{PatientID}\n", "Actions[0].Target", "not a tag"),
    ("routings", "- Actions:\n    - Type: drop\n      RemoveOriginal: maybe\n", "Actions[0].RemoveOriginal", "true or false"),
    ("routings", "- Actions:\n    - Type: drop\n      Log: verbose\n", "Actions[0].Log", "debug or info"),
    ("routings", "- Actions:\n    - Type: drop\n      Targte: x\n", "Actions[0].Targte", "unknown key"),
    ("routings", "- Descripton: typo\n  Actions:\n    - Type: drop\n", "entry 1: Descripton", "unknown key"),
    ("routings", "- AeTitles: [WAY_TOO_LONG_AE_TITLE_X]\n  Actions:\n    - Type: drop\n", "AeTitles[0]", "at most 16"),
    ("routings", "- Conditions:\n    - MatchExpression: CT\n  Actions:\n    - Type: drop\n", "Conditions[0].Tag", "required"),
    ("routings", "- Conditions:\n    - Tag: Modality\n  Actions:\n    - Type: drop\n", "Conditions[0].Tag", "not a tag"),
    ("routings", "- Conditions:\n    - Tag: 8,60\n      MatchExpression: (?<m>CT)\n  Actions:\n    - Type: drop\n", "Conditions[0].MatchExpression", "named groups"),
    ("routings", "- Conditions:\n    - Tag: 8,60\n      MatchTag: 8,60\n  Actions:\n    - Type: drop\n", "Conditions[0].MatchTag", "old name of Tag"),
    ("routings", "- Conditions:\n    - Tag: 40,100\n      Search: true\n      SequenceItems:\n        - Tag: 40,2\n  Actions:\n    - Type: drop\n", "Conditions[0]", "Search and SequenceItems"),
    ("routings", "- Conditions:\n    - Tag: 40,100\n      SequenceItems:\n        - Tag: 40,2\n          MatchExpression: '[unclosed'\n  Actions:\n    - Type: drop\n", "Conditions[0].SequenceItems[0].MatchExpression", "not valid"),
    ("routings", "- Conditions:\n    - Tag: 8,60\n      PrivateTagCreator: X\n  Actions:\n    - Type: drop\n", "Conditions[0]", "odd"),
    ("routings", "Tag: 8,60\n", "routings.yml: file", "list of entries"),
    ("routings", "- [unclosed\n", "routings.yml: line", "invalid YAML"),
    ("routings", "- just text\n", "entry 1: entry", "must be a mapping"),
    ("sortings", "- Actions:\n    - SortTag: 20,13\n      SortType: Integer\n      SortDirection: asc\n", "Actions[0].SortType", "lowercase"),
    ("sortings", "- Actions:\n    - SortTag: 20,13\n      SortType: integer\n", "Actions[0].SortDirection", "required"),
    ("sortings", "- Actions:\n    - SortType: integer\n      SortDirection: asc\n", "Actions[0].SortTag", "must be a tag"),
    ("mutations", "- Affects: [everything]\n  Actions:\n    - Type: remove\n      Destination:\n        Tag: 8,1010\n", "Affects[0]", "'everything' is not one of"),
    ("mutations", "- Description: m\n", "entry 1 (m): Actions", "required"),
    ("mutations", "- Actions:\n    - Type: query\n      Node: MWL\n", "Actions[0].Type", "not supported yet in the storage phase"),
    ("mutations", "- Affects: [worklist_query]\n  Actions:\n    - Type: query\n      Node: MWL\n", "Actions[0].Type", "not allowed in a mutation of the query phases"),
    ("mutations", "- Actions:\n    - Type: exclude_result\n", "Actions[0].Type", "query results only"),
    ("mutations", "- Actions:\n    - Type: stamp\n      Destination:\n        Tag: 8,1010\n", "entry 1: Actions[0].Type", "stamp"),
]


@pytest.mark.parametrize(("name", "text", "where", "why"), BAD_FILES)
def test_invalid_file_is_one_config_error(tmp_path: Path, name: str, text: str, where: str, why: str) -> None:
    write(tmp_path, f"filters: {dict(routings='route', sortings='sort', mutations='mutate')[name]}\n", NODES)
    files(tmp_path, **{name: text})
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, environ={})
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(str(tmp_path / f"{name}.yml")), line
    assert where in line and why in line, line


def test_invalid_file_stops_start_up_exit_2(tmp_path: Path) -> None:
    write(tmp_path, "filters: mutate, route\n", NODES)
    files(tmp_path, routings="- Description: scouts\n  Actions:\n    - Type: drop\n- Description: dose\n  Actions:\n    - Type: copy\n")
    for command in ("check-config", "run"):
        r = run_cli(command, "--path", str(tmp_path), "--config.scpPort=0")
        assert r.returncode == 2, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert f"{tmp_path / 'routings.yml'}: entry 2 (dose): Actions[0].Type: 'copy' is not one of" in line, line


# ---- the documented files, loaded and run on instances ----

README_ROUTINGS = """\
- Description: no scouts in the archive
  AeTitles: [ARCHIVE]
  Conditions:
    - Tag: 0008,103E
      MatchExpression: (?i)scout|localizer
  Actions:
    - Type: drop
- Description: MR copies on disk, by patient and month
  Conditions:
    - Tag: 8,60
      MatchExpression: MR
  Actions:
    - Type: save_file
      Target: /srv/dicom/#{10,20}/#{8,20:0000-00}/
"""

README_MUTATIONS = """\
- Description: Fix what CT1 gets wrong
  Conditions:
    - {Tag: '0008,0060', MatchExpression: CT}
  Actions:
    - Source: {Tag: '0010,0010', Expression: '^(.+)\\^(.+)$'}
      Destination: {Tag: '0010,0010', Value: '$2 $1'}
      OnError: skip_action
    - Type: remove
      Destination: {Tag: '0008,0080'}
"""


class _Saved:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def save_file(self, target: Path, ds: Dataset) -> None:
        self.paths.append(target)


def _ct(description: str, number: str, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4." + number
    ds.Modality = modality
    ds.PatientName = "Doe^John"
    ds.PatientID = "P1"
    ds.StudyDate = "20240131"
    ds.InstitutionName = "General Hospital"
    ds.SeriesDescription = description
    ds.InstanceNumber = number
    return ds


def test_documented_files_run_in_the_chain(tmp_path: Path) -> None:
    files(tmp_path, routings=README_ROUTINGS, mutations=README_MUTATIONS, sortings=SORTINGS)
    chain = load_filters(tmp_path, ("route", "mutate", "sort"))
    now = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    effects = _Saved()

    axial = _ct("AXIAL", "5")
    out = run_chain(chain, axial, ChainContext("CT1", "VIEWER", now), effects)
    assert out.keep and out.failure is None
    assert str(axial.PatientName) == "John Doe" and "InstitutionName" not in axial
    assert [c.keyword for c in out.changes] == ["PatientName", "InstitutionName"]
    assert out.sort_key is not None and out.sort_key.value == "AXIAL"  # the last action: SeriesDescription

    scout = _ct("Scout AP", "1")
    out = run_chain(chain, scout, ChainContext("CT1", "ARCHIVE", now), effects)
    assert not out.keep and out.changes == ()  # dropped before mutate
    assert str(scout.PatientName) == "Doe^John"

    mr = _ct("T1", "2", modality="MR")
    out = run_chain(chain, mr, ChainContext("MR1", "PACS", now), effects)
    assert out.keep and out.changes == () and out.sort_key is None
    assert effects.paths == [Path("/srv/dicom/P1/2024-01/1.2.3.4.2.dcm")]


def test_check_config_accepts_valid_filters_and_warns_once_per_missing_file(tmp_path: Path) -> None:
    write(tmp_path, "filters: route, mutate, sort\n", NODES)
    files(tmp_path, routings=ROUTINGS, sortings=SORTINGS)
    r = run_cli("check-config", "--path", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert '"filters": [\n' in r.stdout or '"filters": ["route", "mutate", "sort"]' in r.stdout, r.stdout
    assert r.stderr.count("mutations.yml does not exist: the mutate filter is off") == 1, r.stderr


def test_describe_a_loaded_chain(tmp_path: Path) -> None:
    files(tmp_path, routings=README_ROUTINGS, mutations=README_MUTATIONS, sortings=SORTINGS)
    d = json.loads(json.dumps(describe(load_filters(tmp_path, ("route", "mutate", "sort")))))
    fix = d["files"][1]["entries"][0]
    assert fix["description"] == "Fix what CT1 gets wrong"
    assert fix["actions"][0] == {
        "type": "add_or_update", "destination": "0010,0010", "value": "$2 $1", "source": "0010,0010",
        "expression": "^(.+)\\^(.+)$", "onError": "skip_action", "description": "",
    }
    assert d["files"][0]["entries"][1]["actions"][0]["target"] == "/srv/dicom/#{10,20}/#{8,20:0000-00}/"
