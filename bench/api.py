"""Benchmark of the management API under load.

Starts a router (run_router, durable writes on unless --no-durable) with 100,000 items queued for
a paused node, keeps DCMTK's storescu sending images to it (delivered on to a DCMTK storescp),
and measures from a separate client process the latency of

    GET /api/nodes
    GET /api/queue/items?state=failed&limit=100
    GET /api/metrics

Prints requests/s and p50/p99 per endpoint. Target: p99 <= 50 ms for each while receiving.

    .venv/bin/python bench/api.py [--items 100000] [--requests 2000] [--concurrency 4]

`--scrape-compare ROUNDS` measures instead what monitoring costs intake and delivery: the same
router, storescu sending all along, alternating windows of `--window` seconds without and with a
separate process scraping `GET /metrics` every second (as Prometheus would) and refreshing the
dashboard every 2 s (its page, then the JSON it asks for, as web/static/app.js does); prints images
received and delivered per second in each window, the mean per mode and their ratio. Target:
within 3 %.

    .venv/bin/python bench/api.py --scrape-compare 4 --window 15 --items 20000
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENDPOINTS = ("/api/nodes", "/api/queue/items?state=failed&limit=100", "/api/metrics")


# ---- the client (a separate process, so it does not share the router's CPU time slice) -------


def _worker(port: int, path: str, n: int, latencies: list[float], errors: list[int], lock: threading.Lock) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    local: list[float] = []
    bad = 0
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        local.append(time.perf_counter() - t0)
        if resp.status != 200:
            bad += 1
    conn.close()
    with lock:
        latencies.extend(local)
        errors.append(bad)


def client_main(port: int, requests: int, concurrency: int, warmup: int) -> None:
    results: dict[str, Any] = {}
    for path in ENDPOINTS:
        lock = threading.Lock()
        _worker(port, path, warmup, [], [], lock)
        latencies: list[float] = []
        errors: list[int] = []
        per_thread = max(1, requests // concurrency)
        threads = [
            threading.Thread(target=_worker, args=(port, path, per_thread, latencies, errors, lock))
            for _ in range(concurrency)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        latencies.sort()
        results[path] = {
            "requests": len(latencies),
            "errors": sum(errors),
            "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": 1000 * latencies[-1],
        }
    print(json.dumps(results))


#: what an open dashboard asks every 2 s (web/static/app.js, refreshDashboard)
DASHBOARD_REFRESH = ("/api/nodes", "/api/service/status", "/api/service/processing-status")


def scrape_main(port: int, seconds: float) -> None:
    """For `seconds`: GET /metrics every second (as Prometheus would) and, as an open dashboard
    does, its page once and its refresh every 2 s (the scraper process of --scrape-compare)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(path: str) -> None:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"GET {path}: {resp.status}")

    get("/")
    end = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < end:
        t0 = time.monotonic()
        get("/metrics")
        if tick % 2 == 0:
            for path in DASHBOARD_REFRESH:
                get(path)
        tick += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    conn.close()


async def compare_scraping(router: Any, args: argparse.Namespace) -> None:
    """Alternate windows without and with a /metrics scraper; print the rates and their ratio."""
    import trio

    ctx = router.supervisor.ctx
    rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    print(f"\n{'window':<8} {'scraped':<8} {'received/s':>11} {'delivered/s':>12}")
    for k in range(2 * args.scrape_compare):
        scraped = k % 2 == 1
        received0, delivered0, t0 = router.metrics.received(), ctx.delivered_count.value, time.perf_counter()
        if scraped:
            await trio.run_process(
                [sys.executable, __file__, "--scrape", str(router.api_port), "--window", str(args.window)],
                check=True,
            )
        else:
            await trio.sleep(args.window)
        elapsed = time.perf_counter() - t0
        rate = ((router.metrics.received() - received0) / elapsed, (ctx.delivered_count.value - delivered0) / elapsed)
        rates[scraped].append(rate)
        print(f"{k + 1:<8} {'yes' if scraped else 'no':<8} {rate[0]:>11.0f} {rate[1]:>12.0f}")
    without = [statistics.mean(r[i] for r in rates[False]) for i in (0, 1)]
    scraped_ = [statistics.mean(r[i] for r in rates[True]) for i in (0, 1)]
    print(f"\nmean without: received {without[0]:.0f}/s, delivered {without[1]:.0f}/s")
    print(f"mean scraped: received {scraped_[0]:.0f}/s, delivered {scraped_[1]:.0f}/s")
    print(f"scraped / without: received {scraped_[0] / without[0]:.3f}, delivered {scraped_[1] / without[1]:.3f}"
          " (target: within 3 %)")


