"""Batches shared by the scenes of a run (geoseg.inference.batching.Batches).

The chips left at the end of one scene go through the model with the first chips of
the next, so a run of many small tiles makes full batches; each scene still finishes
(writes, polygonises, publishes) as soon as its last chips are through, in scene order,
and a failure anywhere leaves nothing behind. The oracle model reproduces the label
carried in a scene's last band, so every mask must equal its label exactly.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch

from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, stand_in_model, write_scene
from geoseg.config import PredictConfig
from geoseg.inference import job, pipeline, predict_scene
from geoseg.inference.batching import Batches

CHIP = 64  # overlap 16: chips every 48 px


class Recording(Oracle):
    """The oracle, recording every batch: its size and the scenes its chips came from."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.fail_at = fail_at
        self.attempts = 0  # calls made, the failed one included

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.attempts += 1
        if self.fail_at is not None and len(self.sizes) == self.fail_at:
            raise RuntimeError("out of memory")
        self.sizes.append(int(x.shape[0]))
        return super().forward(x)


def _scenes(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Tiles of different sizes (6, 12, 2, 24 and 9 chips); one with a nodata strip."""
    rng = np.random.default_rng(5)
    folder.mkdir(exist_ok=True)
    out = {}
    for name, (h, w) in {"a": (100, 120), "b": (150, 170), "c": (60, 90), "d": (200, 260), "e": (130, 140)}.items():
        rects = [(int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20)), int(rng.integers(6, 20)),
                  int(rng.integers(6, 20))) for _ in range(4)]
        label = draw_rectangles(h, w, rects)
        nodata = None
        if name == "d":
            nodata = np.zeros((h, w), bool)
            nodata[:, :70] = True  # whole chips of nodata: skipped
        out[name] = (write_scene(folder / f"{name}.tif", label, nodata_mask=nodata), label if nodata is None
                     else np.where(nodata, 255, label).astype(np.uint8))
    return out


def _layer_in_scene_order(path: Path, scenes: dict[str, tuple[Path, np.ndarray]]) -> gpd.GeoDataFrame:
    """The layer at ``path``, checked to hold each scene's polygons, scene after scene, exactly as each
    scene predicted alone gives them."""
    layer = gpd.read_file(path, layer="rooftops")
    alone = [predict_scene(p, Oracle(), oracle_meta(chip_size=CHIP), device="cpu", precision="32", min_area=0.0,
                           simplify=0.0).polygons for p, _ in scenes.values()]
    assert list(layer["scene"]) == [name for name, frame in zip(scenes, alone) for _ in range(len(frame))]
    expected = [g for frame in alone for g in frame.geometry]
    assert len(layer) == len(expected) and all(a.equals_exact(b, 0) for a, b in zip(layer.geometry, expected))
    return layer


@pytest.fixture
def recording(monkeypatch):
    model = Recording()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=CHIP))
    return model


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "geoseg-write" and t.is_alive()]


def _finish_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("geoseg-finish") and t.is_alive()]


def _model_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("geoseg-model") and t.is_alive()]


@pytest.fixture
def same_thread(monkeypatch):
    """The model runs in the feeding thread: the batch-exact timings asserted below are that way's (with the
    model in a thread of its own, each batch is taken through one batch later)."""
    from geoseg.inference import batching

    monkeypatch.setattr(batching, "OWN_MODEL_THREAD", False)


@pytest.fixture(params=[False, True], ids=["model-in-feeding-thread", "model-in-own-thread"])
def own_thread(request, monkeypatch):
    """Both ways of running the model (``batching.OWN_MODEL_THREAD``), whatever this machine's cores."""
    from geoseg.inference import batching

    monkeypatch.setattr(batching, "OWN_MODEL_THREAD", request.param)
    return request.param


