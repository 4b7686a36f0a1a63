"""``easyanimate serve``: the registered pyfunc model (``EasyAnimatePyfunc``) over HTTP, with bounded work.

Same request and response JSON as ``mlflow models serve`` (see ``easyanimate/serving/pyfunc.py``):
``POST /invocations`` with ``{"dataframe_records": [...]}`` (or ``dataframe_split``, ``inputs``,
``instances``) answers ``{"predictions": [...]}``; ``GET /ping`` and ``GET /health`` answer at once, also
while a video is being generated, with the server's state and counters as JSON.

Bounds, from the params file the server starts with:

- **per request**: ``generate.max_records_per_request`` records and ``generate.max_request_budget`` work
  (frames x height x width x steps summed over them), plus the ``generate.max_*`` size limits; beyond them
  HTTP 400 naming the setting. A body over ``serve.max_body_bytes`` gets 413.
- **in time**: a request's queueing plus generation is cut at ``serve.request_timeout_s`` (504); a client
  that disconnects stops its generation too. Generation checks after every denoising step (the pipeline's
  ``callback_on_step_end``), so the model is free for the next request within one step.
- **in load**: one generation at a time (it uses every core); ``serve.max_queue`` accepted requests may
  wait behind it, more get 503 with ``Retry-After``.
- **on SIGTERM** (uvicorn's graceful shutdown): no new connections; running and queued requests get
  ``serve.shutdown_grace_s`` to finish, then stop (503); the process exits with status 0.

Binds ``serve.host`` (127.0.0.1) by default. Prefer this server to ``mlflow models serve``, which enforces the
budget and stops a generation at its ``--timeout`` but cannot see a client disconnect (see ``pyfunc.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException

from easyanimate.config import ServeConfig, Settings
from easyanimate.serving.pyfunc import EasyAnimatePyfunc, GenerationStopped

logger = logging.getLogger("easyanimate.serve")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
RECORD_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")


class RequestError(Exception):
    """Answered as ``{"error_code": code, "message": message}`` with HTTP ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def parse_payload(body: bytes) -> list[dict]:
    """The records of an MLflow scoring-server JSON body; ``RequestError`` (400) naming what is wrong."""

    def bad(message: str) -> RequestError:
        return RequestError(400, "INVALID_PARAMETER_VALUE", message)

    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    keys = [k for k in RECORD_KEYS if isinstance(payload, dict) and k in payload]
    if len(keys) != 1:
        raise bad(f"the request body must be a JSON object with exactly one of {list(RECORD_KEYS)}")
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list):
            raise bad('dataframe_split must be {"columns": [...], "data": [[...], ...]}')
        columns, rows = data["columns"], data.get("data")
        if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(columns) for r in rows):
            raise bad(f"dataframe_split.data must be a list of rows of {len(columns)} values")
        return [dict(zip(columns, row)) for row in rows]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or any(not isinstance(r, dict) for r in data):
        raise bad(f"{keys[0]} must be a list of records (JSON objects)")
    return data


class Job:
    """One accepted request: its records, its deadline and, once set, why it must stop."""

    def __init__(self, number: int, requests: list[dict], deadline: float, timeout_s: float):
        self.number, self.requests, self.deadline, self.timeout_s = number, requests, deadline, timeout_s
        self.stop_reason: str | None = None  # "timeout" | "disconnected" | "shutdown"
        self.step, self.steps = 0, 0
        self.started: float | None = None

    def cancel(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self) -> str | None:
        if self.stop_reason is None and time.monotonic() >= self.deadline:
            self.stop_reason = "timeout"
        return STOP_MESSAGES[self.stop_reason].format(s=self.timeout_s) if self.stop_reason else None

    def progress(self, done: int, total: int) -> None:
        self.step, self.steps = done, total


STOP_MESSAGES = {
    "timeout": "request stopped: it took longer than {s:g} s (serve.request_timeout_s)",
    "disconnected": "request stopped: the client disconnected",
    "shutdown": "request stopped: the server is shutting down (serve.shutdown_grace_s ran out)",
}
STOP_STATUS = {
    "timeout": (504, "DEADLINE_EXCEEDED"),
    "disconnected": (499, "CANCELLED"),
    "shutdown": (503, "TEMPORARILY_UNAVAILABLE"),
}


