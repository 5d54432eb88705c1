"""Editing nodes.yml in place: one node changed, everything else in the file kept as it is on disk.

The operator owns nodes.yml. An edit through the API therefore reads the file as it is now, not
as it was at start-up, changes the keys of one node entry, and writes the file back with its
comments, key order, spellings and the nodes added by hand since start-up untouched
(ruamel.yaml's round-trip mode). Validation uses the loader's own reading (`config.load`, YAML 1.1
as pyyaml reads it), so what the edit accepts is exactly what a restart would load.

An edit is refused with `NodesFileConflict` when the file no longer parses, or when its entry for
the node no longer matches the node that is running (the operator changed it by hand since it was
loaded): overwriting either would silently discard the operator's work.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from capacitor_trio.config.load import (
    DEFAULT_PREFIX,
    NODE_KEY_ALIASES,
    NODE_KEYS,
    ConfigError,
    check_node_set,
    load_nodes,
    parse_node,
    parse_yaml,
)
from capacitor_trio.config.models import Node

#: Node attribute -> its nodes.yml key
YAML_KEYS = {attr: key for key, (attr, _check) in NODE_KEYS.items()}


class NodesFileConflict(Exception):
    """nodes.yml on disk cannot take the edit; str() is one line for the operator."""


@attrs.frozen
class PlannedEdit:
    """An edit of nodes.yml, validated and not yet written."""

    path: Path
    text: str
    node: Node  #: the edited node, as a restart would load it
    nodes: tuple[Node, ...]  #: every node in the file after the edit

    def write(self) -> None:
        replace_file(self.path, self.text)


def plan_edit(path: Path, running: Node, changes: Mapping[str, Any], *, prefix: str = DEFAULT_PREFIX) -> PlannedEdit:
    """Apply `changes` (Node attribute -> value, e.g. `host_name`; None removes the key, so the
    node inherits the global value) to `running`'s entry in the file at `path` as it is now. `prefix` is
    aeTitlePrefix, for the check that every called AE names one Storage node.

    Raises NodesFileConflict (see the module's docstring), or ConfigError when the edited node
    or the node set would be invalid. Nothing is written until `PlannedEdit.write`.
    """
    on_disk = _load_checked(path, prefix)
    index = _index_of(on_disk, running)
    if on_disk[index] != running:
        raise NodesFileConflict(
            f"{path.name}: node {running.ae_title} was changed in the file since it was loaded; "
            "reload the configuration first"
        )
    rt = _round_trip()
    document = rt.load(path.read_text(encoding="utf-8"))
    entry = document[index]
    for attr, value in changes.items():
        _set_key(entry, YAML_KEYS[attr], value)
    out = io.StringIO()
    rt.dump(document, out)
    nodes = parse_nodes_text(out.getvalue(), "request body", prefix=prefix, edited=index)
    return PlannedEdit(path, out.getvalue(), nodes[index], nodes)


def _load_checked(path: Path, prefix: str) -> tuple[Node, ...]:
    try:
        return load_nodes(path, [], prefix=prefix)
    except ConfigError as exc:
        raise NodesFileConflict(f"{path.name} no longer loads ({exc}); fix it before editing nodes") from None


def _index_of(nodes: tuple[Node, ...], running: Node) -> int:
    for i, node in enumerate(nodes):
        if node.key == running.key:
            return i
    raise NodesFileConflict(
        f"nodes.yml: node {running.ae_title} ({running.role}) is no longer in the file; "
        "reload the configuration first"
    )


def parse_nodes_text(text: str, source: str, *, prefix: str, edited: int) -> tuple[Node, ...]:
    """The nodes a restart would load from `text` (the loader's reading), checked as a set; a
    clash is reported on node `edited` (the one being changed)."""
    raw = parse_yaml(text, source)
    nodes = tuple(parse_node(entry, source, i) for i, entry in enumerate(raw or ()))
    check_node_set(nodes, source, prefix=prefix, edited=nodes[edited])
    return nodes


def _round_trip() -> YAML:
    rt = YAML()  # round-trip: comments, order and quoting survive
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=2, offset=0)
    rt.width = 4096
    return rt


def _set_key(entry: Any, key: str, value: Any) -> None:
    """Set or remove one key, under the spelling the entry already uses for it."""
    spelling = next((k for k in entry if NODE_KEY_ALIASES.get(k, k) == key), key)
    if value is None:
        entry.pop(spelling, None)
    else:
        entry[spelling] = _as_written(value)


def _as_written(value: Any) -> Any:
    """Quote a string that the loader (YAML 1.1) would otherwise read as another type, such as
    `yes`, `on` or `012`."""
    if isinstance(value, list):
        return [_as_written(v) for v in value]
    if isinstance(value, str) and not _reads_as_str(value):
        return DoubleQuotedScalarString(value)
    return value


def _reads_as_str(text: str) -> bool:
    try:
        value = parse_yaml(text, "value")
    except ConfigError:
        return False
    return isinstance(value, str) and value == text


def replace_file(path: Path, text: str) -> None:
    """Replace `path` atomically (temp file, fsync, rename, fsync of the directory), keeping the
    file's permission bits."""
    mode = 0o600
    with contextlib.suppress(FileNotFoundError):
        mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
