"""The configuration in force as the operator wrote it: config.yml's keys (Capacitor's spelling)
with their values in force, secrets redacted, and the text of nodes.yml and of the filter files
in the data directory (read-only views for the dashboard's Settings page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from capacitor_trio.config.keys import FILTER_FILES, GLOBAL_KEYS
from capacitor_trio.config.load import shown_value
from capacitor_trio.config.models import Config

#: the most of a file shown (bytes); a longer one is cut with a note
MAX_SHOWN = 256 * 1024


def effective_config(config: Config) -> dict[str, Any]:
    """Every config.yml key and its value in force (nested keys dotted), a secret redacted when
    set (`config.load.shown_value`, as check-config shows it), paths and other values as plain
    JSON values."""
    out: dict[str, Any] = {}
    for key in GLOBAL_KEYS:
        value: Any = config
        for part in key.field.split("."):
            value = getattr(value, part)
        out[key.name] = _plain(shown_value(key.name, value))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple | frozenset | set):
        return [_plain(v) for v in value]
    if attrs.has(type(value)):
        return {k: _plain(v) for k, v in attrs.asdict(value, recurse=False).items()}
    return str(value)


def read_shown(path: Path) -> str | None:
    """A file's text for showing (None if it does not exist or cannot be read), at most
    `MAX_SHOWN` bytes. Blocking: call in a worker thread."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SHOWN + 1)
    except OSError:
        return None
    text = data[:MAX_SHOWN].decode("utf-8", "replace")
    return text + "\n# … cut: longer than 256 KiB\n" if len(data) > MAX_SHOWN else text


def settings_files(data_dir: Path) -> tuple[str | None, list[tuple[str, str | None]]]:
    """nodes.yml's text and (name, text) of each filter file present in `data_dir`. Blocking."""
    filters = [(name, read_shown(data_dir / name)) for name in FILTER_FILES if (data_dir / name).exists()]
    return read_shown(data_dir / "nodes.yml"), filters
