"""HTTP API over a trained model: `uvicorn oracle_mnist.api:app` (docs at /docs).

Settings come from the environment, read once at start-up:

| variable                      | default                                          |
| ----------------------------- | ------------------------------------------------ |
| ORACLE_MNIST_MODEL            | models/model.pt (models/model.onnx for onnx)     |
| ORACLE_MNIST_BACKEND          | torch (or onnx)                                  |
| ORACLE_MNIST_MAX_FILES        | 16 images per request                            |
| ORACLE_MNIST_MAX_FILE_BYTES   | 5242880 (5 MiB) per image file                   |
| ORACLE_MNIST_MAX_PIXELS       | 16000000 pixels per image, checked before decode |
| ORACLE_MNIST_TOP_K            | 3 classes listed per image unless ?top_k= says   |
| ORACLE_MNIST_THREADS          | 1 core per forward pass, as many passes as cores |
| ORACLE_MNIST_BODY_TIMEOUT     | 60 s for a request body to arrive, else 408      |
| ORACLE_MNIST_MIN_CONFIDENCE   | 0 (off): below it an answer is flagged "unsure"  |
| ORACLE_MNIST_HEAD_TIMEOUT     | 10 s for a request head to arrive, else 408      |
| ORACLE_MNIST_HEAD_BYTES       | 65536 bytes per request head, else 431           |
| ORACLE_MNIST_CONNECTIONS      | 1000 open (at most half the open-file limit)     |

The last three are bounds of the HTTP server, enforced by `oracle-mnist serve` (oracle_mnist.server).

`GET /` is a page for people (static files shipped in the package, no CDN); `/docs` and `/redoc` serve their
assets from the installed fastapi-offline package, so everything works without network access.

Images may be PNG, JPEG, GIF, BMP, TIFF, WebP or PPM/PGM/PBM. The model is loaded once; a missing or
unreadable model stops start-up with a message naming the file. Every bad request gets a 4xx JSON body
{"detail": "<what is wrong, naming the file or field>"}.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, get_type_hints

import fastapi_offline
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.inference import (
    BACKENDS,
    DEFAULT_MODEL_PATHS,
    SERVED_FORMATS,
    ImageTooLargeError,
    ModelMeta,
    ModelNotFoundError,
    ModelOutputError,
    Prediction,
    Predictor,
    UnsureReason,
    characters_of,
    check_min_confidence,
    in_a_clone,
    return_freed_memory,
)

logger = logging.getLogger("uvicorn.error")

ENV = "ORACLE_MNIST_"
# Room for one multipart part's boundary and headers on top of its content.
PART_OVERHEAD_BYTES = 64 * 1024
# The page (index.html, page.js, page.css), shipped as package data.
STATIC_DIR = Path(__file__).parent / "static"
# Swagger UI and ReDoc's JavaScript and CSS from an installed package: FastAPI's default pages fetch them
# from a CDN and are blank without network access.
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


@dataclass(frozen=True)
class Settings:
    model_path: Path
    backend: str = "torch"
    max_files: int = 16
    max_file_bytes: int = 5 * 1024 * 1024
    max_pixels: int = 16_000_000
    top_k: int = 3
    # Small batches gain little from intra-op threads, and on a busy machine their synchronisation costs
    # several times the pass itself; concurrent requests use the cores instead.
    threads: int = 1
    # Seconds from the request head to the last byte of its body (80 MiB at the default limits needs about
    # 11 Mbit/s): a client that declares a body and then sends it slowly or never cannot hold a connection.
    body_timeout: int = 60
    # Answers whose (calibrated) probability is below this are flagged unsure; 0 flags none.
    min_confidence: float = 0.0
    # Bounds on request heads and open connections, enforced by the server's HTTP protocol
    # (oracle_mnist.server) before a request reaches the app; connections None: its default.
    head_timeout: int = 10
    head_bytes: int = 64 * 1024
    connections: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        backend = env.get(f"{ENV}BACKEND", "torch")
        if backend not in BACKENDS:
            raise OracleMnistError(f"{ENV}BACKEND: {backend!r} is not one of {list(BACKENDS)}")
        limits = {}
        names = ("max_files", "max_file_bytes", "max_pixels", "top_k", "threads", "body_timeout")
        for name in (*names, "head_timeout", "head_bytes", "connections"):
            var = f"{ENV}{name.upper()}"
            if var not in env:
                continue
            raw = env[var]
            if not raw.strip().isdigit() or int(raw) < 1:
                raise OracleMnistError(f"{var}: expected a positive integer, got {raw!r}")
            limits[name] = int(raw)
        model = env.get(f"{ENV}MODEL") or DEFAULT_MODEL_PATHS[backend]
        return cls(model_path=Path(model), backend=backend, min_confidence=_min_confidence(env), **limits)

    @property
    def max_body_bytes(self) -> int:
        return self.max_files * (self.max_file_bytes + PART_OVERHEAD_BYTES)


def _min_confidence(env: Mapping[str, str]) -> float:
    var = f"{ENV}MIN_CONFIDENCE"
    raw = env.get(var, "0")
    try:
        return check_min_confidence(float(raw), var)
    except ValueError:
        # Not a number at all: refused by the same check, which names what was given.
        return check_min_confidence(raw, var)  # type: ignore[arg-type]


class ClassScore(BaseModel):
    index: int
    name: str
    probability: float


class ImagePrediction(ClassScore):
    file: str
    unsure: bool = Field(
        description="treat this answer with care: `unsure_reason` says why (null exactly when this is false)"
    )
    unsure_reason: UnsureReason | None = Field(
        description="too_small: the image is under 8 pixels wide or high, too small to hold a character; "
        "no_ink: after the conversion it holds no ink (blank, uniform or faint noise), whatever class it got; "
        "low_confidence: the probability is below the minimum confidence (?min_confidence=, else the "
        "server's ORACLE_MNIST_MIN_CONFIDENCE; 0, the default, flags none)"
    )
    top_k: list[ClassScore]
    input: str | None = Field(
        default=None,
        description="with ?include=input: the image as the model saw it (the converted image_size square, "
        "white glyph on black) as a data:image/png;base64 URL",
    )


class PredictResponse(BaseModel):
    model: str
    backend: str
    predictions: list[ImagePrediction]


class Health(BaseModel):
    status: str
    model: str
    backend: str


class ServingInfo(BaseModel):
    """What /model adds to the model's own metadata."""

    characters: list[str | None] = Field(
        description="the oracle-bone character of each class, in label order (null for a class name that is "
        "not one of the dataset's)"
    )
    backend: str
    limits: dict[str, int]
    min_confidence: float = Field(
        description="the server's minimum confidence (0: nothing is flagged unsure)"
    )


