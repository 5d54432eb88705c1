#!/usr/bin/env python
"""Instructions per image: the router's CPU work counted by valgrind, free of machine noise.

Usage:  .venv/bin/python bench/instructions.py [--compare-src TREE ...] [--counts 100,1100]
                                               [--reps 2] [--corpus S] [--durable]

On this machine (a virtual one, shared with others) throughput and CPU-time figures move by 10-30 %
from one run to the next, more than the few per cent a change to the hot path costs or saves.
The number of instructions the router executes does not depend on the machine's load: this runs
`capacitor-trio run` under `valgrind --tool=cachegrind --cache-sim=no`, sends it the first N images
of a corpus with DCMTK storescu (storescp is the destination, as in bench/e2e.py), waits until the
router has logged every one delivered, stops it and reads the instructions executed (Ir) by the
router process and by its sender process. Two runs with N0 and N1 images give the instructions
per image, (Ir(N1) - Ir(N0)) / (N1 - N0): the start-up (imports, opening the index) cancels out.

What is left is the router's own variation: how many instances each delivery batch and each
scheduler pass carries depends on timing, which valgrind slows about 30 times. On 1,000 images
the router process repeats within about 1 % and the sender process within about 5 %; run --reps 2
or more. The loop-lag watch (loopwatch.py) is turned off in the router measured: it wakes 100
times a second of wall-clock time, which under valgrind would be 30 times as many wake-ups per
image as in service.

`--compare-src TREE` (the src/ directory of another checkout, e.g. a git worktree of an older
commit) runs the same measurement from that tree, interleaved; the table gives the ratio of this
tree's figures to each. Instructions are not time: a system call counts one instruction here and
may cost microseconds (strace -c tells those apart); use bench/e2e.py for throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from transport import OUT, corpus_files, env, free_port, make_corpus, start_outputs, storescp

SRC = Path(__file__).resolve().parent.parent / "src"
DELIVERED = re.compile(r"delivered (\d+) instance")
#: the router as run here: the loop-lag watch asleep (see the module docstring)
LAUNCH = (
    "import sys, importlib.util; "
    "w = importlib.util.find_spec('capacitor_trio.loopwatch') and "
    "__import__('capacitor_trio.loopwatch', fromlist=['LoopLag']); "
    "w and setattr(w.LoopLag.watch, '__defaults__', (1e6,)); "
    "from capacitor_trio.cli import main; sys.argv[0] = 'capacitor-trio'; sys.exit(main())"
)


def router_config(data: Path, port: int, dest_port: int, durable: bool) -> None:
    data.mkdir(parents=True)
    (data / "config.yml").write_text(
        f"myAeTitle: CAPACITOR\nscpPort: {port}\ncachePath: {data / 'cache'}\n"
        f"durableWrites: {'true' if durable else 'false'}\nminimumAge: 0\nstorageInterval: 0\n"
        "batchSize: 0\nminFreeSpace: 0\napi:\n  enabled: false\n"
    )
    (data / "nodes.yml").write_text(
        f"- AeTitle: STORESCP\n  HostName: 127.0.0.1\n  Port: {dest_port}\n  NodeRole: Storage\n"
    )


def _watch_log(proc: subprocess.Popen[str], n: int, ready: threading.Event, done: threading.Event) -> None:
    assert proc.stderr is not None
    router_ready = sender_ready = False
    total = 0
    for line in proc.stderr:
        router_ready = router_ready or "router ready" in line
        sender_ready = sender_ready or ("sender process" in line and " started" in line)
        if router_ready and sender_ready:
            ready.set()
        m = DELIVERED.search(line)
        if m:
            total += int(m.group(1))
            if total >= n:
                done.set()


def instructions(src: Path, files: list[str], durable: bool, work: Path) -> tuple[int, int]:
    """(Ir of the router process, Ir of its sender process) for delivering `files`."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "dest").mkdir()
    dest = storescp(work / "dest")
    port = free_port()
    router_config(work / "data", port, dest.port, durable)
    argv = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--trace-children=yes",
        f"--cachegrind-out-file={work}/cg.%p", sys.executable, "-c", LAUNCH,
        "run", "--path", str(work / "data"),
    ]
    proc = subprocess.Popen(
        argv, env=env(True) | {"PYTHONPATH": str(src)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    ready, done = threading.Event(), threading.Event()
    threading.Thread(target=_watch_log, args=(proc, len(files), ready, done), daemon=True).start()
    try:
        if not ready.wait(600):
            raise RuntimeError("router not ready under valgrind within 600 s")
        timeouts = ["-to", "600", "-ta", "600", "-td", "600"]
        subprocess.run(
            ["storescu", "-aet", "BENCH", "-aec", "STORESCP", "-pdu", "131072", *timeouts,
             "127.0.0.1", str(port), *files],
            env=env(True), check=True, capture_output=True,
        )
        if not done.wait(600):
            raise RuntimeError("not every image delivered within 600 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(600)
        except subprocess.TimeoutExpired:
            proc.kill()
        dest.stop()
    return _read_counts(work)


def _read_counts(work: Path) -> tuple[int, int]:
    router = sender = 0
    for f in work.glob("cg.*"):
        text = f.read_text()
        cmd = re.search(r"^cmd: (.*)$", text, re.M)
        total = re.search(r"^summary: (\d+)", text, re.M)
        if cmd is None or total is None:
            continue
        if " run --path " in cmd.group(1):
            router += int(total.group(1))
        elif "sender_worker" in cmd.group(1):
            sender += int(total.group(1))
    return router, sender


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare-src", action="append", default=[], type=Path)
    ap.add_argument("--counts", default="100,1100")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--corpus", default="S")
    ap.add_argument("--durable", action="store_true")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    n0, n1 = (int(x) for x in args.counts.split(","))
    files = [p for p, *_ in corpus_files(make_corpus(args.corpus))]
    if n1 > len(files):
        sys.exit(f"corpus {args.corpus} has {len(files)} images")
    start_outputs()
    trees = [SRC, *[t.resolve() for t in args.compare_src]]
    per: dict[Path, list[tuple[float, float]]] = {t: [] for t in trees}
    for rep in range(args.reps):
        for k, tree in enumerate(trees if rep % 2 == 0 else reversed(trees)):
            a = instructions(tree, files[:n0], args.durable, OUT / f"instr-{rep}-{k}-a")
            b = instructions(tree, files[:n1], args.durable, OUT / f"instr-{rep}-{k}-b")
            figure = ((b[0] - a[0]) / (n1 - n0), (b[1] - a[1]) / (n1 - n0))
            per[tree].append(figure)
            print(f"{tree}: router {figure[0] / 1e6:.3f} M, sender {figure[1] / 1e6:.3f} M per image", file=sys.stderr)
    _table(per, trees, args)


def _table(per: dict[Path, list[tuple[float, float]]], trees: list[Path], args: argparse.Namespace) -> None:
    med = statistics.median
    print(f"\ninstructions per image (valgrind Ir), corpus {args.corpus}, durableWrites "
          f"{'true' if args.durable else 'false'}, images {args.counts}, medians of {args.reps}\n")
    print("| tree | router process | sender process | both | each run (router + sender) |")
    print("|---|---|---|---|---|")
    for t in trees:
        r, s = med(x[0] for x in per[t]), med(x[1] for x in per[t])
        runs = ", ".join(f"{(x[0] + x[1]) / 1e6:.3f}" for x in per[t])
        name = "this tree" if t == SRC else str(t)
        print(f"| {name} | {r / 1e6:.3f} M | {s / 1e6:.3f} M | {(r + s) / 1e6:.3f} M | {runs} |")
    ours = per[SRC]
    for t in trees[1:]:
        def ratio(i: int | None, t: Path = t) -> float:
            def of(x: tuple[float, float]) -> float:
                return x[0] + x[1] if i is None else x[i]
            return med(of(x) for x in ours) / med(of(x) for x in per[t])
        print(f"\nthis tree / {t}: router {ratio(0):.3f}, sender {ratio(1):.3f}, both {ratio(None):.3f}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
