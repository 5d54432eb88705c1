"""The error a filter file's entry raises when it cannot be read.

The parsers of one entry (route, mutate, sort and the mutate actions) raise `FilterEntryError`
with the path of the faulty key inside the entry (e.g. "Actions[2].OnError"); the filter file
loader (config/filters.py) adds the file, the entry's index and its Description, and turns it into
the one-line ConfigError the operator sees.
"""

from __future__ import annotations


class FilterEntryError(ValueError):
    """A key of one filter entry is invalid: `key` is its path inside the entry (e.g.
    "Conditions[0].Tag", "Actions[2].OnError"), `message` says why, without patient data."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
