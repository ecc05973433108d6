"""What ``hierarchy serve`` refuses, and where: before the body is read, while it is read, before decoding.

* :class:`Gate` bounds the classify requests admitted at once (queued + running). One more gets
  503 with ``Retry-After`` at once, before its body is read: there is never an unbounded backlog.
* :class:`GuardMiddleware` refuses a classify body over :attr:`Limits.max_request_bytes` with 413,
  from ``Content-Length`` before reading, or while streaming when there is none.
* The endpoint then checks the file count (413) and each file's size: an oversize file becomes
  that file's ``too_large`` record; pixel limits are the loader's (``max_pixels``, from the header).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

from hierarchy.data.imageio import DEFAULT_MAX_PIXELS

MB = 1024 * 1024
FORM_OVERHEAD = 256 * 1024  # multipart headers and boundaries allowed on top of the files themselves

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    max_upload_mb: float = 20.0  # per file
    max_files: int = 16  # per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, checked from its header before decoding
    max_queue: int = 32  # classify requests admitted at once; one more -> 503
    timeout_s: float = 60.0  # a request still waiting for the model after this -> 504
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_files", "max_pixels", "max_queue", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_upload_bytes + FORM_OVERHEAD


class Busy(HTTPException):
    def __init__(self, limits: Limits):
        super().__init__(503, f"busy: {limits.max_queue} requests already queued; retry shortly",
                         headers={"Retry-After": str(limits.retry_after_s)})


class TooLarge(HTTPException):
    """413; an HTTPException so that FastAPI's body parsing passes it through unchanged."""

    def __init__(self, what: str):
        super().__init__(413, what)


class Gate:
    """At most ``capacity`` holders at once; :meth:`try_enter` never waits. Used from the event loop only."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0

    def try_enter(self) -> bool:
        if self.held >= self.capacity:
            return False
        self.held += 1
        return True

    def leave(self) -> None:
        self.held -= 1


class GuardMiddleware:
    """Pure ASGI: admission (:class:`Gate`) and the body-size limit for ``paths``."""

    def __init__(self, app: ASGIApp, limits: Limits, gate: Gate, paths: frozenset[str],
                 on_busy: Callable[[], None] = lambda: None):
        self.app, self.limits, self.gate, self.paths, self.on_busy = app, limits, gate, paths, on_busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        limit = self.limits.max_request_bytes
        if declared is not None and declared > limit:
            await _reply(send, TooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes "
                                        f"({self.limits.max_files} files x {self.limits.max_upload_mb:g} MB)"))
            return
        if not self.gate.try_enter():
            self.on_busy()
            await _reply(send, Busy(self.limits))
            return
        try:
            await self.app(scope, _counting(receive, limit), send)
        finally:
            self.gate.leave()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise TooLarge(f"request body is over the limit of {limit} bytes")
        return message
    return wrapped


async def _reply(send: Send, exc: HTTPException) -> None:
    import json

    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