class Worker:
    """Runs jobs one at a time in a background thread; at most ``1 + max_queue`` jobs admitted at once."""

    def __init__(self, model: EasyAnimatePyfunc, max_queue: int):
        self.model = model
        self.capacity = 1 + max_queue
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easyanimate-generate")
        self._lock = threading.Lock()
        self.jobs: list[Job] = []  # admitted, not finished; the first one runs
        self.counts = {
            "served": 0,
            "failed": 0,
            "rejected_invalid": 0,
            "rejected_queue_full": 0,
            **{f"stopped_{reason}": 0 for reason in STOP_MESSAGES},
        }

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def submit(self, job: Job):
        with self._lock:
            if len(self.jobs) >= self.capacity:
                self.counts["rejected_queue_full"] += 1
                raise RequestError(
                    503,
                    "TEMPORARILY_UNAVAILABLE",
                    f"the server is busy: {len(self.jobs)} requests running or queued "
                    f"(serve.max_queue={self.capacity - 1}); retry later",
                    {"Retry-After": "1"},
                )
            self.jobs.append(job)
        return self.executor.submit(self._run, job)

    def _run(self, job: Job) -> list[dict]:
        try:
            job.started = time.monotonic()
            return self.model.generate(job.requests, job.should_stop, job.progress)
        finally:
            with self._lock:
                self.jobs.remove(job)

    def state(self) -> dict:
        with self._lock:
            running = next((j for j in self.jobs if j.started is not None), None)
            return {
                "running": None
                if running is None
                else {"request": running.number, "step": running.step, "steps": running.steps},
                "queued": sum(1 for j in self.jobs if j.started is None),
                "max_queue": self.capacity - 1,
                **self.counts,
            }

    def cancel_all(self, reason: str) -> None:
        with self._lock:
            for job in self.jobs:
                job.cancel(reason)


