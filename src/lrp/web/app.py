"""The FastAPI app of ``lrp serve``: the page (``/``), its files (``/static``) and the JSON API (``/api``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping, Optional, Sequence, Union

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import camera, service
from ..pipeline.text import is_text_spec
from .schemas import (MAX_SEED, MAX_TEXT_CHARS, TEXT_COMPOSITE, VQA_COMPOSITE, ErrorResponse, ExplainArrayRequest,
                      ExplainForm, ExplainOptions, ExplainResponse, ExplainTextRequest, ExplainTextResponse, Limits,
                      ModelInfo, ModelsResponse, PreprocessingInfo, Sample, TextExample, VQAExplainRequest,
                      VQAExplainResponse, VQASceneResponse)
from .service import MAX_BYTES, MAX_SIDE, ServedModel, ServiceError
from .text_service import DEFAULT_MODELS, ServedText
from .vqa_service import Served, ServedVQA, is_vqa_spec

try:  # Swagger UI and ReDoc from the package, not from a CDN: /docs works without Internet
    from fastapi_offline import FastAPIOffline as _FastAPI
except ImportError:  # pragma: no cover - the web extra installs it
    _FastAPI = FastAPI  # type: ignore[assignment]

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lrp.web")

ERRORS: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "undecodable body or image, bad target"},
    413: {"model": ErrorResponse, "description": f"body over {MAX_BYTES // 2**20} MB, image over "
                                                 f"{MAX_SIDE}x{MAX_SIDE} pixels, text over {MAX_TEXT_CHARS:,} "
                                                 f"characters (or over the tokens a model reads)"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data or JSON; the file is not a supported "
                                                 "image"},
    422: {"model": ErrorResponse, "description": "invalid fields, unknown model or composite, wrong array "
                                                 "shape, an empty text, a text for an image model or an array "
                                                 "or image for a text model, a model that fails on the input"},
}

VQA_ERRORS: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a target that is not an answer"},
    413: {"model": ErrorResponse, "description": f"body over {MAX_BYTES // 2**20} MB"},
    422: {"model": ErrorResponse, "description": "a question with unknown words, without words or too long (the "
                                                 "message names the vocabulary), a seed out of range, invalid "
                                                 "fields, an unknown model or composite"},
}

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class PayloadTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"request body too large: at most {MAX_BYTES} bytes ({MAX_BYTES // 2**20} MB)")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by its Content-Length before reading it, or while
    reading it (chunked uploads). The rest of the body is read and dropped first (up to ``DRAIN_BYTES``), so that
    the client, still sending, gets the answer instead of a reset connection."""

    def __init__(self, app: Any, max_bytes: int = MAX_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            if b"100-continue" not in headers.get(b"expect", b"").lower():  # else the client waits to send it
                await _drain(receive)
            await JSONResponse({"error": PayloadTooLarge().detail}, 413,
                               headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise PayloadTooLarge()
            return message

        await self.app(scope, limited, send)


DRAIN_BYTES = 64 * 2**20


async def _drain(receive: Receive) -> None:
    drained = 0
    while drained <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)


def _known(shape: Optional[tuple[Optional[int], ...]]) -> Optional[list[int]]:
    """A sample shape as a list when every size is known, else None."""
    return [d for d in shape if d is not None] if shape is not None and None not in shape else None


def _model_info(served: Served) -> ModelInfo:
    if isinstance(served, ServedVQA):
        return ModelInfo(name=served.name, modality="vqa", kind=served.kind, input_shape=served.input_shape,
                         num_classes=len(served.classes), classes=served.classes, drawable=False,
                         composites=served.composites, default_composite=VQA_COMPOSITE, accuracy=served.accuracy,
                         vocabulary=served.vocabulary)
    if isinstance(served, ServedText):
        pipeline = served.pipeline
        return ModelInfo(name=served.name, modality="text", kind=served.kind, input_shape=None,
                         num_classes=len(served.classes), preprocessing=None,
                         classes=served.classes, drawable=False, composites=served.composites,
                         default_composite=TEXT_COMPOSITE, accuracy=pipeline.accuracy,
                         max_tokens=pipeline.max_tokens, truncates=pipeline.truncates)
    pre = served.pre
    return ModelInfo(
        name=served.name, kind=served.loaded.kind,
        input_shape=_known(served.input_shape),
        num_classes=served.num_classes, classes=served.classes, drawable=served.drawable,
        composites=list(service.COMPOSITES), default_composite=service.DEFAULT_COMPOSITE,
        preprocessing=PreprocessingInfo(size=pre.size, crop=pre.crop, mean=list(pre.mean) if pre.mean else None,
                                        std=list(pre.std) if pre.std else None, grayscale=pre.grayscale,
                                        invert=pre.invert, scale=pre.scale, bgr=pre.bgr))


def _openapi_body() -> dict:
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": ExplainForm.model_json_schema()},
        "application/json": {"schema": {"oneOf": [ExplainArrayRequest.model_json_schema(),
                                                  ExplainTextRequest.model_json_schema()]}},
    }}}


