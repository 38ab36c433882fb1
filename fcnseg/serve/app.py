"""The FastAPI application of ``fcnseg serve``: the JSON / HTTP API, the page at ``/`` and its static files.

``create_app(Service(...))`` builds it over a loaded model (:class:`~fcnseg.serve.segment.Segmenter`) and a bounded
pool (:class:`~fcnseg.serve.pool.InferencePool`); ``fcnseg serve`` runs it under uvicorn, and the tests call it
through FastAPI's ``TestClient``. Around the endpoints, outermost first: the access log, the :class:`.guard.Guard`
(Host, Origin, API key) and the :class:`.middleware.BodyReader` (the whole body, within its limits, before a request
takes a place in the pool). Every refusal is ``{"error": "one line"}`` with its status; the server keeps serving
after each. The endpoints are described at ``/openapi.json``; FastAPI's interactive page, ``/docs``, is served only
when asked for (it loads Swagger UI's scripts from a CDN).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import FcnsegError
from .guard import LOOPBACK_HOSTS, Guard
from .middleware import AccessLog, BodyReader, Refusal, Scope
from .pool import BusyError, ClientGoneError, DeadlineError, InferencePool, Place
from .segment import BATCH_COST, Segmentation, Segmenter, ServeError, Upload

__all__ = ["STATIC", "Service", "create_app"]

STATIC = Path(__file__).parent / "static"
LOG = logging.getLogger("fcnseg.serve")
MAX_BATCH = 64  # images in one /predict/batch request
MAX_PREDICT_FILES = 8  # files in one /predict request: the image and a fusion net's extra images


@dataclass
class Service:
    """What the application serves: the model (``segmenter``), the pool it runs on, and what the card says."""

    segmenter: Segmenter
    pool: InferencePool = field(default_factory=InferencePool)
    name: str = "model"
    runtime: str = "eager"
    metrics: dict[str, Any] = field(default_factory=dict)
    max_upload_mb: float = 20.0
    threads: int = 1  # torch threads per worker
    timeout: float | None = 60.0  # seconds a request may hold a place (--timeout)
    upload_timeout: float = 60.0  # seconds for a whole body (--upload-timeout)
    idle_timeout: float = 10.0  # seconds of silence in the middle of a body (--idle-timeout)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # None: any Host
    api_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    docs: bool = False  # FastAPI's /docs page (Swagger UI from a CDN)

    def card(self) -> dict[str, Any]:
        seg, p = self.segmenter, self.segmenter.predictor
        serving = {
            "runtime": self.runtime, "tile": p.tile, "overlap": p.overlap, "flip": p.flip, "scales": list(p.scales),
            "max_pixels": seg.max_pixels, "max_upload_mb": self.max_upload_mb, "max_batch": MAX_BATCH,
            "max_batch_pixels": BATCH_COST * seg.max_pixels, "batch": seg.batch,
            "timeout_s": self.timeout, "workers": self.pool.workers, "queue": self.pool.queue,
            "threads_per_worker": self.threads, "fcnseg_version": __version__,
        }  # fmt: skip
        return {"name": self.name, **seg.card(), "metrics": self.metrics, "serving": serving}


# ------------------------------------------------------------------------------------------------ uploads


def _upload_body(fields: dict[str, dict[str, Any]], required: str) -> dict[str, Any]:
    """OpenAPI text of a multipart body (the endpoints read it themselves, after taking a place in the pool)."""
    schema = {"type": "object", "properties": fields, "required": [required]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_BINARY = {"type": "string", "format": "binary"}
_PREDICT_BODY = _upload_body(
    {
        "file": {**_BINARY, "description": "the image: PNG, JPEG, BMP, TIFF, WebP, GIF or PPM (any PIL mode)"},
        "extra": {
            "type": "array",
            "items": _BINARY,
            "description": "fusion nets only: the image's depth (16-bit "
            "mm PNG) or HHA image, repeated in channel order",
        },
    },  # fmt: skip
    "file",
)
_BATCH_BODY = _upload_body({"files": {"type": "array", "items": _BINARY, "description": "the images"}}, "files")


def _form(request: Request, expected: str, max_files: int) -> Any:
    """``async with _form(request, FIELD, N) as form``: the multipart body, parsed now (uploads spooled to temporary
    files, closed after the block; more than ``max_files`` files is an HTTPException); 415 for another kind of
    body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ServeError(
            415, f"expected a multipart/form-data upload with the image in the field {expected!r} "
            f"(curl -F {expected}=@photo.jpg), got content type {content_type or 'none'!r}"
        )  # fmt: skip
    return request.form(max_files=max_files, max_fields=max_files + 8)


@contextlib.asynccontextmanager
async def _batch_form(request: Request) -> AsyncIterator[FormData]:
    """The batch's form; 413 naming the cap when it holds more than :data:`MAX_BATCH` files."""
    try:
        async with _form(request, "files", MAX_BATCH) as form:
            yield form
    except HTTPException as e:
        if "Too many files" not in str(e.detail):
            raise
        raise ServeError(413, f"a batch holds at most {MAX_BATCH} images; send the others in another request") from None


