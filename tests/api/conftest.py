"""Fixtures for API tests: a running router (run_router, real HTTP on 127.0.0.1) with a real
DICOM destination (a pynetdicom storage SCP), and helpers to queue items quickly."""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from capacitor_trio.config.models import ApiConfig, Config, Node, Settings
from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.logs import RingBufferHandler
from capacitor_trio.runtime import Router, run_router
from tests.helpers.datasets import make_dataset, write_dataset
from tests.helpers.fill import bulk_insert  # noqa: F401 (the API tests import it from here)
from tests.helpers.nodes_yml import write_nodes

TOKEN = "test-token"
PASSWORD = "test-password"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StorageScp:
    """A pynetdicom storage SCP (with Verification) in its own threads: the real destination."""

    def __init__(self, ae_title: str = "PACS") -> None:
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def scp() -> Iterator[StorageScp]:
    server = StorageScp()
    yield server
    server.close()


@attrs.define
class Running:
    router: Router
    client: httpx.AsyncClient
    data_dir: Path
    ring: RingBufferHandler

    @property
    def store(self) -> Any:
        return self.router.store

    async def queue(
        self,
        n: int = 1,
        *,
        dest: str = "PACS",
        role: str = "Storage",
        state: str = "new",
        study_uid: str | None = None,
        series_uid: str | None = None,
        source: str = "MODALITY",
        modality: str = "CT",
        accession: str = "ACC001",
        patient_id: str = "PID001",
        rows: int = 8,
    ) -> list[int]:
        """Commit `n` instances (small unless `rows` says otherwise: rows x rows pixels) for one
        destination straight into the store."""
        ids: list[int] = []
        ds = make_dataset(rows=rows, columns=rows, modality=modality, accession=accession, patient_id=patient_id)
        study = study_uid or generate_uid()
        series = series_uid or generate_uid()
        for _ in range(n):
            sop = generate_uid()
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            temp = self.store.new_incoming_path()
            await trio.to_thread.run_sync(write_dataset, temp, ds)
            header = InstanceHeader(
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=sop,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                study_instance_uid=study,
                series_instance_uid=series,
                modality=modality,
                patient_id=patient_id,
                patient_name="DOE^JANE",
                accession_number=accession,
            )
            ids += await self.store.commit_instance(temp, header, source, [Destination(dest, role)], state=state)
        return ids


def make_settings(
    data_dir: Path,
    nodes: tuple[Node, ...],
    *,
    token: str = TOKEN,
    password: str = PASSWORD,
    scp_port: int = 0,
    **config: Any,
) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_nodes(data_dir / "nodes.yml", nodes)
    values: dict[str, Any] = dict(
        data_dir=data_dir,
        cache_path=data_dir / "cache",
        scp_port=scp_port,
        durable_writes=False,
        minimum_age=0,
        storage_interval=0,
        retry_delay_seconds=30,
        api=ApiConfig(enabled=True, port=0, token=token, service_password=password),
    )
    values.update(config)
    return Settings(config=Config(**values), nodes=nodes)


StartRouter = Callable[..., Any]


@pytest.fixture
async def start_router(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[StartRouter]:
    """start_router(nodes, **config) -> Running: a router on free ports, stopped after the test."""
    clients: list[httpx.AsyncClient] = []
    handlers: list[RingBufferHandler] = []
    count = 0
    saved_level = logging.getLogger("capacitor_trio").level

    async def start(nodes: tuple[Node, ...] = (), **kwargs: Any) -> Running:
        nonlocal count
        count += 1
        ring = RingBufferHandler()
        logger = logging.getLogger("capacitor_trio")
        logger.addHandler(ring)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        handlers.append(ring)
        data_dir = tmp_path / f"router{count}"
        settings = make_settings(data_dir, nodes, **kwargs)
        router: Router = await nursery.start(functools.partial(run_router, settings, ring=ring))
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.api_port}", timeout=20)
        clients.append(client)
        return Running(router, client, data_dir, ring)

    yield start
    for client in clients:
        await client.aclose()
    for ring in handlers:
        logging.getLogger("capacitor_trio").removeHandler(ring)
    logging.getLogger("capacitor_trio").setLevel(saved_level)


def pacs(scp: StorageScp, **kw: Any) -> Node:
    return Node(ae_title=kw.pop("ae_title", "PACS"), host_name="127.0.0.1", port=scp.port, **kw)


def dead_node(ae_title: str = "DEAD", **kw: Any) -> Node:
    """A Storage node nobody listens for (delivery fails, items stay queued)."""
    return Node(ae_title=ae_title, host_name="127.0.0.1", port=free_port(), **kw)


