"""Train/val/test splits that never let a chip of one split overlap another."""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
from rasterio.windows import Window

from geoseg.datasets.pairs import SPLITS, PairItem, ScenePair
from geoseg.errors import ConfigError, DatasetError, InputFileError, file_error
from geoseg.raster_io import open_raster

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- splits


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(
            f"split fractions should be three non-negative numbers (train, val, test) summing "
            f"to 1, got {list(fractions)!r}"
        )
    if fr[0] == 0:
        raise ConfigError(f"the train fraction should be above 0, got {list(fractions)!r}")
    return fr


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """How many of ``n`` units (scenes or blocks) go to train, val and test.

    Largest-remainder rounding of ``n * fractions``, then small-``n`` care: a
    split with a fraction above 0 gets at least one unit as long as train
    keeps one (val is served before test), and test gets its first unit only
    when train keeps two. With 3 scenes and 0.9/0.05/0.05 that gives 2/1/0;
    with 4 scenes 2/1/1; with 20 scenes 18/1/1.

    Raises:
        ConfigError: Bad fractions.
    """
    fr = _check_fractions(fractions)
    exact = [n * f for f in fr]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if fr[1] > 0 and counts[1] == 0 and counts[0] >= 2:
        counts[0] -= 1
        counts[1] += 1
    if fr[2] > 0 and counts[2] == 0 and counts[0] >= 3:
        counts[0] -= 1
        counts[2] += 1
    return counts[0], counts[1], counts[2]


def _shipped_splits() -> list[Path]:
    from geoseg.config import PRESETS_DIR

    return sorted((PRESETS_DIR / "splits").glob("*.yaml"))


