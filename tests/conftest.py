"""Shared fixtures: small generated georeferenced scenes and datasets (geoseg.synthetic).

Each scene or dataset is generated once per test session and copied into the
test's own ``tmp_path``, so tests may write beside it or change it freely.

Fixtures:
    synthetic_scene: 517 x 300 px RGB scene, EPSG:32633, 0.3 m pixels (seed 0).
    small_scene: 200 x 150 px, smaller than one 256 px chip (seed 1).
    nodata_scene: 300 x 280 px with a 12 px nodata frame (value 0, declared nodata).
    seed_dataset: seed layout (images/images + label/label), 3 scenes of 517 x 300 px.
    flat_dataset: flat layout (images + labels), 2 scenes of 300 x 260 px.
    vector_dataset: images + one roofs.gpkg (EPSG:32633), 2 scenes of 300 x 260 px.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from geoseg.synthetic import SyntheticDataset, SyntheticScene, make_dataset, make_scene


def _rebase_path(path: Path | None, old: Path, new: Path) -> Path | None:
    return None if path is None else new / path.relative_to(old)


def _copy_scene(scene: SyntheticScene, src_dir: Path, dst_dir: Path) -> SyntheticScene:
    shutil.copytree(src_dir, dst_dir, dirs_exist_ok=True)
    return dataclasses.replace(
        scene,
        image=_rebase_path(scene.image, src_dir, dst_dir),
        mask=_rebase_path(scene.mask, src_dir, dst_dir),
        roofs=_rebase_path(scene.roofs, src_dir, dst_dir),
        polygons=list(scene.polygons),
    )


def _copy_dataset(ds: SyntheticDataset, dst: Path) -> SyntheticDataset:
    shutil.copytree(ds.root, dst, dirs_exist_ok=True)
    return dataclasses.replace(
        ds,
        root=dst,
        vector=_rebase_path(ds.vector, ds.root, dst),
        scenes=[
            dataclasses.replace(
                s,
                image=_rebase_path(s.image, ds.root, dst),
                mask=_rebase_path(s.mask, ds.root, dst),
                roofs=_rebase_path(s.roofs, ds.root, dst),
                polygons=list(s.polygons),
            )
            for s in ds.scenes
        ],
    )


@pytest.fixture(scope="session")
def _scene_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[SyntheticScene, Path]]:
    specs = {
        "synthetic": dict(width=517, height=300, seed=0),
        "small": dict(width=200, height=150, seed=1),
        "nodata": dict(width=300, height=280, seed=2, nodata_border=12),
    }

    class Lazy(dict):
        def __missing__(self, key: str) -> tuple[SyntheticScene, Path]:
            folder = tmp_path_factory.mktemp(f"cache_{key}")
            scene = make_scene(folder, name=key if key != "synthetic" else "scene", **specs[key])
            self[key] = (scene, folder)
            return self[key]

    return Lazy()


@pytest.fixture(scope="session")
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticDataset]:
    specs = {
        "seed": dict(layout="seed", n_scenes=3, width=517, height=300, seed=10),
        "flat": dict(layout="flat", n_scenes=2, width=300, height=260, seed=20),
        "vector": dict(layout="vector", n_scenes=2, width=300, height=260, seed=30),
    }

    class Lazy(dict):
        def __missing__(self, key: str) -> SyntheticDataset:
            self[key] = make_dataset(tmp_path_factory.mktemp(f"cache_{key}_dataset"), **specs[key])
            return self[key]

    return Lazy()


@pytest.fixture
def synthetic_scene(_scene_cache, tmp_path: Path) -> SyntheticScene:
    """A 517 x 300 px RGB scene in EPSG:32633 (0.3 m) with mask and roof GeoPackage."""
    scene, folder = _scene_cache["synthetic"]
    return _copy_scene(scene, folder, tmp_path / "scene")


@pytest.fixture
def small_scene(_scene_cache, tmp_path: Path) -> SyntheticScene:
    """A 200 x 150 px scene: smaller than one 256 px chip along both axes."""
    scene, folder = _scene_cache["small"]
    return _copy_scene(scene, folder, tmp_path / "small")


@pytest.fixture
def nodata_scene(_scene_cache, tmp_path: Path) -> SyntheticScene:
    """A 300 x 280 px scene whose outer 12 px are nodata (0 in every band)."""
    scene, folder = _scene_cache["nodata"]
    return _copy_scene(scene, folder, tmp_path / "nodata")


@pytest.fixture
def seed_dataset(_dataset_cache, tmp_path: Path) -> SyntheticDataset:
    """Seed layout: ROOT/images/images/NAME.tif + ROOT/label/label/NAME_label.tif, 3 scenes."""
    return _copy_dataset(_dataset_cache["seed"], tmp_path / "seed_dataset")


@pytest.fixture
def flat_dataset(_dataset_cache, tmp_path: Path) -> SyntheticDataset:
    """Flat layout: ROOT/images/NAME.tif + ROOT/labels/NAME.tif, 2 scenes."""
    return _copy_dataset(_dataset_cache["flat"], tmp_path / "flat_dataset")


@pytest.fixture
def vector_dataset(_dataset_cache, tmp_path: Path) -> SyntheticDataset:
    """Vector layout: ROOT/images/NAME.tif + ROOT/roofs.gpkg (masks in ROOT/masks), 2 scenes."""
    return _copy_dataset(_dataset_cache["vector"], tmp_path / "vector_dataset")
