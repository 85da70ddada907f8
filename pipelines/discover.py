"""SRC arguments → the list of source videos to ingest (runs on the driver, reads no video bytes).

An ingest takes any mix of files, folders (walked recursively), globs and `file://`, `s3://`,
`gs://` URIs. Everything goes through pyarrow filesystems, so the same listing code serves a
laptop folder and a bucket. Rules:

* A file named explicitly is a source whatever its extension: the operator asked for it, and
  if it is not a video the probe stage rejects it with a reason.
* Folders and globs keep only files with a video extension (`VIDEO_EXTENSIONS`, case
  insensitive; generous on purpose: `.m4a` and `.ogg` are MP4/Ogg containers that may hold
  video, and one that does not is rejected by probe with "no video stream", which is worth
  seeing). Sidecars (`.txt`, `.json`, `.srt`) are never sources, and names starting with
  "." are skipped (editor swap files, macOS `._clip.mp4` resource forks).
* A SRC that does not exist is an error naming it (a typo must not silently shrink a run);
  a folder or glob without videos only logs a warning, but no videos at all is an error.

Each source carries a `source_key`: a hash of (uri, size, mtime). It names the source's
result in the output's work area, so a rerun can tell finished sources apart without
re-reading their bytes; a file rewritten in place gets a new key and is ingested again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from model.errors import one_line
from model.storage import resolve_uri

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {
        "3g2", "3gp", "amv", "asf", "avi", "dv", "f4v", "flv", "gif", "h264", "hevc", "ivf", "m1v",
        "m2t", "m2ts", "m2v", "m4a", "m4v", "mj2", "mjpeg", "mkv", "mov", "mp4", "mpe", "mpeg", "mpg", "mpv", "mts",
        "mxf", "nut", "ogg", "ogm", "ogv", "qt", "rm", "rmvb", "ts", "vob", "webm", "wmv", "y4m",
    }
)  # fmt: skip
_GLOB_CHARS = re.compile(r"[*?\[]")
_URI_SCHEMES = ("file://", "s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")


@dataclass(frozen=True)
class SourceFile:
    uri: str  # absolute local path, or scheme://bucket/key for object stores
    size_bytes: int
    mtime_ns: int
    source_key: str  # 32 hex digits of sha256(uri, size, mtime): the work-area name

    def as_row(self) -> dict[str, object]:
        return {"uri": self.uri, "size_bytes": self.size_bytes, "mtime_ns": self.mtime_ns, "source_key": self.source_key}


def source_key(uri: str, size_bytes: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{uri}\n{size_bytes}\n{mtime_ns}".encode()).hexdigest()[:32]


def is_video_name(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("."):
        return False
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext in VIDEO_EXTENSIONS


def discover_sources(srcs: list[str]) -> list[SourceFile]:
    """Every source named by `srcs`, deduplicated and sorted by uri (a stable job order)."""
    if not srcs:
        raise ValueError("no SRC given: name files, folders, globs or URIs to ingest")
    found: dict[str, SourceFile] = {}
    for src in srcs:
        matches = _expand(src)
        if not matches:
            logger.warning("SRC %s: no video files found (extensions: %s)", src, ", ".join(sorted(VIDEO_EXTENSIONS)))
        for source in matches:
            found[source.uri] = source
    if not found:
        raise ValueError(f"no video sources found in {' '.join(srcs)}")
    return [found[uri] for uri in sorted(found)]


def _expand(src: str) -> list[SourceFile]:
    fs, path, prefix = _resolve(src)
    if _GLOB_CHARS.search(path):
        return _glob(fs, path, prefix)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [_source(info, prefix)]
    if info.type == pafs.FileType.Directory:
        return _walk(fs, path, prefix)
    raise ValueError(f"SRC {src!r}: no such file or folder")


def _resolve(src: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns a path back into the uri)."""
    if src.startswith(_URI_SCHEMES) and not src.startswith("file://"):
        scheme, bucket_path = src.split("://", 1)
        # from_uri rejects glob characters in some schemes; resolve the bucket root, keep the path.
        try:
            fs, _ = resolve_uri(f"{scheme}://{bucket_path.split('/', 1)[0]}")
        except (OSError, ValueError) as exc:
            raise ValueError(f"SRC {src!r}: cannot open filesystem ({one_line(exc)})") from None
        return fs, bucket_path.rstrip("/"), f"{scheme}://"
    fs, path = resolve_uri(src)  # a local path or file:// URI
    return fs, path, ""


def _source(info: pafs.FileInfo, prefix: str) -> SourceFile:
    uri = prefix + info.path
    size = int(info.size or 0)
    mtime_ns = int(info.mtime_ns or 0)
    return SourceFile(uri=uri, size_bytes=size, mtime_ns=mtime_ns, source_key=source_key(uri, size, mtime_ns))


def _walk(fs: pafs.FileSystem, root: str, prefix: str) -> list[SourceFile]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [
        _source(info, prefix)
        for info in infos
        if info.type == pafs.FileType.File and is_video_name(info.path) and not _hidden_below(info.path, root)
    ]


def _hidden_below(path: str, root: str) -> bool:
    """True if a folder between `root` and the file starts with "." (e.g. .git, .cache)."""
    relative = path[len(root) :].strip("/")
    return any(part.startswith(".") for part in relative.split("/")[:-1])


def _glob(fs: pafs.FileSystem, pattern: str, prefix: str) -> list[SourceFile]:
    # List below the longest folder without glob characters, then match the full path:
    # `*` and `?` stay inside one path component, `**` spans folders (shell globstar).
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    base = "/".join(fixed) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    regex = _glob_regex(pattern)
    return [
        _source(info, prefix)
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if info.type == pafs.FileType.File and is_video_name(info.path) and regex.fullmatch(info.path)
    ]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")  # zero or more folders
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))
