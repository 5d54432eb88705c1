#!/usr/bin/env python
"""End-to-end benchmark: DCMTK storescu -> capacitor-trio -> DCMTK storescp, against DCMTK direct.

Usage:  .venv/bin/python bench/e2e.py [--rounds 3] [--corpus L,S] [--batch-size 0]
                                      [--durable true,false] [--profile DIR] [--compare-src DIR]
                                      [--filters routes,mutate]
        .venv/bin/python bench/e2e.py --transcode 40 [--rounds 2]

`--transcode N` (issue 22) runs another comparison instead: N 0.5 MB CT images (bench/
transcode.py's corpus) through a node with TransferSyntax JPEG2000Lossless (storescu -> router
-> storescp +xa, durable writes), against gdcmconv --j2k converting the same files one after
another pinned to one core; the target is >= 0.8x the tool's rate.

Scenarios, every one once per round (interleaved, so all saw the same machine noise; the router
scenarios in a balanced order, see balanced_order; each after an `os.sync()`, untimed, so that none
runs while the kernel writes back what the one before wrote; then the files written before are
dropped from the page cache; outputs are deleted only at the end, and an untimed DCMTK run warms
the machine up first: see transport.fresh_dir, settle and warm_up), medians:
  direct        storescu -> storescp                          (the reference)
  router        storescu -> `capacitor-trio run` -> storescp  (durableWrites false, and true)
  filtered      the same with a filter chain (`--filters`): `routes` = 10 routes whose conditions
                match every instance (their add_destination names the node itself, which adds
                nothing: the conditions and the per-item prepare stage are what is measured);
                `mutate` = those and 10 mutations changing 10 attributes of every instance (a
                prepared copy per instance). Their ratio to the unfiltered router of the same
                durableWrites and batchSize is printed as well (targets 0.8x and 0.5x).
Both DCMTK ends run with TCP_NODELAY=1 and `-pdu 131072`; storescp writes the files (`-od`, `+B`).
Ratios are to the direct DCMTK figure of the same run.

Corpora (generated once into bench/.corpus/ by bench/transport.py's generator, gitignored):
L = 500 x 512x512x16 bit (~0.53 MB), S = 2000 x 64x64x16 bit (~9 kB), one series.

The router runs as a subprocess with a fresh data directory per run (under `bench/.corpus/out/`,
same disk as the corpus; no output is deleted before the run ends, see transport.fresh_dir):
api disabled, minimumAge 0, storageInterval 0, minFreeSpace 0, one Storage node (the storescp),
batchSize from `--batch-size` (0 = one series per association, capped at 1000 per batch). It is
started, and the clock starts once it has logged both "router ready" and "sender process N
started": a router in service has its sender process running long before an image arrives, and
the child's start (its imports: ~0.5-1 s of CPU) would otherwise land in the timed run.

What is timed: "first image sent to last image received at the destination".
  * direct: storescu's process start to its exit. storescu exits after the last C-STORE-RSP,
    which storescp sends after it has written the file.
  * router: storescu's process start to the moment the router logs that the last instance was
    delivered. The node actor logs "node X: delivered N instance(s)" once per batch, right after
    the index recorded the batch's C-STORE-RSPs (each sent by storescp after writing its file); a
    thread in this script reads the router's stderr and stamps the line that brings the total
    to the corpus size. That adds one store write (~1 ms) to the router's time and nothing to
    DCMTK's, and costs no CPU while the run is going (no polling of storescp's directory, no
    `--exec-on-reception` process per image). The storescp directory is counted afterwards as a
    check. The intake time (storescu start to exit) is printed too: it tells whether the router
    was limited by receiving or by forwarding. "router CPU" is the user + system CPU of the
    router process and of its sender process (`deliveryProcess`) over the run, per image; the
    sender process's share is shown too. "DCMTK ends CPU" is what storescu and storescp used in
    the same window, per image; with it the table prints the router's CPU budget at the target:
    the CPU per image that would keep every core busy at the target's pace, less the DCMTK ends'
    share. It is an upper bound: storescu sends one image at a time and waits for the response,
    so a router within the budget still needs its work to overlap with storescu's.

`--profile DIR` runs the router under `py-spy record` (must be installed; not a project
dependency) and writes its collapsed stacks (`-f raw`, one file per router run) into DIR.

A calibration line (bench/machine.py: Python loop speed, fsync latency of the bench's disk, load,
free page reporting) is printed before and after the runs, so that runs on different machines
or days can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import calibrate
from transport import (
    OUT,
    Server,
    corpus_files,
    env,
    free_port,
    fresh_dir,
    make_corpus,
    run_storescu,
    settle,
    start_outputs,
    storescp,
    warm_up,
)

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "capacitor-trio"
DELIVERED = re.compile(r"delivered (\d+) instance")
TARGETS = {("L", False): 0.5, ("S", False): 0.5, ("L", True): 0.25, ("S", True): 0.4}
#: the filtered router against the unfiltered one of the same run (issue 21)
FILTER_TARGETS = {"routes": 0.8, "mutate": 0.5}

ROUTE = """\
- Description: bench route {k}
  Conditions:
    - Tag: 8,16
      MatchExpression: ^1\\.2\\..*$
    - Tag: 10,20
      MatchExpression: ^.+$
  Actions:
    - Type: add_destination
      Target: STORESCP