@pytest.mark.parametrize("batch_size", [4, 7, 16, 64])
def test_scenes_share_batches_and_only_the_last_of_the_run_is_partial(tmp_path, recording, batch_size, own_thread):
    scenes = _scenes(tmp_path)
    reports: list[tuple[str, int, int]] = []
    summary = job.predict(
        [str(p) for p, _ in scenes.values()], out=tmp_path / "out" / "roofs.gpkg", mask_out=tmp_path / "masks",
        config=PredictConfig(batch_size=batch_size, device="cpu", precision="32", min_area=0.0, simplify=0.0),
        progress=lambda name, done, total: reports.append((name, done, total)),
    )
    results = summary.results
    n = sum(r.chips_predicted for r in results)
    assert [r.chips_predicted for r in results] == [6, 12, 2, 20, 9]
    assert [r.chips_skipped for r in results] == [0, 0, 0, 4, 0]  # d's first column of chips is all nodata
    assert recording.sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    # Each scene counts the model calls that carried its chips (the run's chips in scene order).
    starts = np.cumsum([0] + [r.chips_predicted for r in results])
    assert [r.batches for r in results] == [(e - 1) // batch_size - s // batch_size + 1
                                            for s, e in zip(starts[:-1], starts[1:])]
    for (name, (_, label)), res in zip(scenes.items(), results):
        assert res.name == name and res.mask_path == tmp_path / "masks" / f"{name}_mask.tif"
        with rasterio.open(res.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), label)
    # Scenes finish in order: every report of a scene comes before any of the next, and each ends complete.
    names = [name for name, _, _ in reports]
    assert names == sorted(names)
    for name, res in zip(scenes, results):
        assert [(d, t) for nm, d, t in reports if nm == name][-1] == (res.chips_predicted,) * 2
    # The layer holds each scene's polygons, scene after scene, exactly as each scene alone gives them.
    layer = _layer_in_scene_order(tmp_path / "out" / "roofs.gpkg", scenes)
    assert list(layer["id"]) == list(range(1, len(layer) + 1))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["roofs.gpkg"]  # no scratch left
    assert not _writer_threads() and not _finish_threads() and not _model_threads()


@pytest.mark.parametrize("fail_at", [0, 1, 2, 4])
def test_a_failing_batch_with_a_scene_still_open_leaves_nothing(tmp_path, monkeypatch, fail_at, own_thread):
    """Batch 1 holds the last chips of a and the first of b (4 + 2 and 4 + ...): failures before, during and
    after a's finish discard every output, scratch and writer thread."""
    model = Recording(fail_at=fail_at)
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=CHIP))
    scenes = _scenes(tmp_path / "in")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match="out of memory"):
        job.predict([str(p) for p, _ in scenes.values()], out=tmp_path / "roofs.gpkg", mask_out=tmp_path / "m",
                    prob_out=tmp_path / "p", config=PredictConfig(batch_size=4, device="cpu", precision="32"))
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert len(model.sizes) == fail_at
    # No batch after the failed one went into the model (in its own thread, at most one: handed to it
    # before the failure was known).
    assert model.attempts == fail_at + 1 or (own_thread and model.attempts == fail_at + 2)
    assert not _writer_threads() and not _finish_threads() and not _model_threads()


def test_a_scene_failing_as_it_finishes_inside_the_next_scenes_batch_leaves_nothing(tmp_path, monkeypatch,
                                                                                     recording, own_thread):
    """a's finish starts as b's first batch (the one that carries a's last chips) passes and runs beside b's
    batches: its failure stops b (at b's next batch, or at the run's end), and nothing is left."""
    def refuse(path, rooftop, valid):
        if Path(path).name == "a.tif":
            raise RuntimeError("a could not be finished")

    monkeypatch.setattr(pipeline, "check_rooftop_share", refuse)
    scenes = _scenes(tmp_path / "in")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match="a could not be finished"):
        job.predict([str(p) for p, _ in scenes.values()], out=tmp_path / "roofs.gpkg", mask_out=tmp_path / "m",
                    config=PredictConfig(batch_size=4, device="cpu", precision="32"))
    assert recording.sizes[:2] == [4, 4]  # a: 4, then a's last 2 with b's first 2; a's finish starts there
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not _writer_threads() and not _finish_threads() and not _model_threads()


def _slow_finish_of_a(monkeypatch, recording, *, until: int, then_s: float = 0.0) -> dict[str, int]:
    """a's finish waits (at most 20 s) until the model has run ``until`` batches, then ``then_s`` more
    seconds; returns the batches run when it started waiting and when it went on."""
    import time

    seen: dict[str, int] = {}
    real = pipeline._ScenePass.finish

    def finish(self):
        if Path(self.source).name == "a.tif":
            seen["start"] = len(recording.sizes)
            t0 = time.monotonic()
            while len(recording.sizes) < until and time.monotonic() - t0 < 20:
                time.sleep(0.005)
            time.sleep(then_s)
            seen["end"] = len(recording.sizes)
        return real(self)

    monkeypatch.setattr(pipeline._ScenePass, "finish", finish)
    return seen


