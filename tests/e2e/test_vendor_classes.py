"""End to end with the router as a subprocess: instances of private and unknown SOP classes (a
Siemens CSA Non-Image object, a made-up class) are received, stored and delivered byte-identical;
the contexts the router refuses are named in its log with their reasons."""

from __future__ import annotations

import gc
import signal
from pathlib import Path

import pytest
import trio
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from tests.helpers.datasets import CSA_NON_IMAGE, MADE_UP, vendor_instances
from tests.helpers.peers import (
    PynetdicomDestination,
    RouterProcess,
    dataset_bytes,
    free_port,
    path_uid,
)

# pynetdicom leaves a socket behind when an association goes away under it
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
REJECTED = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage, in rejectAbstractSyntaxes here


def send(port: int, files: list[Path]) -> list[int]:
    """Send `files` with pynetdicom, proposing their classes, a Q/R FIND context and a storage
    class the router refuses; their statuses."""
    ae = AE(ae_title="MRI")
    for uid in (CSA_NON_IMAGE, MADE_UP, PATIENT_ROOT_FIND, REJECTED):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PYDEST")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(f).Status for f in files]
    finally:
        assoc.release()


async def test_vendor_classes_go_through_the_router_byte_identical(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the destination takes any SOP class, as a PACS configured for vendor objects does
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", True)
    pydest = PynetdicomDestination("PYDEST")
    py_port = pydest.start()
    data = tmp_path / "data"
    data.mkdir()
    scp_port = free_port()
    (data / "config.yml").write_text(
        f"myAeTitle: ROUTER\nscpPort: {scp_port}\nminimumAge: 0\nstorageInterval: 0\n"
        f"rejectAbstractSyntaxes: ['{REJECTED}']\napi:\n  enabled: false\n"
    )
    (data / "nodes.yml").write_text(f"- AeTitle: PYDEST\n  Port: {py_port}\n")
    router = RouterProcess(data)
    try:
        await router.start(nursery)
        files = vendor_instances(tmp_path / "in")
        assert await trio.to_thread.run_sync(send, scp_port, files) == [0, 0]
        with trio.fail_after(60):
            await pydest.count.wait_for(len(files))
        for f in files:
            assert pydest.received[path_uid(f)] == dataset_bytes(f)
        line = await router.wait_for_line(lambda s: "presentation contexts refused" in s)
        assert "2 of 4 presentation contexts refused" in line
        assert f"{PATIENT_ROOT_FIND} " in line and "(non-storage service not provided)" in line
        assert f"{REJECTED} MR Image Storage (rejectAbstractSyntaxes)" in line
        assert CSA_NON_IMAGE not in line and MADE_UP not in line
        router.signal(signal.SIGTERM)
        assert await router.wait() == 0
    finally:
        pydest.stop()
        await router.aclose()
        gc.collect()  # surface pynetdicom's leaked socket here, where the filter above applies
