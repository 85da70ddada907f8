"""Component specs: how configs and bundles name an autoencoder or a text encoder.

A spec is `kind` (a built-in component: "pixel", "minilm") or `kind:location` (a local folder or
hub id: "wan:/models/wan", "t5:google/t5-v1_1-xxl"); a built-in may take options after the colon
instead ("pixel:s=2,t=1").
"""

from __future__ import annotations

from collections.abc import Collection


def split_spec(spec: str, kinds: Collection[str], builtin: str, what: str, expected: str) -> tuple[str, str]:
    """(kind, rest) of `spec`; one-line ValueError for a kind outside `kinds` (`expected` says what
    would do) or a kind other than `builtin` without a location."""
    kind, _, rest = spec.partition(":")
    if kind not in kinds:
        raise ValueError(f"unknown {what} {spec!r}: expected {expected}")
    if kind != builtin and not rest:
        raise ValueError(f"{what} {spec!r} needs a location: {kind}:<local dir or hub id>")
    return kind, rest
