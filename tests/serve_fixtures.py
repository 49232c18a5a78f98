"""Helpers for the ``lrp serve`` tests: a real uvicorn server in a thread, small models, drawn digits."""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
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


# The camera's held model: like ``slow``, with gates of its own (the camera tests hold frames in the model while
# they send more, or close the socket).
CAMERA_ENTERED = threading.Event()
CAMERA_GATE = threading.Event()


class HoldBright(nn.Module):
    """Passes its input on; on a bright input (mean > 0.9) it first sets ``CAMERA_ENTERED`` and waits for
    ``CAMERA_GATE`` (at most 60 s)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().mean()) > 0.9:
            CAMERA_ENTERED.set()
            CAMERA_GATE.wait(60)
        return x


def held() -> nn.Module:
    """A 1x8x8 classifier that holds bright inputs until ``CAMERA_GATE`` opens."""
    torch.manual_seed(0)
    return nn.Sequential(HoldBright(), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 8 * 8, 2)).eval()


def paper_digit(digit: np.ndarray, size: tuple[int, int] = (280, 280), scale: int = 8, shift: tuple[int, int] = (0, 0),
                paper: float = 255.0, ink: float = 255.0, noise: float = 0.0, shading: float = 0.0,
                seed: int = 0) -> np.ndarray:
    """A (28, 28) white-on-black digit in [0, 1] as dark ink on light paper, as a camera sees it: enlarged
    ``scale`` times (nearest), centred in a ``size`` (width, height) sheet of gray ``paper`` (moved by ``shift``),
    the ink ``ink`` darker at full strength, with gaussian ``noise`` and a left-to-right ``shading`` ramp.
    uint8 (height, width). With the defaults exactly ``255 * (1 - digit)``, enlarged."""
    width, height = size
    sheet = np.full((height, width), paper, dtype=np.float64)
    if shading:
        sheet += np.linspace(-shading / 2, shading / 2, width)[None]
    big = np.kron(digit, np.ones((scale, scale)))
    top = (height - big.shape[0]) // 2 + shift[1]
    left = (width - big.shape[1]) // 2 + shift[0]
    sheet[top:top + big.shape[0], left:left + big.shape[1]] -= big * ink
    if noise:
        sheet += np.random.default_rng(seed).normal(0, noise, sheet.shape)
    return np.clip(np.round(sheet), 0, 255).astype(np.uint8)


TEXT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def text_checkpoints(root) -> dict:
    """Two tiny random Hugging Face checkpoints saved under ``root`` with a byte-level BPE tokenizer trained here
    (needs transformers): ``{"classifier": folder of a 3-class BERT, "causal-lm": folder of a Llama}``. Texts
    longer than 64 tokens do not fit them."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = ["the film was good and the actors were great", "a bad plot and a dull ending",
              "nothing special happens in this one", "free money now, click here to win a prize"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=64, pad_token_id=3)
    found = {
        "classifier": transformers.BertForSequenceClassification(transformers.BertConfig(
            num_labels=3, id2label=TEXT_LABELS, label2id={v: k for k, v in TEXT_LABELS.items()}, **sizes)),
        "causal-lm": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_key_value_heads=1, bos_token_id=0, eos_token_id=1, **sizes)),
    }
    folders = {}
    for kind, model in found.items():
        folder = Path(root) / kind
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


# A text model that holds texts with HOLD in them until the test opens the gate: an answer still on its way, for as
# long as the test needs (to check that the page does not show it once the text has changed).
HOLD = "[hold]"
TEXT_ENTERED = threading.Event()
TEXT_GATE = threading.Event()
TEXT_DONE = threading.Event()


def held_spam():
    """The spam model as ``lrp serve`` serves it, except that a text with ``HOLD`` in it waits for ``TEXT_GATE``
    (at most 60 s) before it is explained; ``TEXT_DONE`` is set when that answer is ready."""
    from lrp.web.text_service import ServedText

    class Held(ServedText):
        def explain(self, request):
            if HOLD not in request.text:
                return super().explain(request)
            TEXT_ENTERED.set()
            TEXT_GATE.wait(60)
            try:
                return super().explain(request)
            finally:
                TEXT_DONE.set()

    return Held.load("spam")
