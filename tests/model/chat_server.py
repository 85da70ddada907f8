"""A real OpenAI-compatible chat-completions server on loopback, for tests and benchmarks.

    with ChatServer(latency_s=0.05) as server:
        backend = OpenAIChat(server.url, "test-model")
        ...
        server.requests[0].body["messages"]

It is an aiohttp web server on 127.0.0.1, bound to port 0 so the OS picks a free port (no race
between choosing a port and binding it), run on its own event loop in a daemon thread. It speaks
POST /v1/chat/completions and GET /v1/models, records every request, answers a deterministic
caption (`default_caption`), and can be scripted to fail: `fail_next(status, ...)` answers the
next requests with an error, `hang_next(seconds)` holds the next one past a client's timeout.
`latency_s` is slept with asyncio.sleep, so concurrent requests overlap as on a real server, and
`max_in_flight` records how many were ever handled at once.

A `reply(body)` hook replaces the default caption, e.g. to serve a real model's output. It runs on
one worker thread (calls are serialised, the server's loop is not blocked) and returns a str (the
message content), a dict (the whole JSON answer, sent as is), bytes (a raw 200 body, e.g. not
JSON at all) or a (status, dict) tuple (an HTTP error for that request alone).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class RecordedRequest:
    body: dict[str, Any]  # the JSON body as sent
    headers: dict[str, str]
    peer: tuple[str, int]  # the client's address: the same port across calls means a reused connection


@dataclass
class _Failure:
    status: int
    retry_after: str | None
    body: str | dict[str, Any] | None


@dataclass
class _Hang:
    seconds: float


def default_caption(body: dict[str, Any]) -> str:
    """The server's answer to a chat-completions body: how much it was shown, and a hash of the
    prompt, so a test can tell which reply answers which request."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return f"A reply to {prompt_hash(content)}"
    prompt = "".join(part["text"] for part in content if part["type"] == "text")
    frames = sum(part["type"] == "image_url" for part in content)
    videos = sum(part["type"] == "video_url" for part in content)
    shown = f"{videos} video" if videos else f"{frames} frames"
    return f"A clip of {shown}: {prompt_hash(prompt)}"


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def completion(model: str, text: str, number: int) -> dict[str, Any]:
    """An OpenAI chat.completion object around `text`."""
    tokens = len(text.split())
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
    }


class ChatServer:
    def __init__(
        self,
        latency_s: float = 0.0,
        reply: Callable[[dict[str, Any]], str | dict[str, Any] | bytes] | None = None,
        model: str = "test-model",
    ):
        self.latency_s = latency_s
        self.reply = reply
        self.model = model
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""  # http://127.0.0.1:PORT/v1 once started
        self._script: deque[_Failure | _Hang] = deque()
        self._numbers = itertools.count(1)
        self._hook_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-server-reply")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None

    # --- scripting --------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        times: int = 1,
        retry_after: float | str | None = None,
        body: str | dict[str, Any] | None = None,
    ) -> None:
        """Answer the next `times` requests with `status` (after any already scripted), with an
        OpenAI-style error body unless `body` is given (a dict is sent as JSON, a str as is)."""
        for _ in range(times):
            self._script.append(_Failure(status, None if retry_after is None else str(retry_after), body))

    def hang_next(self, seconds: float) -> None:
        """Hold the next request `seconds` before answering it normally (past a client's timeout)."""
        self._script.append(_Hang(seconds))

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> ChatServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chat-server", daemon=True)
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._hook_thread.shutdown(wait=False, cancel_futures=True)

    async def _start(self) -> int:
        from aiohttp import web

        app = web.Application(client_max_size=512 * 1024**2)  # a clip as a base64 video_url is big
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        # A short shutdown: a request still hanging when the test ends is not waited for.
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return self._runner.addresses[0][1]

    async def _stop(self) -> None:
        await self._runner.cleanup()
        # Requests still hanging past the shutdown timeout: end them here, not when the loop closes.
        hanging = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)

    # --- handlers ---------------------------------------------------------------------------

    async def _models(self, request):
        from aiohttp import web

        models = [{"id": self.model, "object": "model", "owned_by": "reelforge-tests"}]
        return web.json_response({"object": "list", "data": models})

    async def _chat_completions(self, request):
        from aiohttp import web

        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(RecordedRequest(body, dict(request.headers), tuple(peer or ("", 0))))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            scripted = self._script.popleft() if self._script else None
            if isinstance(scripted, _Failure):
                return self._failure(scripted)
            if isinstance(scripted, _Hang):
                await asyncio.sleep(scripted.seconds)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if self.reply is None:
                answer = default_caption(body)
            else:
                answer = await self._loop.run_in_executor(self._hook_thread, self.reply, body)
            if isinstance(answer, tuple):  # (HTTP status, JSON body): an answer for this request only
                status, payload = answer
                return web.json_response(payload, status=status)
            if isinstance(answer, bytes):
                return web.Response(body=answer, status=200, content_type="text/plain")
            if isinstance(answer, str):
                answer = completion(body.get("model", self.model), answer, next(self._numbers))
            return web.json_response(answer)
        finally:
            self.in_flight -= 1

    def _failure(self, failure: _Failure):
        from aiohttp import web

        headers = {"Retry-After": failure.retry_after} if failure.retry_after is not None else {}
        if isinstance(failure.body, str):
            return web.Response(text=failure.body, status=failure.status, headers=headers)
        error = {"message": f"scripted failure {failure.status}", "type": "test_error", "code": failure.status}
        body = failure.body or {"error": error}
        return web.Response(text=json.dumps(body), status=failure.status, headers=headers, content_type="application/json")
