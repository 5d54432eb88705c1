#!/usr/bin/env python
"""DICOM transport benchmark: our Trio upper layer against DCMTK, measured in the same run.

Usage:  .venv/bin/python bench/transport.py [--rounds 3] [--corpus L,S] [--skip-pynetdicom]
                                           [--compare-src TREE]

With --compare-src TREE (the root of another checkout, e.g. a git worktree of an older commit),
every scenario that runs our code runs a second time from that tree's bench/transport.py and src/,
interleaved in the same round, and the table gives its rows marked [before] and the ratio of ours
to it.

Scenarios (images/s and MB/s, median of interleaved rounds, ratio to the reference; each after an
`os.sync()`, untimed, so that none runs while the kernel writes back what the one before wrote,
with the files written before dropped from the page cache, and each writing into a new directory:
nothing is deleted until the run ends, see fresh_dir and settle;
an untimed DCMTK run of the first corpus warms the machine up before the first round):
  ref        DCMTK storescu -> storescp (-pdu 131072, TCP_NODELAY=1, storescp writes files)
  acc        storescu -> our acceptor, no fsync (the sink writes an instance received in memory
             straight to its file, as storescp does, and names the file a larger one was
             received into: like the router's store, it hands out files a thread made ahead)
  acc-dur    storescu -> our acceptor, durable commit (fsync file, rename, fsync dir)
  acc-store  storescu -> our acceptor + the router's store (durable commit_instance), queue
             growing (nothing delivered)
  acc-steady the same with the queue in a steady state: every 32 commits, those instances are
             recorded delivered in the background (as a node records its outcomes), so their
             spool files are retired and receptions reuse them (store/spares.py)
  fsync-loop a plain Python loop writing + fsyncing the same files to the same disk
  req        our requestor -> storescp
  acc-nagle  storescu with Nagle left on (no TCP_NODELAY) -> our acceptor
  req-nagle  our requestor -> storescp with Nagle left on
  pyn        pynetdicom SCU -> pynetdicom SCP (raw bytes written)

Corpora (generated once into bench/.corpus/, gitignored): L = 500 x 512x512x16 bit (~0.5 MB),
S = 2000 x 64x64x16 bit. Our acceptor and requestor run in their own processes, like DCMTK.
Times: DCMTK tools and the fsync loop are timed from outside (process start to exit); our
requestor and pynetdicom's SCU report the time from connect to release (their Python start-up,
~0.3 s of imports, is not part of the transport).

A calibration line (bench/machine.py: Python loop speed, fsync latency of the bench's disk, load,
free page reporting) is printed before and after the runs, so that runs on different machines
or days can be compared.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import calibrate

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / ".corpus"
PY = sys.executable
CORPORA = {"L": (500, 512), "S": (2000, 64)}


# ----------------------------------------------------------------------------- corpus


def make_corpus(name: str) -> Path:
    count, size = CORPORA[name]
    d = CORPUS / name
    manifest = d / "manifest.json"
    if manifest.exists() and len(json.loads(manifest.read_text())) == count:
        return d
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    study = generate_uid()
    series = generate_uid()
    items = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.PatientID = "BENCH"
        ds.PatientName = "BENCH^MARK"
        ds.AccessionNumber = "ACC"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, size * size, dtype="<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = d / f"img{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append(
            [str(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian]
        )
    manifest.write_text(json.dumps(items))
    return d


def corpus_files(d: Path) -> list[list[str]]:
    return json.loads((d / "manifest.json").read_text())


def corpus_bytes(d: Path) -> int:
    return sum(os.path.getsize(p) for p, *_ in corpus_files(d))


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


def env(nodelay: bool) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("TCP_NODELAY", None)
    if nodelay:
        e["TCP_NODELAY"] = "1"
    return e


# Scenario outputs. None is deleted while the bench runs (the router and store under test remove
# files of their own): on this machine's ext4 (no journal) a file created less than 60 s after
# thousands of deletions in the same inode group (360 s while the group's inode table is not
# written back) pays a scan past every such inode (`find_inode_bit` -> `recently_deleted`);
# DCMTK's storescp went from ~3,000 to ~900 small images/s when its directory was emptied just
# before. So each scenario writes into a new directory, everything is deleted at exit, and a run
# starts only once the last deletion is that old, after a sync; and each new directory is placed
# away from the one before (`_spread_subdirectories`). One bench run at a time: a run deletes
# what it finds in OUT.
#
# Nor is what they wrote left in the page cache: the next scenario then takes memory this VM had
# not touched yet, which costs far more here (the reference with large images: 889-1,111 images/s
# run after run with each run's output dropped from the cache, 910 falling to 379-463 without).
# `settle()` writes everything back and drops the outputs written since it last ran.
OUT = CORPUS / "out"
DELETED_AT = CORPUS / "out.deleted-at"
RECENTLY_DELETED_S = 61.0  # dtime has whole seconds
_outputs = 0
_unsettled: list[Path] = []


def _delete_outputs() -> None:
    if OUT.exists():
        shutil.rmtree(OUT, ignore_errors=True)
        DELETED_AT.write_text(f"{time.time()}\n")


def _spread_subdirectories(d: Path) -> None:
    """Mark `d` a top of directory hierarchies (ext4's `chattr +T`): each scenario's directory
    then lands in a block group of its own, away from the inodes the scenario before freed (the
    router deletes the spool files of delivered instances). DCMTK's small-image reference right
    after 3,000 deletions in a sibling directory: 1,067 and 1,474 images/s without the mark,
    1,875 and 3,167 with it. Best effort: Linux, 64-bit ioctl numbers."""
    if sys.platform != "linux":
        return
    get_flags, set_flags, topdir = 0x80086601, 0x40086602, 0x00020000
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, get_flags, buf)
        fcntl.ioctl(fd, set_flags, struct.pack("i", struct.unpack("i", buf)[0] | topdir))
    except OSError:
        pass
    finally:
        os.close(fd)


def start_outputs() -> None:
    """Call once before the first scenario: deletes what an earlier run left, marks the output
    directory (`_spread_subdirectories`), waits until no deletion is recent (untimed), and
    deletes this run's outputs at exit."""
    _delete_outputs()
    OUT.mkdir(parents=True, exist_ok=True)
    _spread_subdirectories(OUT)
    try:
        wait = float(DELETED_AT.read_text()) + RECENTLY_DELETED_S - time.time()
    except (OSError, ValueError):
        wait = 0.0
    if wait > 0:  # (bounded: a clock set back must not make it longer)
        print(f"waiting {wait:.0f} s: files were deleted just now (see fresh_dir)", file=sys.stderr)
        os.sync()  # the freed inodes' table blocks written back: the 60 s rule, not the 360 s one
        time.sleep(min(wait, RECENTLY_DELETED_S))
    atexit.register(_delete_outputs)


def warm_up(d: Path) -> None:
    """One untimed DCMTK run of corpus `d`: the first run after an idle spell (the wait above,
    or a fresh VM) was the slowest of a series (787 against 1,107-1,388 large images/s for the
    three after it), and it was always the reference's."""
    out = fresh_dir("warm-up")
    srv = storescp(out)
    try:
        run_storescu(srv.port, d, nodelay=True, aec="STORESCP")
    finally:
        srv.stop()


def fresh_dir(name: str) -> Path:
    """A new, empty directory for one scenario's files (deleted at exit, not before; the name
    is new in this run, and `start_outputs` emptied OUT)."""
    global _outputs
    _outputs += 1
    d = OUT / f"{_outputs:03d}-{name}"
    d.mkdir(parents=True)
    _unsettled.append(d)
    return d


def settle() -> None:
    """Before a scenario (untimed): write everything back (`os.sync()`), so that none runs while
    the kernel writes back what the one before wrote, then drop the files written since the last
    call from the page cache (kept on disk, see OUT)."""
    os.sync()
    for d in _unsettled:
        for root, _dirs, files in os.walk(d):
            for name in files:
                try:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    _unsettled.clear()


def run_storescu(port: int, d: Path, *, nodelay: bool, aec: str) -> float:
    files = [p for p, *_ in corpus_files(d)]
    cmd = [
        "storescu",
        "-aet",
        "BENCH",
        "-aec",
        aec,
        "-pdu",
        "131072",
        "127.0.0.1",
        str(port),
        *files,
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env(nodelay), capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr.decode()[-500:]}")
    return elapsed


# The checkout whose acceptor and requestor the current scenario runs (--compare-src): None is
# this one. Set by main() around each scenario; the child processes read nothing else from it.
_tree: Path | None = None
# CPU seconds (user + system) our acceptor or requestor process used in the current scenario,
# from the moment it was ready (its imports, 0.6-0.7 s, left out): with --compare-src, a
# before/after figure less sensitive to the machine's noise than throughput. Reset by main()
# before each scenario.
_our_cpu = 0.0
# (corpus, run label) whose CPU includes the process's imports: a --compare-src tree whose
# requestor (`--send`) does not report its own CPU; their CPU ratio is not printed
_CPU_WITH_IMPORTS: set[tuple[str, str]] = set()
_with_imports = False


def our_script() -> tuple[list[str], dict[str, str]]:
    """The command prefix and extra environment that start our code from the current tree."""
    if _tree is None:
        return [PY, __file__], {}
    return [PY, str(_tree / "bench" / "transport.py")], {"PYTHONPATH": str(_tree / "src")}


class Server:
    def __init__(
        self, argv: list[str], port: int, nodelay: bool = True, extra: dict[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env(nodelay) | (extra or {}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.port = port
        wait_listening(port, self.proc)

    def cpu_seconds(self) -> float:
        """User + system CPU the server process has used so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def storescp(out: Path, nodelay: bool = True) -> Server:
    port = free_port()
    return Server(["storescp", "-od", str(out), "-pdu", "131072", "+B", str(port)], port, nodelay)


def our_acceptor(out: Path, durable: bool, store: bool = False, steady: bool = False) -> Server:
    port = free_port()
    script, extra = our_script()
    argv = (
        script
        + ["--serve-acceptor", str(port), str(out)]
        + (["--durable"] if durable else [])
        + (["--store"] if store else [])
        + (["--steady"] if steady else [])
    )
    return Server(argv, port, extra=extra)


def run_requestor(port: int, d: Path, ae: str = "STORESCP") -> float:
    global _our_cpu, _with_imports
    import resource

    script, extra = our_script()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # for a tree whose --send prints no CPU
    r = subprocess.run(
        [*script, "--send", str(port), str(d), ae],
        capture_output=True,
        check=False,
        text=True,
        env=dict(os.environ) | extra,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"requestor failed: {r.stderr[-1500:]}")
    elapsed, *cpu = r.stdout.strip().splitlines()[-1].split()
    if cpu:  # the sending's own CPU, imports left out
        _our_cpu += float(cpu[0])
    else:
        _our_cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        _with_imports = True
    return float(elapsed)


# ----------------------------------------------------------------------------- scenarios


def sc_ref(d: Path) -> float:
    out = fresh_dir("ref")
    srv = storescp(out)
    try:
        return run_storescu(srv.port, d, nodelay=True, aec="STORESCP")
    finally:
        srv.stop()


def _acc(
    d: Path, *, durable: bool, nodelay: bool, store: bool = False, steady: bool = False
) -> float:
    global _our_cpu
    out = fresh_dir("acc")
    srv = our_acceptor(out, durable, store, steady)
    try:
        ready = srv.cpu_seconds()  # listening: its imports are done
        elapsed = run_storescu(srv.port, d, nodelay=nodelay, aec="CAPACITOR")
        _our_cpu += srv.cpu_seconds() - ready
        return elapsed
    finally:
        srv.stop()


def sc_acc(d: Path) -> float:
    return _acc(d, durable=False, nodelay=True)


def sc_acc_dur(d: Path) -> float:
    return _acc(d, durable=True, nodelay=True)


def sc_acc_store(d: Path) -> float:
    return _acc(d, durable=True, nodelay=True, store=True)


def sc_acc_steady(d: Path) -> float:
    return _acc(d, durable=True, nodelay=True, store=True, steady=True)


def sc_acc_nagle(d: Path) -> float:
    return _acc(d, durable=False, nodelay=False)


def sc_fsync_loop(d: Path) -> float:
    out = fresh_dir("loop")
    files = [p for p, *_ in corpus_files(d)]
    t0 = time.perf_counter()
    dfd = os.open(out, os.O_RDONLY)
    try:
        for i, p in enumerate(files):
            data = Path(p).read_bytes()
            fd = os.open(out / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)
    finally:
        os.close(dfd)
    return time.perf_counter() - t0


def _req(d: Path, nodelay: bool) -> float:
    out = fresh_dir("req")
    srv = storescp(out, nodelay=nodelay)
    try:
        return run_requestor(srv.port, d)
    finally:
        srv.stop()


def sc_req(d: Path) -> float:
    return _req(d, True)


def sc_req_nagle(d: Path) -> float:
    return _req(d, False)


def sc_pyn(d: Path) -> float:
    out = fresh_dir("pyn")
    port = free_port()
    srv = Server([PY, __file__, "--serve-pynetdicom", str(port), str(out)], port)
    try:
        r = subprocess.run(
            [PY, __file__, "--send-pynetdicom", str(port), str(d)],
            capture_output=True,
            check=False,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-1500:])
        return float(r.stdout.strip().splitlines()[-1])
    finally:
        srv.stop()


SCENARIOS = {
    "ref": ("DCMTK storescu -> storescp (reference)", sc_ref),
    "acc": ("storescu -> our acceptor, no fsync", sc_acc),
    "acc-dur": ("storescu -> our acceptor, durable commit", sc_acc_dur),
    "acc-store": (
        "storescu -> our acceptor + the real store (durable commit_instance)",
        sc_acc_store,
    ),
    "acc-steady": ("the same, queue in a steady state (delivered files reused)", sc_acc_steady),
    "fsync-loop": ("Python write+fsync loop (durability reference)", sc_fsync_loop),
    "req": ("our requestor -> storescp", sc_req),
    "acc-nagle": ("storescu (Nagle on) -> our acceptor", sc_acc_nagle),
    "req-nagle": ("our requestor -> storescp (Nagle on)", sc_req_nagle),
    "pyn": ("pynetdicom SCU -> pynetdicom SCP", sc_pyn),
}

# the scenarios that run our acceptor or requestor (the ones --compare-src runs twice)
OURS = {"acc", "acc-dur", "acc-store", "acc-steady", "req", "acc-nagle", "req-nagle"}


# ----------------------------------------------------------------------------- child processes


def serve_acceptor_main(port: int, out: Path, durable: bool) -> None:
    import uuid

    import trio

    from capacitor_trio.dicom import AcceptorConfig, ReceivedInstance, serve_acceptor
    from capacitor_trio.store.spares import SpareFiles

    incoming = out / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(out, os.O_RDONLY)
    # as the router's store does: files made ahead by a thread, so that no reception spilled to
    # a file waits for one to be created
    spares = SpareFiles(incoming)
    use_spares = not os.environ.get("BENCH_NO_SPARES")

    def new_file() -> Path:
        return (spares.take() if use_spares else None) or incoming / uuid.uuid4().hex

    def save(rx: ReceivedInstance, dst: Path) -> None:
        if rx.data is not None:  # received in memory (small): written as storescp writes
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                done = 0
                while done < len(rx.data):  # a short write (a full disk) continues, or raises
                    done += os.write(fd, rx.data[done:])
            finally:
                os.close(fd)
        else:
            rx.save_as(dst)

    def commit(rx: ReceivedInstance, dst: Path) -> None:
        # fsync the data, then the name: a file received in memory is written to `dst` first
        if rx.data is not None:
            save(rx, dst)
        fd = os.open(dst if rx.path is None else rx.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if rx.path is not None:
            os.rename(rx.path, dst)
        os.fsync(dir_fd)

    class Sink:
        def accepts_called_ae(self, called_ae: str) -> bool:
            return True

        def called_ae_hint(self, called_ae: str) -> str | None:
            return None

        def new_temp_path(self) -> Path:
            return new_file()

        def check_admission(self) -> None:
            pass

        def start_sync(self, path: Path, size: int) -> None:
            return None

        async def instance_received(self, rx: ReceivedInstance) -> None:
            dst = out / f"{rx.header.sop_instance_uid}.dcm"
            if durable:
                await trio.to_thread.run_sync(commit, rx, dst)
            else:
                save(rx, dst)  # rename the temporary file, or write the bytes received in memory

    config = AcceptorConfig(host="127.0.0.1", port=port)
    trio.run(serve_acceptor, config, Sink())


def serve_store_acceptor_main(port: int, out: Path, steady: bool = False) -> None:
    """Our acceptor committing every instance through the real store (durable), one
    destination: what the router's intake pays for its durability promise. `steady`: every 32
    commits, those instances are recorded delivered in a background task."""
    import trio

    from capacitor_trio.dicom import AcceptorConfig, ReceivedInstance, serve_acceptor
    from capacitor_trio.domain.instance import Destination
    from capacitor_trio.store import open_store

    async def main() -> None:
        async with open_store(out / "cache", durable=True) as store, trio.open_nursery() as bg:
            done: list[int] = []

            class Sink:
                def accepts_called_ae(self, called_ae: str) -> bool:
                    return True

                def called_ae_hint(self, called_ae: str) -> str | None:
                    return None

                def new_temp_path(self) -> Path:
                    return store.new_incoming_path()

                def check_admission(self) -> None:
                    pass

                def start_sync(self, path: Path, size: int) -> Any:
                    return store.start_sync(path, size)

                async def instance_received(self, rx: ReceivedInstance) -> None:
                    done.extend(
                        await store.commit_instance(
                            rx.path,
                            rx.header,
                            rx.calling_ae,
                            [Destination("BENCH")],
                            data=rx.data,
                            sync=rx.sync,
                        )
                    )
                    if steady and len(done) >= 32:
                        bg.start_soon(store.delivered, done[:])
                        done.clear()

            await serve_acceptor(AcceptorConfig(host="127.0.0.1", port=port), Sink())

    trio.run(main)


def send_main(port: int, d: Path, ae: str) -> None:
    import trio

    from capacitor_trio.dicom import OutgoingInstance, Peer, SendOptions, send_batch

    items = [OutgoingInstance(Path(p), c, i, t) for p, c, i, t in corpus_files(d)]
    bad: list[object] = []

    def on_outcome(i: int, o: object) -> None:
        if type(o).__name__ != "Delivered":
            bad.append((i, o))

    async def main() -> float:
        t0 = trio.current_time()
        await send_batch(Peer(ae, "127.0.0.1", port), items, SendOptions("BENCH"), on_outcome)
        return trio.current_time() - t0

    cpu0 = time.process_time()
    elapsed = trio.run(main)
    cpu = time.process_time() - cpu0
    if bad:
        raise SystemExit(f"not delivered: {bad[:3]} ({len(bad)})")
    print(elapsed, cpu)  # seconds: the sending's wall-clock time, and this process's CPU in it


def serve_pynetdicom_main(port: int, out: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.dimse_primitives import C_STORE

    def handle(event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)  # the handler is bound to EVT_C_STORE only
        (out / f"{request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0

    ae = AE(ae_title="PYSCP")
    ae.maximum_pdu_size = 131072
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None  # every one of pynetdicom's storage contexts has one
        ae.add_supported_context(cx.abstract_syntax)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle)])


def send_pynetdicom_main(port: int, d: Path) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    files = corpus_files(d)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(files[0][1], files[0][3])
    t0 = time.perf_counter()
    done = 0
    while done < len(files):  # pynetdicom's requestor sometimes loses a response: retry
        assoc = ae.associate("127.0.0.1", port, ae_title="PYSCP", max_pdu=131072)
        if not assoc.is_established:
            raise SystemExit("association failed")
        for path, *_ in files[done:]:
            status = assoc.send_c_store(dcmread(path))
            if not status or status.Status != 0:
                break
            done += 1
        assoc.release() if assoc.is_established else assoc.abort()
    print(time.perf_counter() - t0)


# ----------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", default="L,S")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--skip-pynetdicom", action="store_true")
    ap.add_argument(
        "--compare-src",
        type=Path,
        help="also run our scenarios from this checkout's bench/ and src/, interleaved",
    )
    ap.add_argument("--serve-acceptor", nargs=2, metavar=("PORT", "OUT"))
    ap.add_argument("--durable", action="store_true")
    ap.add_argument(
        "--store", action="store_true", help="with --serve-acceptor: commit through the real store"
    )
    ap.add_argument("--steady", action="store_true", help="with --store: record delivered every 32")
    ap.add_argument("--send", nargs=3, metavar=("PORT", "CORPUS", "AE"))
    ap.add_argument("--serve-pynetdicom", nargs=2, metavar=("PORT", "OUT"))
    ap.add_argument("--send-pynetdicom", nargs=2, metavar=("PORT", "CORPUS"))
    args = ap.parse_args()
    if args.serve_acceptor:
        if args.store:
            return serve_store_acceptor_main(
                int(args.serve_acceptor[0]), Path(args.serve_acceptor[1]), args.steady
            )
        return serve_acceptor_main(
            int(args.serve_acceptor[0]), Path(args.serve_acceptor[1]), args.durable
        )
    if args.send:
        return send_main(int(args.send[0]), Path(args.send[1]), args.send[2])
    if args.serve_pynetdicom:
        return serve_pynetdicom_main(int(args.serve_pynetdicom[0]), Path(args.serve_pynetdicom[1]))
    if args.send_pynetdicom:
        return send_pynetdicom_main(int(args.send_pynetdicom[0]), Path(args.send_pynetdicom[1]))

    names = [s for s in args.scenarios.split(",") if s]
    if args.skip_pynetdicom and "pyn" in names:
        names.remove("pyn")
    if "ref" not in names:
        names.insert(0, "ref")
    corpora = {c: make_corpus(c) for c in args.corpus.split(",")}
    start_outputs()
    before = calibrate(OUT.parent)  # untimed; printed with the figures
    print(before, file=sys.stderr)
    warm_up(next(iter(corpora.values())))
    global _tree, _our_cpu, _with_imports
    trees: list[Path | None] = [None]
    if args.compare_src:
        trees.append(args.compare_src.resolve())
    runs = [(n, t) for n in names for t in (trees if n in OURS else [None])]
    times: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for cname, d in corpora.items():
            # the two trees swap places every other round, so that neither always runs first
            order = runs if rnd % 2 == 0 else _swap_trees(runs)
            for name, tree in order:
                settle()
                _tree, _our_cpu, _with_imports = tree, 0.0, False
                t = SCENARIOS[name][1](d)
                _tree = None
                label = name + (" [before]" if tree else "")
                if _with_imports:
                    _CPU_WITH_IMPORTS.add((cname, label))
                times.setdefault((cname, label), []).append(t)
                cpus.setdefault((cname, label), []).append(_our_cpu)
                print(
                    f"round {rnd + 1} {cname} {label:19s} {len(corpus_files(d)) / t:8.1f} img/s",
                    file=sys.stderr,
                )
    print(
        f"\n{args.rounds} interleaved rounds, medians; ratio = to the DCMTK reference in this run\n"
    )
    print(f"before the runs, {before}\nafter the runs, {calibrate(OUT.parent)}\n")
    print_table(corpora, runs, times)
    if len(trees) > 1:
        print_comparison(corpora, runs, times, cpus)


def print_comparison(
    corpora: dict[str, Path],
    runs: list[tuple[str, Path | None]],
    times: dict[tuple[str, str], list[float]],
    cpus: dict[tuple[str, str], list[float]],
) -> None:
    """This tree against --compare-src's, scenario by scenario: the median and spread of the
    per-round throughput ratios (the two runs of a round are neighbours in time, so they met
    the same machine), and our process's CPU per image in each."""
    print(
        "\n| scenario | corpus | throughput ratio to [before], per round: median (min-max) "
        "| our CPU/img | [before] CPU/img | CPU ratio |"
    )
    print("|---|---|---|---|---|---|")
    for cname, d in corpora.items():
        n = len(corpus_files(d))
        for name, tree in runs:
            if tree is not None or (cname, name + " [before]") not in times:
                continue
            ours, theirs = times[(cname, name)], times[(cname, name + " [before]")]
            ratios = [b / a for a, b in zip(ours, theirs, strict=True)]
            cpu = statistics.median(cpus[(cname, name)]) / n
            cpu_before = statistics.median(cpus[(cname, name + " [before]")]) / n
            alike = ((cname, name) in _CPU_WITH_IMPORTS) == (
                (cname, name + " [before]") in _CPU_WITH_IMPORTS
            )
            print(
                f"| {SCENARIOS[name][0]} | {cname} | {statistics.median(ratios):.3f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | {_cpu_cell(cpu, (cname, name))} "
                f"| {_cpu_cell(cpu_before, (cname, name + ' [before]'))} "
                f"| {f'{cpu_before / cpu:.3f}x' if alike else '(not alike)'} |"
            )


def _cpu_cell(cpu: float, run: tuple[str, str]) -> str:
    return f"{1000 * cpu:.3f} ms" + (" (with its imports)" if run in _CPU_WITH_IMPORTS else "")


def _swap_trees(runs: list[tuple[str, Path | None]]) -> list[tuple[str, Path | None]]:
    """The same runs with each scenario's two trees in the other order."""
    out = list(runs)
    for i in range(len(out) - 1):
        if out[i][0] == out[i + 1][0]:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def print_table(
    corpora: dict[str, Path],
    runs: list[tuple[str, Path | None]],
    times: dict[tuple[str, str], list[float]],
) -> None:
    print(
        "| scenario | corpus | img/s | MB/s | ratio to ref | ratio to fsync loop "
        "| ratio to [before] |"
    )
    print("|---|---|---|---|---|---|---|")
    for cname, d in corpora.items():
        n = len(corpus_files(d))
        mb = corpus_bytes(d) / 1e6
        ref = statistics.median(times[(cname, "ref")])
        loop = (
            statistics.median(times[(cname, "fsync-loop")])
            if (cname, "fsync-loop") in times
            else None
        )
        for name, tree in runs:
            label = name + (" [before]" if tree else "")
            t = statistics.median(times[(cname, label)])
            durable = name in ("acc-dur", "acc-store", "acc-steady")
            vs_loop = f"{loop / t:.2f}x" if loop and durable else ""
            other = times.get((cname, name + " [before]"))
            vs_before = f"{statistics.median(other) / t:.3f}x" if other and not tree else ""
            title = SCENARIOS[name][0] + (" [before]" if tree else "")
            print(
                f"| {title} | {cname} | {n / t:.0f} | {mb / t:.1f} | {ref / t:.2f}x | {vs_loop} "
                f"| {vs_before} |"
            )


if __name__ == "__main__":
    main()
