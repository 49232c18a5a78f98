"""Latency of ``lrp serve``: one explanation of a drawn digit with the built-in MNIST model, end to end.

    .venv/bin/python benchmarks/serve_latency.py [--requests 200] [--threads N] [--out FILE]

Starts the real server (``lrp serve`` in a subprocess, on a free port of 127.0.0.1), then sends requests one
after another over one keep-alive connection, as the drawing page does: a 280x280 PNG of a drawn digit with
MNIST-style preprocessing and the raw relevance in the answer; also a 28x28 array as JSON, and the drawn digit
from 4 clients at once. Reports the client-side round trip (median, p95, max) and the server's own time, as a
markdown table; exits 1 when the drawn digit's median is over ``--budget`` milliseconds (default 50).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Callable

import httpx
import numpy as np
from PIL import Image, ImageDraw

import lrp

from machine import cpu_name  # benchmarks/machine.py

WARMUP = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lrp.cli", "serve", "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lrp serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("lrp serve did not start within 120 s")


def drawn_seven() -> bytes:
    """A 7 as the page's canvas sends it: white strokes 22 pixels wide on a black 280x280 RGBA PNG."""
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 255))
    ImageDraw.Draw(img).line([(70, 60), (205, 55), (125, 235)], fill=(255, 255, 255, 255), width=22,
                             joint="curve")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def measure(send: Callable[[], httpx.Response], n: int, clients: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Round-trip and server milliseconds of ``n`` requests (after a warm-up), from ``clients`` threads."""
    for _ in range(WARMUP):
        send().raise_for_status()

    def one(_: int) -> tuple[float, float]:
        start = time.perf_counter()
        r = send()
        elapsed = (time.perf_counter() - start) * 1000
        r.raise_for_status()
        return elapsed, r.json()["elapsed_ms"]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    return np.array([r[0] for r in results]), np.array([r[1] for r in results])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per case (default 200)")
    parser.add_argument("--threads", type=int, help="torch threads of the server (lrp serve --threads)")
    parser.add_argument("--budget", type=float, default=50.0, help="median budget in ms for the drawn digit")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/explain"
    server = start_server(port, args.threads)
    try:
        png = drawn_seven()
        digit = lrp.models.mnist_digits("test", limit=1)[0][0, 0].tolist()
        local = httpx.Client(timeout=30)  # one keep-alive connection, as a browser tab
        form = {"preprocess": "digit", "invert": "false", "raw": "true"}
        drawn = lambda: local.post(url, files={"image": ("drawing.png", png, "image/png")}, data=form)  # noqa: E731
        array = lambda: local.post(url, json={"array": digit, "raw": True})  # noqa: E731
        pooled = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=4))
        parallel = lambda: pooled.post(url, files={"image": ("drawing.png", png, "image/png")},  # noqa: E731
                                       data=form)
        assert drawn().json()["prediction"] == 7, "the drawn 7 is not recognised"
        cases = [("drawn digit: 280x280 PNG, digit preprocessing, raw values", drawn, 1),
                 ("held-out digit: 28x28 array as JSON, raw values", array, 1),
                 ("drawn digit, 4 clients at once", parallel, 4)]
        rows = []
        for name, send, clients in cases:
            total, on_server = measure(send, args.requests, clients)
            rows.append((name, clients, total, on_server))
    finally:
        server.terminate()
        server.wait(30)

    lines = [
        f"- lrp {lrp.__version__}, torch {metadata.version('torch')}, fastapi {metadata.version('fastapi')}, "
        f"uvicorn {metadata.version('uvicorn')}, Python {platform.python_version()}",
        f"- {cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} before the run; server torch threads: "
        f"{args.threads or 'default (1 for a model under 5 M parameters)'}; built-in MNIST model, composite "
        f"epsilon-plus-flat",
        f"- {args.requests} timed requests per case after {WARMUP} warm-ups; client and server on 127.0.0.1; "
        f"times in ms",
        "",
        "| request | clients | median | p95 | max | server median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, clients, total, on_server in rows:
        lines.append(f"| {name} | {clients} | {np.median(total):.1f} | {np.percentile(total, 95):.1f} | "
                     f"{total.max():.1f} | {np.median(on_server):.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# lrp serve latency\n\n`.venv/bin/python benchmarks/serve_latency.py`\n\n" + table + "\n")
    median = float(np.median(rows[0][2]))
    verdict = "within" if median < args.budget else "OVER"
    print(f"\ndrawn digit: median {median:.1f} ms, {verdict} the budget of {args.budget:.0f} ms")
    return 0 if median < args.budget else 1


if __name__ == "__main__":
    sys.exit(main())
