"""The Camera tab's WebSocket, ``/api/camera``: webcam frames explained as they come, the latest first.

The protocol (documented in docs/web.md): the server greets with ``{"type": "ready", ...}``; the client sends
options as JSON text (``{"model": "mnist", "preprocess": "digit", "invert": true, ...}``, the fields of
``POST /api/explain``; each message changes the fields it names and is answered ``{"type": "options", ...}``)
and frames as binary messages (JPEG, PNG, WebP... as ``POST /api/explain`` takes them). Each frame that is
explained is answered ``{"type": "result", ...}``: the prediction and heatmap as ``POST /api/explain`` gives them,
and ``view``, the frame with its heatmap drawn over it. A frame that cannot be explained is answered
``{"type": "error", "status": ..., "error": ..., "frame": n}`` and the session goes on; a frame or message over
the limits is answered with an error and the socket is closed with code 1009.

No backlog: one frame at a time is explained per session. A frame that arrives while another is being explained
waits in a single slot; a newer frame replaces it there (the older one is dropped, and counted). The page sends
its next frame only once the answer to the previous one is back, so that nothing waits at all.

The model runs in a worker thread, under the same lock as ``POST /api/explain`` (one explanation at a time per
model). When the client goes away, the session stops: a frame being explained is finished (a thread running a
model cannot be interrupted) and thrown away, and only then does the session count as closed.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import anyio
import numpy as np
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket

from ..errors import InputError, TargetError
from ..pipeline.inputs import Preprocess
from ..visualize import colorize, relevance_map
from . import service
from .schemas import CameraResult, CameraTiming, ExplainOptions, Frame
from .service import ServedModel, ServiceError

log = logging.getLogger("lrp.web")

PATH = "/api/camera"
MAX_FRAME_BYTES = 2 * 2**20  # one frame (the page sends JPEGs of at most 640 pixels a side: 20 to 80 kB)
MAX_FRAME_SIDE = 1920  # a frame's width and height
MAX_OPTIONS_CHARS = 4096  # one options message
MAX_SESSIONS = 8  # cameras served at once; more are turned away (close code 1013)
CLOSE_TOO_LARGE = 1009  # RFC 6455: a message too big to process
CLOSE_TRY_LATER = 1013  # RFC 6455: try again later (the server is busy)
CLOSE_POLICY = 1008  # RFC 6455: policy violation (here: no image model is served)
VIEW_QUALITY = 80  # JPEG quality of the frame with its heatmap
# the heatmap over the frame, as lrp video's overlay: colour weight alpha * |t|, t = sign(r) |r| ** gamma, over the
# frame in gray lifted into BASE_RANGE; the part of the frame the model did not see darkened by OUTSIDE
ALPHA, GAMMA = 0.75, 0.5
BASE_RANGE = (0.3, 0.9)
OUTSIDE = 0.45
LIFTED = [round(255 * BASE_RANGE[0] + v * (BASE_RANGE[1] - BASE_RANGE[0])) for v in range(256)]  # gray -> base
DARKENED = [round(v * OUTSIDE) for v in LIFTED]
MIN_CONTRAST = 0.2  # digits: ink must stand out of the paper by this much (of the full range) to count as ink
NO_INK = "no ink in view: hold a digit written on paper inside the square, the paper filling it"


class TooLarge(Exception):
    """A frame or message over the limits: answered, then the socket is closed (1009)."""


# --------------------------------------------------------------------------- frames

def clean_paper(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """A photo of dark ink on light paper, inverted (ink bright, paper dark), made into a drawing: the paper's
    level and noise (its median plus four robust standard deviations) become 0 and the brightest ink 1, so that
    shading and sensor noise do not count as ink. A drawing or a clean scan (most of it exactly 0) is left as it
    is. Returns the drawing and whether ink was found (else it is all 0)."""
    level = float(np.median(gray))
    spread = 1.4826 * float(np.median(np.abs(gray - level)))
    floor = level + 4 * spread
    peak = float(gray.max())
    if peak - floor < MIN_CONTRAST:
        return np.zeros_like(gray), False
    if floor <= 0:  # paper of one level, 0: a drawing or a clean scan
        return gray, True
    return np.clip((gray - floor) / (peak - floor), 0.0, 1.0).astype(gray.dtype), True


def seen_box(width: int, height: int, pre: Preprocess) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` frame a model sees after ``pre``'s resize and centre crop, as
    (left, top, right, bottom) in the frame's pixels (as ``lrp video`` finds it)."""
    rw, rh = width, height
    if pre.size:
        scale = pre.size / min(width, height)
        rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
    if not pre.crop or pre.crop > min(rw, rh):
        return 0.0, 0.0, float(width), float(height)
    left, top = (rw - pre.crop) // 2, (rh - pre.crop) // 2
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + pre.crop) * sx, (top + pre.crop) * sy


