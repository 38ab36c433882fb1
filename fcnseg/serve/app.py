"""The FastAPI application of ``fcnseg serve``: the JSON / HTTP API, the page at ``/`` and its static files.

``create_app(Service(...))`` builds it over a loaded model (:class:`~fcnseg.serve.segment.Segmenter`) and a bounded
pool (:class:`~fcnseg.serve.pool.InferencePool`); ``fcnseg serve`` runs it under uvicorn, and the tests call it
through FastAPI's ``TestClient``. Every refusal is ``{"error": "one line"}`` with its status; the server keeps
serving after each. The endpoints are documented by FastAPI's own OpenAPI page, ``/docs``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
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
from .middleware import AccessLog, UploadLimit
from .pool import BusyError, InferencePool
from .segment import Segmentation, Segmenter, ServeError, Upload

__all__ = ["STATIC", "Service", "create_app"]

STATIC = Path(__file__).parent / "static"
LOG = logging.getLogger("fcnseg.serve")
MAX_BATCH = 64  # images in one /predict/batch request


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

    def card(self) -> dict[str, Any]:
        seg = self.segmenter
        serving = {
            "runtime": self.runtime, "tile": seg.options["tile"], "overlap": seg.options["overlap"],
            "max_pixels": seg.max_pixels, "max_upload_mb": self.max_upload_mb, "workers": self.pool.workers,
            "queue": self.pool.queue, "threads_per_worker": self.threads, "fcnseg_version": __version__,
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
        "file": {**_BINARY, "description": "the image: JPEG, PNG, BMP, TIFF, WebP, ... (any PIL mode)"},
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


def _form(request: Request, expected: str) -> Any:
    """``async with _form(request, FIELD) as form``: the multipart body, read now (uploads spooled to temporary
    files, closed after the block); 415 for another kind of body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ServeError(
            415, f"expected a multipart/form-data upload with the image in the field {expected!r} "
            f"(curl -F {expected}=@photo.jpg), got content type {content_type or 'none'!r}"
        )  # fmt: skip
    return request.form(max_files=MAX_BATCH + 8, max_fields=MAX_BATCH + 8)


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


def _predict_job(service: Service, form: FormData, answer: str, head: int, alpha: float) -> tuple[Segmentation, Any]:
    """One /predict request's work on a worker thread: segment, then encode the answer asked for."""
    seg = service.segmenter
    result = seg.segment(_uploads(form, "file", required=True)[0], _uploads(form, "extra", required=False))
    if answer == "json":
        return result, seg.describe(result)
    if answer == "overlay":
        return result, seg.overlay_jpeg(result, head, alpha)
    return result, result.heads[head].png


def _describe_job(service: Service, upload: Upload) -> dict[str, Any]:
    """One image of a batch: its JSON answer, or its error and status."""
    try:
        result = service.segmenter.segment(upload)
    except ServeError as e:
        return {"file": upload.name, "status": e.status, "error": str(e)}
    return {"status": 200, **service.segmenter.describe(result)}


def _image_response(result: Segmentation, body: bytes, answer: str, head: str) -> Response:
    first = head == result.heads[0].name
    stem = _safe_stem(result.name) + ("" if first else f"_{_safe_stem(head)}")
    name, media = (f"{stem}.png", "image/png") if answer == "png" else (f"{stem}_overlay.jpg", "image/jpeg")
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
        config = getattr(model, "build_config", None) or {"name": type(model).__name__}
        # The architecture's name only: the whole card (a parameter count among it) is /model's.
        return {"status": "ok", "model": service.name, "architecture": config["name"], **service.pool.stats()}

    @app.get("/model", summary="the model card: architecture, classes and colours, input, runtime, metrics")
    async def model() -> dict[str, Any]:
        return service.card()


_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "image/jpeg": {}, "application/json": {}},
          "description": "format=png: the palette mask (pixel values are class indices); overlay: a JPEG; json: "
          "size, timing, and per head the mask PNG in base64 and every class's pixel share"},
    400: {"description": "not an image, or a truncated or empty file"},
    413: {"description": "upload over --max-upload-mb, or image over --max-pixels (without --tile) or PIL's limit"},
    415: {"description": "not a multipart/form-data upload"},
    422: {"description": "no 'file' field, an unknown head, or a fusion net's image without its 'extra' images"},
    503: {"description": "every worker and queue place taken: retry after the Retry-After header's seconds"},
}  # fmt: skip


def _add_predict(app: FastAPI, service: Service) -> None:
    @app.post("/predict", summary="segment one image", openapi_extra=_PREDICT_BODY, responses=_PREDICT_RESPONSES)
    async def predict(
        request: Request,
        format: Literal["png", "overlay", "json"] = Query(
            "png", description="png: the palette mask; overlay: the mask over the image, JPEG; json: see below"
        ),
        head: str | None = Query(None, description="which head's mask (png, overlay); default: the first"),
        alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay: the mask's opacity"),
    ) -> Response:
        index = service.segmenter.head_index(head)
        with service.pool.admit():
            async with _form(request, "file") as form:
                result, body = await service.pool.run(_predict_job, service, form, format, index, alpha)
        request.state.image_size = "{}x{}".format(*result.size)
        if format == "json":
            return JSONResponse(body)
        return _image_response(result, body, format, service.segmenter.heads[index])

    @app.post("/predict/batch", summary="segment several images: one entry per image, good and bad alike",
              openapi_extra=_BATCH_BODY)  # fmt: skip
    async def predict_batch(request: Request) -> dict[str, Any]:
        with service.pool.admit():
            async with _form(request, "files") as form:
                uploads = _uploads(form, "files", required=True)
                results = [await service.pool.run(_describe_job, service, upload) for upload in uploads]
        request.state.image_size = ",".join(f"{r['width']}x{r['height']}" if "width" in r else "-" for r in results)
        return {"results": results}


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
    """The application over ``service``: the page, /health, /model, /predict, /predict/batch, /docs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.pool.shutdown()  # after uvicorn has answered every request in flight

    app = FastAPI(
        title="fcnseg serve",
        version=__version__,
        description=f"Semantic segmentation with {service.name} (fcnseg). The page is at /.",
        lifespan=lifespan,
    )
    _add_pages(app, service)
    _add_predict(app, service)
    _add_error_handlers(app)
    app.add_middleware(UploadLimit, max_bytes=int(service.max_upload_mb * 2**20))
    app.add_middleware(AccessLog, logger=LOG)  # outermost: refusals by the limit are logged too
    return app