def test_the_model_goes_on_while_a_scene_finishes_and_the_layer_stays_in_scene_order(tmp_path, monkeypatch,
                                                                                     recording, same_thread):
    """a's finish (writer, polygons, publishing) runs in its own thread: b's batches pass while it is held
    up, and b's polygons, traced meanwhile, still come after a's in the layer."""
    seen = _slow_finish_of_a(monkeypatch, recording, until=4)
    scenes = _scenes(tmp_path)
    summary = job.predict(
        [str(p) for p, _ in scenes.values()], out=tmp_path / "out" / "roofs.gpkg", mask_out=tmp_path / "masks",
        config=PredictConfig(batch_size=4, device="cpu", precision="32", min_area=0.0, simplify=0.0),
    )
    # a ends in batch 2 (6 chips); the model ran batches 3 and 4 (b's), and maybe more (b's and c's
    # finishes queue behind a's), while a's finish was held up.
    assert seen["start"] == 2 and seen["end"] >= 4
    _layer_in_scene_order(tmp_path / "out" / "roofs.gpkg", scenes)
    for (name, (_, label)), res in zip(scenes.items(), summary.results):
        with rasterio.open(res.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), label)
    assert not _writer_threads() and not _finish_threads()


@pytest.mark.parametrize("limits, until, waits", [
    # a's and b's pixels fit (100x120 + 150x170): c's (60x90, ending in batch 5 too) do not, and the
    # model waits for a's finish before it runs batch 6.
    ({"MAX_PENDING_FINISH_PIXELS": 100 * 120 + 150 * 170}, 5, True),
    ({"MAX_PENDING_FINISH_PIXELS": 0}, 5, True),  # two whatever their size: b queued, c waits
    ({"MAX_PENDING_FINISHES": 3}, 10, True),  # a, b, c pending: d (ending in batch 10) waits
    ({}, 13, False),  # five small tiles: all queue behind a's finish, the model never waits
])
def test_the_model_waits_once_the_pending_finishes_are_too_many_or_too_big(tmp_path, monkeypatch, recording,
                                                                          limits, until, waits, same_thread):
    """Finishes queue behind a held-up one while they are at most MAX_PENDING_FINISHES and
    MAX_PENDING_FINISH_PIXELS in all (two always may); then the model waits for the first."""
    from geoseg.inference import batching

    assert (batching.MIN_PENDING_FINISHES, batching.MAX_PENDING_FINISHES,
            batching.MAX_PENDING_FINISH_PIXELS) == (2, 32, 2048 * 2048)
    for name, value in limits.items():
        monkeypatch.setattr(batching, name, value)
    seen = _slow_finish_of_a(monkeypatch, recording, until=until, then_s=0.3 if waits else 0.0)
    scenes = _scenes(tmp_path)
    job.predict([str(p) for p, _ in scenes.values()], out=tmp_path / "roofs.gpkg",
                config=PredictConfig(batch_size=4, device="cpu", precision="32"))
    assert seen == {"start": 2, "end": until}  # with a wait, no batch ran in the 0.3 s after batch ``until``
    assert len(recording.sizes) == 13


