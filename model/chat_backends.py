"""Making a chat backend (model/chat.py) from plain settings: what each package's config maps onto.

Apart from model/chat.py so that the backends, which import chat.py's types, are imported only
here and only when made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.chat import ChatBackend, Sampling


@dataclass
class BackendSpec:
    """Everything that makes a backend, as plain values."""

    kind: str  # "hf" | "openai"
    model: str
    revision: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    # hf
    device: str | None = None  # None: cuda when there is one, else cpu
    dtype: str = "auto"
    batch_size: int = 8
    # openai
    endpoint: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    video_input: bool = False


def make_backend(spec: BackendSpec) -> ChatBackend:
    match spec.kind:
        case "hf":
            from model.chat_hf import HFChat

            return HFChat(
                spec.model,
                revision=spec.revision,
                sampling=spec.sampling,
                device=spec.device,
                dtype=spec.dtype,
                batch_size=spec.batch_size,
            )
        case "openai":
            from model.chat_openai import OpenAIChat

            if not spec.endpoint:
                raise ValueError("an openai backend needs an endpoint")
            return OpenAIChat(
                spec.endpoint,
                spec.model,
                revision=spec.revision,
                sampling=spec.sampling,
                api_key_env=spec.api_key_env,
                concurrency=spec.concurrency,
                timeout_s=spec.timeout_s,
                max_retries=spec.max_retries,
                video_input=spec.video_input,
            )
    raise ValueError(f"unknown chat backend {spec.kind!r} (hf|openai)")
