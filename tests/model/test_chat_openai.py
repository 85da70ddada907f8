"""model/chat_openai.py against a real aiohttp server on loopback (tests/model/chat_server.py):
the requests' shape, the retry and error policy, the concurrency bound, and an API key that never
leaks. No mocks; backoff is shortened (`backoff_s`) so the whole file runs in seconds."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
import time
import traceback

import pytest
from PIL import Image

from model.chat import BackendUnavailable, ChatRequest, Sampling
from model.chat_openai import OpenAIChat, completions_url
from tests.model.chat_server import ChatServer, default_caption, prompt_hash

FAST = {"backoff_s": 0.01, "timeout_s": 5.0}


def jpeg(shade: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


def decode_data_url(url: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :])


@pytest.fixture
def server():
    with ChatServer() as running:
        yield running


@pytest.fixture
def backend_for():
    """`backend_for(server_or_url, **kwargs)`: an OpenAIChat closed when the test ends."""
    made = []

    def make(target, model="test-model", **kwargs):
        url = target if isinstance(target, str) else target.url
        backend = OpenAIChat(url, model, **{**FAST, **kwargs})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


# --- the request's shape --------------------------------------------------------------------


def test_frames_system_prompt_and_sampling_reach_the_server(server, backend_for, monkeypatch):
    monkeypatch.setenv("CHAT_TEST_KEY", "sk-test-shape")
    frames = (jpeg(0), jpeg(120), jpeg(250))
    sampling = Sampling(max_new_tokens=77, temperature=0.3, top_p=0.9, seed=5)
    backend = backend_for(server, model="some/vlm", revision="v1", sampling=sampling, api_key_env="CHAT_TEST_KEY")
    request = ChatRequest("Describe this clip.", images=frames, system="You caption videos.")

    [reply] = backend.chat([request])

    [seen] = server.requests
    body = seen.body
    assert body["model"] == "some/vlm"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (77, 0.3, 0.9, 5)
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You caption videos."}
    assert user["role"] == "user"
    *images, text = user["content"]
    assert [part["type"] for part in images] == ["image_url"] * 3
    assert [decode_data_url(part["image_url"]["url"], "image/jpeg") for part in images] == list(frames)  # in order
    assert text == {"type": "text", "text": "Describe this clip."}
    assert seen.headers["Authorization"] == "Bearer sk-test-shape"
    assert reply.text == default_caption(body) and reply.text.startswith("A clip of 3 frames")
    assert reply.error is None and reply.finish_reason == "stop" and reply.output_tokens == len(reply.text.split())
    assert reply.seconds > 0
    assert (backend.model_id, backend.revision) == ("some/vlm", "v1")


def test_video_input_sends_the_clip_as_one_video_url(server, backend_for):
    clip = b"\x00\x00\x00\x18ftypmp42 not really an mp4"
    backend = backend_for(server, video_input=True)

    with_video, frames_only = backend.chat(
        [ChatRequest("Describe.", images=(jpeg(9),), video=clip), ChatRequest("Describe.", images=(jpeg(9),))]
    )

    video_parts = server.requests[0].body["messages"][0]["content"]
    assert [part["type"] for part in video_parts] == ["video_url", "text"]
    assert decode_data_url(video_parts[0]["video_url"]["url"], "video/mp4") == clip
    assert with_video.text.startswith("A clip of 1 video")
    # A request with no video still goes as frames.
    assert [part["type"] for part in server.requests[1].body["messages"][0]["content"]] == ["image_url", "text"]
    assert frames_only.text.startswith("A clip of 1 frames")


def test_a_text_only_request_sends_a_plain_string_and_no_key_when_none_is_set(server, backend_for, monkeypatch):
    monkeypatch.delenv("CHAT_TEST_KEY", raising=False)
    backend = backend_for(server, api_key_env="CHAT_TEST_KEY", revision=None)

    [reply] = backend.chat([ChatRequest("Expand: a cat on a roof")])

    [seen] = server.requests
    assert seen.body["messages"] == [{"role": "user", "content": "Expand: a cat on a roof"}]
    assert "Authorization" not in seen.headers
    assert reply.text == default_caption(seen.body)
    assert backend.revision == ""


def test_a_video_without_frames_needs_video_input(server, backend_for):
    with pytest.raises(ValueError, match="video_input"):
        backend_for(server).chat([ChatRequest("Describe.", video=b"mp4")])
    assert server.requests == []


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://gpu:8000", "http://gpu:8000/v1/chat/completions"),
        ("http://gpu:8000/", "http://gpu:8000/v1/chat/completions"),
        ("http://gpu:8000/v1", "http://gpu:8000/v1/chat/completions"),
        ("http://gpu:8000/v1/", "http://gpu:8000/v1/chat/completions"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1/chat/completions"),
        ("http://gpu:8000/v1/chat/completions", "http://gpu:8000/v1/chat/completions"),
    ],
)
def test_completions_url(endpoint, url):
    assert completions_url(endpoint) == url


def test_an_endpoint_must_be_an_http_url():
    with pytest.raises(ValueError, match="http"):
        completions_url("gpu:8000/v1")


def test_an_endpoint_without_v1_reaches_the_server_and_connections_are_reused(server, backend_for):
    backend = backend_for(server.url.removesuffix("/v1"), concurrency=1)

    first = backend.chat([ChatRequest("one")])
    second = backend.chat([ChatRequest("two")])

    assert first[0].text and second[0].text
    assert server.requests[0].peer == server.requests[1].peer  # one kept-alive connection across calls


def test_chat_works_from_a_thread_running_its_own_loop(server, backend_for):
    backend = backend_for(server)

    async def caller():
        return backend.chat([ChatRequest("from a coroutine")])

    [reply] = asyncio.run(caller())
    assert reply.text == default_caption(server.requests[0].body)


# --- replies the endpoint makes per request ------------------------------------------------


def test_malformed_refused_and_list_content_replies():
    def reply(body):
        match body["messages"][-1]["content"]:
            case "not json":
                return b"<html>502 bad gateway</html>"
            case "no choices":
                return {"object": "chat.completion", "choices": []}
            case "refuse":
                message = {"role": "assistant", "content": None, "refusal": "I can't help\nwith that."}
                return {"choices": [{"message": message, "finish_reason": "stop"}]}
            case "parts":
                content = [{"type": "text", "text": "A dog "}, {"type": "text", "text": "runs."}]
                return {"choices": [{"message": {"content": content}, "finish_reason": "length"}]}

    with ChatServer(reply=reply) as server:
        backend = OpenAIChat(server.url, "m", **FAST)
        try:
            prompts = ("not json", "no choices", "refuse", "parts")
            not_json, no_choices, refused, parts = backend.chat([ChatRequest(prompt) for prompt in prompts])
        finally:
            backend.close()

    assert len(server.requests) == 4  # none retried
    assert not_json.text is None and not_json.error.startswith("malformed response: not JSON")
    assert no_choices.text is None and no_choices.error.startswith("malformed response: no choices")
    assert refused.text is None and refused.error == "refused: I can't help with that."
    assert parts.text == "A dog runs." and parts.finish_reason == "length" and parts.output_tokens is None


def test_400_is_an_error_reply_for_that_request_only_and_not_retried(server, backend_for):
    message = "Too many images:\n at most 2 per prompt. " + "x" * 500
    server.fail_next(400, body={"object": "error", "message": message})
    backend = backend_for(server, concurrency=1)  # one at a time: the first request meets the 400

    replies = backend.chat([ChatRequest(f"clip {i}", images=(jpeg(i),)) for i in range(3)])

    assert len(server.requests) == 3  # exactly one try for the rejected request
    assert replies[0].text is None
    assert replies[0].error.startswith("endpoint answered 400: Too many images: at most 2 per prompt.")
    assert "\n" not in replies[0].error and len(replies[0].error) < 260
    assert [reply.text for reply in replies[1:]] == [default_caption(seen.body) for seen in server.requests[1:]]


# --- retries --------------------------------------------------------------------------------


def test_429_with_retry_after_is_retried_after_that_wait(server, backend_for, caplog):
    server.fail_next(429, retry_after=1)

    with caplog.at_level(logging.WARNING, logger="model.chat_openai"):
        [reply] = backend_for(server).chat([ChatRequest("clip", images=(jpeg(1),))])

    assert len(server.requests) == 2
    assert reply.text == default_caption(server.requests[1].body)
    assert reply.seconds >= 1.0  # the server's Retry-After, not the 10 ms backoff
    [warning] = caplog.records
    assert "429" in warning.getMessage() and "try 1 of 6" in warning.getMessage()
    assert "base64" not in warning.getMessage()


def test_500_twice_then_success(server, backend_for, caplog):
    server.fail_next(500, times=2)

    with caplog.at_level(logging.WARNING, logger="model.chat_openai"):
        [reply] = backend_for(server).chat([ChatRequest("clip")])

    assert len(server.requests) == 3
    assert reply.text == default_caption(server.requests[-1].body) and reply.error is None
    assert len(caplog.records) == 2


def test_a_timeout_is_retried(server, backend_for):
    server.hang_next(1.5)

    [reply] = backend_for(server, timeout_s=0.3).chat([ChatRequest("clip")])

    assert len(server.requests) == 2
    assert reply.text == default_caption(server.requests[-1].body)
    assert 0.3 <= reply.seconds < 1.5


def test_exhausted_retries_raise_backend_unavailable(server, backend_for):
    server.fail_next(503, times=10)

    with pytest.raises(BackendUnavailable, match=r"gave up after 3 tries: answered 503: scripted failure 503"):
        backend_for(server, max_retries=2).chat([ChatRequest("clip")])
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_configuration_error_raises_at_once_and_cancels_the_rest(server, backend_for, status):
    server.fail_next(status, body={"error": {"message": "The model `nope` does not exist."}})
    backend = backend_for(server, model="nope", concurrency=1, api_key_env="CHAT_TEST_KEY")

    with pytest.raises(BackendUnavailable) as raised:
        backend.chat([ChatRequest(f"clip {i}") for i in range(5)])

    message = str(raised.value)
    assert f"answered {status}" in message and server.url in message and "$CHAT_TEST_KEY" in message
    assert "caption.endpoint" in message and "does not exist" in message and "\n" not in message
    assert len(server.requests) == 1  # not retried, and the queued requests were cancelled


def test_a_server_that_is_not_running_raises_one_line(backend_for):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(BackendUnavailable, match="gave up after 3 tries") as raised:
        backend_for(f"http://127.0.0.1:{port}/v1", max_retries=2).chat([ChatRequest("clip")])
    assert "\n" not in str(raised.value) and f"127.0.0.1:{port}" in str(raised.value)


# --- concurrency ----------------------------------------------------------------------------


def test_at_most_concurrency_requests_are_in_flight_and_replies_keep_their_order(backend_for):
    with ChatServer(latency_s=0.2) as server:
        backend = backend_for(server, concurrency=4)
        requests = [ChatRequest(f"clip {i}", images=(jpeg(i * 10),) * (1 + i % 3)) for i in range(16)]

        started = time.monotonic()
        replies = backend.chat(requests)
        elapsed_s = time.monotonic() - started

    assert server.max_in_flight == 4
    expected = [f"A clip of {len(request.images)} frames: {prompt_hash(request.prompt)}" for request in requests]
    assert [reply.text for reply in replies] == expected
    assert elapsed_s >= 0.8  # four rounds of four
    assert all(reply.seconds >= 0.2 for reply in replies)
    assert replies[-1].seconds < elapsed_s - 0.4  # the last round queued 0.6 s: not counted as its time


def test_close_is_idempotent_and_a_closed_backend_refuses_work(server):
    backend = OpenAIChat(server.url, "m", **FAST)
    backend.close()
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.chat([ChatRequest("clip")])


# --- the API key ----------------------------------------------------------------------------


def test_the_api_key_never_leaks(server, backend_for, monkeypatch, caplog):
    key = "sk-reelforge-SECRET-0123456789"
    monkeypatch.setenv("CHAT_TEST_KEY", key)
    echo = {"error": {"message": f"Incorrect API key provided: {key}"}}
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)

    backend = backend_for(server, api_key_env="CHAT_TEST_KEY", max_retries=1, timeout_s=0.3)
    seen += [repr(backend), str(backend)]
    # Error replies: a 400 and a non-JSON 200 that echo the key, and a successful reply.
    server.fail_next(400, body=echo)
    server.fail_next(200, body=f"<html>{key}</html>")
    one_at_a_time = backend_for(server, api_key_env="CHAT_TEST_KEY", concurrency=1)
    seen += [str(reply) for reply in one_at_a_time.chat([ChatRequest("a"), ChatRequest("b"), ChatRequest("c")])]
    # Retries then BackendUnavailable: 429, 5xx and a timeout, each echoing the key.
    for provoke in ("429", "500", "timeout"):
        if provoke == "429":
            server.fail_next(429, times=2, retry_after=0, body=echo)
        elif provoke == "500":
            server.fail_next(500, times=2, body=echo)
        else:
            server.hang_next(1.0)
            server.fail_next(503, body=echo)
        with pytest.raises(BackendUnavailable) as raised:
            backend.chat([ChatRequest("clip")])
        seen.append("".join(traceback.format_exception(raised.value)))
    # Configuration errors: 401 and 403 echoing the key.
    for status in (401, 403):
        server.fail_next(status, body=echo)
        with pytest.raises(BackendUnavailable) as raised:
            backend.chat([ChatRequest("clip")])
        seen.append("".join(traceback.format_exception(raised.value)))
    # Connection refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BackendUnavailable) as raised:
        backend_for(f"http://127.0.0.1:{port}/v1", api_key_env="CHAT_TEST_KEY", max_retries=1).chat([ChatRequest("clip")])
    seen.append("".join(traceback.format_exception(raised.value)))

    seen += [record.getMessage() for record in caplog.records] + [caplog.text]
    assert len(seen) > 12 and any("Incorrect API key provided: ***" in text for text in seen)
    assert [text for text in seen if key in text] == []
    assert all(key in seen_request.headers["Authorization"] for seen_request in server.requests)  # it was sent
