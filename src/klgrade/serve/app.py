"""`klgrade serve`: the grading API and its web page, over the same `Predictor` as the CLI.

Uploads are held in memory only (never written to disk), limited in size (413), and checked by decoding
(415/422 with a JSON `detail`); DICOM header fields are never logged or returned.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.formparsers import MultiPartParser

import klgrade
from klgrade.errors import ImageReadError
from klgrade.infer.grading import NamedBytes, grade, load_model
from klgrade.infer.predictor import Predictor

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/dicom", "application/octet-stream")


class Settings(BaseModel):
    """Service settings; `create_app` takes them, tests override them."""

    checkpoints: list[str] | None = None
    backend: str = "torch"
    tta: bool | None = None
    max_upload_bytes: int = 32 * 1024 * 1024


class GradeResponse(BaseModel):
    grade: int = Field(description="Predicted Kellgren-Lawrence grade, 0-4.")
    probabilities: list[float] = Field(description="Probability of each grade 0-4.")
    confidence: float = Field(description="Probability of the predicted grade.")
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


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """The service; `predictor` (already loaded, e.g. by the CLI to fail early) or the one `settings` name."""
    settings = settings or Settings()
    # Keep multipart uploads up to the size limit in memory (Starlette spools larger parts to a temp file).
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    MultiPartParser.max_part_size = max(MultiPartParser.max_part_size, settings.max_upload_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.predictor = predictor or load_model(settings.checkpoints, tta=settings.tta, backend=settings.backend)
        app.state.lock = threading.Lock()  # Grad-CAM hooks the model: one request at a time touches it
        yield

    app = FastAPI(title="klgrade", version=klgrade.__version__, lifespan=lifespan,
                  description="Kellgren-Lawrence grading of knee radiographs with Grad-CAM explanations. "
                              "Research use only; not a medical device.")

    @app.middleware("http")
    async def limit_upload_size(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _json_error(411, "Content-Length header required")
            if not length.isdigit() or int(length) > settings.max_upload_bytes:
                return _json_error(413, f"upload larger than {settings.max_upload_bytes // 2**20} MiB")
        return await call_next(request)

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

    @app.post("/v1/grade", responses={413: {"description": "Upload too large"},
                                      415: {"description": "Not an image type"},
                                      422: {"description": "Unreadable image"}})
    def grade_upload(request: Request, predictor: Annotated[Predictor, Depends(get_predictor)],
                     file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM radiograph")],
                     explain: Annotated[bool, Query(description="Add a Grad-CAM overlay")] = False) -> GradeResponse:
        data = file.file.read()
        declared = (file.content_type or "").lower()
        try:
            with request.app.state.lock:
                result = grade(NamedBytes(data, file.filename or "upload"), explain=explain, model=predictor)
        except ImageReadError as exc:
            status = 422 if declared.startswith(IMAGE_TYPES) or not declared else 415
            raise HTTPException(status, detail=f"not a readable radiograph: {exc.reason}") from None
        log.info("graded upload of %d bytes: KL %d", len(data), result.grade)
        return GradeResponse(grade=result.grade, probabilities=result.probabilities, confidence=result.confidence,
                             heatmap_png=_overlay_png(result) if explain else None, model=predictor.name)

    return app


def _overlay_png(result) -> str:
    from klgrade.explain.gradcam import overlay

    buffer = io.BytesIO()
    overlay(result.image, result.heatmap, f"KL {result.grade}   p={result.confidence:.2f}").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
