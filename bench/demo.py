"""How fast the draw-a-digit page answers, on whatever machine runs it.

  server_work    what the server does for one drawing, in-process: decode the PNG, the
                 MNIST recipe, the forward pass with every layer, the JSON encoding (ms)
  http           the same through the running server on loopback, one request after
                 another on one connection (ms)
  browser        with --browser: from the end of a stroke drawn by the mouse in Chromium
                 to the page showing its answer and maps (ms)

Median and 99th percentile over --requests drawings (MNIST test digits drawn dark on
white at 280x280, as the page's canvas sends them).

With --hostile, instead: a real ``eval.py --serve`` process under ``bench.hostile``'s
clients, 200 uploads of each hostile kind (--per-kind) while valid drawings are sent,
then an endless body and 150 slow bodies at once, again with drawings: the server's
resident memory before and after, each kind's slowest refusal, the drawings' latencies
under attack, and whether the targets hold (an over-cap upload refused in under 100 ms,
drawings' median under 50 ms, memory back within 150 MB).

    python -m bench.demo [--json] [--requests 1000] [--browser]
    python -m bench.demo --hostile [--per-kind 200] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import time
from typing import Any

import jax
import numpy as np
from PIL import Image

from bench import common
from lenet_jax import demo, pretrained


def drawings(n: int) -> list[bytes]:
    ds = common.mnist()
    out = []
    for digit in ds.test_images[:n]:
        buffer = io.BytesIO()
        Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BILINEAR).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def summary(ms: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(ms), "p99": float(np.percentile(ms, 99)), "unit": "ms", "n": len(ms)}


def browser_latencies(url: str, strokes: int) -> list[float]:
    """Stroke end to answer shown, in Chromium (Playwright with Debian's browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1800, "height": 760})
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        box = page.locator("#pad").bounding_box()
        for k in range(strokes):
            page.click("#clear")
            x = 100 + 10 * (k % 8)
            page.mouse.move(box["x"] + x, box["y"] + 50)
            page.mouse.down()
            page.mouse.move(box["x"] + x + 30, box["y"] + 230, steps=6)
            page.mouse.up()
            page.wait_for_function(f"window.latencies.length > {k} && window.demoIdle()")
        latencies = page.evaluate("window.latencies")
        browser.close()
    return latencies


def measure(requests: int = 1000, browser: bool = False, strokes: int = 30) -> dict[str, Any]:
    params, config, _ = pretrained.load()
    reader = demo.DigitReader(params, config, "shipped")
    images = drawings(requests)
    work = []
    for data in images:
        t0 = time.perf_counter()
        json.dumps(reader.read(data))
        work.append(1000 * (time.perf_counter() - t0))
    results: dict[str, Any] = {"server_work": summary(work)}
    page = demo.Background(reader)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=60)
        loop = []
        for data in images:
            t0 = time.perf_counter()
            conn.request("POST", "/api/read", body=data)
            response = conn.getresponse()
            response.read()
            loop.append(1000 * (time.perf_counter() - t0))
            assert response.status == 200
        conn.close()
        results["http"] = summary(loop)
        if browser:
            results["browser"] = summary(browser_latencies(page.url, strokes))
    finally:
        page.stop()
    device = jax.devices()[0]
    return common.result(f"jax {jax.__version__}", jax.default_backend(), None if device.platform == "cpu" else device.device_kind,
                         {"requests": requests, "image": "280x280 PNG", "model": "shipped"}, results)