def load_model(spec: str) -> Served:
    """The VQA model (``vqa``), a text model (``spam``, ``hf:DIR``) or an image model (anything else ``lrp explain
    --model`` takes)."""
    if is_vqa_spec(spec):
        return ServedVQA.load(spec)
    return ServedText.load(spec) if is_text_spec(spec) else ServedModel.load(spec)


def create_app(models: Sequence[Union[Served, str]] = DEFAULT_MODELS, *, warm_up: bool = True) -> FastAPI:
    """The web app serving ``models`` (:class:`ServedModel`, :class:`ServedText`, :class:`ServedVQA` or specs as
    ``lrp explain --model`` takes them: ``spam`` and ``hf:DIR`` are text models, ``vqa`` the VQA model). The first
    image model is the default for images and arrays, the first text model for texts, the first VQA model for
    questions about scenes. ``warm_up`` runs each model once now, so that the first request is fast."""
    served: dict[str, Served] = {}
    for spec in models:
        m = load_model(spec) if isinstance(spec, str) else spec
        name, k = m.name, 1
        while name in served:
            k += 1
            name = f"{m.name}#{k}"
        m.name = name
        if warm_up:
            m.warm_up()
        served[name] = m
    if not served:
        raise ValueError("create_app needs at least one model")

    app = _FastAPI(title="lrp", version=_version(),
                   description="Layer-wise Relevance Propagation: why did the model predict that? "
                               "Draw, upload, type a text or ask about a scene on the page at `/`; the JSON API "
                               "is below.")
    app.state.models = served
    app.add_middleware(BodyLimit, max_bytes=MAX_BYTES)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def pick(name: Optional[str], modality: str) -> Served:
        """The model ``name`` (default: the first of ``modality``), which must read ``modality``."""
        if name and name not in served:
            raise ServiceError(422, f"unknown model {name!r}; served: {', '.join(served)}")
        found = served[name] if name else next((m for m in served.values() if m.modality == modality), None)
        if found is None or found.modality != modality:
            raise ServiceError(422, _wrong_modality(name, modality, served))
        return found

    def pick_image(name: Optional[str]) -> ServedModel:
        found = pick(name, "image")
        assert isinstance(found, ServedModel)
        return found

    def pick_text(name: Optional[str]) -> ServedText:
        found = pick(name, "text")
        assert isinstance(found, ServedText)
        return found

    def pick_vqa(name: Optional[str]) -> ServedVQA:
        found = pick(name, "vqa")
        assert isinstance(found, ServedVQA)
        return found

    app.state.camera = camera.CameraSessions(pick_image)

    @app.websocket(camera.PATH)
    async def camera_frames(ws: WebSocket) -> None:
        """The Camera tab: frames in (binary), options in (JSON text), answers out (JSON); see lrp.web.camera."""
        await app.state.camera.serve(ws)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    text_models = [n for n, m in served.items() if m.modality == "text"]
    texts = bool(text_models)

    @app.get("/api/models", response_model=ModelsResponse, summary="The models served", tags=["models"])
    def list_models() -> JSONResponse:
        """Each model's name, modality (image or text), input shape, class names, held-out accuracy (where
        known) and the composites it can be explained with; and the limits on requests."""
        answer = ModelsResponse(models=[_model_info(m) for m in served.values()],
                                limits=Limits(max_bytes=MAX_BYTES, max_side=MAX_SIDE,
                                              max_text_chars=MAX_TEXT_CHARS if texts else None)).model_dump(mode="json")
        if not texts:  # the text limit only where texts are taken
            del answer["limits"]["max_text_chars"]
        return JSONResponse(answer)

    @app.get("/api/samples", response_model=list[Sample], summary="Held-out MNIST digits, one per class",
             tags=["models"])
    def samples() -> tuple[Sample, ...]:
        """Digits the built-in MNIST model was not trained on, to try the drawing page with."""
        return service.digit_samples()

    @app.get("/api/examples", response_model=list[TextExample], responses={422: {"model": ErrorResponse}},
             summary="Held-out example texts of a text model", tags=["models"])
    def examples(model: Optional[str] = None) -> list[TextExample]:
        """Texts the model was not trained on, with their true class: the built-in spam model's 20 held-out mails
        (10 ham, 10 spam); an empty list for other text models. `model`: a served text model (default: the
        first)."""
        if model in served and served[model].modality != "text":
            where = ("its scenes and suggested questions are at GET /api/vqa/scene"
                     if served[model].modality == "vqa" else "its held-out digits are at GET /api/samples")
            raise ServiceError(422, f"model {model!r} reads {_READS[served[model].modality]}: {where}; example texts "
                                    f"are for text models ({', '.join(text_models) or 'none served'})")
        return pick_text(model).examples()

    @app.post("/api/explain", response_model=Union[ExplainResponse, ExplainTextResponse], responses=ERRORS,
              openapi_extra=_openapi_body(), summary="Predict and explain one input", tags=["explain"])
    async def explain(request: Request) -> Union[ExplainResponse, ExplainTextResponse]:
        """Image models: send an image file as `multipart/form-data` (field `image`, plus the options as
        fields) or an array as JSON (`{"array": [[...]], ...}`); the answer is an `ExplainResponse`. Text models:
        send JSON `{"model": "spam", "text": "..."}` (`ExplainTextRequest`); the answer is an
        `ExplainTextResponse`, a relevance per token. The model runs in a worker thread."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await request.body()
            return await run_in_threadpool(_explain_json, body, served, pick_image, pick_text)
        if kind == "multipart/form-data":
            upload, options = await _read_form(request)
            data = await upload.read()
            await upload.close()
            return await run_in_threadpool(service.explain_image, pick_image(options.model), data,
                                           upload.content_type, options)
        raise ServiceError(415, f"unsupported content type {kind or 'none'!r}: send multipart/form-data with an "
                                f"image file (field 'image'), or application/json with an array (image models) or "
                                f"a text (text models)")

    @app.get("/api/vqa/scene", response_model=VQASceneResponse, responses={422: {"model": ErrorResponse}},
             summary="A generated Shapes VQA scene and questions about it", tags=["vqa"])
    def vqa_scene(seed: Optional[int] = Query(None, ge=0, le=MAX_SEED, description="the scene; default: a random "
                                                                                    "one"),
                  model: Optional[str] = None) -> VQASceneResponse:
        """The scene of `seed` (the same seed gives the same scene; without one a random seed, returned) as a PNG
        enlarged 4 times for display (the model reads it at 64 x 64), its objects, and one generated question per
        template that the scene answers. `model`: a served VQA model (default: the first)."""
        return pick_vqa(model).scene(seed)

    @app.post("/api/vqa/explain", response_model=VQAExplainResponse, responses=VQA_ERRORS,
              summary="Answer a question about a scene and explain the answer", tags=["vqa"])
    def vqa_explain(request: VQAExplainRequest) -> VQAExplainResponse:
        """Ask the VQA model a question about the scene of `seed` and explain its answer (or the answer `target`)
        with one LRP pass over the pixels and the words: the heatmap over the scene, the relevance of each word,
        the probability of each answer and, for a question that follows a template, the ground truth. Runs in a
        worker thread."""
        return pick_vqa(request.model).explain(request)

    return app


_READS = {"image": "images", "text": "text", "vqa": "questions about Shapes VQA scenes"}


def _wrong_modality(name: Optional[str], modality: str, served: dict[str, Served]) -> str:
    """Why model ``name`` (None: no model of ``modality`` is served) cannot take an input of ``modality``."""
    others = [n for n, m in served.items() if m.modality == modality]
    if modality == "vqa":
        where = (f"questions about scenes go to a VQA model ({', '.join(others)})" if others else
                 "no VQA model is served: start the server with --model vqa")
        return f"model {name!r} reads {_READS[served[name].modality]}; {where}" if name else where
    if name and served[name].modality == "vqa":
        sent = "a text" if modality == "text" else "an image or array"
        return (f"model {name!r} answers questions about Shapes VQA scenes, not {sent}: POST /api/vqa/explain "
                f"{{\"seed\": 7, \"question\": \"is there a red circle?\"}} (scenes: GET /api/vqa/scene)")
    if modality == "text":
        where = (f"send it to a text model ({', '.join(others)})" if others else
                 "no text model is served: start the server with --model spam (or --model hf:DIR)")
        return (f"model {name!r} reads images and arrays, not text; {where}" if name else
                f"a text to explain, but {where}")
    where = (f"send images and arrays to an image model ({', '.join(others)})" if others else
             "no image model is served: start the server with --model mnist (or another image model)")
    return (f"model {name!r} reads text: send JSON {{\"model\": {json.dumps(name)}, \"text\": \"...\"}}; {where}"
            if name else f"an image or array to explain, but {where}")


def _explain_json(body: bytes, served: dict[str, Served], pick_image: Callable[[Optional[str]], ServedModel],
                  pick_text: Callable[[Optional[str]], ServedText]) -> Union[ExplainResponse, ExplainTextResponse]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ServiceError(422, 'the body must be a JSON object: {"array": [[...]], ...} for an image model, '
                                '{"text": "...", ...} for a text model')
    if "text" in payload and "array" in payload:
        raise ServiceError(422, "send either 'text' (to a text model) or 'array' (to an image model), not both")
    name = payload.get("model")
    named = served.get(name) if isinstance(name, str) else None
    if "text" in payload:
        modality = "text"
    elif "array" in payload:
        modality = "image"
    else:  # neither: say what the model named (or the default, an image model) misses
        modality = named.modality if named is not None else "image"
    if named is not None and named.modality == "vqa":
        raise ServiceError(422, _wrong_modality(name, "text" if "text" in payload else "image", served))
    if named is not None and named.modality != modality:
        raise ServiceError(422, _wrong_modality(name, modality, served))
    if modality == "text":
        text_request = ExplainTextRequest.model_validate(payload)
        return pick_text(text_request.model).explain(text_request)
    request = ExplainArrayRequest.model_validate(payload)
    return service.explain_array(pick_image(request.model), request.array, request)


async def _read_form(request: Request) -> tuple[UploadFile, ExplainOptions]:
    try:
        form = await request.form(max_files=1, max_fields=20)
    except HTTPException:  # too large, or Starlette's own answer to a broken body
        raise
    except Exception as exc:  # older Starlette lets the multipart parser's errors through
        raise ServiceError(400, f"the body is not valid multipart/form-data ({type(exc).__name__})") from None
    if not form:
        raise ServiceError(400, "the body is not multipart/form-data with fields (it holds none)")
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        await form.close()
        raise ServiceError(422, "image: the multipart field 'image' (an image file) is missing")
    fields = {}
    for key, value in form.multi_items():
        if key == "image":
            continue
        if not isinstance(value, str):
            await form.close()
            raise ServiceError(422, f"{key}: expected a text field, got a file")
        if value != "":  # an empty form field means "not given"
            fields[key] = value
    try:
        return upload, ExplainOptions.model_validate(fields)
    except ValidationError:
        await form.close()
        raise


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON: ``{"error": "..."}`` with its status."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc.errors()))

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc.errors()))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error: {type(exc).__name__}")


def _version() -> str:
    from .. import __version__
    return __version__
