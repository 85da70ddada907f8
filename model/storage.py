"""Where files live and what their bytes are: the one URI -> filesystem rule, and sha256 digests
of files, folders and configs.

Ingest reads footage and writes shards, training reads shards and hashes manifests, registration
hashes bundles: every part names files the same way, by a local path or a URI that a pyarrow
filesystem understands (`file://`, `s3://`, `gs://`, `hdfs://`, ...).

    filesystem, path = resolve_uri("s3://bucket/shards")   # (S3FileSystem, "bucket/shards")
    file_sha256("s3://bucket/shards/manifest.parquet")
    folder_sha256("runs/tiny/bundle")                       # every file of a folder, in path order
    config_hash(settings)                                   # 16 hex digits of a config's canonical JSON

Imports pyarrow only when called, so `model/` still imports with torch alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs


def resolve_uri(
    uri: str | os.PathLike[str], filesystem: "pyarrow.fs.FileSystem | None" = None
) -> tuple["pyarrow.fs.FileSystem", str]:
    """(filesystem, path inside it) for a local path, a `file://` URI or any URI pyarrow knows; with
    `filesystem` given (a caller's SubTreeFileSystem, say), `uri` is already a path inside it.

    Local paths come back absolute; object-store paths as `bucket/key` without a trailing slash."""
    import pyarrow.fs

    uri = os.fspath(uri)
    if filesystem is not None:
        return filesystem, uri
    if uri.startswith("file://"):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if "://" in uri:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        return filesystem, path.rstrip("/")
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(uri)


def file_sha256(path: str | os.PathLike[str], filesystem: "pyarrow.fs.FileSystem | None" = None) -> str:
    """sha256 hex digest of one file: a local path or URI, or a path inside `filesystem`.
    `hashlib.file_digest` streams it (a local file through its descriptor), so size costs no memory."""
    import pyarrow.fs

    filesystem, path = resolve_uri(path, filesystem)
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    with filesystem.open_input_stream(path) as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 over every file below a local folder (relative path, then bytes, in path order): two
    folders hash alike exactly when they hold the same files with the same bytes."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def config_hash(config: Any) -> str:
    """A stable 16-hex-digit hash of a config: a pydantic model (its JSON dump) or plain JSON data.
    Independent of key order and of how a float was spelled, so equal settings hash alike."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
