"""``GET /v1/attnmatch/requests/{id}``: the per-request report, served by vLLM's OpenAI server.

vLLM 0.32 lets a package add HTTP routes through an *endpoint plugin* (``vllm.plugins.endpoint_plugins``:
an object with ``attach_router(app)`` and ``init_state(...)``, attached by ``build_app`` after the core
routes). Its discovery is opt-in per name through ``VLLM_PLUGINS``, which would also make users list the
general plugin; but a user who starts the server with an ``attnmatch`` section has already opted in. So
the front end's config hook (:func:`install`) adds this plugin to the list vLLM discovers, and vLLM
attaches it like any other endpoint plugin. The route sits under ``/v1``, so ``--api-key`` guards it.

The reports themselves come from EngineCore through files (:mod:`vllm_attnmatch.ipc.report`). Answers:

- 200 with the reports of the response ``id`` (one per prompt × ``n``);
- 404 for an id with no report: unknown, dropped (each engine keeps its last ``MAX_REPORTS``), or a request
  that never asked for compaction (no ``am_*`` keys and a server preset that does not compact: such requests
  are not recorded at all, so the answer cannot tell them from unknown ids); and for a bare ``X-Request-Id``
  (only its response form ``cmpl-<id>`` / ``chatcmpl-<id>`` is answered);
- 409 when the id names requests of more than one submission (a client-chosen ``X-Request-Id`` reused):
  nobody reads another client's report;
- for an id the client chose (``X-Request-Id`` or the body's ``request_id``), the 404 of an unknown id to a
  caller whose ``Authorization`` header differs from the one the request was sent with
  (:mod:`vllm_attnmatch.ipc.report_scope`; recorded by :class:`ChosenIdScopes`, a middleware of the same app).
"""

from __future__ import annotations

import json
import threading
from argparse import Namespace
from typing import Any

from fastapi import Request
from vllm.logger import init_logger

from vllm_attnmatch.ipc.report import MAX_REPORTS, AmbiguousId, find_reports
from vllm_attnmatch.ipc.report_scope import ScopeRecorder, may_read

logger = init_logger("vllm.attnmatch.report")

PLUGIN_NAME = "attnmatch_reports"
ROUTE = "/v1/attnmatch/requests/{request_id}"
OBJECT = "attnmatch.request_report"


def not_found_message(request_id: str) -> str:
    return (
        f"no attnmatch report for id {request_id!r}: pass the 'id' of a completion or chat completion "
        f"response of this server; only requests that asked for compaction (am_* keys, or a server preset "
        f"that compacts) have a report, kept for the last {MAX_REPORTS} such requests of each engine"
    )


def ambiguous_message(request_id: str) -> str:
    return (
        f"id {request_id!r} names requests of more than one client (an X-Request-Id sent twice): its reports "
        f"are not served; send a unique X-Request-Id, or none (the server then picks a random id)"
    )


def _error(message: str, code: int):
    from fastapi.responses import JSONResponse

    kind = "NotFoundError" if code == 404 else "ConflictError"
    return JSONResponse({"error": {"message": message, "type": kind, "param": "id", "code": code}}, status_code=code)


def report_body(request_id: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": OBJECT, "id": request_id, "data": reports}


class AttnMatchReportsEndpoint:
    """vLLM endpoint plugin (``vllm.plugins.endpoint_plugins.interface.EndpointPlugin``)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter

        router = APIRouter()

        # A plain ``def``: FastAPI runs it in its thread pool, so reading the files never blocks the loop.
        @router.get(ROUTE, summary="What vllm-attnmatch did to one request (compacted or why not, T -> t)")
        def get_request_report(request_id: str, request: Request):
            if not may_read(request_id, request.headers.get("authorization")):
                return _error(not_found_message(request_id), 404)
            try:
                reports = find_reports(request_id)
            except AmbiguousId:
                return _error(ambiguous_message(request_id), 409)
            if not reports:
                return _error(not_found_message(request_id), 404)
            return report_body(request_id, reports)

        app.include_router(router)
        app.add_middleware(ChosenIdScopes)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        return None


#: Body size up to which a completion request without ``X-Request-Id`` is read for a chosen ``request_id``.
MAX_SCANNED_BODY = 64 << 20


class ChosenIdScopes:
    """ASGI middleware: records the credential scope of every completion / chat request whose id the
    client chose (the ``X-Request-Id`` header, which vLLM prefers, or else the body's ``request_id``),
    before the request reaches vLLM, so its report is never readable without the same credentials. It
    reads the body as it passes (unchanged) only when there is no header and the body names a
    ``request_id``; other requests pass untouched."""

    def __init__(self, app) -> None:
        self.app = app
        self.scopes = ScopeRecorder()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        chosen = headers.get(b"x-request-id")
        if chosen is not None:
            self.scopes.record(chosen.decode("latin-1"), authorization)
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0

        async def receive_and_scan():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request" and size <= MAX_SCANNED_BODY:
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if not message.get("more_body", False):
                    self._record_body_id(b"".join(chunks), authorization)
            return message

        return await self.app(scope, receive_and_scan, send)

    def _record_body_id(self, body: bytes, authorization: str | None) -> None:
        if b'"request_id"' not in body:
            return
        try:
            chosen = json.loads(body).get("request_id")
        except (ValueError, AttributeError):
            return  # vLLM answers a malformed body itself
        if isinstance(chosen, str):
            self.scopes.record(chosen, authorization)


_install_lock = threading.Lock()


def install() -> bool:
    """Make vLLM's endpoint-plugin discovery include this plugin (front end only; idempotent).
    Returns False (and logs why) when this vLLM has no endpoint plugins."""
    with _install_lock:
        try:
            import vllm.plugins as plugins
            from vllm.plugins.endpoint_plugins import interface  # noqa: F401  (the hook build_app calls)
        except ImportError:
            logger.warning("this vLLM has no endpoint plugins: %s is not served", ROUTE)
            return False
        original = getattr(plugins, "load_endpoint_plugins", None)
        if original is None:
            logger.warning("vllm.plugins.load_endpoint_plugins is missing: %s is not served", ROUTE)
            return False
        if getattr(original, "_attnmatch_reports", False):
            return True

        def load_endpoint_plugins(supported_tasks=None):
            loaded = original(supported_tasks)
            eligible = supported_tasks is not None and "generate" in supported_tasks
            if eligible and not any(getattr(p, "name", None) == PLUGIN_NAME for p in loaded):
                loaded.append(AttnMatchReportsEndpoint())
            return loaded

        load_endpoint_plugins._attnmatch_reports = True  # type: ignore[attr-defined]
        load_endpoint_plugins.__wrapped__ = original  # type: ignore[attr-defined]
        plugins.load_endpoint_plugins = load_endpoint_plugins
        return True
