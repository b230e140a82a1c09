"""`klgrade serve`: the grading API and its web page, over the same input -> grade path as the CLI.

Uploads are held in memory only (never written to disk), limited in size (413), in the time their body may take
to arrive (408) and, all together, in the bytes held at once (`max_held_bytes`: more wait their turn, else 503),
decoded under a pixel limit of their own and at most `decode_slots` at a time (bounded memory), and graded by one
inference thread that takes every request waiting as one batch (throughput without oversubscribing the cores).
Undecodable uploads get 415/422 with a JSON `detail`; DICOM header fields are never logged or returned.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser

import klgrade
from klgrade.errors import ImageReadError
from klgrade.explain.gradcam import overlay, save_overlay_png
from klgrade.infer.batch import caption
from klgrade.infer.grading import NamedBytes, PreparedInput, grade_prepared, load_model, prepare_input
from klgrade.infer.predictor import Grading, Predictor

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/dicom", "application/octet-stream")
MAX_BATCH = 32
"""Most uploads graded in one forward pass."""


class Settings(BaseModel):
    """Service settings; `create_app` takes them, tests override them."""

    checkpoints: list[str] | None = None
    backend: str = "torch"
    device: str = "cpu"
    tta: bool | None = None
    max_upload_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_upload_pixels: int = Field(30_000_000, gt=0, description="Larger uploads are refused before decoding (422).")
    body_timeout_s: float = Field(15.0, gt=0, description="Time a request body may take to arrive (else 408), and "
                                                          "the longest an upload waits for room (else 503).")
    max_held_bytes: int | None = Field(None, gt=0, description="Bytes of uploads held at once, all requests together "
                                                               "[4 x max_upload_bytes]; more wait for room.")
    decode_slots: int = Field(max(1, os.cpu_count() or 1), gt=0, description="Uploads decoded at the same time.")

    @model_validator(mode="after")
    def _room_for_one_upload(self):
        if self.held_bytes < self.max_upload_bytes:
            raise ValueError(f"uploads held at once ({self.held_bytes / 2**20:g} MiB) must leave room for the largest "
                             f"upload ({self.max_upload_bytes / 2**20:g} MiB)")
        return self

    @property
    def held_bytes(self) -> int:
        return self.max_held_bytes or 4 * self.max_upload_bytes


class GradeResponse(BaseModel):
    grade: int = Field(description="Predicted Kellgren-Lawrence grade, 0-4.")
    probabilities: list[float] = Field(description="Probability of each grade 0-4.")
    confidence: float = Field(description="Probability of the predicted grade.")
    grade_set: list[int] = Field(description="Contiguous grades holding the true grade with probability `coverage`, "
                                             "whatever the true grade (calibrated models); the grade alone otherwise.")
    coverage: float | None = Field(None, description="Nominal coverage of grade_set (1 - alpha); null if uncalibrated.")
    gradable: bool = Field(description="False: not a knee radiograph like the training data; do not trust the grade.")
    warnings: list[str] = Field(default_factory=list, description="What a reader must know about this answer.")
    heatmap_png: str | None = Field(None, description="Base64 PNG: radiograph with Grad-CAM overlay (explain=true).")
    model: str


class ModelResponse(BaseModel):
    name: str
    version: str
    backend: str
    tta: bool
    image_size: int
    card: dict


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool


def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor


@dataclass
class _Job:
    prepared: PreparedInput
    explain: bool
    alpha: float | None
    result: asyncio.Future


class BatchGrader:
    """Grades uploads on one inference thread; all jobs waiting when it is free go through as one batch.

    Jobs that differ in explanation or alpha go in separate batches. Requests never run the network at the same time, so the
    cores serve one forward pass at a time (no oversubscription) and Grad-CAM's hooks see only its own pass.
    """

    def __init__(self, model: Predictor):
        self.model = model
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klgrade-inference")

    async def grade(self, prepared: PreparedInput, explain: bool, alpha: float | None) -> Grading:
        job = _Job(prepared, explain, alpha, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.result

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            while len(jobs) < MAX_BATCH and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            for explain, alpha in sorted({(job.explain, job.alpha) for job in jobs}, key=str):
                batch = [job for job in jobs if (job.explain, job.alpha) == (explain, alpha) and not job.result.done()]
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self.thread, grade_prepared, self.model,
                                                         [job.prepared for job in batch], explain, alpha)
                except Exception as exc:  # a bug: these requests fail (500), the service goes on
                    log.exception("inference failed for a batch of %d", len(batch))
                    for job in batch:
                        if not job.result.done():
                            job.result.set_exception(exc)
                    continue
                for job, result in zip(batch, results):
                    if not job.result.done():  # the client may have gone
                        job.result.set_result(result)


class UploadRoom:
    """Bytes of request bodies the service holds at once, all requests together: each request's body, and its copies
    while it is parsed and graded, live until its answer is sent, so without a bound N concurrent uploads of the
    largest size hold N times that (40 of 30 MiB took a server to 4.7 GB). A request waits for room."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._freed: asyncio.Event | None = None

    def _freed_here(self) -> asyncio.Event:
        """The event that says room was made, of the running event loop: an asyncio.Event serves the loop it first
        waited in only, and one app may serve on several loops one after another (a TestClient each, a restart)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._freed = loop, asyncio.Event()
        return self._freed

    async def take(self, size: int, timeout_s: float) -> bool:
        """Hold `size` bytes (give them back with `give`); False when no room is made within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.held + size > self.limit:
                    freed = self._freed_here()
                    freed.clear()
                    await freed.wait()
        except TimeoutError:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size
        self._freed_here().set()  # every waiter looks again