# /model's body: every ModelMeta field, derived from the dataclass so the two cannot drift apart, and the above.
ModelInfo = create_model(
    "ModelInfo",
    __base__=ServingInfo,
    **{
        f.name: (hint, ...)
        for f, hint in zip(fields(ModelMeta), get_type_hints(ModelMeta).values(), strict=True)
    },
)


class ErrorResponse(BaseModel):
    detail: str


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


class BodyLimit:
    """Refuses an upload by its Content-Length before any of it is read or spooled to disk."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/predict":
            settings: Settings = scope["app"].state.settings
            length = dict(scope["headers"]).get(b"content-length")
            response = None
            if length is None:
                response = _error(411, "Content-Length header required (chunked uploads are not accepted)")
            elif not length.isdigit():
                response = _error(
                    400, f"Content-Length header is not a number: {length.decode(errors='replace')!r}"
                )
            elif int(length) > settings.max_body_bytes:
                response = _error(
                    413,
                    f"request body of {int(length)} bytes is over the limit of {settings.max_body_bytes} "
                    f"({settings.max_files} files of at most {settings.max_file_bytes} bytes)",
                )
            if response is not None:
                await response(scope, receive, send)
                return
            await BodyDeadline(self.app, settings.body_timeout)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyDeadline:
    """Answers 408 and closes the connection when a request's body has not fully arrived `seconds` after its
    head; uvicorn's own timeouts cover idle keep-alive connections, not a body that never comes."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = timed_out = response_started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                timed_out = True
                raise BodyTimeoutError from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if timed_out:  # whatever the app made of the missing body, the answer is the 408 below
                return
            response_started = True
            await send(message)

        with contextlib.suppress(BodyTimeoutError):
            await self.app(scope, timed_receive, guarded_send)
        if timed_out and not response_started:
            response = _error(408, f"request body did not arrive within {self.seconds} s")
            response.headers["connection"] = "close"
            await response(scope, receive, send)