def test_scenes_run_differently_do_not_share_a_batch(tmp_path):
    """A scene predicted another way (here with flips averaged) gets batches of its own: the shared batch runs first."""
    scenes = _scenes(tmp_path)
    model = Recording()
    with Batches(4) as batches:
        a = predict_scene(scenes["a"][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                          polygons=False, batches=batches, mask_out=tmp_path / "a_mask.tif")
        assert a.seconds == 0.0 and model.sizes == [4]  # a's last 2 chips wait for the next scene's
        b = predict_scene(scenes["c"][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                          polygons=False, batches=batches, tta=True, mask_out=tmp_path / "c_mask.tif")
        assert model.sizes == [4, 2]  # a's leftovers ran alone, without c's flipped chips
        batches.flush()
    assert model.sizes == [4, 2, 2, 2, 2, 2]  # c's 2 chips, once per flip
    assert a.seconds > 0 and b.chips_predicted == 2 and a.batches == 2 and b.batches == 1  # one call, 4 flips
    for name, res in (("a", a), ("c", b)):
        with rasterio.open(res.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), scenes[name][1])


def test_scenes_run_the_same_way_share_one_predictor(tmp_path, monkeypatch):
    """A run's scenes share the model's predictor (prepared and checked once); a scene normalised
    or run another way gets its own, and each scene's chips are normalised by its own."""
    from geoseg.inference import batching

    made: list[tuple] = []
    init = batching.ChipPredictor.__init__

    def counting(self, model, **settings):
        made.append((settings["mean"], settings["tta"]))
        init(self, model, **settings)

    monkeypatch.setattr(batching.ChipPredictor, "__init__", counting)
    scenes = _scenes(tmp_path)
    model = Recording()
    shifted = dataclasses.replace(oracle_meta(chip_size=CHIP), mean=(0.0, 0.0, 0.0, -1.0))  # rooftop band + 1
    with Batches(4) as batches:
        runs = [predict_scene(scenes[name][0], model, meta, device="cpu", precision="32", polygons=False,
                              batches=batches, tta=tta, mask_out=tmp_path / f"{name}_{i}.tif")
                for i, (name, meta, tta) in enumerate([("a", oracle_meta(chip_size=CHIP), False),
                                                      ("b", oracle_meta(chip_size=CHIP), False),
                                                      ("c", shifted, False), ("a", oracle_meta(chip_size=CHIP), True),
                                                      ("b", oracle_meta(chip_size=CHIP), False)])]
        batches.flush()
    assert made == [((0.0,) * 4, False), ((0.0, 0.0, 0.0, -1.0), False), ((0.0,) * 4, True)]
    for i, (name, res) in enumerate(zip("abcab", runs)):
        with rasterio.open(res.mask_path) as src:
            expected = scenes[name][1]
            if name == "c":  # its rooftop band read one higher: every pixel a rooftop but the nodata
                expected = np.where(expected == 255, 255, 1)
            np.testing.assert_array_equal(src.read(1), expected)


def test_shared_batches_of_another_size_are_refused(tmp_path):
    scene = write_scene(tmp_path / "s.tif", draw_rectangles(100, 120, [(5, 5, 30, 30)]))
    with Batches(8) as batches, pytest.raises(Exception, match="batch size 4 differs from the shared batches' 8"):
        predict_scene(scene, Oracle(), oracle_meta(chip_size=CHIP), device="cpu", batch_size=4, batches=batches)


class _Slow(Recording):
    """The oracle taking 20 ms a batch, as a real model takes its time: the run is the model's, and a few
    milliseconds of threads handing over the GIL do not weigh like whole phases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.02)
        return super().forward(x)


def test_the_scenes_seconds_add_up_to_the_run(tmp_path, monkeypatch, own_thread):
    """Each scene's seconds are its own work (set-up, feed, its share of the run's last batch, the model's
    waits for its finish), so that they add up to the time of the run's scene loop: a scene set up ahead
    of its turn, or waiting for the next scene's chips, is not counted twice, nor is any phase lost."""
    import time

    stand_in_model(monkeypatch, _Slow(), oracle_meta(chip_size=CHIP))
    loop: list[float] = []
    real = job._Run.predict_share

    def timed(self, pub):
        t0 = time.perf_counter()
        try:
            return real(self, pub)
        finally:
            loop.append(time.perf_counter() - t0)

    monkeypatch.setattr(job._Run, "predict_share", timed)
    scenes = _scenes(tmp_path)
    summary = job.predict([str(p) for p, _ in scenes.values()], out=tmp_path / "roofs.gpkg",
                          config=PredictConfig(batch_size=4, device="cpu", precision="32"))
    seconds = [r.seconds for r in summary.results]
    assert all(s > 0 for s in seconds)
    assert 0.9 * loop[0] < sum(seconds) <= loop[0]


