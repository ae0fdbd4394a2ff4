"""Scene bands chosen by number or by name: a name matches a band's description, then its colour interpretation.

The rule (the same for ``data.bands`` in training and ``--bands`` in prediction):

- a number (``3``, or the text ``"3"``) is a 1-based band index;
- a name matches, case-insensitively and ignoring spaces, ``-`` and ``_``, the band
  *descriptions* first (``gdal_edit.py -set_band_description``; ``"Near Infrared"``
  matches ``near-infrared``); only when no description matches, the bands' *colour
  interpretations* (rasterio ``colorinterp``: ``red``, ``green``, ``blue``, ``alpha``,
  ``gray``, ``nir``, ...);
- one alias: ``nir`` and ``near infrared`` are the same name (sensor band codes such as
  ``B8`` are not guessed: they mean different bands on different sensors);
- a name that matches several bands, or none, is refused, as is a list mixing numbers and
  names that picks one band twice.
"""

from __future__ import annotations

from typing import Sequence

from geoseg.errors import GeosegError, file_error
from geoseg.raster_io import SceneInfo

#: Names that mean the same band, after :func:`canonical_name`'s folding.
ALIASES = {"nearinfrared": "nir"}
#: The colour interpretation that names nothing.
UNDEFINED = "undefined"

BandSpec = int | str


def canonical_name(name: str) -> str:
    """``name`` folded for matching: lower case, without spaces, ``-`` and ``_``, aliases resolved."""
    folded = "".join(ch for ch in str(name).lower() if ch not in " -_")
    return ALIASES.get(folded, folded)


def band_spec(items: Sequence[int | str]) -> tuple[BandSpec, ...]:
    """Bands as given (YAML list items or ``--bands`` parts): numbers as ints, names as stripped text.

    Raises:
        ValueError: An empty name, or a number below 1.
    """
    out: list[BandSpec] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                raise ValueError("a band name is empty")
            if item.lstrip("-").isdigit():
                item = int(item)
        if isinstance(item, int) and item < 1:
            raise ValueError(f"band numbers start at 1, got {item}")
        out.append(item)
    return tuple(out)


def by_name(spec: Sequence[BandSpec] | None) -> bool:
    """Whether a band list names any band (rather than numbering all of them)."""
    return spec is not None and any(isinstance(b, str) and not b.isdigit() for b in spec)


def _interpretations(info: SceneInfo) -> tuple[str, ...]:
    found = tuple(getattr(info, "colorinterp", ()) or ())
    return found + (UNDEFINED,) * (info.count - len(found))


def band_names(info: SceneInfo) -> tuple[str | None, ...]:
    """Each band's name: its description, else its colour interpretation, else None (``undefined``)."""
    descriptions = tuple(info.descriptions or ()) + (None,) * info.count
    out: list[str | None] = []
    for desc, interp in zip(descriptions[:info.count], _interpretations(info)):
        if desc:
            out.append(str(desc))
        else:
            out.append(None if interp == UNDEFINED else interp)
    return tuple(out)


def describe_bands(info: SceneInfo) -> str:
    """The scene's bands as ``1:red, 2:green, 3:blue, 4:undefined`` (description, else colour interpretation)."""
    names = band_names(info)
    return ", ".join(f"{i}:{name or UNDEFINED}" for i, name in enumerate(names, start=1))


def _match(info: SceneInfo, name: str) -> list[int]:
    want = canonical_name(name)
    descriptions = tuple(info.descriptions or ()) + (None,) * info.count
    hits = [i for i, d in enumerate(descriptions[:info.count], start=1) if d and canonical_name(d) == want]
    if hits:
        return hits
    return [i for i, c in enumerate(_interpretations(info), start=1) if canonical_name(c) == want]


def resolve_bands(
    info: SceneInfo, spec: Sequence[BandSpec], *, error: type[GeosegError], fix: str, what: str = "--bands"
) -> tuple[int, ...]:
    """The 1-based scene bands ``spec`` picks (numbers kept, names matched as the module says).

    Args:
        info: The scene.
        spec: Band numbers and names (:func:`band_spec`).
        error: The GeosegError subclass to raise.
        fix: The fix the message ends with.
        what: How the user gave the list (``--bands``, ``data.bands``), for the message.

    Raises:
        error: A number the scene lacks, a name it lacks or has on several bands, a band picked twice
            by a list of numbers and names; one line naming the scene, its bands (index:name) and ``fix``.
    """
    spec = band_spec(spec)
    listed = ",".join(str(b) for b in spec)
    chosen: list[int] = []
    for item in spec:
        if isinstance(item, int):
            if item > info.count:
                raise file_error(error, info.path, f"has {info.count} band{'s' if info.count != 1 else ''} "
                                 f"({describe_bands(info)}), no band {item} ({what} {listed})", fix)
            chosen.append(item)
            continue
        hits = _match(info, item)
        if len(hits) != 1:
            problem = "no band" if not hits else f"{len(hits)} bands ({', '.join(map(str, hits))})"
            raise file_error(error, info.path, f"has {problem} named {item!r} ({what} {listed}); its bands are "
                             f"{describe_bands(info)}", fix)
        chosen.append(hits[0])
    if by_name(spec) and len(set(chosen)) != len(chosen):
        twice = next(b for b in chosen if chosen.count(b) > 1)
        given = " and ".join(str(s) for s, b in zip(spec, chosen) if b == twice)
        raise file_error(error, info.path, f"{what} {listed} picks band {twice} twice ({given}); its bands are "
                         f"{describe_bands(info)}", fix)
    return tuple(chosen)


def names_of(info: SceneInfo, bands: Sequence[int]) -> tuple[str, ...] | None:
    """The names of ``bands`` (:func:`band_names`) when every one of them has one, else None."""
    names = band_names(info)
    picked = [names[b - 1] for b in bands]
    return None if any(n is None for n in picked) else tuple(str(n) for n in picked)
