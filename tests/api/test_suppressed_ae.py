"""suppressLogAeTitles with a real association through the router: a probe from HEALTHCHECK
(the default) to a called AE the router does not know leaves no line; the same from another AE
does."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from capacitor_trio.logs import setup_logging
from tests.helpers.datasets import write_corpus
from tests.helpers.peers import needs_dcmtk, storescu

from .conftest import StartRouter, free_port

pytestmark = needs_dcmtk


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_healthcheck_association_is_not_logged(
    tmp_path: Path, restore_root: None, start_router: StartRouter
) -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream=stream, suppress_calling_aes=["HEALTHCHECK"])
    r = await start_router((), scp_port=free_port())
    files = write_corpus(tmp_path / "c", 1)
    for calling in ("HEALTHCHECK", "MODALITY"):
        with pytest.raises(AssertionError):  # refused: no such called AE
            await storescu(r.router.dicom_port, "NOBODY", files, calling_ae=calling)
    await trio.sleep(0.1)
    text = stream.getvalue()
    assert "'NOBODY' not recognized (calling AE 'MODALITY')" in text
    assert "HEALTHCHECK" not in text