def render_view(picture: Image.Image, relevance: np.ndarray, box: tuple[float, float, float, float]) -> Image.Image:
    """The frame with the relevance map (h, w) drawn over ``box`` (left, top, right, bottom; it may reach past the
    frame's edges), as ``lrp video`` draws it: the frame in gray, lightened, with the heatmap blended in (colour
    ``bwr(t)`` with weight ``alpha * |t|``, ``t = sign(r) |r| ** 0.5`` for the relevance scaled by its largest
    magnitude, resized bilinearly onto ``box``); the part of the frame outside ``box`` darkened. Pillow does the
    per-pixel work (a few milliseconds for 640x480)."""
    gray = picture.convert("L")
    lifted = gray.point(LIFTED)
    out = gray.point(DARKENED).convert("RGB")
    width, height = gray.size
    left, top, right, bottom = box
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(right)), min(height, round(bottom))
    if x1 <= x0 or y1 <= y0 or right <= left or bottom <= top:
        return out
    r = np.asarray(relevance, dtype=np.float64)
    vmax = float(np.abs(r).max()) if r.size else 0.0
    scaled = np.clip(r / vmax, -1.0, 1.0) if vmax > 0 and math.isfinite(vmax) else np.zeros_like(r)
    t = np.sign(scaled) * np.abs(scaled) ** GAMMA
    layer = np.dstack([colorize(t), np.round(ALPHA * np.abs(t) * 255).astype(np.uint8)])
    h, w = r.shape
    sx, sy = w / (right - left), h / (bottom - top)  # the map's part that lies over the frame, in map pixels
    source = (max(0.0, (x0 - left) * sx), max(0.0, (y0 - top) * sy), min(w, (x1 - left) * sx),
              min(h, (y1 - top) * sy))
    heat = Image.fromarray(layer, "RGBA").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=source)
    seen = lifted.crop((x0, y0, x1, y1)).convert("RGBA")
    out.paste(Image.alpha_composite(seen, heat).convert("RGB"), (x0, y0))
    return out


def jpeg_data_url(img: Image.Image, quality: int = VIEW_QUALITY) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def oversized(data: bytes, number: int) -> Optional[str]:
    """Why a frame is over the limits (its bytes, or its size as its header gives it), or None."""
    if len(data) > MAX_FRAME_BYTES:
        return (f"frame {number} is too large: {len(data):,} bytes, at most {MAX_FRAME_BYTES:,} "
                f"({MAX_FRAME_BYTES // 2**20} MB) are taken; send smaller frames")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except Exception:  # not an image: said when it is explained
        return None
    if width > MAX_FRAME_SIDE or height > MAX_FRAME_SIDE:
        return (f"frame {number} is too large: {width}x{height} pixels, at most {MAX_FRAME_SIDE}x{MAX_FRAME_SIDE}; "
                f"send smaller frames")
    return None