def test_a_run_opens_each_scene_once_and_checks_them_side_by_side_in_order(tmp_path, monkeypatch, recording):
    """The check before any work opens every scene (in threads) and hands its header on: prediction does not
    open it again. Results keep the scenes' order, and of two bad scenes the first is the one named."""
    from geoseg.inference import job as job_module

    opened: list[tuple[str, str]] = []
    real = job_module.open_scene

    def counting(path, **kwargs):
        import threading as th

        opened.append((Path(path).name, th.current_thread().name))
        return real(path, **kwargs)

    monkeypatch.setattr(job_module, "open_scene", counting)
    monkeypatch.setattr(pipeline, "open_scene", counting)
    scenes = _scenes(tmp_path)
    summary = job.predict([str(p) for p, _ in scenes.values()], out=tmp_path / "roofs.gpkg", mask_out=tmp_path / "m",
                          config=PredictConfig(batch_size=4, device="cpu", precision="32"))
    assert sorted(name for name, _ in opened) == sorted(f"{n}.tif" for n in scenes)  # once each
    assert {thread.rsplit("_", 1)[0] for _, thread in opened} == {"geoseg-check"}
    assert [(r.width, r.height) for r in summary.results] == [(120, 100), (170, 150), (90, 60), (260, 200),
                                                              (140, 130)]
    for name, res in zip(scenes, summary.results):
        with rasterio.open(res.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), scenes[name][1])
    # Two bad scenes: whichever thread fails first, the error names the first of them in the run's order.
    nocrs = write_scene(tmp_path / "x_nocrs.tif", draw_rectangles(60, 70, []), crs=None)
    cut = tmp_path / "y_cut.tif"
    cut.write_bytes(scenes["d"][0].read_bytes()[:2000])
    paths = [str(scenes["a"][0]), str(nocrs), str(cut), str(scenes["b"][0])]
    for order in (paths, [paths[0], paths[2], paths[1], paths[3]]):
        with pytest.raises(Exception) as exc:
            job.predict(order, out=tmp_path / "again.gpkg", config=PredictConfig(device="cpu", precision="32"))
        assert str(exc.value).startswith(order[1])
    assert not (tmp_path / "again.gpkg").exists()


