"""How the index names a file: relative to the cache directory, '/'-separated, the same as
`Path.relative_to(...).as_posix()` would say, and a path outside the directory refused alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from capacitor_trio.store.fsops import relative_name


@pytest.mark.parametrize(
    ("root", "path"),
    [
        ("/srv/cache", "/srv/cache/spool/000001/a.dcm"),
        ("/srv/cache", "/srv/cache/incoming/b.part"),
        ("/", "/spool/000001/a.dcm"),
        ("/srv/cache/../cache", "/srv/cache/../cache/spool/000002/c.dcm"),
    ],
)
def test_a_file_under_the_cache_is_named_as_relative_to_names_it(root: str, path: str) -> None:
    assert relative_name(Path(root), Path(path)) == Path(path).relative_to(root).as_posix()


@pytest.mark.parametrize("path", ["/srv/cache2/spool/000001/a.dcm", "/srv/other/a.dcm", "/srv"])
def test_a_file_outside_the_cache_is_refused(path: str) -> None:
    with pytest.raises(ValueError):
        relative_name(Path("/srv/cache"), Path(path))