class BodyTimeoutError(Exception):
    """The body of a request did not arrive in time (BodyDeadline)."""


def _classify(
    predictor: Predictor,
    uploads: list[tuple[str, BinaryIO]],
    settings: Settings,
    top_k: int,
    min_confidence: float,
) -> tuple[list[Prediction], np.ndarray]:
    """Predictions and the uint8 (N, S, S) features they were made from."""
    features, sizes = [], []
    for name, data in uploads:
        limits = (settings.max_pixels, settings.max_file_bytes, SERVED_FORMATS)
        converted, size = predictor.features_from(data, name, *limits)
        features.append(converted)
        sizes.append(size)
    stacked = np.stack(features)
    return predictor.predict_features(stacked, top_k, min_confidence, sizes), stacked


def png_data_url(features: np.ndarray) -> str:
    """One uint8 (S, S) feature array as a data:image/png;base64 URL (a few hundred bytes at 64 px)."""
    buf = io.BytesIO()
    Image.fromarray(features).save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{field or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) + " (send images as multipart/form-data field 'files')"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "malformed request"),
        (411, "no Content-Length"),
        (413, "too many files, a file too large, or an image with too many pixels"),
        (422, "empty upload, not an image, truncated or corrupt image, or a bad field"),
        (500, "the model failed on this request (the server's log says how)"),
    )
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; `settings` default to the environment, read when the server starts."""
    app = FastAPI(
        title="oracle-mnist",
        summary="Classify images of oracle-bone characters (Oracle-MNIST's 10 classes).",
        lifespan=_lifespan(settings),
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit)
    add_page_and_docs(app)
    _add_error_handlers(app)
    _add_info_routes(app)
    _add_predict_route(app)
    _state_file_count_bounds(app, settings)
    return app


def _state_file_count_bounds(app: FastAPI, settings: Settings | None) -> None:
    """The schema of `files` states the bounds the server enforces: at least one (a required field) and at most
    Settings.max_files (413 above it; a 422 from validation would not say which limit). The schema is made
    after start-up, so it reads the settings the server runs with."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain_openapi()  # cached by FastAPI; the bounds are set on it again each time, idempotently
        current = getattr(app.state, "settings", None) or settings or Settings.from_env()
        body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        if "$ref" in body:
            body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
        body["properties"]["files"].update(minItems=1, maxItems=current.max_files)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _lifespan(settings: Settings | None) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start-up: settings and model loaded and checked once, kept in `app.state`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            resolved = settings or Settings.from_env()
            predictor = _load_predictor(resolved)
        except OracleMnistError as exc:
            logger.error("oracle-mnist API cannot start: %s", exc)
            raise
        app.state.settings = resolved
        app.state.predictor = predictor
        logger.info("serving %s (%s) from %s", predictor.meta.model_name, predictor.backend, predictor.path)
        yield

    return lifespan


def _load_predictor(settings: Settings) -> Predictor:
    """The model, refused at start-up when the server's defaults do not fit it."""
    return_freed_memory()
    try:
        predictor = Predictor.from_file(settings.model_path, settings.backend, settings.threads)
    except ModelNotFoundError as exc:
        if in_a_clone():
            raise  # its advice, `dvc repro` or `dvc pull`, works here
        raise OracleMnistError(
            f"{exc.path}: model file not found (set {ENV}MODEL to a saved model: a model.pt, or a model.onnx "
            f"with {ENV}BACKEND=onnx)"
        ) from None
    predictor.check_top_k(settings.top_k)
    check_min_confidence(settings.min_confidence)
    return predictor


