"""Cleaning a model's caption before anything trains on it.

Vision-language models open with the medium ("The video shows ...", "In this video, ..."), wrap
answers in quotes or labels, now and then refuse, loop ("a man walks, a man walks, a man walks
..."), or stop mid-sentence at their token limit. A text-to-video model trained on such captions
learns the boilerplate and the loops. `clean_caption` turns one raw output into either a caption
(`status="ok"`) or a failure with a reason (`status="failed"`); nothing bad is kept silently:

1. whitespace normalised; surrounding quotes and a leading "Caption:"/"Description:" label dropped;
2. a refusal ("I'm sorry, but I can't ...") fails as `refused`;
3. the longest matching boilerplate opening (`caption.strip_prefixes`, case-insensitive) is
   stripped and the next letter capitalised; which one is recorded, for the report's counts;
4. a repetition loop (few distinct word 4-grams, or text that compresses to almost nothing) fails
   as `repetition`; fewer than `caption.min_words` words fails as `empty`;
5. an output cut off by the model's token limit loses its unfinished last sentence;
6. the caption is capped at `max_tokens` tokens of the training text encoder, at the last
   sentence end that keeps at least half of it, else at a word boundary, so the encoder reads
   every word that is kept.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

_LABEL = re.compile(r"^(?:caption|description|video description|answer)\s*:\s*", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m unable|i am unable|i'?m not able|as an ai)\b", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")
_QUOTES = "\"'“”‘’`"

MIN_NGRAMS = 8  # word 4-grams a caption needs before the distinct-ratio test means anything
MIN_DISTINCT_RATIO = 0.5  # fewer distinct 4-grams than this share is a loop
MIN_COMPRESSED_RATIO = 0.15  # text of 200+ characters that zlib squeezes below this share is a loop


@dataclass
class CleanCaption:
    caption: str  # "" when failed
    status: str  # "ok" | "failed"
    reason: str | None = None  # failed: "empty" | "refused: ..." | "repetition: ..." | the backend's error
    stripped: str | None = None  # the boilerplate opening removed, as configured
    truncated: bool = False  # cut at the token cap or at an unfinished last sentence
    tokens: int | None = None  # tokens of the training text encoder (no special tokens)


def failed(reason: str) -> CleanCaption:
    return CleanCaption("", "failed", reason)


def clean_caption(
    raw: str | None,
    *,
    strip_prefixes: tuple[str, ...],
    min_words: int,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    finish_reason: str | None = None,
) -> CleanCaption:
    if raw is None:
        return failed("empty: no output")
    text = " ".join(raw.split())
    text = _LABEL.sub("", text).strip(_QUOTES + " ").strip()
    if _REFUSAL.match(text):
        return failed(f"refused: {text[:120]}")
    stripped = None
    for prefix in sorted(strip_prefixes, key=len, reverse=True):
        if text.lower().startswith(prefix.lower()) and (len(text) == len(prefix) or not text[len(prefix)].isalnum()):
            stripped = prefix
            text = text[len(prefix) :].lstrip(" ,:;-")
            text = text[:1].upper() + text[1:]
            break
    loop = repetition(text)
    if loop:
        return failed(f"repetition: {loop}")
    if len(text.split()) < min_words:
        return failed(f"empty: {len(text.split())} words" + (f" after stripping {stripped!r}" if stripped else ""))
    truncated = False
    if finish_reason == "length" and not _SENTENCE_END.search(text[-2:]):
        text, truncated = _cut_at_sentence(text, len(text), min_keep=0.0) or text, True
    tokens = None
    if tokenizer is not None:
        text, tokens, capped = _cap_tokens(text, tokenizer, max_tokens)
        truncated = truncated or capped
    return CleanCaption(text, "ok", None, stripped, truncated, tokens)


def repetition(text: str) -> str | None:
    """Why `text` looks like a generation loop, or None."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if len(grams) >= MIN_NGRAMS:
        ratio = len(set(grams)) / len(grams)
        if ratio < MIN_DISTINCT_RATIO:
            return f"{ratio:.0%} distinct word 4-grams"
    if len(text) >= 200:
        ratio = len(zlib.compress(text.encode())) / len(text.encode())
        if ratio < MIN_COMPRESSED_RATIO:
            return f"compresses to {ratio:.0%}"
    return None


def _cut_at_sentence(text: str, limit: int, min_keep: float = 0.5) -> str | None:
    """`text[:limit]` cut after its last sentence end, if that keeps at least `min_keep` of it."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text[:limit])]
    if ends and ends[-1] >= limit * min_keep:
        return text[: ends[-1]].rstrip()
    return None


def _cap_tokens(text: str, tokenizer: Any, max_tokens: int | None) -> tuple[str, int, bool]:
    """(text, its token count, whether it was cut) with at most `max_tokens` content tokens."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    count = len(encoded["input_ids"])
    if max_tokens is None:
        max_tokens = getattr(tokenizer, "model_max_length", None)
    if not max_tokens or max_tokens > 100_000:
        return text, count, False
    limit = max_tokens - tokenizer.num_special_tokens_to_add()
    if count <= limit:
        return text, count, False
    end_char = encoded["offset_mapping"][limit - 1][1]  # the last kept token's end
    cut = _cut_at_sentence(text, end_char)
    if cut is None:
        space = text.rfind(" ", 0, end_char + 1)
        cut = text[: space if space > 0 else end_char].rstrip(" ,;:-")
    return cut, len(tokenizer(cut, add_special_tokens=False)["input_ids"]), True