def _uploads(form: FormData, name: str, *, required: bool) -> list[Upload]:
    items = form.getlist(name)
    if required and not items:
        got = ", ".join(sorted({repr(k) for k in form})) or "no fields"
        raise ServeError(422, f"expected the image in the multipart field {name!r}; got {got}")
    if any(not isinstance(item, UploadFile) for item in items):
        raise ServeError(422, f"the multipart field {name!r} must be a file upload, got text")
    return [Upload(item.filename or name, item.file) for item in items]


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).stem)[:100] or "mask"


# ------------------------------------------------------------------------------------------------ answers


def _predict_job(
    service: Service, form: FormData, options: tuple[str, int, float, bool], place: Place
) -> tuple[Segmentation, Any]:
    """One /predict request's work on a worker thread: segment, then encode the answer asked for (``options``:
    format, head index, overlay opacity, whether the JSON carries confidence maps)."""
    seg, (answer, head, alpha, confidence) = service.segmenter, options
    image, extras = _uploads(form, "file", required=True)[0], _uploads(form, "extra", required=False)
    result = seg.segment(image, extras, check=place.check, confidence=confidence or answer == "confidence")
    place.check()  # given up during the inference: no answer to encode
    if answer == "json":
        return result, seg.describe(result)
    if answer == "overlay":
        return result, seg.overlay_jpeg(result, head, alpha)
    if answer == "confidence":
        return result, seg.confidence_png(result, head)
    return result, result.heads[head].png


def _batch_job(service: Service, uploads: list[Upload], place: Place) -> list[dict[str, Any]]:
    """One group of a batch's images (:meth:`Segmenter.batch_groups`) on a worker thread: each one's JSON answer,
    or its error and status."""
    results = service.segmenter.segment_batch(uploads, check=place.check)
    place.check()  # given up during the inference: no answer to encode
    return [
        {"file": upload.name, "status": r.status, "error": str(r)} if isinstance(r, ServeError)
        else {"status": 200, **service.segmenter.describe(r)}
        for upload, r in zip(uploads, results, strict=True)
    ]  # fmt: skip


async def _batch_answers(service: Service, uploads: list[Upload], place: Place) -> list[dict[str, Any]]:
    """Every image's answer, in order: its headers read first (one job), then each group of one size (one job and
    one forward pass each, within --batch images and --max-pixels padded pixels). At the deadline the groups
    finished keep their answers and the others are each a 503 entry; with none finished the request is a 503."""
    groups = await service.pool.run(place, service.segmenter.batch_groups, uploads, place.check)
    answers: dict[int, dict[str, Any]] = {}
    try:
        for group in groups:
            group_answers = await service.pool.run(place, _batch_job, service, [uploads[i] for i in group], place)
            answers.update(zip(group, group_answers, strict=True))
    except DeadlineError as e:
        if not answers:
            raise
        for i, upload in enumerate(uploads):
            answers.setdefault(i, {"file": upload.name, "status": 503, "error": str(e)})
    return [answers[i] for i in range(len(uploads))]


def _image_response(result: Segmentation, body: bytes, answer: str, head: str) -> Response:
    first = head == result.heads[0].name
    stem = _safe_stem(result.name) + ("" if first else f"_{_safe_stem(head)}")
    name, media = {
        "png": (f"{stem}.png", "image/png"),
        "confidence": (f"{stem}_confidence.png", "image/png"),
        "overlay": (f"{stem}_overlay.jpg", "image/jpeg"),
    }[answer]
    w, h = result.size
    headers = {
        "Content-Disposition": f'inline; filename="{name}"',
        "X-Image-Size": f"{w}x{h}",
        "X-Inference-Ms": str(result.timing_ms["inference"]),
    }
    return Response(body, media_type=media, headers=headers)


# ------------------------------------------------------------------------------------------------ the app


def _add_pages(app: FastAPI, service: Service) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", summary="ok, the model's name, and the pool's load")
    async def health() -> dict[str, Any]:
        model = service.segmenter.model
        config = model.build_config or {"name": type(model).__name__}
        # The architecture's name only: the whole card (a parameter count among it) is /model's.
        return {"status": "ok", "model": service.name, "architecture": config["name"], **service.pool.stats()}

    @app.get("/model", summary="the model card: architecture, classes and colours, input, runtime, metrics")
    async def model() -> dict[str, Any]:
        return service.card()


_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "image/jpeg": {}, "application/json": {}},
          "description": "format=png: the palette mask (pixel values are class indices); overlay: a JPEG; "
          "confidence: each pixel's largest class probability x 65535, a 16-bit grey PNG; json: size, timing, and per "
          "head the mask PNG in base64 and every class's pixel share (with confidence=true, also the confidence PNG "
          "in base64 and its mean)"},
    400: {"description": "not an image, or a truncated or empty file"},
    401: {"description": "no API key, or another than the server's (when it was started with one)"},
    408: {"description": "the upload took longer than --upload-timeout, or stalled for --idle-timeout"},
    413: {"description": "upload over --max-upload-mb; image whose padded area (or, with --tile, own area) is over "
                        "--max-pixels, or over PIL's limit; a batch of more than 64 images"},
    415: {"description": "not a multipart/form-data upload, or an image format outside PNG, JPEG, BMP, TIFF, WebP, "
                        "GIF and PPM"},
    422: {"description": "no 'file' field, an unknown head, or a fusion net's image without its 'extra' images"},
    503: {"description": "every worker and queue place taken (retry after the Retry-After header's seconds), or "
                        "the request ran past --timeout (a batch with images done answers 200, the others as 503 "
                        "entries)"},
}  # fmt: skip


