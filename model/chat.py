"""One interface to the language models reelforge talks to: vision-language captioners that
describe clips (recaptioning, `pipelines/recaption.py`) and text models that rewrite prompts
(prompt expansion at generation time).

A backend takes a list of `ChatRequest`s and answers one `ChatReply` per request, in order:

    backend.chat([ChatRequest(prompt, images=(jpeg, jpeg, ...)), ...]) -> [ChatReply, ...]

Two kinds of failure, told apart on purpose (a failure of our environment is never blamed on
the input):

* a reply with `error` set: the backend answered *this request* with a refusal (an HTTP 400 for
  its image, a content refusal). The caller records it against the request (a clip's caption
  becomes `status=failed` with the reason) and goes on.
* `BackendUnavailable` raised: the backend itself failed (an endpoint unreachable, rate-limited
  or answering 5xx past its retries, a model that cannot be loaded). Nothing about the requests
  is known; the job stops and a rerun resumes.

Backends live beside this file: `model/chat_hf.py` (a transformers image-text-to-text model,
local folder or hub id) and `model/chat_openai.py` (any OpenAI-compatible chat-completions
endpoint: vLLM, SGLang, a hosted API); `model/chat_backends.py` makes one from plain settings,
importing it only then, so nothing heavy loads until a backend is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    images: tuple[bytes, ...] = ()  # encoded frames (JPEG), in time order
    video: bytes | None = None  # an MP4 clip, for endpoints that take video (vLLM's video_url)
    system: str | None = None


@dataclass
class ChatReply:
    text: str | None  # None when the request failed
    error: str | None = None  # one line: why the backend refused this request
    seconds: float = 0.0  # wall time spent on this request (a batched backend: the batch's time / its size)
    output_tokens: int | None = None
    finish_reason: str | None = None  # "stop", "length", ... as the backend says


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0: greedy, deterministic
    top_p: float = 1.0
    seed: int = 0

    def as_record(self) -> dict[str, float | int]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


class BackendUnavailable(RuntimeError):
    """The backend failed, not a request: our environment. The message is one line and never
    carries an API key."""


class ChatBackend(Protocol):
    model_id: str  # what was asked for: a hub id, a local folder, an endpoint's model name
    revision: str  # what was actually used: a hub commit, a content hash of a local folder, or ""

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatReply]: ...

    def close(self) -> None: ...