"""
MUTATION_TAGS = ["8,80", "8,1010", "8,1030", "8,103e", "8,1070", "8,90", "10,1000", "18,1000", "20,4000", "32,1060"]
MUTATION = """\
- Description: bench mutation {k}
  Conditions:
    - Tag: 8,16
      MatchExpression: ^1\\.2\\..*$
  Actions:
    - Type: add_or_update
      Source:
        Tag: 10,20
        Expression: ^(.*)$
      Destination:
        Tag: {tag}
        Value: BENCH $1
"""


def balanced_order(k: int, rnd: int) -> list[int]:
    """Round `rnd`'s order of k scenarios, a row of a Williams square: 0, 1, k-1, 2, k-2, ...
    shifted by the round; for an odd k every other k rounds run it reversed."""
    base, lo, hi = [0], 1, k - 1
    while len(base) < k:
        if len(base) % 2:
            base.append(lo)
            lo += 1
        else:
            base.append(hi)
            hi -= 1
    if k % 2 and (rnd // k) % 2:
        base.reverse()
    return [(i + rnd) % k for i in base]


def write_filters(data: Path, filters: str) -> str:
    """The filter files of a `--filters` profile in `data`; the `filters:` line for config.yml."""
    if not filters:
        return ""
    (data / "routings.yml").write_text("".join(ROUTE.format(k=k) for k in range(10)))
    if filters == "routes":
        return "filters: route\n"
    (data / "mutations.yml").write_text(
        "".join(MUTATION.format(k=k, tag=tag) for k, tag in enumerate(MUTATION_TAGS))
    )
    return "filters: route, mutate\n"


#: (end-to-end seconds, intake seconds, router CPU seconds (router process, sender process),
#: CPU seconds of the two DCMTK ends (storescu + storescp))
Times = tuple[float, float, tuple[float, float], float]


def _ticks(pid: int) -> int:
    """User + system clock ticks used so far by process `pid` (Linux /proc; 0 if it is gone)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    return 0