def _add_predict(app: FastAPI, service: Service) -> None:
    @app.post("/predict", summary="segment one image", openapi_extra=_PREDICT_BODY, responses=_PREDICT_RESPONSES)
    async def predict(
        request: Request,
        format: Literal["png", "overlay", "confidence", "json"] = Query(
            "png",
            description="png: the palette mask; overlay: the mask over the image, JPEG; confidence: the "
            "confidence map, 16-bit grey PNG; json: see below",
        ),
        head: str | None = Query(None, description="which head's mask (png, overlay, confidence); default: the first"),
        alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay: the mask's opacity"),
        confidence: bool = Query(False, description="json: add each head's confidence map and its mean"),
    ) -> Response:
        index = service.segmenter.head_index(head)
        with _admit(service, request) as place:
            async with _form(request, "file", MAX_PREDICT_FILES) as form:
                job = (_predict_job, service, form, (format, index, alpha, confidence), place)
                result, body = await service.pool.run(place, *job)
        request.state.image_size = "{}x{}".format(*result.size)
        if format == "json":
            return JSONResponse(body)
        return _image_response(result, body, format, service.segmenter.heads[index])

    @app.post("/predict/batch", summary=f"segment up to {MAX_BATCH} images: one entry per image, good and bad alike",
              openapi_extra=_BATCH_BODY, responses=_PREDICT_RESPONSES)  # fmt: skip
    async def predict_batch(request: Request) -> dict[str, Any]:
        with _admit(service, request) as place:
            async with _batch_form(request) as form:
                uploads = _uploads(form, "files", required=True)
                results = await _batch_answers(service, uploads, place)
        request.state.image_size = ",".join(f"{r['width']}x{r['height']}" if "width" in r else "-" for r in results)
        return {"results": results}


def _admit(service: Service, request: Request) -> contextlib.AbstractContextManager[Place]:
    """A place in the pool for this request (its body has been read by now), given up at its deadline or when its
    client leaves."""
    return service.pool.admit(service.timeout, getattr(request.state, "client_gone", None))


def _precheck(service: Service) -> Callable[[Scope], Refusal | None]:
    """503 from the headers of an upload that would find no place: before any of its body is read or sent."""

    def precheck(scope: Scope) -> Refusal | None:
        if scope["method"] != "POST" or scope.get("path") not in ("/predict", "/predict/batch"):
            return None
        busy = service.pool.busy()
        return None if busy is None else (503, str(busy), {"Retry-After": str(busy.retry_after)})

    return precheck


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    where = " ".join(str(part) for part in first.get("loc", ()) if part not in ("query", "body"))
    return f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", "invalid request"))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def refused(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(FcnsegError)
    async def user_error(request: Request, exc: FcnsegError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(BusyError)
    async def busy(request: Request, exc: BusyError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after), "Connection": "close"})

    @app.exception_handler(DeadlineError)
    async def too_long(request: Request, exc: DeadlineError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(ClientGoneError)
    async def client_left(request: Request, exc: ClientGoneError) -> Response:
        # Nobody reads this answer (uvicorn drops it); the access log writes 499 and when the client left.
        request.state.client_left = "before its answer"
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, and uvicorn logs the traceback.
        return _error(500, f"internal error ({type(exc).__name__}); the server logged it and keeps serving")


def create_app(service: Service) -> FastAPI:
    """The application over ``service``: the page, /health, /model, /predict, /predict/batch, /openapi.json (and
    /docs when ``service.docs``), behind its guard, body reader and access log."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.pool.shutdown()  # after uvicorn has answered every request in flight

    app = FastAPI(
        title="fcnseg serve",
        version=__version__,
        description=f"Semantic segmentation with {service.name} (fcnseg). The page is at /.",
        lifespan=lifespan,
        docs_url="/docs" if service.docs else None,
        redoc_url=None,  # ReDoc too loads its script from a CDN
    )
    _add_pages(app, service)
    _add_predict(app, service)
    _add_error_handlers(app)
    # add_middleware wraps what is there already: the last added is the outermost.
    app.add_middleware(BodyReader, max_bytes=int(service.max_upload_mb * 2**20), precheck=_precheck(service),
                       upload_timeout=service.upload_timeout, idle_timeout=service.idle_timeout)  # fmt: skip
    app.add_middleware(Guard, allowed_hosts=service.allowed_hosts, api_key=service.api_key,
                       cors_origins=service.cors_origins)  # fmt: skip
    app.add_middleware(AccessLog, logger=LOG)  # outermost: every refusal is logged too
    return app
