"""The FastAPI app of ``lrp serve``: the page (``/``), its files (``/static``) and the JSON API (``/api``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from . import service
from .schemas import (ErrorResponse, ExplainArrayRequest, ExplainForm, ExplainOptions, ExplainResponse, Limits,
                      ModelInfo, ModelsResponse, PreprocessingInfo, Sample)
from .service import MAX_BYTES, MAX_SIDE, ServedModel, ServiceError

try:  # Swagger UI and ReDoc from the package, not from a CDN: /docs works without Internet
    from fastapi_offline import FastAPIOffline as _FastAPI
except ImportError:  # pragma: no cover - the web extra installs it
    _FastAPI = FastAPI  # type: ignore[assignment]

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lrp.web")

ERRORS: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "undecodable body or image, bad target"},
    413: {"model": ErrorResponse, "description": f"body over {MAX_BYTES // 2**20} MB or image over "
                                                 f"{MAX_SIDE}x{MAX_SIDE} pixels"},
    415: {"model": ErrorResponse, "description": "not multipart/form-data or JSON; the file is not a supported "
                                                 "image"},
    422: {"model": ErrorResponse, "description": "invalid fields, unknown model or composite, wrong array "
                                                 "shape, a model that fails on the input"},
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


def _model_info(served: ServedModel) -> ModelInfo:
    pre = served.pre
    return ModelInfo(
        name=served.name, kind=served.loaded.kind,
        input_shape=_known(served.input_shape),
        num_classes=served.num_classes, classes=served.classes, drawable=served.drawable,
        composites=list(service.COMPOSITES), default_composite=service.DEFAULT_COMPOSITE,
        preprocessing=PreprocessingInfo(size=pre.size, crop=pre.crop, mean=list(pre.mean) if pre.mean else None,
                                        std=list(pre.std) if pre.std else None, grayscale=pre.grayscale,
                                        invert=pre.invert))


def _openapi_body() -> dict:
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": ExplainForm.model_json_schema()},
        "application/json": {"schema": ExplainArrayRequest.model_json_schema()},
    }}}


def create_app(models: Sequence[Union[ServedModel, str]] = ("mnist",), *, warm_up: bool = True) -> FastAPI:
    """The web app serving ``models`` (:class:`ServedModel` or specs as ``lrp explain --model`` takes them;
    the first is the default). ``warm_up`` runs each model once now, so that the first request is fast."""
    served: dict[str, ServedModel] = {}
    for spec in models:
        m = ServedModel.load(spec) if isinstance(spec, str) else spec
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
                               "Draw or upload on the page at `/`; the JSON API is below.")
    app.state.models = served
    app.add_middleware(BodyLimit, max_bytes=MAX_BYTES)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def pick(name: Optional[str]) -> ServedModel:
        if not name:
            return next(iter(served.values()))
        if name not in served:
            raise ServiceError(422, f"unknown model {name!r}; served: {', '.join(served)}")
        return served[name]

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/models", response_model=ModelsResponse, summary="The models served", tags=["models"])
    def list_models() -> ModelsResponse:
        """Each model's name, input shape, class names and the composites it can be explained with."""
        return ModelsResponse(models=[_model_info(m) for m in served.values()],
                              limits=Limits(max_bytes=MAX_BYTES, max_side=MAX_SIDE))

    @app.get("/api/samples", response_model=list[Sample], summary="Held-out MNIST digits, one per class",
             tags=["models"])
    def samples() -> tuple[Sample, ...]:
        """Digits the built-in MNIST model was not trained on, to try the drawing page with."""
        return service.digit_samples()

    @app.post("/api/explain", response_model=ExplainResponse, responses=ERRORS, openapi_extra=_openapi_body(),
              summary="Predict and explain one input", tags=["explain"])
    async def explain(request: Request) -> ExplainResponse:
        """Send an image file as `multipart/form-data` (field `image`, plus the options as fields) or an
        array as JSON (`{"array": [[...]], ...}`). The model runs in a worker thread."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            body = await request.body()
            return await run_in_threadpool(_explain_json, body, pick)
        if kind == "multipart/form-data":
            upload, options = await _read_form(request)
            data = await upload.read()
            await upload.close()
            return await run_in_threadpool(service.explain_image, pick(options.model), data, upload.content_type,
                                           options)
        raise ServiceError(415, f"unsupported content type {kind or 'none'!r}: send multipart/form-data with an "
                                f"image file (field 'image') or application/json with an array")

    return app


def _explain_json(body: bytes, pick: Callable[[Optional[str]], ServedModel]) -> ExplainResponse:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ServiceError(422, 'the body must be a JSON object: {"array": [[...]], "model": ..., ...}')
    request = ExplainArrayRequest.model_validate(payload)
    return service.explain_array(pick(request.model), request.array, request)


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