def explain_frame(served: ServedModel, data: bytes, options: ExplainOptions, number: int = 1,
                  dropped: int = 0) -> CameraResult:
    """Explain one camera frame (encoded image bytes) with ``options``: the answer of ``/api/camera``. Raises
    :class:`ServiceError` for a frame that cannot be explained, :class:`TooLarge` for one over the limits."""
    started = time.perf_counter()
    too_large = oversized(data, number)
    if too_large:
        raise TooLarge(too_large)
    try:
        img = service.open_image(data, None)
    except ServiceError as exc:
        message = exc.message.replace("the file is not", "it is not")
        raise ServiceError(exc.status, f"frame {number}: {message}") from None
    width, height = img.size
    picture = img.convert("RGB")
    decoded = time.perf_counter()
    note = None
    if options.preprocess == "digit":  # as the drawing tab's digits, once the paper is taken out
        invert = served.pre.invert if options.invert is None else options.invert
        gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        drawing, ink = clean_paper(1.0 - gray if invert else gray)
        if not ink:
            note = NO_INK
        try:
            prepared = served.digit(drawing)
        except InputError as exc:
            raise ServiceError(422, str(exc)) from None
        x, y, w, h = prepared.frame or (0.0, 0.0, float(width), float(height))
        box = (x, y, x + w, y + h)
    else:
        prepared = service.image_input(served, picture, options)
        box = seen_box(width, height, served.pre)
    outcome = service.explain_outcome(served, prepared, options)
    answer = service.response(served, outcome, options, started, overlay=False)
    explained = time.perf_counter()
    view = jpeg_data_url(render_view(picture, relevance_map(outcome.relevance), box))
    done = time.perf_counter()
    left, top, right, bottom = box
    fields = dict(answer)
    fields.update(type="result", number=number, dropped=dropped, view=view, width=width, height=height,
                  seen=Frame(x=left, y=top, width=right - left, height=bottom - top), note=note,
                  timing=CameraTiming(decode_ms=_ms(decoded - started), explain_ms=_ms(explained - decoded),
                                      render_ms=_ms(done - explained)),
                  elapsed_ms=_ms(done - started))
    return CameraResult.model_construct(**fields)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# --------------------------------------------------------------------------- sessions

@dataclass
class _Frame:
    number: int
    data: bytes
    options: ExplainOptions


class _Session:
    """One open camera: its options, the frame waiting to be explained (one at most) and its counts."""

    def __init__(self, ws: WebSocket, options: ExplainOptions) -> None:
        self.ws = ws
        self.options = options
        self.waiting: Optional[_Frame] = None
        self.wake = anyio.Event()  # set when a frame is put in the slot; replaced once it is taken
        self.lock = anyio.Lock()  # one message at a time onto the socket
        self.received = 0
        self.dropped = 0
        self.closed = False
        self.scope: Optional[anyio.CancelScope] = None

    async def send(self, message: dict) -> bool:
        """Send a message; False (and the session stops) when the client has gone."""
        if self.closed:
            return False
        try:
            async with self.lock:
                await self.ws.send_text(json.dumps(message, separators=(",", ":")))
            return True
        except Exception:  # the client went away meanwhile
            self.stop()
            return False

    async def refuse(self, status: int, message: str, code: int) -> None:
        """Answer an error, then close the socket with ``code`` and stop."""
        await self.send({"type": "error", "status": status, "error": message})
        if not self.closed:
            try:
                await self.ws.close(code, message.encode()[:120].decode(errors="ignore"))  # at most 123 bytes
            except Exception:
                pass
        self.stop()

    def stop(self) -> None:
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()


