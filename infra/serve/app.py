"""The HTTP surface of `reelforge serve`: MLflow's scoring protocol plus async jobs in the OpenAI
Videos shape, over one `Engine` (infra/serve/engine.py).

    GET  /ping, /health        200 once the model is loaded, 503 (with the reason) before or if it failed
    GET  /version              reelforge and MLflow versions, model URI, resolved version, bundle sha256, card
    POST /invocations          MLflow's request formats (JSON dataframe_split/records/instances/inputs, CSV,
                               Parquet), parsed by MLflow's own code; answers `{"predictions": [...]}` like
                               `mlflow models serve`, or 202 + Location when the estimate exceeds --sync-budget
    POST /v1/videos            202 {id, status: queued, queue_position}; Idempotency-Key honoured
    GET  /v1/videos            newest first (?limit=, ?after=)
    GET  /v1/videos/{id}       status, progress, error
    GET  /v1/videos/{id}/content   video/mp4 (409 until completed)
    DELETE /v1/videos/{id}     cancel a queued or running job; delete a finished one

Every refusal is JSON with one line that names the field: `{"error": {"message", "type", "param",
"code"}}` on /v1, `{"error_code", "message"}` (MLflow's shape) on /invocations. No stack trace ever
reaches a client; the server log has one line per request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import uuid
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from starlette.exceptions import HTTPException as StarletteHTTPException

from model import __version__
from model.errors import one_line
from model.pyfunc import OUTPUT_COLUMNS
from pipelines.output import StorageError
from infra.serve.engine import Engine, ServeError
from infra.serve.store import ID_RE, request_sha256

logger = logging.getLogger("reelforge.serve")

MLFLOW_CONTENT_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")
MAX_LIST = 100


def create_app(engine: Engine, max_body_bytes: int = 64 << 20) -> FastAPI:
    app = FastAPI(title="reelforge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    async def body_of(request: Request) -> bytes:
        return await read_body(request, max_body_bytes)

    _add_error_handling(app)
    _add_mlflow_routes(app, engine, body_of)
    _add_video_routes(app, engine, body_of)
    return app


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_body_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise ServeError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_body_bytes} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ServeError(413, f"request body exceeds the limit of {max_body_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(raw: bytes, content_type: str) -> Any:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ServeError(415, f"content type must be application/json, got {content_type or 'none'!r}", code="unsupported_media_type")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(400, f"body is not valid JSON ({one_line(exc)})") from None


def _add_error_handling(app: FastAPI) -> None:
    @app.middleware("http")
    async def log_requests(request: Request, call_next: Any) -> Response:
        began = time.perf_counter()
        request.state.note = ""
        response = await call_next(request)
        note = f" {request.state.note}" if request.state.note else ""
        logger.info("%s %s %d %.0f ms%s", request.method, request.url.path, response.status_code, 1000 * (time.perf_counter() - began), note)
        return response

    def error_response(request: Request, status: int, message: str, *, param: str | None = None,
                       code: str = "invalid_request", headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
        request.state.note = message if len(message) <= 200 else message[:197] + "..."
        if request.url.path == "/invocations":  # what MLflow clients parse
            mlflow_code = "INVALID_PARAMETER_VALUE" if status == 400 else _MLFLOW_CODES.get(status, "BAD_REQUEST")
            return JSONResponse({"error_code": mlflow_code, "message": message}, status, headers=headers)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers=headers)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(StorageError)
    async def on_storage_error(request: Request, exc: StorageError) -> JSONResponse:
        logger.error("storage failed: %s", one_line(exc))
        return error_response(request, 503, "the server's job store is failing; try again later", code="storage_error", headers={"Retry-After": "10"})

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error_response(request, exc.status_code, f"{message}: {request.method} {request.url.path}", code="not_found" if exc.status_code == 404 else "bad_method")

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:8]
        logger.exception("internal error %s on %s %s", incident, request.method, request.url.path)
        return error_response(request, 500, f"internal error {incident}; see the server log", code="internal_error")


def _add_mlflow_routes(app: FastAPI, engine: Engine, body_of: Any) -> None:

    def health() -> JSONResponse:
        if engine.state == "ready":
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": engine.state, "error": engine.load_error}, 503, headers={"Retry-After": "5"})

    app.get("/ping")(health)
    app.get("/health")(health)

    @app.get("/version")
    def version() -> dict[str, Any]:
        import mlflow

        out: dict[str, Any] = {"reelforge": __version__, "mlflow": mlflow.__version__, "model_uri": engine.settings.model}
        if engine.model is not None:
            out |= engine.model.info() | {"card": engine.model.pipeline.card.to_json()}
        return out

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        raw = await body_of(request)
        content_type = request.headers.get("content-type", "")
        return await run_in_threadpool(_invocations, engine, raw, content_type, request)


def _add_video_routes(app: FastAPI, engine: Engine, body_of: Any) -> None:

    @app.post("/v1/videos", status_code=202)
    async def create_video(request: Request) -> JSONResponse:
        body = json_body(await body_of(request), request.headers.get("content-type", ""))
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise ServeError(400, "Idempotency-Key must be 1-255 characters", param="Idempotency-Key")

        def work() -> tuple[dict[str, Any], bool]:
            if key is None:
                engine.ensure_room()  # a full server answers 429 before validating anything
            record, plan = engine.check(body)
            digest = request_sha256(body) if isinstance(body, dict) else None
            return engine.submit(record, plan, key=key, body_sha256=digest)

        status, new = await run_in_threadpool(work)
        request.state.note = f"{status['id']}{'' if new else ' (existing, Idempotency-Key)'}"
        return JSONResponse(status, 202, headers={"Location": f"/v1/videos/{status['id']}"})

    @app.get("/v1/videos")
    def list_videos(limit: str = "20", after: str | None = None) -> dict[str, Any]:
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST:
            raise ServeError(400, f"limit must be an integer in [1, {MAX_LIST}], got {limit!r}", param="limit")
        return engine.list(int(limit), after)

    def job(job_id: str) -> dict[str, Any]:
        if not ID_RE.match(job_id):
            raise ServeError(404, f"no job {job_id!r}", param="id", code="not_found")
        return engine.get(job_id)

    @app.get("/v1/videos/{job_id}")
    def get_video(job_id: str) -> dict[str, Any]:
        return engine.public(job(job_id))

    @app.get("/v1/videos/{job_id}/content")
    def video_content(job_id: str) -> Response:
        status = job(job_id)
        if status["status"] != "completed":
            raise ServeError(409, f"job {job_id} is {status['status']}, not completed; its video is not available", code="not_ready")
        path = engine.store.local_video_path(job_id)
        if path is not None:
            return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")
        return Response(engine.store.video(job_id), media_type="video/mp4")

    @app.delete("/v1/videos/{job_id}")
    def delete_video(job_id: str) -> dict[str, Any]:
        job(job_id)
        return engine.cancel_or_delete(job_id)


_MLFLOW_CODES = {404: "RESOURCE_DOES_NOT_EXIST", 409: "RESOURCE_ALREADY_EXISTS", 413: "BAD_REQUEST",
                 415: "BAD_REQUEST", 429: "REQUEST_LIMIT_EXCEEDED", 503: "TEMPORARILY_UNAVAILABLE"}  # fmt: skip


def parse_mlflow_table(raw: bytes, content_type: str, input_schema: Any) -> list[dict[str, Any]]:
    """An /invocations body -> request rows, parsed by MLflow's scoring-server code so every format
    `mlflow models serve` accepts is accepted here with the same meaning. One-line errors."""

    mime = content_type.split(";")[0].strip().lower()
    if mime not in MLFLOW_CONTENT_TYPES:
        raise ServeError(415, f"content type must be one of {', '.join(MLFLOW_CONTENT_TYPES)}, got {content_type or 'none'!r}")
    try:
        if mime == "application/json":
            try:
                decoded = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ServeError(400, f"body is not valid JSON ({one_line(exc)})") from None
            if not isinstance(decoded, dict):
                raise ServeError(400, f"body must be a JSON object with one of {', '.join(scoring_server.SUPPORTED_FORMATS)}")
            formats = {key: value for key, value in decoded.items() if key in scoring_server.SUPPORTED_FORMATS}
            if len(formats) != 1:
                raise ServeError(400, f"body must have exactly one of {', '.join(scoring_server.SUPPORTED_FORMATS)}; got keys {sorted(decoded)}")
            table = scoring_server.infer_and_parse_data(formats, input_schema)
        elif mime == "text/csv":
            # Without the schema: MLflow's CSV reader cannot type our `any` columns and would refuse
            # every CSV; pandas' own inference gives the numbers build_request checks per cell.
            table = scoring_server.parse_csv_input(io.StringIO(raw.decode("utf-8")), None)
        else:
            table = scoring_server.parse_parquet_input(io.BytesIO(raw))
    except MlflowException as exc:
        raise ServeError(400, one_line(exc)[:300]) from None
    except UnicodeDecodeError:
        raise ServeError(400, "CSV body is not UTF-8") from None
    if isinstance(table, dict):  # `inputs` as a dict of columns
        table = pd.DataFrame(table)
    if not isinstance(table, pd.DataFrame):
        raise ServeError(400, f"expected a table of requests, got {type(table).__name__}")
    if table.empty:
        raise ServeError(400, "the request table has no rows")
    # Through JSON: numpy scalars become plain numbers, NaN becomes null (= the bundle's default).
    return json.loads(table.to_json(orient="records"))


def _invocations(engine: Engine, raw: bytes, content_type: str, request: Request) -> Response:
    from model.pyfunc import model_signature

    rows = parse_mlflow_table(raw, content_type, model_signature().inputs)
    if len(rows) > engine.settings.max_queue:  # could never fit: not a matter of waiting
        raise ServeError(400, f"{len(rows)} rows exceed --max-queue {engine.settings.max_queue}; use /v1/videos or fewer rows")
    engine.ensure_room(len(rows))
    checked = [engine.check(row, row=index) for index, row in enumerate(rows)]
    sync = engine.fits_sync_budget([plan for _, plan in checked])
    statuses = engine.submit_all(checked, source="invocations")
    ids = [status["id"] for status in statuses]
    request.state.note = ",".join(ids)
    if sync:
        deadline = time.monotonic() + 3 * engine.settings.sync_budget_s  # estimates can be wrong; never hang
        finals = [engine.wait(job_id, max(0.0, deadline - time.monotonic())) for job_id in ids]
        if all(status["status"] == "completed" for status in finals):
            return JSONResponse({"predictions": [_prediction(engine, job_id) for job_id in ids]})
        failed = next((s for s in finals if s["status"] in ("failed", "cancelled")), None)
        if failed is not None:
            error = failed.get("error") or {}
            raise ServeError(500 if error.get("code") in ("internal_error", "storage_error") else 400,
                             f"row {ids.index(failed['id'])}: {error.get('message', failed['status'])}")  # fmt: skip
    # Over budget (or slower than estimated): the client polls the job(s) instead of timing out.
    body = {"object": "list", "data": [engine.public(engine.get(job_id)) for job_id in ids]}
    return JSONResponse(body, 202, headers={"Location": f"/v1/videos/{ids[0]}"})


def _prediction(engine: Engine, job_id: str) -> dict[str, Any]:
    """One row of the pyfunc's output table, from a finished job: what `mlflow models serve` returns."""
    result = engine.store.result(job_id) or {}
    values = dict(result, video_mp4_base64=base64.b64encode(engine.store.video(job_id)).decode("ascii"))
    values["warnings"] = json.dumps(list(values.get("warnings", [])))  # as the pyfunc writes it
    return {name: values.get(name) for name, _ in OUTPUT_COLUMNS}
