"""Writing a whole nodes.yml from Node values, for tests that set up a data directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from capacitor_trio.config.load import node_to_yaml
from capacitor_trio.config.models import Node
from capacitor_trio.config.nodes_file import replace_file


def write_nodes(path: Path, nodes: Sequence[Node]) -> None:
    replace_file(path, yaml.safe_dump([node_to_yaml(n) for n in nodes], sort_keys=False))