# ---- the router side -------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def router_main(args: argparse.Namespace) -> None:
    import trio
    from tests.helpers.datasets import make_dataset, write_dataset
    from tests.helpers.nodes_yml import write_nodes

    from capacitor_trio.actors.messages import Pause
    from capacitor_trio.config.models import ApiConfig, Config, Node, Settings
    from capacitor_trio.domain.instance import Destination
    from capacitor_trio.runtime import run_router

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        pacs_port = free_port()
        (work / "pacs").mkdir()
        storescp = subprocess.Popen(  # noqa: ASYNC220 - started once, before any serving
            ["storescp", "-aet", "PACS", "-od", str(work / "pacs"), "--ignore", str(pacs_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        nodes = (
            Node(ae_title="PACS", host_name="127.0.0.1", port=pacs_port),
            Node(ae_title="ARCHIVE", host_name="127.0.0.1", port=free_port()),
        )
        data_dir = work / "data"
        data_dir.mkdir()
        write_nodes(data_dir / "nodes.yml", nodes)
        config = Config(
            data_dir=data_dir, cache_path=data_dir / "cache", scp_port=free_port(),
            durable_writes=args.durable, minimum_age=0, storage_interval=0,
            api=ApiConfig(enabled=True, port=0, token="bench"),
        )
        images = work / "images"
        images.mkdir()
        for k in range(20):
            write_dataset(images / f"{k}.dcm", make_dataset(rows=256, columns=256, seed=k))
        async with trio.open_nursery() as nursery:
            router = await nursery.start(functools.partial(run_router, Settings(config, nodes)))
            await router.store.set_paused(Destination("ARCHIVE"), True)
            await router.supervisor.handle("ARCHIVE").call(Pause())
            t0 = time.perf_counter()
            from tests.helpers.fill import bulk_insert

            await bulk_insert(router.store, args.items, dest="ARCHIVE", patients=500, retry_in=3600)
            print(f"queued {args.items} items in {time.perf_counter() - t0:.1f} s", flush=True)

            sent = 0
            stop = trio.Event()

            async def send_forever() -> None:
                nonlocal sent
                files = sorted(str(p) for p in images.iterdir())
                while not stop.is_set():
                    await trio.run_process(
                        ["storescu", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", str(config.scp_port), *files],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                    )
                    sent += len(files)

            if args.receive:
                nursery.start_soon(send_forever)
                await trio.sleep(1)
            if args.scrape_compare:
                await compare_scraping(router, args)
                stop.set()
                nursery.cancel_scope.cancel()
                storescp.terminate()
                return
            received_before = router.receiver.received
            t_start = time.perf_counter()
            proc = await trio.run_process(
                [sys.executable, __file__, "--client", str(router.api_port), "--requests", str(args.requests),
                 "--concurrency", str(args.concurrency)],
                capture_stdout=True, check=True,
            )
            elapsed = time.perf_counter() - t_start
            received = router.receiver.received - received_before
            stop.set()
            results = json.loads(proc.stdout)
            counts = await router.store.counts()
            nursery.cancel_scope.cancel()
        storescp.terminate()
        storescp.wait(5)
        print(
            f"\nitems queued: {counts.total}   durable writes: {'on' if args.durable else 'off'}   "
            f"client threads: {args.concurrency}"
        )
        print(
            f"images received during the run: {received} ({received / elapsed:.0f}/s)"
            if args.receive else "not receiving"
        )
        print(f"\n{'endpoint':<45} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}")
        worst = 0.0
        for path, r in results.items():
            worst = max(worst, r["p99_ms"])
            print(f"GET {path:<41} {r['rps']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['errors']:>6}")
        print(f"\ntarget p99 <= 50 ms: {'met' if worst <= 50 else 'NOT met'} (worst p99 {worst:.1f} ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (keep-alive connections)")
    parser.add_argument("--no-durable", dest="durable", action="store_false")
    parser.add_argument("--no-receive", dest="receive", action="store_false")
    parser.add_argument("--scrape-compare", type=int, default=0, metavar="ROUNDS",
                        help="alternate ROUNDS windows without and with /metrics scraped every second")
    parser.add_argument("--window", type=float, default=15.0, help="seconds per --scrape-compare window")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scrape", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scrape:
        scrape_main(args.scrape, args.window)
        return
    if args.client:
        client_main(args.client, args.requests, args.concurrency, warmup=50)
        return
    if not (shutil.which("storescu") and shutil.which("storescp")):
        sys.exit("bench/api.py needs DCMTK (storescu, storescp) on PATH")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    import trio

    os.environ.setdefault("PYTHONHASHSEED", "0")
    trio.run(router_main, args)


if __name__ == "__main__":
    main()
