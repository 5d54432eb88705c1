"""Pieces of the soak harness: a modality that resends what was not acknowledged, a gate that
tells senders when the router is back, router configuration, a memory sampler and an API prober.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import trio
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from tests.helpers.datasets import make_dataset
from tests.helpers.peers import Counter


class Gate:
    """Whether the router is up, and a generation number bumped at every restart. Senders (threads)
    wait on it after a broken association instead of hammering a dead port."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.generation = 0
        self.up = False
        self.closed = False

    def open(self) -> None:
        with self._cond:
            self.up = True
            self.generation += 1
            self._cond.notify_all()

    def shut(self) -> None:
        with self._cond:
            self.up = False

    def close(self) -> None:
        """For good: every waiter returns."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_after_failure(self, generation: int, timeout: float = 2.0) -> None:
        """Wait until the router has restarted since `generation` (or `timeout`: the failure may
        have had another cause)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.closed or (self.up and self.generation > generation), timeout
            )


def pixel_digest(pixels: bytes) -> str:
    """A digest of an image's pixels, carried in the data set (ImageComments) so that a
    destination can tell the bytes it got are the ones sent."""
    return "sha1:" + hashlib.sha1(pixels).hexdigest()


def series_of(n: int, *, per_series: int = 20, rows: int | tuple[int, ...] = 16,
              sop_class: str = CTImageStorage, patient: str = "SOAK") -> Iterator[Dataset]:
    """`n` small instances, `per_series` to a series, a few series to a study. A tuple of
    `rows` cycles through image sizes (e.g. some kept in the index, some in spool files). Each
    carries the digest of its pixels (`pixel_digest`)."""
    sizes = rows if isinstance(rows, tuple) else (rows,)
    study = series = ""
    for i in range(n):
        rows = sizes[i % len(sizes)]
        if i % (per_series * 5) == 0:
            study = generate_uid()
        if i % per_series == 0:
            series = generate_uid()
        ds = make_dataset(rows=rows, columns=rows, sop_class_uid=sop_class, study_uid=study,
                          series_uid=series, patient_id=patient, seed=i % 251,
                          modality="MR" if sop_class == MRImageStorage else "CT")
        ds.ImageComments = pixel_digest(ds.PixelData)  # what CountingSink checks on arrival
        yield ds


@attrs.define
class Sender:
    """A modality: sends datasets to the router under `called_ae` over pynetdicom associations
    (in a thread), resending an instance that got no answer or a non-success status, the way a
    modality retries a study. Records every SOP Instance UID acknowledged with success."""

    port: int
    called_ae: str
    datasets: Iterator[Dataset]
    gate: Gate
    acked_total: Counter | None = None
    stop: threading.Event = attrs.field(factory=threading.Event)
    # called after a refusal (non-success status), with the status; default: resend at once
    on_refused: Callable[[int], None] | None = None
    acked: list[str] = attrs.field(factory=list)
    attempts: collections.Counter[str] = attrs.field(factory=collections.Counter)
    statuses: collections.Counter[int] = attrs.field(factory=collections.Counter)
    associations: int = 0
    broken: int = 0
    error: BaseException | None = None

    def resent(self) -> int:
        """Extra attempts: each one may have been queued twice by the router (its answer lost)."""
        return sum(n - 1 for n in self.attempts.values())

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc
            raise

    def _run(self) -> None:
        ae = AE(ae_title="SOAKMOD")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        for cls in (CTImageStorage, MRImageStorage):
            ae.add_requested_context(cls, UID(ExplicitVRLittleEndian))
        pending: Dataset | None = None
        while not self.stop.is_set():
            if pending is None:
                pending = next(self.datasets, None)
                if pending is None:
                    return
            generation = self.gate.generation
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
            if not assoc.is_established:
                _close_socket(assoc)
                self.gate.wait_after_failure(generation)
                continue
            self.associations += 1
            try:
                while pending is not None and not self.stop.is_set():
                    uid = str(pending.SOPInstanceUID)
                    self.attempts[uid] += 1
                    status = assoc.send_c_store(pending)
                    code = int(status.Status) if status and "Status" in status else None
                    if code is None:
                        self.broken += 1
                        break
                    self.statuses[code] += 1
                    if code == 0x0000:
                        self.acked.append(uid)
                        if self.acked_total is not None:
                            self.acked_total.add_from_thread()
                        pending = next(self.datasets, None)
                    elif self.on_refused is not None:
                        self.on_refused(code)
                    if not assoc.is_established:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
                _close_socket(assoc)
            if pending is not None and not self.stop.is_set():
                self.gate.wait_after_failure(generation, timeout=0.5)


def _close_socket(assoc: Any) -> None:
    """pynetdicom leaves the socket of a refused or broken association to the garbage collector
    (a ResourceWarning, an error in this suite): close it ourselves."""
    assoc_socket = getattr(getattr(assoc, "dul", None), "socket", None)
    raw = getattr(assoc_socket, "socket", None)
    if raw is not None:
        raw.close()


