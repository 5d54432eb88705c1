"""Editing one node of nodes.yml in place: the operator's comments, key order, spellings and nodes
added by hand survive; a file that no longer loads or no longer matches the running node is
refused and left as it was."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from capacitor_trio.config.load import ConfigError, load_nodes
from capacitor_trio.config.models import Node
from capacitor_trio.config.nodes_file import NodesFileConflict, plan_edit

NODES = """\
# Our PACS, behind the firewall. Ask Anna before changing the port.
- AeTitle: PACS
  HostName: 10.0.0.5   # primary
  Port: 104
  Role: Storage
  Aliases: [ARCHIVE]

# Workstation in room 3
- AeTitle: WS3
  HostName: ws3.local
  Port: 11112
  BatchSize: 50
"""


@pytest.fixture
def nodes_yml(tmp_path: Path) -> Path:
    path = tmp_path / "nodes.yml"
    path.write_text(NODES, encoding="utf-8")
    path.chmod(0o600)
    return path


def running(path: Path, ae: str) -> Node:
    return next(n for n in load_nodes(path, []) if n.ae_title == ae)


def edit_node(path: Path, node: Node, changes: dict[str, Any]) -> tuple[Node, tuple[Node, ...]]:
    planned = plan_edit(path, node, changes)
    planned.write()
    return planned.node, planned.nodes


def test_nothing_is_written_before_the_planned_edit_is(nodes_yml: Path) -> None:
    planned = plan_edit(nodes_yml, running(nodes_yml, "PACS"), {"port": 4242})
    assert nodes_yml.read_text() == NODES and planned.node.port == 4242


def test_an_edit_changes_one_key_and_keeps_comments_order_and_spelling(nodes_yml: Path) -> None:
    node, nodes = edit_node(nodes_yml, running(nodes_yml, "PACS"), {"port": 4242})
    assert node.port == 4242
    assert [n.ae_title for n in nodes] == ["PACS", "WS3"]
    text = nodes_yml.read_text()
    assert text == NODES.replace("Port: 104", "Port: 4242")
    assert stat.S_IMODE(nodes_yml.stat().st_mode) == 0o600
    assert not list(nodes_yml.parent.glob(".nodes.yml*"))


def test_none_removes_a_key_and_a_new_key_is_added_to_the_entry(nodes_yml: Path) -> None:
    node, _ = edit_node(nodes_yml, running(nodes_yml, "WS3"), {"batch_size": None, "priority": 2})
    assert node.batch_size is None and node.priority == 2
    text = nodes_yml.read_text()
    assert "BatchSize" not in text
    assert "# Workstation in room 3" in text and "# primary" in text
    assert load_nodes(nodes_yml, [])[1] == node


def test_the_legacy_role_spelling_is_edited_where_it_stands(nodes_yml: Path) -> None:
    # "Role" is the file's spelling of NodeRole: the edit must not add a second key
    edit_node(nodes_yml, running(nodes_yml, "PACS"), {"role": "Storage", "host_name": "pacs2"})
    text = nodes_yml.read_text()
    assert "NodeRole" not in text and "Role: Storage" in text and "HostName: pacs2" in text


def test_a_node_added_by_hand_since_start_up_is_kept(nodes_yml: Path) -> None:
    at_start = running(nodes_yml, "PACS")
    nodes_yml.write_text(NODES + "\n- AeTitle: NEWBIE\n  HostName: h\n  Port: 1\n")
    _, nodes = edit_node(nodes_yml, at_start, {"port": 105})
    assert [n.ae_title for n in nodes] == ["PACS", "WS3", "NEWBIE"]
    assert "NEWBIE" in nodes_yml.read_text()


def test_a_node_changed_by_hand_since_it_was_loaded_is_a_conflict(nodes_yml: Path) -> None:
    at_start = running(nodes_yml, "PACS")
    changed = NODES.replace("Port: 104", "Port: 204")
    nodes_yml.write_text(changed)
    with pytest.raises(NodesFileConflict, match="PACS was changed in the file"):
        edit_node(nodes_yml, at_start, {"host_name": "x"})
    assert nodes_yml.read_text() == changed


def test_a_node_removed_by_hand_is_a_conflict(nodes_yml: Path) -> None:
    at_start = running(nodes_yml, "WS3")
    nodes_yml.write_text(NODES.split("# Workstation")[0])
    with pytest.raises(NodesFileConflict, match=r"WS3 .* no longer in the file"):
        edit_node(nodes_yml, at_start, {"port": 1})


def test_a_file_that_no_longer_loads_is_a_conflict_and_untouched(nodes_yml: Path) -> None:
    at_start = running(nodes_yml, "PACS")
    nodes_yml.write_text(NODES + "- [unclosed\n")
    with pytest.raises(NodesFileConflict, match="no longer loads"):
        edit_node(nodes_yml, at_start, {"port": 1})
    assert nodes_yml.read_text().endswith("- [unclosed\n")


def test_an_invalid_edit_raises_config_error_and_leaves_the_file(nodes_yml: Path) -> None:
    with pytest.raises(ConfigError, match="Aliases"):
        edit_node(nodes_yml, running(nodes_yml, "WS3"), {"aliases": ["ARCHIVE"]})
    assert nodes_yml.read_text() == NODES


def test_a_string_yaml_would_read_as_another_type_stays_a_string(nodes_yml: Path) -> None:
    node, _ = edit_node(nodes_yml, running(nodes_yml, "WS3"), {"host_name": "yes", "aliases": ["ON"]})
    assert node.host_name == "yes" and node.aliases == ("ON",)
    assert load_nodes(nodes_yml, [])[1] == node


def test_numbers_are_read_as_the_loader_reads_them(tmp_path: Path) -> None:
    """An AE title or port written as digits with a leading zero is what a restart loads
    (`0123` stays 0123, not YAML 1.1's octal 83; Port 0104 is 104)."""
    path = tmp_path / "nodes.yml"
    path.write_text("- AeTitle: 0123\n  HostName: h\n  Port: 0104\n")
    node = running(path, "0123")
    assert node.port == 104
    edited, _ = edit_node(path, node, {"priority": 1, "aliases": ["0777"]})
    assert (edited.ae_title, edited.port, edited.aliases, edited.priority) == ("0123", 104, ("0777",), 1)
    assert load_nodes(path, [])[0] == edited
