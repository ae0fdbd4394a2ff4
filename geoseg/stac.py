"""STAC Items as scenes: the image asset of an Item, or of each Item of an ItemCollection, read with pystac.

A SCENE ending in ``.json`` (a local file or an http(s) URL) is a STAC Item, an
ItemCollection (a GeoJSON FeatureCollection of Items) or a JSON list of Items.
Each Item gives one scene: its asset named by ``--asset``, else the asset keyed or
with the role ``visual``, else the first GeoTIFF asset with 3 bands or more
(``eo:bands``/``raster:bands``/``bands`` where the Item lists them), else its first
GeoTIFF. The scene is the asset's absolute href (relative hrefs are resolved
against the JSON's location) and its name is the Item's id.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from geoseg import __version__
from geoseg.errors import InputFileError, file_error
from geoseg import remote
from geoseg.remote import http_failure, is_url, timeout_failure, unreachable_failure

if TYPE_CHECKING:
    import pystac

#: The suffix of a SCENE read as STAC (its path's, without a URL's query string).
STAC_SUFFIX = ".json"
#: The asset key and role picked first.
VISUAL = "visual"
#: Roles of assets never picked without ``--asset`` (small previews, not the scene).
SKIPPED_ROLES = frozenset({"thumbnail"})
#: HTTP answers after which a STAC document is asked for again (as GDAL retries raster reads).
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: File suffixes of a GeoTIFF asset that gives no media type.
GEOTIFF_SUFFIXES = (".tif", ".tiff")
#: Band lists of an asset: the eo and raster extensions', and STAC 1.1's common ``bands``.
BAND_FIELDS = ("eo:bands", "raster:bands", "bands")
#: Bands of an image asset picked before a GeoTIFF with fewer (RGB).
RGB_BANDS = 3


class ItemAsset(NamedTuple):
    """The asset chosen from one STAC Item.

    Attributes:
        item_id: The Item's id (the scene's name).
        key: The asset's key in the Item.
        href: The asset's absolute href (a URL, a GDAL path or a local path).
    """

    item_id: str
    key: str
    href: str


def is_stac(spec: str | os.PathLike[str]) -> bool:
    """Whether a SCENE is read as STAC: its path (a URL's without the query string) ends in ``.json``."""
    text = os.fspath(spec)
    return text.split("?", 1)[0].split("#", 1)[0].lower().endswith(STAC_SUFFIX)


def stac_assets(spec: str | os.PathLike[str], *, asset: str | None = None) -> list[ItemAsset]:
    """The asset to predict of each Item in a STAC document (Item, ItemCollection or list of Items).

    Args:
        spec: A local ``.json`` file or an http(s) URL.
        asset: The asset key to take from every Item (``--asset``); None picks one by role and type.

    Returns:
        One entry per Item, in the document's order.

    Raises:
        InputFileError: A document that cannot be read (a URL answering an HTTP error, or not in
            time), that is not STAC Items, that holds none; an Item without the asset asked for or
            without a GeoTIFF asset (the message lists its assets).
    """
    import pystac
    from pystac.utils import make_absolute_href

    text = os.fspath(spec)
    base = text if is_url(text) else os.path.abspath(text)
    items = _read_items(text, base)
    chosen = []
    for item in items:
        key = _choose(item, asset, text)
        start = item.get_self_href() or base
        href = make_absolute_href(item.assets[key].href, start)
        if href.startswith("file://"):
            href = pystac.utils.safe_urlparse(href).path
        chosen.append(ItemAsset(item_id=str(item.id), key=key, href=href))
    return chosen


def _read_items(text: str, base: str) -> list["pystac.Item"]:
    import pystac

    try:
        data = _stac_io().read_json(base)
    except InputFileError:
        raise
    except FileNotFoundError:
        raise file_error(InputFileError, text, "file does not exist", "check the path") from None
    except (OSError, ValueError) as exc:  # a folder, unreadable, not JSON, duplicate keys
        raise _not_stac(text, str(exc).split("\n")[0]) from None
    try:
        if isinstance(data, list):
            items = [pystac.Item.from_dict(d, preserve_dict=False) for d in data]
        elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
            items = [pystac.Item.from_dict(d, preserve_dict=False) for d in data.get("features", [])]
        elif isinstance(data, dict) and data.get("type") == "Feature":
            items = [pystac.Item.from_dict(data, preserve_dict=False)]
        elif isinstance(data, dict) and data.get("type") in ("Collection", "Catalog"):
            raise file_error(InputFileError, text, f"is a STAC {data['type']}, not an Item",
                             "pass one of its Items, or an ItemCollection")
        else:
            kind = data.get("type") if isinstance(data, dict) else type(data).__name__
            raise _not_stac(text, f"JSON of type {kind!r}")
    except InputFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - pystac raises STACTypeError, KeyError, ValueError, ...
        raise _not_stac(text, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not items:
        raise file_error(InputFileError, text, "holds no STAC Items", "pass an Item or an ItemCollection with Items")
    return items


def _not_stac(text: str, detail: str) -> InputFileError:
    return file_error(InputFileError, text, f"is not a STAC Item or ItemCollection ({detail})",
                      "pass a STAC Item (.json), an ItemCollection, or a GeoTIFF")


def _choose(item: "pystac.Item", asset: str | None, source: str) -> str:
    """The key of the asset to predict (see the module's docstring)."""
    assets = item.assets
    if asset is not None:
        if asset in assets:
            return asset
        raise file_error(InputFileError, source, f"STAC item {item.id!r} has no asset {asset!r} "
                         f"(its assets: {_listing(item)})", "pass --asset with one of them")
    if VISUAL in assets:
        return VISUAL
    for key, a in assets.items():
        if VISUAL in (a.roles or []):
            return key
    tiffs = [key for key, a in assets.items() if _is_geotiff(a) and not SKIPPED_ROLES & set(a.roles or [])]
    for key in tiffs:
        if _band_count(assets[key]) >= RGB_BANDS:
            return key
    if tiffs:
        return tiffs[0]
    raise file_error(InputFileError, source, f"STAC item {item.id!r} has no GeoTIFF asset to predict "
                     f"(its assets: {_listing(item)})", "pass --asset NAME to choose one")


def _listing(item: "pystac.Item") -> str:
    """``key (media type)`` of every asset, or ``none``."""
    parts = [f"{key} ({a.media_type or 'no type given'})" for key, a in item.assets.items()]
    return ", ".join(parts) if parts else "none"


def _is_geotiff(asset: "pystac.Asset") -> bool:
    media = (asset.media_type or "").lower()
    if media:
        return media.startswith("image/tiff") or "geotiff" in media
    return asset.href.split("?", 1)[0].lower().endswith(GEOTIFF_SUFFIXES)


def _band_count(asset: "pystac.Asset") -> int:
    """Bands an asset lists (0 when it lists none)."""
    for name in BAND_FIELDS:
        bands = asset.extra_fields.get(name)
        if isinstance(bands, Sequence) and not isinstance(bands, str):
            return len(bands)
    return 0


def _fetch(url: str) -> str:
    """A STAC document over http(s): :data:`~geoseg.remote.REMOTE`'s timeout and retries, one-line errors.

    pystac's own reader waits on a server that never answers (urllib without a timeout), so
    the reading is done here; pystac parses what it returns.
    """
    import socket
    from urllib.error import HTTPError, URLError
    from urllib.parse import urlsplit
    from urllib.request import Request, urlopen

    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise file_error(InputFileError, url, "STAC documents are read from local files and http(s) URLs",
                         "download it and pass its local path")
    settings = remote.REMOTE  # looked up at each call: the one place that sets it
    delay, retries = float(settings.retry_delay_s), int(settings.retries)
    request = Request(url, headers={"User-Agent": f"geoseg/{__version__}"})
    while True:
        try:
            with urlopen(request, timeout=settings.timeout_s) as response:  # noqa: S310 - http(s) only
                return response.read().decode("utf-8")
        except HTTPError as exc:
            if exc.code in RETRY_STATUS and retries > 0:
                retries -= 1
                time.sleep(delay)
                delay *= 2
                continue
            raise http_failure(url, exc.code) from None
        except (TimeoutError, socket.timeout, URLError) as exc:
            reason = exc.reason if isinstance(exc, URLError) else exc
            if not isinstance(reason, (TimeoutError, socket.timeout)):
                raise unreachable_failure(url, unknown_host=isinstance(reason, socket.gaierror)) from None
            if retries > 0:  # as GDAL does, a request that timed out is asked again
                retries -= 1
                continue
            raise timeout_failure(url) from None
        except UnicodeDecodeError:
            raise _not_stac(url, "not UTF-8 text") from None


def _stac_io() -> Any:
    import pystac.stac_io

    class _StacIO(pystac.stac_io.DefaultStacIO):
        def read_text_from_href(self, href: str) -> str:
            return _fetch(href) if is_url(href) else super().read_text_from_href(href)

    return _StacIO()