class BodyLimits:
    """ASGI middleware for POST: a Content-Length within the limit (else 411/413), room for it among the bodies held
    (`UploadRoom`; waits up to `timeout_s`, else 503), a body that arrives within `timeout_s` (else 408) and is no
    longer than it promised (else 400); the app then gets it in one piece."""

    def __init__(self, app, max_bytes: int, timeout_s: float, held_bytes: int):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.room = UploadRoom(held_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if not length:
            return await _json_error(411, "Content-Length header required")(scope, receive, send)
        if not length.isdigit() or int(length) > self.max_bytes:
            return await _json_error(413, f"upload larger than {self.max_bytes / 2**20:g} MiB")(scope, receive, send)
        if not await self.room.take(int(length), self.timeout_s):
            return await _json_error(503, "too many uploads in progress; try again shortly")(scope, receive, send)
        try:
            return await self._read_and_answer(int(length), scope, receive, send)
        finally:
            self.room.give(int(length))

    async def _read_and_answer(self, length: int, scope, receive, send):
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > length:
                        return await _json_error(400, "body longer than its Content-Length")(scope, receive, send)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await _json_error(408, f"request body did not arrive within {self.timeout_s:g} s")(
                scope, receive, send)
        body = [b"".join(chunks)]
        chunks.clear()

        async def replay():
            if not body:
                return await receive()
            return {"type": "http.request", "body": body.pop(), "more_body": False}  # held by the app alone

        return await self.app(scope, replay, send)


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """The service; `predictor` (already loaded, e.g. by the CLI to fail early) or the one `settings` name."""
    settings = settings or Settings()
    # Keep multipart uploads up to the size limit in memory (Starlette spools larger parts to a temp file).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    MultiPartParser.max_part_size = max(MultiPartParser.max_part_size, settings.max_upload_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.predictor = predictor or load_model(settings.checkpoints, device=settings.device, tta=settings.tta,
                                                      backend=settings.backend)
        app.state.grader = BatchGrader(app.state.predictor)
        app.state.decode_slots = asyncio.Semaphore(settings.decode_slots)
        worker = asyncio.create_task(app.state.grader.run())
        yield
        worker.cancel()
        app.state.grader.thread.shutdown(wait=False)

    # FastAPI's /docs and /redoc would load Swagger UI and ReDoc from CDNs: served from the package instead.
    app = FastAPIOffline(title="klgrade", version=klgrade.__version__, lifespan=lifespan,
                         description="Kellgren-Lawrence grading of knee radiographs with Grad-CAM explanations. "
                                     "Research use only; not a medical device.")
    app.add_middleware(BodyLimits, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s,
                       held_bytes=settings.held_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (resources.files("klgrade.serve") / "static" / "index.html").read_text()

    @app.get("/v1/health")
    def health(request: Request) -> HealthResponse:
        return HealthResponse(status="ok", model_loaded=getattr(request.app.state, "predictor", None) is not None)

    @app.get("/v1/model")
    def model_info(predictor: Annotated[Predictor, Depends(get_predictor)]) -> ModelResponse:
        info = predictor.infos[0]
        card = {"val_metrics": info.get("val_metrics", {}), "data": info.get("card", {}).get("data", ""),
                "intended_use": info.get("card", {}).get("intended_use", "research use only, not a medical device")}
        return ModelResponse(name=predictor.name, version=klgrade.__version__, backend=predictor.backend,
                             tta=predictor.tta, image_size=predictor.preprocess.size, card=card)

    @app.post("/v1/grade", responses={400: {"description": "Body longer than its Content-Length"},
                                      408: {"description": "Body did not arrive in time"},
                                      411: {"description": "No Content-Length"},
                                      413: {"description": "Upload too large"},
                                      415: {"description": "Not an image type"},
                                      503: {"description": "Too many uploads in progress; try again"},
                                      422: {"description": "Unreadable image, too many pixels, more than one "
                                                            "file, or a bad query value"}})
    async def grade_upload(request: Request, predictor: Annotated[Predictor, Depends(get_predictor)],
                           file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM radiograph")],
                           explain: Annotated[bool, Query(description="Add a Grad-CAM overlay")] = False,
                           alpha: Annotated[float | None, Query(gt=0, lt=1, description="Grade sets miss the true "
                                                                "grade for at most this share [0.1]")] = None,
                           ) -> GradeResponse:
        files = (await request.form()).getlist("file")  # the form FastAPI has parsed already
        if len(files) > 1:
            raise HTTPException(422, detail=f"one radiograph per request, not {len(files)} files")
        data = await file.read()
        await file.close()  # its in-memory copy goes now, not after the answer
        declared = (file.content_type or "").lower()
        source = NamedBytes(data, file.filename or "upload")  # the name gives the knee side and marks .dcm files
        try:
            async with request.app.state.decode_slots:
                prepared = await run_in_threadpool(prepare_input, predictor, source, settings.max_upload_pixels)
        except ImageReadError as exc:
            status = 422 if declared.startswith(IMAGE_TYPES) or not declared else 415
            raise HTTPException(status, detail=f"not a readable radiograph: {exc.reason}") from None
        result = await request.app.state.grader.grade(prepared, explain, alpha)
        log.info("graded upload of %d bytes: KL %d", len(data), result.grade)
        heatmap = await run_in_threadpool(_overlay_png, result) if result.heatmap is not None else None
        return GradeResponse(grade=result.grade, probabilities=result.probabilities, confidence=result.confidence,
                             grade_set=result.grade_set, coverage=result.coverage, gradable=result.gradable,
                             warnings=result.warnings, heatmap_png=heatmap, model=predictor.name)

    return app


def _overlay_png(result: Grading) -> str:
    buffer = io.BytesIO()
    save_overlay_png(overlay(result.image, result.heatmap, caption(result)), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