def storescu_timed(port: int, d: Path) -> tuple[float, float]:
    """(storescu's run time, its CPU seconds). storescu is the only child this script reaps
    while it runs, so the growth of RUSAGE_CHILDREN is its CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = run_storescu(port, d, nodelay=True, aec="STORESCP")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def sc_direct(d: Path) -> Times:
    out = fresh_dir("e2e-direct")
    srv = storescp(out)
    try:
        dest0 = _ticks(srv.proc.pid)
        t, scu = storescu_timed(srv.port, d)
        scp = (_ticks(srv.proc.pid) - dest0) / os.sysconf("SC_CLK_TCK")
    finally:
        srv.stop()
    return t, t, (0.0, 0.0), scu + scp


class Router:
    """`capacitor-trio run` as a subprocess; counts delivered instances from its log."""

    def __init__(
        self,
        data: Path,
        dest_port: int,
        *,
        durable: bool,
        batch_size: int,
        profile: Path | None,
        src: Path | None = None,
        filters: str = "",
        transfer_syntax: str = "",
    ) -> None:
        self.port = free_port()
        data.mkdir(parents=True, exist_ok=True)
        (data / "config.yml").write_text(
            f"myAeTitle: CAPACITOR\nscpPort: {self.port}\n"
            f"cachePath: {data / 'cache'}\ndurableWrites: {'true' if durable else 'false'}\n"
            f"minimumAge: 0\nstorageInterval: 0\nbatchSize: {batch_size}\nminFreeSpace: 0\n"
            "api:\n  enabled: false\n" + write_filters(data, filters)
        )
        (data / "nodes.yml").write_text(
            f"- AeTitle: STORESCP\n  HostName: 127.0.0.1\n  Port: {dest_port}\n  NodeRole: Storage\n"
            + (f"  TransferSyntax: {transfer_syntax}\n" if transfer_syntax else "")
        )
        argv = [str(CLI), "run", "--path", str(data)]
        self.profiling = profile is not None
        if profile is not None:
            spy = shutil.which("py-spy", path=str(CLI.parent)) or "py-spy"
            argv = [
                spy,
                "record",
                *os.environ.get("E2E_PYSPY", "").split(),
                "-r",
                os.environ.get("E2E_PYSPY_RATE", "200"),
                "-f",
                "raw",
                "-o",
                str(profile),
                "--",
                *argv,
            ]
        router_env = env(True)
        if src is not None:  # another source tree of the project (e.g. a git worktree)
            router_env["PYTHONPATH"] = str(src)
        self.proc = subprocess.Popen(
            argv, env=router_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.ready = threading.Event()
        self.total = 0
        self.batches = 0
        self.target = 0
        self.done_at: float | None = None
        self.done = threading.Event()
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.ready.wait(30):
            self.stop()
            raise RuntimeError("router not ready: " + "".join(self.errors[-5:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        router_ready = sender_ready = False
        for line in self.proc.stderr:
            if "router ready" in line:
                router_ready = True
            elif "sender process" in line and " started" in line:
                sender_ready = True
            if router_ready and sender_ready:
                self.ready.set()
            m = DELIVERED.search(line)
            if m:
                self.total += int(m.group(1))
                self.batches += 1
                if self.target and self.total >= self.target and self.done_at is None:
                    self.done_at = time.perf_counter()
                    self.done.set()
            elif "WARNING" in line or "ERROR" in line or "Traceback" in line:
                self.errors.append(line)

    def cpu_seconds(self) -> tuple[float, float]:
        """User + system CPU used so far by the router process and by its sender process
        (Linux /proc)."""
        pid = self.proc.pid
        if self.profiling:
            pid = int(_children(pid)[0])
        ticks = [0, 0]
        for i, p in enumerate([pid, *_children(pid)]):
            ticks[min(i, 1)] += _ticks(int(p))
        hz = os.sysconf("SC_CLK_TCK")
        return ticks[0] / hz, ticks[1] / hz

    def stop(self) -> None:
        if self.profiling:  # py-spy writes its output once the router exits
            for pid in _children(self.proc.pid):
                os.kill(int(pid), signal.SIGTERM)
        else:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _children(pid: int) -> list[str]:
    """The child processes of `pid`, whichever of its threads started them (the router starts
    its sender process from a worker thread: /proc lists it under that thread only)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += (task / "children").read_text().split()
    return found


def sc_router(
    d: Path, *, durable: bool, batch_size: int, profile: Path | None = None, src: Path | None = None,
    filters: str = "",
) -> Times:
    """(end-to-end seconds, intake seconds, router CPU seconds: (router process, sender process),
    CPU seconds of storescu and storescp)."""
    n = len(corpus_files(d))
    out = fresh_dir("e2e-dest")
    data = fresh_dir("e2e-router")
    dest = storescp(out)
    try:
        router = Router(
            data, dest.port, durable=durable, batch_size=batch_size, profile=profile, src=src,
            filters=filters,
        )
        try:
            router.target = n
            cpu0 = router.cpu_seconds()
            t0 = time.perf_counter()
            dest0 = _ticks(dest.proc.pid)
            intake, scu = storescu_timed(router.port, d)
            if not router.done.wait(300):
                raise RuntimeError(
                    f"only {router.total}/{n} delivered: " + "".join(router.errors[-5:])
                )
            assert router.done_at is not None
            elapsed = router.done_at - t0
            cpu1 = router.cpu_seconds()
            cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
            scp = (_ticks(dest.proc.pid) - dest0) / os.sysconf("SC_CLK_TCK")
            print(f"  {router.batches} delivery records", file=sys.stderr)
        finally:
            router.stop()
    finally:
        dest.stop()
    received = sum(1 for _ in os.scandir(out))
    if received < n:
        raise RuntimeError(f"storescp holds {received} files, expected {n}")
    return elapsed, intake, cpu, scu + scp