def _read_split_file(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    import yaml

    p = Path(path)
    if not p.is_file() and not p.is_absolute():
        # A split file shipped with the presets: "oam_val_kampala" or "configs/splits/oam_val_kampala.yaml".
        shipped_by_name = {q.name: q for q in _shipped_splits()}
        p = shipped_by_name.get(p.name) or shipped_by_name.get(f"{p.name}.yaml") or p
    if not p.is_file():
        shipped = ", ".join(sorted(q.stem for q in _shipped_splits()))
        raise file_error(InputFileError, p, "split file does not exist",
                         f"check the path, or name a shipped split ({shipped})")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            raw = yaml.safe_load(text) if p.suffix.lower() != ".json" else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise file_error(DatasetError, p, f"is not valid {p.suffix[1:].upper()} ({exc})".split("\n")[0],
                             "fix the syntax") from None
        if not isinstance(raw, dict):
            raise file_error(DatasetError, p, "should map split names to lists of scene names",
                             "write e.g. {train: [a, b], val: [c], test: [d]}")
        return {str(k): [str(v) for v in (vals or [])] if isinstance(vals, list) else [str(vals)]
                for k, vals in raw.items()}
    # Text: one "NAME SPLIT" (or "NAME,SPLIT") per line; '#' starts a comment.
    out: dict[str, list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise file_error(DatasetError, p, f"line {n} should be 'NAME SPLIT', got {line!r}",
                             "write one scene name and its split (train, val or test) per line")
        out.setdefault(parts[1], []).append(parts[0])
    return out


def _match_names(
    name: str, by_name: Mapping[str, ScenePair], pairs: Sequence[ScenePair]
) -> list[ScenePair]:
    """The scenes a split-file entry names: an exact scene name, or a glob such as ``kampala_*``."""
    if name in by_name:
        return [by_name[name]]
    if not any(ch in name for ch in "*?["):
        return []
    return [p for p in sorted(pairs, key=lambda p: p.name) if fnmatch.fnmatchcase(p.name, name)]


def _split_from_lists(
    pairs: Sequence[ScenePair], lists: Mapping[str, Sequence[str]], source: str
) -> dict[str, list[PairItem]]:
    unknown_splits = [k for k in lists if k not in SPLITS]
    if unknown_splits:
        raise DatasetError(
            f"{source}: unknown split(s) {', '.join(map(repr, unknown_splits))}; "
            "use train, val and test"
        )
    by_name: dict[str, ScenePair] = {}
    for p in pairs:
        by_name[p.name] = p
        by_name.setdefault(p.image.name, p)
    out: dict[str, list[PairItem]] = {k: [] for k in SPLITS}
    placed: dict[str, str] = {}
    unknown: list[str] = []
    for split in SPLITS:
        for name in lists.get(split, []):
            matched = _match_names(name, by_name, pairs)
            if not matched:
                unknown.append(name)
                continue
            for pair in matched:
                if pair.name in placed and placed[pair.name] != split:
                    raise DatasetError(
                        f"{source}: scene {pair.name!r} is listed in both {placed[pair.name]!r} "
                        f"and {split!r}; list each scene once"
                    )
                if pair.name not in placed:
                    placed[pair.name] = split
                    out[split].append(pair)
    if unknown:
        raise DatasetError(
            f"{source}: scene(s) {', '.join(map(repr, unknown[:10]))} are not in the dataset; "
            "check the names (scene names are the image file stems; globs like 'city_*' work)"
        )
    rest = [p for p in pairs if p.name not in placed]
    if rest:
        if "train" in lists:
            log.warning("%s: %d scenes are in no split and are not used", source, len(rest))
        else:
            out["train"].extend(rest)
    return out


def split_pairs(
    pairs: Sequence[ScenePair],
    *,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    by: Literal["scene", "block"] = "scene",
    block: int = 1024,
    seed: int = 42,
    split_file: str | os.PathLike[str] | Mapping[str, Sequence[str]] | None = None,
    sizes: Mapping[Path, tuple[int, int]] | None = None,
) -> dict[str, list[PairItem]]:
    """Split scenes into train/val/test so that no chip of one split overlaps another.

    - ``by="scene"``: whole scenes are shuffled (seeded) and dealt out with
      :func:`split_counts` (with 3 scenes: 2 train, 1 val, 0 test).
    - ``by="block"``: every scene is cut into square blocks of ``block`` pixels
      (the last row/column may be smaller); blocks of all scenes are shuffled
      and dealt out; each item is ``(ScenePair, block Window)``.
      :class:`ChipDataset` cuts chips only inside an item's block, so chips of
      different splits never share a pixel. Use a block of at least the chip
      size (blocks smaller than a chip give padded chips).
    - ``split_file`` (YAML/JSON mapping ``{train: [...], val: [...], test: [...]}``,
      a text file of ``NAME SPLIT`` lines, or such a mapping itself) names the
      scenes of each split; scenes it does not list go to train when it has no
      ``train`` entry, else are left out.

    Args:
        pairs: The scenes.
        fractions: Train, val and test fractions (sum 1, train > 0).
        by: ``"scene"`` or ``"block"``.
        block: Block side in pixels (``by="block"``).
        seed: Shuffle seed.
        split_file: Explicit assignment (overrides ``fractions`` and ``by``).
        sizes: (width, height) per image path, to skip opening the images for
            ``by="block"``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ConfigError: Bad fractions, ``by`` or block size.
        DatasetError: No pairs; a split file naming unknown scenes or splits.
        InputFileError: A split file or image that cannot be read.
    """
    if not pairs:
        raise DatasetError("no scenes to split; check the dataset folder")
    if split_file is not None:
        if isinstance(split_file, Mapping):
            lists, source = {str(k): list(v) for k, v in split_file.items()}, "split"
        else:
            lists, source = _read_split_file(split_file), os.fspath(split_file)
        return _split_from_lists(pairs, lists, source)
    if by not in ("scene", "block"):
        raise ConfigError(f"split 'by' should be 'scene' or 'block', got {by!r}")
    ordered = sorted(pairs, key=lambda p: (p.name, str(p.image)))
    rng = np.random.default_rng(seed)
    if by == "scene":
        units: list[PairItem] = list(ordered)
    else:
        if int(block) != block or block < 1:
            raise ConfigError(f"split block should be a positive number of pixels, got {block!r}")
        units = []
        for p in ordered:
            if sizes is not None and p.image in sizes:
                width, height = sizes[p.image]
            else:
                with open_raster(p.image) as src:
                    width, height = src.width, src.height
            for r in range(0, height, block):
                for c in range(0, width, block):
                    units.append((p, Window(c, r, min(block, width - c), min(block, height - r))))
    perm = rng.permutation(len(units))
    n_train, n_val, _ = split_counts(len(units), fractions)
    shuffled = [units[i] for i in perm]
    out = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train:n_train + n_val],
        "test": shuffled[n_train + n_val:],
    }
    for k in SPLITS:  # stable, readable order inside each split
        out[k].sort(key=lambda u: (u.name, 0, 0) if isinstance(u, ScenePair)
                    else (u[0].name, int(u[1].row_off), int(u[1].col_off)))
    fr = _check_fractions(fractions)
    if fr[1] > 0 and not out["val"]:
        log.warning("only %d %s(s): the validation split is empty", len(units), by)
    if fr[2] > 0 and not out["test"]:
        log.info("only %d %s(s): the test split is empty", len(units), by)
    return out
