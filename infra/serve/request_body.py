"""A request body as the server reads it, before the model sees it: known fields, strings that are
strings, `size: "WxH"`. What the model checks (model/card.py, VideoPipeline.check_request) comes after.
"""

from __future__ import annotations

import re
from typing import Any

from model.pyfunc import INPUT_COLUMNS

REQUEST_FIELDS = tuple(name for name, _, _ in INPUT_COLUMNS)
STRING_FIELDS = {name for name, kind, _ in INPUT_COLUMNS if kind == "string"}


class ServeError(Exception):
    """A request the server refuses: HTTP status, one line naming the field, OpenAI-style code."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def parse_body(body: Any, where: str = "") -> dict[str, Any]:
    """One JSON object or table row -> the record build_request takes (nulls dropped, size split);
    ServeError(400) naming the field otherwise. `where` prefixes messages ("row 2: ")."""
    if not isinstance(body, dict):
        raise ServeError(400, f"{where}a request must be a JSON object, got {type(body).__name__}")
    record = {key: value for key, value in body.items() if value is not None}
    unknown = sorted(set(record) - set(REQUEST_FIELDS) - {"size"})
    if unknown:
        raise ServeError(400, f"{where}unknown field {unknown[0]!r}; fields: {', '.join(REQUEST_FIELDS)}, size", param=unknown[0])
    if "size" in record:
        size = record.pop("size")
        match = re.fullmatch(r"(\d+)[xX](\d+)", size) if isinstance(size, str) else None
        if match is None or "width" in record or "height" in record:
            raise ServeError(400, f"{where}size must be 'WIDTHxHEIGHT' (and not given with width/height), got {size!r}", param="size")
        record["width"], record["height"] = int(match.group(1)), int(match.group(2))
    if "prompt" not in record:
        raise ServeError(400, f"{where}missing field 'prompt'", param="prompt")
    for name in STRING_FIELDS & set(record):
        if not isinstance(record[name], str):  # a table cell would be str()-ed; a JSON client made a mistake
            raise ServeError(400, f"{where}{name}: expected a string, got {type(record[name]).__name__}", param=name)
    return record


_FIELD_RE = re.compile(r"^row \d+ column (\w+): ")


def field_message(message: str) -> tuple[str, str | None]:
    """build_request says 'row 0 column width: ...'; a JSON client sent one object: 'width: ...'.
    The field a message is about is also returned for the error's `param`."""
    match = _FIELD_RE.match(message)
    if match:
        return f"{match.group(1)}: {message[match.end():]}", match.group(1)
    named = next((word for word in re.findall(r"[a-z_0-9]+", message) if word in REQUEST_FIELDS or word == "size"), None)
    return message, named