def hostile_run(per_kind: int = 200) -> dict[str, Any]:
    """The server under hostile clients (see the module's doc), in a process of its own."""
    import os
    import subprocess
    import sys

    from bench import hostile

    valid = drawings(20)
    proc = subprocess.Popen([sys.executable, "eval.py", "--serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        line = proc.stdout.readline()
        port = int(line.split(" at ")[1].split()[0].rsplit(":", 1)[1].strip("/"))
        uploads = hostile.upload_attack(port, proc.pid, valid, per_kind=per_kind)
        before = hostile.rss_mb(proc.pid)
        slow = hostile.SlowBodies(port, n=150, gap=1.0, seconds=40)
        endless: dict[str, Any] = {}
        t0 = time.perf_counter()
        with hostile.Drawer(port, valid) as drawer:
            endless = hostile.endless_body(port, seconds=20)
            hostile.wait_until(lambda: slow.open_count() == 0, seconds=30)
            slow_closed_s = time.perf_counter() - t0
        slow.close()
        connections = {"endless_body": endless, "slow_bodies_closed_after_s": slow_closed_s, "slow_bodies_still_open": slow.open_count(),
                       "drawings": {"n": len(drawer.ms), "statuses": sorted(set(drawer.statuses)), "median_ms": statistics.median(drawer.ms),
                                    "p99_ms": float(np.percentile(drawer.ms, 99))},
                       "rss_before_mb": before, "rss_after_mb": hostile.rss_mb(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    over_cap = [k for k in uploads["kinds"].values() if k["over_cap"]]
    targets = {
        "over-cap refused in < 100 ms (slowest)": (max(k["max_ms"] for k in over_cap), max(k["max_ms"] for k in over_cap) < 100),
        "drawings' median < 50 ms during uploads": (uploads["drawings"]["median_ms"], uploads["drawings"]["median_ms"] < 50),
        "memory back within 150 MB": (uploads["rss_after_mb"] - uploads["rss_before_mb"],
                                      uploads["rss_after_mb"] - uploads["rss_before_mb"] < 150),
    }
    device = jax.devices()[0]
    return common.result(f"jax {jax.__version__}", jax.default_backend(), None if device.platform == "cpu" else device.device_kind,
                         {"per_kind": per_kind, "server": "eval.py --serve (shipped model)"},
                         {"uploads": uploads, "connections": connections,
                          "targets": {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()}})


def print_hostile(r: dict[str, Any]) -> None:
    u, c = r["results"]["uploads"], r["results"]["connections"]
    print(f"machine: {common.describe(r['machine'])}")
    print(f"{'upload kind':<18}{'bytes':>9}{'answer':>8}{'median ms':>11}{'slowest ms':>12}{'server RSS MB':>15}")
    for name, k in u["kinds"].items():
        print(f"{name:<18}{k['bytes']:>9,}{'/'.join(map(str, k['statuses'])):>8}{k['median_ms']:>11.1f}{k['max_ms']:>12.1f}{k['rss_mb']:>15.0f}")
    d = u["drawings"]
    print(f"server memory: {u['rss_before_mb']:.0f} MB before, {u['rss_after_mb']:.0f} MB after; "
          f"valid drawings meanwhile: {d['n']}, answers {d['statuses']}, median {d['median_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms")
    e, d = c["endless_body"], c["drawings"]
    print(f"endless chunked body: answer {e['status']}, connection closed: {e['closed']}, after {e['sent_bytes']:,} bytes sent")
    print(f"150 slow bodies: all closed after {c['slow_bodies_closed_after_s']:.1f} s ({c['slow_bodies_still_open']} still open); "
          f"valid drawings meanwhile: {d['n']}, answers {d['statuses']}, median {d['median_ms']:.1f} ms")
    for name, t in r["results"]["targets"].items():
        print(f"target {name}: {t['value']:.1f} {'met' if t['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--browser", action="store_true", help="also the stroke-to-answer time in Chromium (needs playwright)")
    parser.add_argument("--strokes", type=int, default=30, help="strokes drawn with --browser")
    parser.add_argument("--hostile", action="store_true", help="the server under hostile clients instead (see above)")
    parser.add_argument("--per-kind", type=int, default=200, help="uploads of each hostile kind with --hostile")
    args = parser.parse_args(argv)
    if args.hostile:
        r = hostile_run(args.per_kind)
        print(json.dumps(r)) if args.json else print_hostile(r)
        return
    common.emit(measure(args.requests, args.browser, args.strokes), args.json)


if __name__ == "__main__":
    main()
