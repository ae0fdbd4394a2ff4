"""Remote inputs: URLs and GDAL network paths recognised, named, and read under one GDAL environment.

A remote scene (``https://``, ``s3://``, ``/vsicurl/``, ...) stays text all the way to GDAL,
which reads it through its network file systems under :func:`remote_env`: only the byte
ranges of the windows asked for travel. A network or credentials failure (an HTTP error,
no answer in time, no connection) becomes a one-line GeosegError that names the URL and
the fix. Opening and reading rasters, local or remote, is :mod:`geoseg.raster_io`'s job.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import rasterio

from geoseg.errors import GeosegError, InputFileError, file_error

#: A URL: a scheme of two or more characters, then ``://`` (one letter before ``:`` is a drive).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+://")
#: GDAL's network file systems (``/vsicurl/``, ``/vsis3/``, ...), also inside a chain
#: such as ``/vsizip//vsicurl/...``.
_REMOTE_VSI = re.compile(r"/vsi(curl|s3|gs|az|adls|oss|swift|hdfs|webhdfs)(_streaming)?/")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a remote input rather than a local file.

    Remote: a URL (``https://``, ``s3://``, ...) or a GDAL network path
    (``/vsicurl/...``). Ask before turning the text into a ``Path``, which
    collapses the ``//`` of a URL.
    """
    text = os.fspath(path)
    return bool(_URL.match(text)) or (text.startswith("/vsi") and bool(_REMOTE_VSI.search(text)))


def check_local(path: str | os.PathLike[str], *, error: type[GeosegError] = InputFileError) -> None:
    """Refuse a remote input (see :func:`is_url`) with the URL intact in the message.

    Args:
        path: An input as the user gave it (scene, label, AOI, checkpoint, data folder).
        error: The GeosegError subclass to raise.

    Raises:
        GeosegError: ``error``, when ``path`` is a URL.
    """
    if is_url(path):
        raise file_error(error, path, "remote inputs (URLs) are not read yet",
                         "download the file and pass its local path")


def as_source(path: str | os.PathLike[str]) -> Path | str:
    """A scene as geoseg passes it on: a local file as a Path, a remote one (:func:`is_url`) as its text.

    A Path would collapse the ``//`` of a URL, so a remote scene stays text all the way
    to GDAL (rasterio opens ``https://`` through ``/vsicurl/``, ``s3://`` through ``/vsis3/``).
    """
    text = os.fspath(path)
    return text if is_url(text) else Path(text)


def source_stem(path: str | os.PathLike[str]) -> str:
    """A scene's name from its path: the file stem; for a URL, the stem of its last path component.

    The query string (a signed URL's) is dropped: ``https://h/a/scene.tif?sig=x`` is ``scene``.
    """
    text = os.fspath(path)
    if not is_url(text):
        return Path(text).stem
    return PurePosixPath(text.split("?", 1)[0].split("#", 1)[0].rstrip("/")).stem or text


def source_key(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int]]:
    """What a cache of a scene's contents is keyed on: the resolved path and (mtime in ns, size) of a
    local file, which change with it; a remote scene's text (not asked again within a process).

    Raises:
        OSError: A local file that does not exist.
    """
    text = os.fspath(path)
    if is_url(text):
        return text, (0, 0)
    st = os.stat(text)
    return str(Path(text).resolve()), (st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class RemoteSettings:
    """How GDAL reads remote inputs: the GDAL configuration options of :func:`remote_env`.

    Attributes:
        timeout_s: Seconds one HTTP request may take in all (``GDAL_HTTP_TIMEOUT``): a server
            that accepts the connection and never answers fails after this long.
        connect_timeout_s: Seconds to connect (``GDAL_HTTP_CONNECTTIMEOUT``).
        retries: Retries of a request answered 429 or 5xx, or cut off or timed out
            (``GDAL_HTTP_MAX_RETRY``).
        retry_delay_s: Seconds before the first retry, growing with each (``GDAL_HTTP_RETRY_DELAY``).
        cache_bytes: Bytes of each remote file kept in memory once read (``VSI_CACHE_SIZE``):
            a block's halo read again by the next block does not travel twice.
    """

    timeout_s: int = 30
    connect_timeout_s: int = 10
    retries: int = 3
    retry_delay_s: float = 1.0
    cache_bytes: int = 64 * 2**20


#: The settings of every remote read (the one place to change them; tests shorten the timeout here).
REMOTE = RemoteSettings()


def remote_options(settings: RemoteSettings | None = None) -> dict[str, Any]:
    """The GDAL configuration options of a remote read (``settings`` default: :data:`REMOTE`).

    ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` spares the listing of the file's folder (a bucket
    may hold millions of keys) and the probes for sidecar files. ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS``
    is left unset: STAC asset hrefs and signed URLs often do not end in ``.tif``.
    """
    s = REMOTE if settings is None else settings
    return {
        "GDAL_HTTP_TIMEOUT": int(s.timeout_s),
        "GDAL_HTTP_CONNECTTIMEOUT": int(s.connect_timeout_s),
        "GDAL_HTTP_MAX_RETRY": int(s.retries),
        "GDAL_HTTP_RETRY_DELAY": float(s.retry_delay_s),
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "VSI_CACHE": True,
        "VSI_CACHE_SIZE": int(s.cache_bytes),
    }


@contextlib.contextmanager
def remote_env(path: str | os.PathLike[str]) -> Iterator[None]:
    """The GDAL environment in which ``path`` is opened and read: :func:`remote_options` for a
    remote input, nothing at all for a local file.

    Enter it in every thread that opens or reads a remote dataset: rasterio keeps one
    environment per thread (and in threads other than the main one GDAL's options are
    thread-local), so a reader thread does not see the main thread's.
    """
    if not is_url(path):
        yield
        return
    with rasterio.Env(**remote_options()):
        yield


#: A status code in GDAL's words for an HTTP failure ("HTTP response code on URL: 404",
#: "HTTP error code : 404", "... 403 Forbidden ..."), and the reason geoseg gives for it.
_HTTP_STATUS = re.compile(r"(?:response code|error code|HTTP/[\d.]+)\D{0,200}?\b([45]\d\d)\b", re.IGNORECASE)
_HTTP_REASONS = {401: "needs credentials", 403: "access denied", 404: "not found", 410: "gone",
                 429: "too many requests", 500: "server error", 502: "bad gateway",
                 503: "service unavailable", 504: "gateway timeout"}
#: curl's words for a request that ran out of time, for a host name that is not known, and for
#: a server that could not be reached.
_TIMED_OUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)
_UNKNOWN_HOST = re.compile(r"could not resolve|couldn't resolve", re.IGNORECASE)
_UNREACHABLE = re.compile(r"could not connect|couldn't connect|connection refused|failed to connect|"
                          r"network is unreachable|no route to host", re.IGNORECASE)
