"""The blocking baseline: a WSGI app that runs the whole generation inside the request.

Same request model, the same steps (``generate_api.GenerateJob``: validate, encode), the same limits
(``limits.ServerLimits``: 413 for a body over ``max_body_bytes``, 415 for a body not sent as JSON) and the
same JSON bodies and errors as the FastAPI app's non-streaming ``/generate``, so the two can be compared
request for request. The engine runs in the request's own thread; served by ``background.FlaskServer``
(one request at a time), a ``/health`` call waits behind a running generation. That is the point of the
baseline, not a bug to fix here.

Served by ``background.FlaskServer``, a connection has the FastAPI app's deadlines before its request
reaches this app (``limits.wsgi``: idle, headers, body; a 408 or a closed connection), so a silent or
slowloris client holds the one thread for seconds, not for good.

Left out on purpose: streaming (``stream=true`` is a 400), the engine thread, the concurrency limit
(one request at a time already), the cap on connections (they wait in the kernel's backlog), a deadline
on the generation and on writing the answer, the drain on SIGTERM (a request in progress is cut), the
``/v1`` API, debug mode (it would run arbitrary code from the browser and reload the model).
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .generate_api import (GenerateJob, GenerateRequest, InputError, error_payload, http_error_body,
                           validation_detail, validation_error_body)
from .limits import ServerLimits, not_json_message, too_large_message

logger = logging.getLogger(__name__)


def create_flask_app(engine, limits: ServerLimits | None = None) -> Flask:
    """The Flask app serving ``engine`` directly: ``POST /generate`` (no streaming) and ``GET /health``.

    ``limits`` defaults to ``ServerLimits()``; only its ``max_body_bytes`` applies here.
    """
    limits = limits or ServerLimits()
    app = Flask("labserver")
    app.debug = False  # Flask reads FLASK_DEBUG at creation; the debugger must never reach a shared server
    # werkzeug refuses a larger Content-Length at once; a chunked body it reads up to this many bytes and
    # silently stops, so it may read one byte more than the limit and `generate` tells the two apart.
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes + 1
    app.json.sort_keys = False  # keep the engine's key order, as FastAPI does

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge | None):
        return jsonify(detail=too_large_message(limits)), 413

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # 404, 405 as JSON, shaped like FastAPI's
        return jsonify(detail=exc.description), exc.code

    @app.get("/health")
    def health():
        return {"status": "ok", "running": engine.running, "backend": "flask", "model": engine.config.model}

    @app.post("/generate")
    def generate():
        if message := not_json_message(request.headers):
            return jsonify(detail=message), 415
        data = request.get_data()
        if len(data) > limits.max_body_bytes:
            return too_large(None)
        try:
            job = GenerateJob(GenerateRequest.model_validate_json(data))
            job.validate(engine)
        except ValidationError as exc:
            body, status = validation_error_body(validation_detail(exc))
            return jsonify(body), status
        except InputError as exc:
            body, status = validation_error_body(exc.detail)
            return jsonify(body), status
        if job.stream:
            message = "the Flask baseline does not stream: send stream=false, or use the FastAPI server"
            return jsonify(detail=message), 400
        try:
            ids = job.encode(engine)
        except InputError as exc:
            body, status = http_error_body(exc)
            return jsonify(body), status
        try:
            completion = engine.generate(ids, job.params)
        except Exception as exc:
            logger.exception("generation failed")
            return jsonify(error_payload(exc)), 500
        return jsonify(completion.to_dict())

    return app