@dataclass(frozen=True)
class Scenario:
    kind: str  # "direct" or "router"
    durable: bool | None = None
    batch_size: int = 0
    src: Path | None = None  # router from another source tree (--compare-src)
    filters: str = ""  # "", "routes" or "mutate" (--filters)

    @property
    def label(self) -> str:
        if self.kind == "direct":
            return "direct"
        tree = f" [{self.src.name}]" if self.src else ""
        chain = f" filters={self.filters}" if self.filters else ""
        return f"router dur={self.durable} batch={self.batch_size}{tree}{chain}"

    @property
    def title(self) -> str:
        if self.kind == "direct":
            return "DCMTK storescu -> storescp (reference)"
        tree = f" [{self.src}]" if self.src else ""
        chain = {"": "", "routes": ", 10 routes", "mutate": ", 10 routes + 10 mutations"}[self.filters]
        return (
            f"storescu -> capacitor-trio{tree} (durableWrites {str(self.durable).lower()}, "
            f"batchSize {self.batch_size}{chain}) -> storescp"
        )


# ------------------------------------------------------------------ --transcode (issue 22)


def tool_j2k_one_core(files: list[Path]) -> float:
    """gdcmconv --j2k on each file in turn, pinned to one core: the C++ tool alone converting
    the corpus. Seconds from the first start to the last exit."""
    out = fresh_dir("j2k-tool")
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        subprocess.run([*pin, "gdcmconv", "--j2k", str(f), str(out / f"{i}.dcm")], check=True)
    return time.perf_counter() - t0