def write_router_config(data: Path, scp_port: int, nodes: dict[str, int], *, api_port: int = 0,
                        extra: str = "", node_extra: dict[str, str] | None = None,
                        retry_max: int = 2) -> None:
    """config.yml and nodes.yml for a soak router: no minimum age, no pause between batches,
    quick retries; `nodes` maps AE title -> port on 127.0.0.1."""
    data.mkdir(parents=True, exist_ok=True)
    api = f"api:\n  enabled: true\n  port: {api_port}\n" if api_port else "api:\n  enabled: false\n"
    (data / "config.yml").write_text(
        f"myAeTitle: ROUTER\nscpPort: {scp_port}\nminimumAge: 0\nstorageInterval: 0\n"
        f"retryDelaySeconds: 1\nretryMaxDelaySeconds: {retry_max}\n{api}{extra}"
    )
    node_extra = node_extra or {}
    (data / "nodes.yml").write_text("".join(
        f"- AeTitle: {ae}\n  Port: {port}\n{node_extra.get(ae, '')}" for ae, port in nodes.items()
    ))


class LogWatch(logging.Handler):
    """Keeps the messages of an in-process router's loggers; `changed` ticks with each one, so a
    test can wait for a line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.changed = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.changed.add_from_thread()

    def count(self, *parts: str) -> int:
        return sum(all(p in m for p in parts) for m in self.messages)

    def __enter__(self) -> LogWatch:
        logger = logging.getLogger("capacitor_trio")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("capacitor_trio")
        logger.removeHandler(self)
        logger.setLevel(self._level)


class RssSampler:
    """Peak resident memory of a process, sampled every `every` seconds while `run` runs. With a
    `fuse` (bytes), a process found above it is killed (SIGKILL) and `blown` set: an attack
    that makes the router take gigabytes must not take the machine with it."""

    def __init__(self, every: float = 0.2, fuse: int = 0) -> None:
        self.every = every
        self.fuse = fuse
        self.peak = 0
        self.blown = False

    async def run(self, pid_of: Callable[[], int | None]) -> None:
        while True:
            pid = pid_of()
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    self.peak = max(self.peak, proc.memory_info().rss)
                    if self.fuse and self.peak > self.fuse and not self.blown:
                        self.blown = True
                        proc.kill()
            await trio.sleep(self.every)


@attrs.define
class StorescuLoop:
    """A well-behaved modality: DCMTK storescu sending `per_run` fresh small CT instances per
    association to `called_ae`, again and again until `stop` is set. Keeps the SOP Instance UIDs
    storescu got a success status for, and counts runs that failed (refused, timed out, broken);
    `pause` seconds between a failed run and the next."""

    port: int
    called_ae: str
    workdir: Path
    per_run: int = 3
    pause: float = 0.2
    acked: list[str] = attrs.field(factory=list)
    runs_ok: int = 0
    runs_failed: int = 0
    errors: list[str] = attrs.field(factory=list)
    _n: int = 0

    async def run(self, stop: trio.Event) -> None:
        while not stop.is_set():
            if not await self.once():
                with trio.move_on_after(self.pause):
                    await stop.wait()

    async def once(self) -> bool:
        """One storescu association; True when every instance got a success status."""
        self._n += 1
        run_dir = self.workdir / f"run{self._n}"
        uids = _write_instances(run_dir, self.per_run)
        result = await trio.run_process(
            ["storescu", "-v", "-aet", "MODALITY", "-aec", self.called_ae, "-to", "10",
             "-ta", "10", "-td", "30", "127.0.0.1", str(self.port), *uids],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        acked = storescu_acked(result.stdout.decode(errors="replace")
                               + result.stderr.decode(errors="replace"))
        self.acked += [uids[p] for p in acked if p in uids]
        shutil.rmtree(run_dir)
        ok = result.returncode == 0 and len(acked) == len(uids)
        if ok:
            self.runs_ok += 1
        else:
            self.runs_failed += 1
            self.errors.append(result.stderr.decode(errors="replace")[-300:])
        return ok


def _write_instances(run_dir: Path, n: int) -> dict[str, str]:
    """`n` fresh Part 10 files in `run_dir`: path -> SOP Instance UID."""
    run_dir.mkdir(parents=True)
    uids = {}
    for i, ds in enumerate(series_of(n, rows=16, patient="STORESCU")):
        path = run_dir / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        uids[str(path)] = str(ds.SOPInstanceUID)
    return uids


def storescu_acked(output: str) -> list[str]:
    """The files that `storescu -v` reports a success status for: each "Sending file: X" line
    is answered by a "Received Store Response (...)" line."""
    acked, current = [], None
    for line in output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response" in line and current is not None:
            if "(Success" in line:
                acked.append(current)
            current = None
    return acked


class ApiProber:
    """Asks the management API in a loop and keeps the slowest answer; counts failures."""

    PATHS = ("/api/queue/stats", "/api/nodes", "/api/metrics", "/api/queue/items?limit=50")

    def __init__(self, base: str) -> None:
        self.base = base
        self.requests = 0
        self.slowest = 0.0
        self.failures: list[str] = []

    async def get(self, client: httpx.AsyncClient, path: str) -> Any:
        start = trio.current_time()
        r = await client.get(self.base + path)
        took = trio.current_time() - start
        self.requests += 1
        self.slowest = max(self.slowest, took)
        if r.status_code != 200:
            self.failures.append(f"{path}: {r.status_code} {r.text[:200]}")
        return r.json()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                for path in self.PATHS:
                    await self.get(client, path)
                await trio.sleep(0.05)


async def queue_stats(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(base + "/api/queue/stats")
        r.raise_for_status()
        body = r.json()
        return dict(body.get("data", body))