class CameraSessions:
    """The camera sessions of one app (``app.state.camera``): :meth:`serve` serves one WebSocket. ``open`` counts
    the sessions being served and ``working`` the frames being explained in worker threads right now; both are 0
    once every camera has gone (a session ends only after its frame in the model is done). ``frames``,
    ``answered`` and ``dropped`` count frames over all sessions."""

    def __init__(self, pick: Callable[[Optional[str]], ServedModel], max_sessions: int = MAX_SESSIONS) -> None:
        self.pick = pick
        self.max_sessions = max_sessions
        self.open = 0
        self.working = 0
        self.sessions = 0  # served since the start
        self.frames = 0
        self.answered = 0
        self.dropped = 0

    def configure(self, current: ExplainOptions, text: str) -> ExplainOptions:
        """``current`` with the fields an options message names; :class:`ServiceError` when they do not fit."""
        try:
            payload = json.loads(text)
        except ValueError:
            raise ServiceError(400, "a text message must be JSON options, such as {\"model\": \"mnist\", "
                                    "\"preprocess\": \"digit\", \"invert\": true}; send frames as binary messages"
                               ) from None
        if not isinstance(payload, dict):
            raise ServiceError(422, "options must be a JSON object, such as {\"model\": \"mnist\"}")
        try:
            options = ExplainOptions.model_validate({**current.model_dump(exclude_unset=True), **payload})
        except ValidationError as exc:
            raise ServiceError(422, "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else str(e["msg"])
                for e in exc.errors()[:5])) from None
        self.check(options)
        return options

    def check(self, options: ExplainOptions) -> ServedModel:
        """The model the options name, once the options are checked against it."""
        served = self.pick(options.model)
        if options.composite not in service.COMPOSITES:
            raise ServiceError(422, f"unknown composite {options.composite!r}; choose one of "
                                    f"{', '.join(service.COMPOSITES)}")
        try:
            served.target(options.target)
        except TargetError as exc:
            raise ServiceError(400, str(exc)) from None
        if options.preprocess == "digit" and not served.drawable:
            shape = "x".join(str(d) for d in served.input_shape or ()) or "another input"
            raise ServiceError(422, f"preprocess 'digit' makes a 1x28x28 digit, but model {served.name!r} reads "
                                    f"{shape}: use preprocess 'model'")
        return served

    def ready(self, options: ExplainOptions) -> dict[str, Any]:
        return {"type": "ready", "model": self.pick(options.model).name, "options": options.model_dump(),
                "max_frame_bytes": MAX_FRAME_BYTES, "max_frame_side": MAX_FRAME_SIDE}

    async def serve(self, ws: WebSocket) -> None:
        """Serve one camera until it goes."""
        await ws.accept()
        self.open += 1
        self.sessions += 1
        session = _Session(ws, ExplainOptions.model_validate({}))
        try:
            try:
                self.pick(None)
            except ServiceError:  # no image model served
                await session.refuse(422, "the camera needs an image model, and none is served: start the server "
                                          "with --model mnist (or another image model)", CLOSE_POLICY)
                return
            if self.open > self.max_sessions:
                await session.refuse(503, f"{self.max_sessions} cameras are connected already, the most this "
                                          f"server takes: try again later", CLOSE_TRY_LATER)
                return
            if not await session.send(self.ready(session.options)):
                return
            async with anyio.create_task_group() as group:
                session.scope = group.cancel_scope
                group.start_soon(self._explain_frames, session)
                await self._read(session)
                group.cancel_scope.cancel()
        finally:
            session.closed = True
            self.open -= 1

    async def _read(self, session: _Session) -> None:
        """Take the client's messages until it goes: options are applied at once, a frame waits in the slot."""
        while not session.closed:
            message = await session.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                session.received += 1
                self.frames += 1
                number = session.received
                too_large = oversized(data, number)
                if too_large:
                    await session.refuse(413, f"{too_large} (the connection is closed)", CLOSE_TOO_LARGE)
                    return
                if session.waiting is not None:  # not explained yet, and now out of date
                    session.dropped += 1
                    self.dropped += 1
                session.waiting = _Frame(number, data, session.options)
                session.wake.set()
            elif text is not None:
                if len(text) > MAX_OPTIONS_CHARS:
                    await session.refuse(413, f"an options message of {len(text):,} characters is too large: at "
                                              f"most {MAX_OPTIONS_CHARS:,} (the connection is closed)",
                                         CLOSE_TOO_LARGE)
                    return
                try:
                    session.options = self.configure(session.options, text)
                except ServiceError as exc:
                    await session.send({"type": "error", "status": exc.status,
                                        "error": f"{exc.message} (the options stay as they were)"})
                    continue
                await session.send({"type": "options", "model": self.pick(session.options.model).name,
                                    "options": session.options.model_dump()})

    async def _explain_frames(self, session: _Session) -> None:
        """Explain the waiting frame, one at a time, until the session stops."""
        while not session.closed:
            await session.wake.wait()
            session.wake = anyio.Event()
            frame, session.waiting = session.waiting, None
            if frame is None:
                continue
            self.working += 1
            try:  # not cancelled midway: a session that stops waits here until the model is done
                message = await run_in_threadpool(self._answer, frame)
            finally:
                self.working -= 1
            if message.get("type") == "too-large":
                await session.refuse(413, f"{message['error']} (the connection is closed)", CLOSE_TOO_LARGE)
                return
            if message.get("type") == "result":
                message["dropped"] = session.dropped  # as of now: those replaced while this one was explained too
                self.answered += 1
            if not await session.send(message):
                return

    def _answer(self, frame: _Frame) -> dict[str, Any]:
        """The message that answers a frame (in a worker thread)."""
        try:
            served = self.check(frame.options)
            return explain_frame(served, frame.data, frame.options, frame.number).model_dump(mode="json")
        except ServiceError as exc:
            return {"type": "error", "status": exc.status, "error": exc.message, "number": frame.number}
        except TooLarge as exc:
            return {"type": "too-large", "error": str(exc)}
        except Exception as exc:
            log.exception("camera frame %d", frame.number)
            return {"type": "error", "status": 500, "error": f"frame {frame.number}: internal error: "
                                                             f"{type(exc).__name__}", "number": frame.number}