def router_j2k(files: list[Path]) -> float:
    """storescu -> `capacitor-trio run` with a node whose TransferSyntax is JPEG2000Lossless
    -> storescp (+xa: it accepts J2K). Seconds from storescu's start to the router's log of
    the last delivery."""
    out, data = fresh_dir("j2k-dest"), fresh_dir("j2k-router")
    port = free_port()
    dest = Server(["storescp", "-od", str(out), "-pdu", "131072", "+B", "+xa", str(port)], port)
    try:
        router = Router(
            data, port, durable=True, batch_size=0, profile=None, transfer_syntax="JPEG2000Lossless"
        )
        try:
            router.target = len(files)
            t0 = time.perf_counter()
            subprocess.run(
                ["storescu", "-aet", "BENCH", "-aec", "STORESCP", "-pdu", "131072", "127.0.0.1",
                 str(router.port), *map(str, files)],
                check=True, env=env(True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if not router.done.wait(600):
                raise RuntimeError(f"only {router.total}/{len(files)} delivered: " + "".join(router.errors[-5:]))
            assert router.done_at is not None
            elapsed = router.done_at - t0
        finally:
            router.stop()
    finally:
        dest.stop()
    import pydicom

    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in out.iterdir()}
    if syntaxes != {"1.2.840.10008.1.2.4.90"} or sum(1 for _ in out.iterdir()) != len(files):
        raise RuntimeError(f"the destination did not get every image in J2K: {syntaxes}")
    return elapsed


def transcode_bench(count: int, rounds: int) -> None:
    """A node with TransferSyntax JPEG2000Lossless delivering, against gdcmconv --j2k alone on
    one core converting the same files (bench/transcode.py's 0.5 MB CT corpus), interleaved."""
    from transcode import make_corpus as ct_corpus

    files = ct_corpus(count)
    start_outputs()
    print(calibrate(OUT.parent), file=sys.stderr)
    tool, ours = [], []
    for rnd in range(rounds):
        for name in (("tool", "router") if rnd % 2 == 0 else ("router", "tool")):
            settle()
            t = tool_j2k_one_core(files) if name == "tool" else router_j2k(files)
            (tool if name == "tool" else ours).append(t)
            print(f"round {rnd + 1} {name:6s} {count / t:6.2f} img/s", file=sys.stderr, flush=True)
    mb = sum(f.stat().st_size for f in files) / 1e6
    t_tool, t_ours = statistics.median(tool), statistics.median(ours)
    print(f"\n{rounds} interleaved rounds, {count} CT images (0.5 MB), medians\n")
    print("| scenario | img/s | MB/s | ratio to the tool | target |")
    print("|---|---|---|---|---|")
    print(f"| gdcmconv --j2k, one process per file, one core | {count / t_tool:.2f} | {mb / t_tool:.1f} | 1.00x | |")
    print(
        f"| storescu -> capacitor-trio (node TransferSyntax JPEG2000Lossless) -> storescp +xa "
        f"| {count / t_ours:.2f} | {mb / t_ours:.1f} | {t_tool / t_ours:.2f}x | >= 0.8x |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", default="L,S")
    ap.add_argument("--durable", default="false,true", help="durableWrites values to run")
    ap.add_argument("--batch-size", default="0", help="comma-separated batchSize values to run")
    ap.add_argument(
        "--profile", type=Path, help="run the router under py-spy, collapsed stacks into DIR"
    )
    ap.add_argument(
        "--compare-src",
        type=Path,
        help="also run the router from this src/ directory (e.g. of a git worktree of an "
        "older commit), interleaved, for before/after ratios from the same run",
    )
    ap.add_argument(
        "--filters", default="",
        help="also run the router with these filter chains, interleaved: routes, mutate",
    )
    ap.add_argument(
        "--transcode", type=int, metavar="N",
        help="instead: N 0.5 MB CT images through a node with TransferSyntax JPEG2000Lossless, "
        "against gdcmconv --j2k converting them on one core",
    )
    args = ap.parse_args()
    if not CLI.exists():
        raise SystemExit(f"{CLI} not found: install the project into this venv")
    if args.transcode:
        transcode_bench(args.transcode, args.rounds)
        return
    corpora = {c: make_corpus(c) for c in args.corpus.split(",")}
    start_outputs()
    before = calibrate(OUT.parent)  # untimed; printed with the figures
    print(before, file=sys.stderr)
    warm_up(next(iter(corpora.values())))
    durables = [v.strip().lower() == "true" for v in args.durable.split(",")]
    batches = [int(b) for b in args.batch_size.split(",")]
    trees: list[Path | None] = [None]
    if args.compare_src:
        trees.append(args.compare_src.resolve())
    scenarios = [Scenario("direct")]
    scenarios += [
        Scenario("router", dur, b, tree) for dur in durables for b in batches for tree in trees
    ]
    chains = [f.strip() for f in args.filters.split(",") if f.strip()]
    scenarios += [Scenario("router", dur, b, None, chain) for dur in durables for b in batches for chain in chains]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    times: dict[tuple[str, str], list[Times]] = {}
    for rnd in range(args.rounds):
        for cname, d in corpora.items():
            n = len(corpus_files(d))
            # the router scenarios in a balanced order (a Williams square): a run's place in
            # the round and the run just before it change its speed (the one right after the
            # direct run is the slowest), and over every k rounds (2k for an odd number k of
            # router scenarios) each has run once in every place and right after each of the
            # others, so a paired ratio holds neither bias (docs/performance.md)
            routers = scenarios[1:]
            order = scenarios[:1] + [routers[i] for i in balanced_order(len(routers), rnd)]
            for sc in order:
                settle()
                if sc.kind == "direct":
                    t = sc_direct(d)
                else:
                    assert sc.durable is not None
                    prof = (
                        args.profile / f"{cname}-dur{int(sc.durable)}-b{sc.batch_size}"
                        f"{'-cmp' if sc.src else ''}{'-' + sc.filters if sc.filters else ''}"
                        f"-r{rnd + 1}.folded"
                        if args.profile
                        else None
                    )
                    t = sc_router(
                        d, durable=sc.durable, batch_size=sc.batch_size, profile=prof, src=sc.src,
                        filters=sc.filters,
                    )
                times.setdefault((cname, sc.label), []).append(t)
                print(
                    f"round {rnd + 1} {cname} {sc.label:28s} {n / t[0]:7.1f} img/s"
                    f"  (intake {n / t[1]:7.1f} img/s, router CPU {1000 * sum(t[2]) / n:.2f} ms/img"
                    f" = {1000 * t[2][0] / n:.2f} + {1000 * t[2][1] / n:.2f} sender process,"
                    f" DCMTK ends {1000 * t[3] / n:.2f} ms/img)",
                    file=sys.stderr,
                    flush=True,
                )
    load = os.getloadavg()
    print(
        f"\n{args.rounds} interleaved rounds, medians; ratio = to DCMTK direct in this run; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n"
    )
    print(f"before the runs, {before}\nafter the runs, {calibrate(OUT.parent)}\n")
    cores = os.cpu_count() or 1
    print(
        "| scenario | corpus | img/s | MB/s | ratio | target | intake img/s | router CPU/img "
        "| of which sender process | DCMTK ends CPU/img | router CPU budget at the target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cname, d in corpora.items():
        files = corpus_files(d)
        n = len(files)
        mb = sum(os.path.getsize(p) for p, *_ in files) / 1e6
        ref = statistics.median(t[0] for t in times[(cname, "direct")])
        for sc in scenarios:
            runs = times[(cname, sc.label)]
            t = statistics.median(r[0] for r in runs)
            intake = statistics.median(r[1] for r in runs)
            cpu = statistics.median(sum(r[2]) for r in runs)
            child = statistics.median(r[2][1] for r in runs)
            dcmtk = statistics.median(r[3] for r in runs)
            if sc.kind == "router":
                assert sc.durable is not None
                goal = TARGETS[(cname, sc.durable)]
                # all cores busy at the target's pace, less what the DCMTK ends took per image
                budget = cores * ref / (goal * n) - dcmtk / n
                target = f">= {goal}x"
                cpu_text = (
                    f"{1000 * cpu / n:.2f} ms | {1000 * child / n:.2f} ms "
                    f"| {1000 * dcmtk / n:.2f} ms | {1000 * budget:.2f} ms"
                )
            else:
                target = ""
                cpu_text = f" | | {1000 * dcmtk / n:.2f} ms ({dcmtk / t:.2f} cores busy) | "
            print(
                f"| {sc.title} | {cname} | {n / t:.0f} | {mb / t:.1f} | {ref / t:.2f}x | {target} "
                f"| {n / intake:.0f} | {cpu_text} |"
            )
    _filter_ratios(corpora, scenarios, times)
    print(
        f"\nrouter CPU budget at the target: the CPU per image that would keep all {cores} cores "
        "busy at the target's pace, less what storescu and storescp took per image in the same "
        "scenario. A router within it could reach the target only if its work overlapped "
        "perfectly with storescu's; storescu sends one image at a time and waits for its "
        "response, so the router's latency per image counts too."
    )


def _filter_ratios(
    corpora: dict[str, Path], scenarios: list[Scenario], times: dict[tuple[str, str], list[Times]]
) -> None:
    """The filtered routers against the unfiltered one of the same durableWrites and batchSize."""
    filtered = [sc for sc in scenarios if sc.filters]
    if not filtered:
        return
    print("\n| filter chain | corpus | durableWrites | batchSize | ratio to the unfiltered router | target |")
    print("|---|---|---|---|---|---|")
    for cname in corpora:
        for sc in filtered:
            plain = Scenario("router", sc.durable, sc.batch_size)
            base = statistics.median(r[0] for r in times[(cname, plain.label)])
            t = statistics.median(r[0] for r in times[(cname, sc.label)])
            print(
                f"| {sc.filters} | {cname} | {str(sc.durable).lower()} | {sc.batch_size} "
                f"| {base / t:.2f}x | >= {FILTER_TARGETS[sc.filters]}x |"
            )


if __name__ == "__main__":
    main()