def build_app(
    model: EasyAnimatePyfunc,
    config: ServeConfig,
    shutting_down: Callable[[], bool] = lambda: False,
):
    """The ASGI app. ``shutting_down()`` turning True (uvicorn's ``should_exit``) starts the drain: requests
    still running ``config.shutdown_grace_s`` later stop with 503."""
    worker = Worker(model, config.max_queue)
    numbers = itertools.count(1)
    drain: dict[str, float] = {}  # "until": the monotonic time the drain ends

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # After uvicorn's graceful shutdown: stop whatever still runs and wait for the worker (one step).
        worker.cancel_all("shutdown")
        await asyncio.to_thread(worker.executor.shutdown, wait=True, cancel_futures=True)
        logger.info("stopped: %s", json.dumps(worker.state()))

    app = FastAPI(title="easyanimate serve", lifespan=lifespan)
    app.state.worker = worker

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse(
            {"error_code": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers
        )

    def draining() -> bool:
        if shutting_down() and "until" not in drain:
            drain["until"] = time.monotonic() + config.shutdown_grace_s
            logger.info("shutting down: %.0f s for %d running or queued requests", config.shutdown_grace_s,
                        len(worker.jobs))  # fmt: skip
        return "until" in drain and time.monotonic() >= drain["until"]

    async def health():
        return {"status": "ok", **worker.state()}

    app.get("/ping")(health)
    app.get("/health")(health)

    async def read_body(request: Request) -> bytes:
        too_big = RequestError(
            413, "INVALID_PARAMETER_VALUE", f"the request body is over {config.max_body_bytes:,} bytes "
            "(serve.max_body_bytes)"
        )  # fmt: skip
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise too_big
        return bytes(body)

    @app.post("/invocations")
    async def invocations(request: Request):
        number = next(numbers)
        started = time.monotonic()
        try:
            if shutting_down():
                raise RequestError(503, "TEMPORARILY_UNAVAILABLE", "the server is shutting down")
            content_type = request.headers.get("content-type", "application/json")
            if not content_type.startswith("application/json"):
                raise RequestError(415, "INVALID_PARAMETER_VALUE", f"send JSON (application/json), not {content_type}")
            rows = parse_payload(await read_body(request))
            try:
                requests = model.check_request(rows)
            except MlflowException as exc:
                raise RequestError(exc.get_http_status_code(), exc.error_code, exc.message) from None
            job = Job(number, requests, started + config.request_timeout_s, config.request_timeout_s)
            future = asyncio.wrap_future(worker.submit(job))
            # A stopped request is answered before its worker finishes; its outcome is then nobody's to read.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        except RequestError as exc:
            if exc.status == 400:
                worker.count("rejected_invalid")
            return error(exc)

        try:
            while not future.done():
                await asyncio.wait({future}, timeout=config.poll_s)
                if future.done():
                    break
                if await request.is_disconnected():
                    job.cancel("disconnected")
                elif draining():
                    job.cancel("shutdown")
                elif time.monotonic() >= job.deadline:
                    job.cancel("timeout")
                if job.stop_reason:  # answer now; the worker stops the generation at its next step
                    raise GenerationStopped(job.should_stop() or "", job.step)
            predictions = future.result()
        except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out before our drain did
            job.cancel("shutdown")
            raise
        except GenerationStopped as exc:
            reason = job.stop_reason or "timeout"
            worker.count(f"stopped_{reason}")
            logger.warning(
                "request %d stopped (%s) after %.1f s at denoising step %d/%d", number, reason,
                time.monotonic() - started, job.step, job.steps,
            )  # fmt: skip
            status, code = STOP_STATUS[reason]
            return error(RequestError(status, code, str(exc)))
        except MlflowException as exc:
            worker.count("failed")
            return error(RequestError(exc.get_http_status_code(), exc.error_code, exc.message))
        except Exception as exc:  # a bug or an out-of-memory: answer, log the traceback, keep serving
            worker.count("failed")
            logger.exception("request %d failed", number)
            return error(RequestError(500, "INTERNAL_ERROR", f"generation failed: {type(exc).__name__}: {exc}"))
        worker.count("served")
        logger.info("request %d served in %.2f s", number, time.monotonic() - started)
        return JSONResponse({"predictions": predictions})

    return app


def load_model(model_uri: str, tracking_uri: str | None = None) -> EasyAnimatePyfunc:
    """The ``EasyAnimatePyfunc`` behind a registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or
    a saved pyfunc model folder, loaded (its pipeline in memory)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    loaded = mlflow.pyfunc.load_model(model_uri)
    model = loaded.unwrap_python_model()
    if not isinstance(model, EasyAnimatePyfunc):
        raise ValueError(f"{model_uri} is a {type(model).__name__} model, not an EasyAnimate pyfunc model")
    return model


def serve(
    settings: Settings,
    model_uri: str,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "info",
) -> None:
    """Load ``model_uri`` and serve it until SIGTERM or Ctrl-C (then drain, and return)."""
    import uvicorn

    from easyanimate.tracking import tracking_uri

    config = settings.serve
    host = host or config.host
    port = port or config.port
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if host not in LOOPBACK:
        logger.warning("binding %s: the server is reachable from the network, without authentication", host)
    model = load_model(model_uri, tracking_uri(settings))
    model.set_limits(settings.generate)  # this host's params decide what a request may ask for
    logger.info("serving %s with limits %s", model_uri, json.dumps(model.limits))
    # Everything loaded so far lives until exit: keep the collector from scanning it again and again (shorter
    # pauses while serving, and a process exit in under a second instead of seconds of finalizer collections).
    gc.freeze()
    server: uvicorn.Server | None = None
    app = build_app(model, config, shutting_down=lambda: server is not None and server.should_exit)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            # Our own drain ends at shutdown_grace_s and answers the stopped requests; this is the backstop.
            timeout_graceful_shutdown=config.shutdown_grace_s + max(2.0, 4 * config.poll_s),
            lifespan="on",
        )
    )
    # uvicorn re-raises the signal that stopped it once it has drained; with a handler of ours installed that
    # ends the process normally (status 0) instead of by the default action.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: logger.info("stopped by SIGTERM"))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise OSError(f"could not serve on {host}:{port} (see the log above)")