@pytest.mark.parametrize("ahead_pixels, fed_after_b", [(2 * 2048 * 2048, False), (0, True)])
def test_scenes_set_up_ahead_are_read_before_their_turn_and_fed_in_order(tmp_path, monkeypatch, ahead_pixels,
                                                                         fed_after_b, same_thread):
    """With look-ahead a scene is set up (outputs open, first block read) and fed only once ``ahead`` more are
    set up, or its pixels would pass MAX_AHEAD_PIXELS (one may always wait), or at the flush; the
    batches, masks and layer are those of scenes fed one after the other."""
    import time

    from geoseg.inference import batching, streams

    # A run reads ahead on a GPU only: on a CPU the model's threads take every core.
    assert job.scenes_ahead(torch.device("cpu")) == 0 and job.scenes_ahead(torch.device("cuda")) == 8
    monkeypatch.setattr(batching, "MAX_AHEAD_PIXELS", ahead_pixels)
    read: list[str] = []
    real_read = streams.BlockReader._read

    def recording_read(self, block):
        item = real_read(self, block)
        read.append(Path(self.path).name)
        return item

    monkeypatch.setattr(streams.BlockReader, "_read", recording_read)
    scenes = _scenes(tmp_path)
    model = Recording()
    with Batches(4, ahead=2) as batches:
        res = {name: None for name in "abc"}
        res["a"] = predict_scene(scenes["a"][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                                 batches=batches, mask_out=tmp_path / "a_mask.tif", min_area=0.0, simplify=0.0)
        res["b"] = predict_scene(scenes["b"][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                                 batches=batches, mask_out=tmp_path / "b_mask.tif", min_area=0.0, simplify=0.0)
        assert model.sizes == ([4] if fed_after_b else [])  # a (6 chips) fed once b is set up, or not yet
        t0 = time.monotonic()
        while len(read) < 2 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert sorted(read) == ["a.tif", "b.tif"]  # b's one block read before b is fed
        res["c"] = predict_scene(scenes["c"][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                                 batches=batches, mask_out=tmp_path / "c_mask.tif", min_area=0.0, simplify=0.0)
        # a fed; b waits for two more scenes (or the flush) - or, with no pixels to spare, is fed too.
        assert model.sizes == ([4, 4, 4, 4] if fed_after_b else [4])
        batches.flush()
    assert model.sizes == [4, 4, 4, 4, 4]  # 6 + 12 + 2 chips in full batches, scene after scene
    for name, result in res.items():
        with rasterio.open(result.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), scenes[name][1])
        alone = predict_scene(scenes[name][0], Oracle(), oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                              min_area=0.0, simplify=0.0).polygons
        assert len(result.polygons) == len(alone) and all(
            x.equals_exact(y, 0) for x, y in zip(result.polygons.geometry, alone.geometry))
    assert not _writer_threads() and not _finish_threads()


def test_a_failure_with_scenes_set_up_ahead_leaves_nothing(tmp_path, own_thread):
    """A batch failing while later scenes wait, set up (outputs open, scratch made, blocks being read) but not
    fed: every scene is aborted, no output, scratch or thread is left."""
    scenes = _scenes(tmp_path / "in")
    before = sorted(p for p in tmp_path.rglob("*"))
    model = Recording(fail_at=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        with Batches(4, ahead=2) as batches:
            for name in "abcd":
                predict_scene(scenes[name][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                              batches=batches, mask_out=tmp_path / f"{name}_mask.tif",
                              prob_out=tmp_path / f"{name}_prob.tif", temp_dir=tmp_path)
            batches.flush()
    assert model.sizes == [4]  # a's first batch ran; the second (a's last 2, b's first 2) failed, c and d waiting
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not _writer_threads() and not _finish_threads() and not _model_threads()


@pytest.mark.parametrize("cores, threads, device, own", [
    (2, None, "cpu", False),  # up to 4 cores the model's threads take them all: no core to spare
    (4, None, "cpu", False),
    (8, None, "cpu", True),  # above 4, one is left: the work around the model runs beside it
    (2, 1, "cpu", True),
    (8, 8, "cpu", False),
    (8, None, "meta", False),  # not a CPU (a GPU runs its own queue)
])
def test_the_model_gets_a_thread_of_its_own_on_a_cpu_with_a_core_to_spare(monkeypatch, cores, threads, device, own):
    from geoseg import devices
    from geoseg.inference import batching

    monkeypatch.setattr(devices, "usable_cores", lambda: cores)
    monkeypatch.setattr(batching, "usable_cores", lambda: cores)
    assert batching.OWN_MODEL_THREAD is None
    batches = Batches(4)
    batches.hold(None, None, threads=threads)  # the run's torch threads, as a scene pass gives them
    assert batches._own_thread(torch.zeros(1, device=device)) is own


class _Timeline(Recording):
    """The recording oracle, noting each call's start, its thread and its torch threads."""

    def __init__(self, events: list[tuple]) -> None:
        super().__init__()
        self.events = events
        self.started = [threading.Event() for _ in range(16)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.calls
        self.events.append(("start", k, threading.current_thread().name, torch.get_num_threads()))
        self.started[k].set()
        return super().forward(x)


def test_with_a_core_to_spare_the_model_runs_beside_the_blending_of_the_batch_before(tmp_path, monkeypatch):
    """Three cores, two torch threads: every batch runs in the model's own thread (with two threads); the
    feeding thread takes batch k through (blends it, closes blocks, hands cores on) once batch k+1 is in the
    model (it waits here for that call to start: it never would with the model in this thread) and before
    handing it k+2, with the one core the model leaves (the last batch, with the model idle, with all);
    masks and polygons are as with the model in the feeding thread, and no thread is left."""
    from geoseg.inference import batching

    scenes = _scenes(tmp_path)
    alone = {name: predict_scene(scenes[name][0], Oracle(), oracle_meta(chip_size=CHIP), device="cpu",
                                 precision="32", threads=2, min_area=0.0, simplify=0.0).polygons for name in "abc"}
    monkeypatch.setattr(batching, "usable_cores", lambda: 3)
    events: list[tuple] = []
    real = Batches._take_through
    model = _Timeline(events)

    def taking(self, call, **kwargs):
        k = len([e for e in events if e[0] == "through"])
        beside = k == 4 or model.started[k + 1].wait(timeout=10)  # the last (5 batches) has none after it
        events.append(("through", k, threading.current_thread().name, torch.get_num_threads(), beside))
        return real(self, call, **kwargs)

    monkeypatch.setattr(Batches, "_take_through", taking)
    results = {}
    with Batches(4) as batches:
        for name in "abc":
            results[name] = predict_scene(
                scenes[name][0], model, oracle_meta(chip_size=CHIP), device="cpu", precision="32", threads=2,
                batches=batches, mask_out=tmp_path / f"{name}_mask.tif", min_area=0.0, simplify=0.0)
        batches.flush()
    assert model.sizes == [4, 4, 4, 4, 4]  # 6 + 12 + 2 chips
    starts = [e for e in events if e[0] == "start"]
    throughs = [e for e in events if e[0] == "through"]
    assert [e[1] for e in starts] == [e[1] for e in throughs] == [0, 1, 2, 3, 4]
    assert {e[2:] for e in starts} == {("geoseg-model_0", 2)}
    # Beside a batch in the model, one thread (the spare core); the last, at the flush with the model idle, all.
    main = threading.current_thread().name
    assert [e[2:] for e in throughs] == [(main, 1, True)] * 4 + [(main, 2, True)]
    at = {e[:2]: i for i, e in enumerate(events)}
    assert all(at["through", k] < at["start", k + 2] for k in range(3))  # one batch in the model at a time
    for name, result in results.items():
        with rasterio.open(result.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), scenes[name][1])
        assert len(result.polygons) == len(alone[name]) and all(
            x.equals_exact(y, 0) for x, y in zip(result.polygons.geometry, alone[name].geometry))
    assert not _writer_threads() and not _finish_threads() and not _model_threads()


def _burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU, mostly without the GIL (sorting), as torch's work does: the
    model's thread is not held up by it."""
    import time

    values = np.random.default_rng(0).random(20_000)
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        np.sort(values)


class _Threads(Recording):
    """The recording oracle, noting the thread of each call; ``cost`` seconds (waited) a call."""

    def __init__(self, cost: float = 0.0) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.cost = cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        self.threads.append(threading.current_thread().name)
        time.sleep(self.cost)
        return super().forward(x)


@pytest.mark.parametrize("feeding_s, model_s, gives_up", [(0.03, 0.0, True), (0.0, 0.03, False)])
def test_the_model_leaves_its_own_thread_once_the_feeding_thread_cannot_keep_up(tmp_path, monkeypatch, feeding_s,
                                                                                model_s, gives_up):
    """Three cores, two model threads (the rule gives the model its own thread), 25 batches of 2 chips. With
    the feeding thread's work per batch (here its blending, made to cost 30 ms of CPU) longer than the model's
    call, the feeding thread cannot keep the model busy: once 4 batches after the first 2 show it (medians), the
    model runs in the feeding thread for the rest of the run (its torch threads back to the model's). With a
    model slower than the feeding thread, it keeps its own thread to the end. Masks exact either way."""
    from geoseg.inference import batching

    assert (batching.OWN_THREAD_SKIP_BATCHES, batching.OWN_THREAD_MIN_BATCHES) == (2, 4)
    monkeypatch.setattr(batching, "usable_cores", lambda: 3)
    real_blend = batching.BlockWork.blend

    def blend(self, entry, index, probs):
        _burn(feeding_s)
        return real_blend(self, entry, index, probs)

    monkeypatch.setattr(batching.BlockWork, "blend", blend)
    model = _Threads(cost=model_s)
    real_forward = model.forward
    threads_seen: list[int] = []
    model.forward = lambda x: threads_seen.append(torch.get_num_threads()) or real_forward(x)
    scenes = _scenes(tmp_path)
    results = {}
    with Batches(2) as batches:
        for name, (path, _) in scenes.items():
            results[name] = predict_scene(path, model, oracle_meta(chip_size=CHIP), device="cpu", precision="32",
                                          threads=2, batches=batches, mask_out=tmp_path / f"{name}_mask.tif",
                                          min_area=0.0, simplify=0.0)
        batches.flush()
    assert len(model.threads) == 25 and set(threads_seen) == {2}
    main, own = threading.current_thread().name, "geoseg-model_0"
    if gives_up:
        # Batch 8's hand-over is the first with 4 feeding cycles and 4 model calls past the first 2 to compare.
        assert model.threads == [own] * 8 + [main] * 17
    else:
        assert model.threads == [own] * 25
    for name, result in results.items():
        with rasterio.open(result.mask_path) as src:
            np.testing.assert_array_equal(src.read(1), scenes[name][1])
    assert not _writer_threads() and not _finish_threads() and not _model_threads()
