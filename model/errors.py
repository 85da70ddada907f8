"""Exceptions as one line: what a reject reason, a command's error and a log line carry."""

from __future__ import annotations


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """`exc` as a single line, whitespace folded; `with_type` prefixes the exception's class name
    (for errors nobody anticipated, where the class is half the story).

    Two kinds of message are cut down first: FFmpeg's (PyAV's `av.error.*`) repeat the file name,
    which the row or message around them already names, so only their `strerror` is kept; and
    messages that carry a server's traceback after their first line (MLflow's `.message`) keep
    that first line."""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message.strip():
        text = message.strip().splitlines()[0]
    elif type(exc).__module__ == "av.error" and getattr(exc, "strerror", None):
        text = str(exc.strerror)  # type: ignore[attr-defined]
    else:
        text = str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type else text