#: GDAL's words for a cloud path (``s3://``, ``gs://``, ``/vsiaz/``, ...) read without credentials.
_NO_CREDENTIALS = re.compile(r"configuration options? not defined|credentials not filled", re.IGNORECASE)


def http_failure(url: str | os.PathLike[str], status: int) -> InputFileError:
    """The one-line error of a remote input answered with an HTTP error ``status``.

    ``"URL: answered 404 (not found); check the address"``; 401/403 point at the credentials.
    """
    reason = _HTTP_REASONS.get(status, "client error" if status < 500 else "server error")
    if status in (401, 403):
        fix = "check the address and the credentials (a signed URL may have expired)"
    elif status in (404, 410) or status < 500 and status != 429:
        fix = "check the address"
    else:
        fix = "try again later"
    return file_error(InputFileError, url, f"answered {status} ({reason})", fix)


def timeout_failure(url: str | os.PathLike[str]) -> InputFileError:
    """The one-line error of a remote input whose server did not answer in time, each of the
    ``1 + retries`` times it was asked (:data:`REMOTE`)."""
    tries = f" (asked {REMOTE.retries + 1} times)" if REMOTE.retries > 0 else ""
    return file_error(InputFileError, url, f"did not answer within {REMOTE.timeout_s} s{tries}",
                      "check the address and the network, or try again later")


def unreachable_failure(url: str | os.PathLike[str], *, unknown_host: bool) -> InputFileError:
    """The one-line error of a remote input whose server could not be reached (or whose host
    name is not known)."""
    why = "unknown host" if unknown_host else "no connection to its server"
    return file_error(InputFileError, url, f"could not be reached ({why})", "check the address and the network")


def remote_failure(url: str | os.PathLike[str], exc: BaseException, detail: str) -> InputFileError | None:
    """A GDAL error about a remote input in geoseg's words (``detail``: its first line, as
    :func:`geoseg.raster_io.read_failure` gives it), or None when it tells of no network or
    credentials failure."""
    messages = _gdal_messages(exc)
    status = _HTTP_STATUS.search(messages)
    if status is not None:
        return http_failure(url, int(status.group(1)))
    if _TIMED_OUT.search(messages):
        return timeout_failure(url)
    if _UNKNOWN_HOST.search(messages):
        return unreachable_failure(url, unknown_host=True)
    if _UNREACHABLE.search(messages):
        return unreachable_failure(url, unknown_host=False)
    if _NO_CREDENTIALS.search(messages):
        return file_error(InputFileError, url, f"cannot be read without credentials ({detail})",
                          "set them as GDAL reads them, or AWS_NO_SIGN_REQUEST=YES (GS_NO_SIGN_REQUEST=YES) "
                          "for a public bucket")
    return None


def _gdal_messages(exc: BaseException) -> str:
    """Every message of a GDAL error and its causes, in one text (the status code may be in any)."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return " | ".join(parts)


def unwrap_vsicurl(name: str) -> str:
    """A GDAL dataset name as the user gave it: ``/vsicurl/https://...`` is ``https://...``; any other as it is."""
    prefix = "/vsicurl/"
    if name.startswith(prefix) and _URL.match(name[len(prefix):]):
        return name[len(prefix):]
    return name
