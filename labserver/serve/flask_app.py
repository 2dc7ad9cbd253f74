"""The blocking baseline (Blog 1): a WSGI app that runs the whole generation inside the request.

Same request model and the same JSON body as the FastAPI app's non-streaming answer, so the two can be
compared request for request. The engine runs in the request's own thread; served by
``serving.FlaskServer`` (one request at a time), a ``/health`` call waits behind a running generation.
That is the point of the baseline, not a bug to fix here.

Left out on purpose: streaming (``stream=true`` is a 400), the engine thread, debug mode (it would run
arbitrary code from the browser and reload the model).
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from .schemas import error_payload, parse_request, validation_detail

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024  # larger bodies get 413 before any JSON parsing


def create_flask_app(engine) -> Flask:
    """The Flask app serving ``engine`` directly: ``POST /generate`` (no streaming) and ``GET /health``."""
    app = Flask("labserver")
    app.debug = False  # Flask reads FLASK_DEBUG at creation; the debugger must never reach a shared server
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # keep the engine's key order, as FastAPI does

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # 404, 405, 413 as JSON, shaped like FastAPI's
        return jsonify(detail=exc.description), exc.code

    @app.get("/health")
    def health():
        return {"status": "ok", "running": engine.running, "backend": "flask", "model": engine.config.model}

    @app.post("/generate")
    def generate():
        try:
            body = parse_request(request.get_data(), engine.config)
            params = body.to_sampling_params()
        except ValidationError as exc:
            return jsonify(detail=validation_detail(exc)), 422
        except ValueError as exc:
            return jsonify(detail=[{"type": "value_error", "loc": ["body"], "msg": str(exc)}]), 422
        if body.stream:
            message = "the Flask baseline does not stream: send stream=false, or use the FastAPI server"
            return jsonify(detail=message), 400
        try:
            completion = engine.generate(body.prompt, params)
        except ValueError as exc:  # PromptTooLong and other input the engine rejects
            return jsonify(detail=str(exc)), 400
        except Exception as exc:
            logger.exception("generation failed")
            return jsonify(error_payload(exc)), 500
        return jsonify(completion.to_dict())

    return app
