"""Helpers for the ``lrp serve`` tests: a real uvicorn server in a thread, small models, drawn digits."""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def digit_png(x: torch.Tensor) -> bytes:
    """A (1, 28, 28) digit in [0, 1] as a PNG (exact: the shipped digits are multiples of 1/255)."""
    return png_bytes(Image.fromarray(np.round(x[0].numpy() * 255).astype(np.uint8)))


def drawn_one(size: int = 280, width: int = 22) -> Image.Image:
    """A '1' drawn as on the page's canvas: a white, slightly slanted stroke on black."""
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).line([(size * 0.55, size * 0.15), (size * 0.5, size * 0.85)], fill=255, width=width)
    return img


def tiny_rgb() -> nn.Module:
    """A small untrained RGB classifier with 3 classes, for 16x16 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)).eval()


# The slow model holds a bright request until the test opens the gate: a request that is still running, for as
# long as the test needs, with no clock involved.
SLOW_ENTERED = threading.Event()
SLOW_GATE = threading.Event()


class WaitOnBright(nn.Module):
    """Passes its input on; on a bright input (mean > 0.9) it first waits for ``SLOW_GATE`` (at most 60 s)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().mean()) > 0.9:
            SLOW_ENTERED.set()
            SLOW_GATE.wait(60)
        return x


def slow() -> nn.Module:
    """A 1x8x8 classifier that holds bright inputs until ``SLOW_GATE`` opens."""
    torch.manual_seed(0)
    return nn.Sequential(WaitOnBright(), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 8 * 8, 2)).eval()