def _add_error_handlers(app: FastAPI) -> None:
    """Every refused request answers {"detail": ...}, FastAPI's own validation errors included."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))


def _add_info_routes(app: FastAPI) -> None:
    """`GET /health` and `GET /model`."""

    @app.get("/health", response_model=Health)
    async def health(request: Request) -> Health:
        predictor: Predictor = request.app.state.predictor
        return Health(status="ok", model=predictor.meta.model_name, backend=predictor.backend)

    @app.get("/model", response_model=ModelInfo)
    async def model_info(request: Request) -> ModelInfo:
        predictor: Predictor = request.app.state.predictor
        current: Settings = request.app.state.settings
        limits = {k: v for k, v in asdict(current).items() if k.startswith("max_")}
        return ModelInfo(
            **asdict(predictor.meta),
            characters=characters_of(predictor.class_names),
            backend=predictor.backend,
            limits=limits,
            min_confidence=current.min_confidence,
        )


def _add_predict_route(app: FastAPI) -> None:
    """`POST /predict`: multipart images in, one prediction per image out."""

    @app.post("/predict", response_model=PredictResponse, responses=ERROR_RESPONSES)
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description="one or more images of any format Pillow reads")],
        top_k: Annotated[int | None, Query(ge=1, description="classes listed per image")] = None,
        min_confidence: Annotated[
            float | None,
            Query(
                description="flag answers below this probability unsure, 0 <= p < 1 (default: the server's)"
            ),
        ] = None,
        include: Annotated[
            Literal["input"] | None,
            Query(description="input: add each image as the model saw it, a small PNG data URL"),
        ] = None,
    ) -> PredictResponse:
        predictor: Predictor = request.app.state.predictor
        current: Settings = request.app.state.settings
        k, minimum = _request_options(predictor, current, len(files), top_k, min_confidence)
        uploads = _spooled_uploads(files)
        predictions, features = await _classify_or_refuse(predictor, uploads, current, k, minimum)
        return PredictResponse(
            model=predictor.meta.model_name,
            backend=predictor.backend,
            predictions=[
                ImagePrediction(
                    file=name, input=png_data_url(feats) if include == "input" else None, **pred.to_dict()
                )
                for (name, _), pred, feats in zip(uploads, predictions, features, strict=True)
            ],
        )


def _request_options(
    predictor: Predictor, settings: Settings, n_files: int, top_k: int | None, min_confidence: float | None
) -> tuple[int, float]:
    """The request's top k and minimum confidence (the server's where it gives none), checked; refuses too
    many files before any is read."""
    if n_files > settings.max_files:
        raise ApiError(413, f"files: {n_files} files sent; the limit is {settings.max_files} per request")
    k = top_k if top_k is not None else settings.top_k
    minimum = min_confidence if min_confidence is not None else settings.min_confidence
    try:
        predictor.check_top_k(k)
        check_min_confidence(minimum)
    except OracleMnistError as exc:
        raise ApiError(422, str(exc)) from None
    return k, minimum


def _spooled_uploads(files: list[UploadFile]) -> list[tuple[str, BinaryIO]]:
    """Each upload's name (its position where the client sent none) and its data."""
    uploads = []
    for i, upload in enumerate(files):
        name = upload.filename or f"files[{i}]"
        # The spooled file itself (in memory up to 1 MB, then on disk): read in the decode lanes, one
        # image at a time, never all of a request's files at once.
        uploads.append((name, upload.file))
    return uploads


async def _classify_or_refuse(
    predictor: Predictor,
    uploads: list[tuple[str, BinaryIO]],
    settings: Settings,
    top_k: int,
    min_confidence: float,
) -> tuple[list[Prediction], np.ndarray]:
    """`_classify` off the event loop, its errors as the HTTP status they deserve."""
    try:
        return await run_in_threadpool(_classify, predictor, uploads, settings, top_k, min_confidence)
    except ImageTooLargeError as exc:
        raise ApiError(413, str(exc)) from None
    except ModelOutputError as exc:
        # The message names the model's path on the server: the log gets it, the client a plain account.
        logger.error("POST /predict: %s", exc)
        raise ApiError(500, "the model failed on this request: its outputs were not finite") from None
    except OracleMnistError as exc:
        raise ApiError(422, str(exc)) from None


def add_page_and_docs(app: FastAPI) -> None:
    """`GET /` (the page), its static files, and Swagger UI at /docs and ReDoc at /redoc with local assets."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    favicon = "/docs-assets/favicon.png"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url=favicon,
        )

    @app.get(app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )


app = create_app()
