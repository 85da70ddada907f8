"""A `ChatBackend` for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted
API), spoken over plain HTTP with aiohttp.

Callers are synchronous (a Ray actor calls `chat(requests)` and waits), but an endpoint answers
fastest when many requests are in flight. So each backend owns one asyncio event loop running
on a daemon thread and one aiohttp session on it: `chat` hands the whole batch to that loop,
which runs the requests concurrently (at most `concurrency` at once per backend, across calls)
and reuses the session's keep-alive connections from one call to the next.

What happens to a request, by what the endpoint answers (see `_attempt`):

1. 2xx with a usable message: a reply with its text, finish reason and token count.
2. 2xx that is not JSON, has no choices or no content, or carries a refusal: an error reply for
   that request ("malformed response: ...", "refused: ..."). A server that answers 200 has
   looked at the request, so retrying would only repeat the answer.
3. 400, 413, 422: the endpoint rejected *this request* (too many frames, an image it cannot
   decode, a prompt over the context): an error reply "endpoint answered 400: ...", not retried.
4. 408, 429, 5xx, a timeout, a refused or dropped connection: transient; retried up to
   `max_retries` times with exponential backoff and jitter, honouring a numeric Retry-After on
   429/503. Past the last try: `BackendUnavailable`.
5. Any other 4xx (401, 403, 404, ...): our configuration is wrong (the key, the model name, the
   URL), not the request: `BackendUnavailable` at once, never blamed on the clip.

When one request raises `BackendUnavailable`, the rest of that `chat` call is cancelled and the
exception propagates: the job stops and a rerun resumes.

The API key is read once from the environment and sent only in the Authorization header. It is
scrubbed from every message this module writes (an endpoint may echo it back in an error), and
never logged, returned or shown in `repr`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from model.chat import BackendUnavailable, ChatReply, ChatRequest, Sampling

logger = logging.getLogger(__name__)

BACKOFF_CAP_S = 8.0  # the longest wait between two tries that we choose ourselves
RETRY_AFTER_CAP_S = 30.0  # the longest wait a server's Retry-After can impose
MESSAGE_CHARS = 200  # a server's error message is cut to this many characters
REQUEST_ERRORS = {400, 413, 422}  # the endpoint rejected this request: an error reply
RETRIED = {408, 429}  # plus every 5xx
LIKELY_CAUSE = {
    401: "the API key is missing or wrong",
    403: "the API key may not use this model",
    404: "the URL or the model name is wrong",
}


def completions_url(endpoint: str) -> str:
    """The URL we POST to: `<endpoint>/chat/completions`.

    An endpoint is the server's base URL as OpenAI clients take it ("http://host:8000/v1"). One
    with no path at all ("http://host:8000") gets "/v1", where vLLM and SGLang serve; any other
    path is kept as written (a hosted API may live under "/openai/v1"). A trailing slash is
    dropped, and an endpoint that already ends in /chat/completions is used as is.
    """
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"chat endpoint must be an http(s) URL like http://host:8000/v1, got {endpoint!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        return parts._replace(path=path).geturl()
    return parts._replace(path=(path or "/v1") + "/chat/completions").geturl()


def request_body(model: str, request: ChatRequest, sampling: Sampling, video_input: bool) -> dict[str, Any]:
    """The chat-completions body for one request: frames as JPEG data URLs in time order, then the
    prompt; or the clip as one vLLM `video_url` when the endpoint takes video and the request has
    one; or the prompt as a plain string when there is nothing to look at."""
    if video_input and request.video is not None:
        visual = [{"type": "video_url", "video_url": {"url": data_url("video/mp4", request.video)}}]
    else:
        visual = [{"type": "image_url", "image_url": {"url": data_url("image/jpeg", frame)}} for frame in request.images]
    content: str | list[dict[str, Any]] = [*visual, {"type": "text", "text": request.prompt}] if visual else request.prompt
    messages = [{"role": "system", "content": request.system}] if request.system is not None else []
    messages.append({"role": "user", "content": content})
    return {
        "model": model,
        "messages": messages,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def parse_reply(text: str) -> ChatReply:
    """A 2xx body as a reply; anything unusable becomes an error reply for this request."""
    try:
        answer = json.loads(text)
    except ValueError:
        return ChatReply(text=None, error=f"malformed response: not JSON: {one_line(text)}")
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return ChatReply(text=None, error=f"malformed response: no choices: {one_line(text)}")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        return ChatReply(text=None, error=f"malformed response: no message: {one_line(text)}")
    finish_reason = choice.get("finish_reason")
    usage = answer.get("usage") or {}
    output_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if message.get("refusal"):
        return ChatReply(text=None, error=f"refused: {one_line(str(message['refusal']))}", finish_reason=finish_reason)
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones, in order
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    if not isinstance(content, str):
        error = f"malformed response: no message content (finish_reason={finish_reason})"
        return ChatReply(text=None, error=error, finish_reason=finish_reason)
    return ChatReply(text=content, output_tokens=output_tokens, finish_reason=finish_reason)


def server_message(text: str) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, vLLM's {"message"},
    FastAPI's {"detail"}, or else the body itself; one line, cut to MESSAGE_CHARS."""
    try:
        body = json.loads(text)
    except ValueError:
        return one_line(text) or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        for found in (error.get("message") if isinstance(error, dict) else error, body.get("message"), body.get("detail")):
            if found:
                return one_line(str(found))
    return one_line(text)


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def retry_after_s(value: str | None) -> float | None:
    """A numeric Retry-After, capped; an HTTP date or garbage is ignored (we back off instead)."""
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP_S) if value is not None else None
    except ValueError:
        return None


