"""Prompt expansion: a short user prompt rewritten into a caption like the model's training captions.

A model trained on dense, descriptive captions (recaptioning) follows prompts best when the
prompt reads like them; users type "a fox in snow". Sora-class systems bridge the gap with a
language model that rewrites the prompt in the training captions' style. Here the style comes
from a few of the model's own training captions, recorded in its bundle at export
(`model_config.json` → `prompt_style.examples`), and the rewrite goes through the same chat
backends as recaptioning (model/chat.py), text only: a local transformers model or any
OpenAI-compatible endpoint.

Expansion never stops a generation: a backend that fails, refuses or answers nothing useful
leaves the original prompt in place, with a warning that the result carries. Both prompts are
recorded with the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from model.chat import BackendUnavailable, ChatBackend, ChatRequest
from model.errors import one_line

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 8
SYSTEM = (
    "You rewrite short video prompts into one detailed caption for a text-to-video model. Write in the "
    "style, length and vocabulary of the example captions. Keep everything the user asked for, add only "
    "plausible visual detail (subjects, setting, lighting, colours, camera motion), and answer with the "
    "caption alone, without quotes or preamble."
)


@dataclass
class ExpandedPrompt:
    original: str
    prompt: str  # what to generate with: the expansion, or the original when expansion failed
    expanded: bool
    expander: str  # "<model>@<revision>" that wrote it
    warning: str | None = None

    def record(self) -> dict[str, Any]:
        return {"original_prompt": self.original, "prompt": self.prompt, "expanded": self.expanded,
                "expander": self.expander, "warning": self.warning}  # fmt: skip


def style_examples(bundle_extra: Mapping[str, Any]) -> list[str]:
    """The training captions a bundle recorded for prompt expansion (none for older bundles)."""
    style = bundle_extra.get("prompt_style") or {}
    return [str(e) for e in style.get("examples") or []][:MAX_EXAMPLES]


def expansion_request(prompt: str, examples: list[str]) -> ChatRequest:
    shown = "\n".join(f"- {example}" for example in examples[:MAX_EXAMPLES])
    body = f"Example captions:\n{shown}\n\n" if shown else ""
    return ChatRequest(f"{body}Prompt: {prompt}\nCaption:", system=SYSTEM)


def expand_prompt(prompt: str, examples: list[str], backend: ChatBackend) -> ExpandedPrompt:
    """`prompt` rewritten by `backend` in the style of `examples`; the original on any failure."""
    expander = f"{backend.model_id}@{backend.revision}" if backend.revision else backend.model_id

    def fallback(why: str) -> ExpandedPrompt:
        logger.warning("prompt expansion failed (%s); generating with the original prompt", why)
        return ExpandedPrompt(prompt, prompt, False, expander, f"prompt expansion failed ({why}); the original prompt was used")

    if not prompt.strip():
        return ExpandedPrompt(prompt, prompt, False, expander, "empty prompt: nothing to expand")
    try:
        [reply] = backend.chat([expansion_request(prompt, examples)])
    except BackendUnavailable as exc:
        return fallback(one_line(exc))
    if reply.text is None:
        return fallback(reply.error or "no output")
    text = " ".join(reply.text.split()).strip("\"'“”` ")
    for label in ("Caption:", "caption:"):
        text = text.removeprefix(label).strip()
    if len(text.split()) < 3:
        return fallback(f"the answer {text!r} is too short to be a caption")
    if not examples:
        logger.warning("the bundle records no training captions: the prompt was expanded without style examples")
    return ExpandedPrompt(prompt, text, True, expander)