def backoff_s(base_s: float, retry: int) -> float:
    """Exponential backoff with "equal jitter": half the step is fixed, half random, so a crowd
    of actors retrying after the same outage spreads out instead of returning in lockstep."""
    step_s = min(BACKOFF_CAP_S, base_s * 2 ** (retry - 1))
    return step_s / 2 + random.uniform(0, step_s / 2)


@dataclass
class _Retry:
    """One failed try that may succeed later: why, and how long the server asked us to wait."""

    reason: str
    status: int | None = None
    wait_s: float | None = None


class OpenAIChat:
    """A chat-completions endpoint as a `ChatBackend`. See the module docstring for the policy."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        revision: str | None = None,
        sampling: Sampling = Sampling(),
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        video_input: bool = False,
        backoff_s: float = 0.5,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        self.model_id = model
        self.revision = revision or ""
        self.url = completions_url(endpoint)
        # Shown in messages without any user:password@ the URL may carry.
        parts = urlsplit(self.url)
        self._shown_url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        self.sampling = sampling
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.video_input = video_input
        self.backoff_s = backoff_s
        self._api_key = os.environ.get(api_key_env) or None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-chat", daemon=True)
        self._thread.start()
        self._session, self._slots = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    def __repr__(self) -> str:
        return f"OpenAIChat(url={self._shown_url!r}, model={self.model_id!r}, concurrency={self.concurrency})"

    async def _open(self):
        import aiohttp  # lazily: model/ must import without it

        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # As many pooled connections as requests in flight, kept alive between chat() calls.
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        return aiohttp.ClientSession(headers=headers, connector=connector), asyncio.Semaphore(self.concurrency)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        """One reply per request, in order. Blocks the calling thread until all are answered;
        the requests run on this backend's own loop thread, so a caller inside a running event
        loop works too (that loop waits meanwhile)."""
        if self._closed:
            raise RuntimeError("this OpenAIChat is closed")
        for request in requests:
            if request.video is not None and not request.images and not self.video_input:
                raise ValueError(
                    "a request carries a video but no frames, and this endpoint takes frames "
                    "(set video_input=True for a vLLM endpoint that takes video)"
                )
        if not requests:
            return []
        future = asyncio.run_coroutine_threadsafe(self._chat_all(list(requests)), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the requests still in flight
            raise

    def close(self) -> None:
        """Close the session and stop the loop thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> OpenAIChat:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    async def _chat_all(self, requests: list[ChatRequest]) -> list[ChatReply]:
        tasks: list[asyncio.Future] = []

        def cancel_others() -> None:
            for task in tasks:
                if task is not asyncio.current_task():
                    task.cancel()

        tasks += [asyncio.ensure_future(self._chat_one(request, cancel_others)) for request in requests]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        return results

    async def _chat_one(self, request: ChatRequest, cancel_others: Callable[[], None]) -> ChatReply:
        """One request, with its retries.

        Its slot is held through the backoff too, so a server that asks us to slow down sees
        fewer requests, not the same number from other tasks. `seconds` counts from taking the
        slot: time queued behind other requests is not this request's. When this request finds
        the backend unavailable, the rest of the call is cancelled while the slot is still held,
        so no queued request takes it and reaches the endpoint after the failure."""
        async with self._slots:
            try:
                return await self._tries(request)
            except Exception:
                cancel_others()
                raise

    async def _tries(self, request: ChatRequest) -> ChatReply:
        started = time.monotonic()
        # Encoded here, not up front, so at most `concurrency` bodies sit in memory.
        payload = json.dumps(request_body(self.model_id, request, self.sampling, self.video_input)).encode()
        tries = self.max_retries + 1
        for attempt in range(1, tries + 1):
            outcome = await self._attempt(payload)
            if isinstance(outcome, ChatReply):
                outcome.seconds = time.monotonic() - started
                return outcome
            if attempt == tries:
                break
            delay_s = outcome.wait_s if outcome.wait_s is not None else backoff_s(self.backoff_s, attempt)
            logger.warning(
                "chat endpoint %s: %s (try %d of %d); retrying in %.2f s", self._shown_url, outcome.reason, attempt, tries, delay_s
            )
            await asyncio.sleep(delay_s)
        raise BackendUnavailable(self._scrub(f"chat endpoint {self._shown_url} gave up after {tries} tries: {outcome.reason}"))

    async def _attempt(self, payload: bytes) -> ChatReply | _Retry:
        """One POST: a reply (maybe an error reply), a `_Retry`, or `BackendUnavailable`."""
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with self._session.post(self.url, data=payload, timeout=timeout) as response:
                status = response.status
                text = await response.text(errors="replace")
                retry_after = response.headers.get("Retry-After")
        except asyncio.TimeoutError:
            return _Retry(f"no answer within {self.timeout_s:g} s")
        except aiohttp.ClientError as exc:  # refused, reset, dropped mid-body, DNS
            return _Retry(self._scrub(one_line(f"{type(exc).__name__}: {exc}")))
        if 200 <= status < 300:
            return self._scrubbed(parse_reply(text))
        message = self._scrub(server_message(text))
        if status in REQUEST_ERRORS:
            return ChatReply(text=None, error=f"endpoint answered {status}: {message}")
        if status in RETRIED or status >= 500:
            wait_s = retry_after_s(retry_after) if status in (429, 503) else None
            return _Retry(f"answered {status}: {message}", status, wait_s)
        cause = LIKELY_CAUSE.get(status, "the endpoint refuses our requests")
        raise BackendUnavailable(
            f"chat endpoint {self._shown_url} answered {status} ({message}): {cause}; "
            f"check caption.endpoint / caption.model / the API key in ${self.api_key_env}"
        )

    def _scrub(self, text: str) -> str:
        """`text` without the API key, which an endpoint may echo back in an error message."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _scrubbed(self, reply: ChatReply) -> ChatReply:
        if reply.text:
            reply.text = self._scrub(reply.text)
        if reply.error:
            reply.error = self._scrub(reply.error)
        return reply


def probe_endpoint(endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 10.0) -> list[str]:
    """Check an endpoint before a job depends on it: GET <base>/models, the list every
    OpenAI-compatible server answers. Returns the model ids it serves ([] when it does not list
    them); BackendUnavailable in one line when it cannot be reached or rejects the key. A model
    missing from the list is only logged: some gateways list a subset of what they route."""
    import urllib.error
    import urllib.request

    url = completions_url(endpoint).removesuffix("/chat/completions") + "/models"
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    key = os.environ.get(api_key_env)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            listing = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise BackendUnavailable(f"chat endpoint {shown} answered {exc.code}: {LIKELY_CAUSE[exc.code]} (${api_key_env})") from None
        return []  # a server that does not list models is still worth trying
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        text = one_line(f"{type(reason).__name__}: {reason}")
        raise BackendUnavailable(f"chat endpoint {shown} cannot be reached ({text.replace(key, '***') if key else text})") from None
    ids = [str(item.get("id")) for item in listing.get("data", []) if isinstance(item, dict)] if isinstance(listing, dict) else []
    if ids and model not in ids:
        logger.warning("chat endpoint %s lists %s but not %r; requests may fail with 404", shown, ", ".join(ids[:5]), model)
    return ids
