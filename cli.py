"""The ``geoseg`` command line: parse options, call one library function each.

This is the only module that knows click, prints, or exits. Heavy imports
(torch, rasterio, geopandas) happen inside command bodies so that
``geoseg --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import click

from geoseg import __version__
from geoseg.progress import PROGRESS_FORMATS, ProgressFormat

if TYPE_CHECKING:  # for annotations only: these modules load torch
    from geoseg.encoding import ProbDtype
    from geoseg.model_export import ExportFormat

#: The values of ``--device`` (the config's ``device``).
Device = Literal["auto", "cpu", "cuda"]

#: Exit status after Ctrl-C and after SIGTERM: 128 + the signal number, as a shell reports a killed command.
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, Slurm), raised in the main thread so that the run unwinds as for Ctrl-C."""


#: The process that turned SIGTERM into Terminated (forked workers, e.g. a DataLoader's, inherit the handler).
_SIGTERM_OWNER: list[int] = []


def _raise_terminated(signum: int, frame: Any) -> None:
    if _SIGTERM_OWNER and os.getpid() != _SIGTERM_OWNER[-1]:  # a forked worker: die as it always did
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM unwinds the main thread like Ctrl-C: temporaries are removed.

    A SIGTERM the process was started to ignore stays ignored; off the main thread
    (an embedding application) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return
    _SIGTERM_OWNER.append(os.getpid())
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGTERM_OWNER.pop()


#: ``--progress`` of the long commands (predict, evaluate, train); geoseg.progress draws or writes it.
progress_option = click.option(
    "--progress", "progress_format", type=click.Choice(PROGRESS_FORMATS), default="bar", show_default=True,
    help="How progress is shown on stderr: tqdm bars, or one JSON object per line for programs "
         "(e.g. {\"stage\": \"predict\", \"done\": 12, \"total\": 40, \"scene\": \"a\"}, last {\"stage\": \"done\"}).")

#: Where a model runs, and in which precision (the choices of the config's ``device`` and ``precision``).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "32", "bf16", "16")
#: Prediction (predict, benchmark) also runs int8 models (geoseg.quantize), on the CPU.
PREDICT_PRECISIONS = (*PRECISIONS, "int8")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def device_option(help: str | None = None, *, default: str | None = None) -> Decorator:
    """``--device``: auto, cpu or cuda; None (the default) leaves the choice to the config."""
    return click.option("--device", type=click.Choice(DEVICES), default=default,
                        show_default=default is not None, help=help)


def precision_option(help: str, *, default: str | None = None,
                     choices: tuple[str, ...] = PRECISIONS) -> Decorator:
    """``--precision``: auto, 32, bf16 or 16 (prediction: also int8); None (the default) leaves the choice to the config."""
    return click.option("--precision", type=click.Choice(choices), default=default,
                        show_default=default is not None, help=help)


def compile_option(help: str, *, negatable: bool) -> Decorator:
    """``--compile`` (torch.compile) as ``compile_model``: a flag, or ``--compile/--no-compile`` (default None)."""
    if negatable:
        return click.option("--compile/--no-compile", "compile_model", default=None, help=help)
    return click.option("--compile", "compile_model", is_flag=True, help=help)


def overwrite_option(help: str) -> Decorator:
    """``--overwrite``: replace existing outputs (never an input: geoseg refuses that anyway)."""
    return click.option("--overwrite", is_flag=True, help=help)


def assume_crs_option(inputs: str = "scenes") -> Decorator:
    """``--assume-crs``: the CRS of ``inputs`` that have none."""
    return click.option("--assume-crs", default=None, help=f"CRS for {inputs} that have none, e.g. EPSG:32633.")


#: Where a command leaves what an interrupt keeps (click shares ``meta`` among nested contexts).
KEPT_KEY = "geoseg.kept"


def say_kept(text: str) -> None:
    """What an interrupt of the running command keeps, for the group's one-line message."""
    click.get_current_context().meta[KEPT_KEY] = text


class GeosegGroup(click.Group):
    """A click group that turns GeosegError into a one-line message and exit 1.

    Ctrl-C and SIGTERM (see :func:`sigterm_as_interrupt`) exit 130 and 143 with one
    line that says what was kept: a command says it with :func:`say_kept` where
    something was (default: nothing was written).
    """

    def invoke(self, ctx: click.Context) -> Any:
        from geoseg.errors import GeosegError

        try:
            return super().invoke(ctx)
        except GeosegError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            kept = ctx.meta.get(KEPT_KEY) or "nothing was written"
            click.echo(f"interrupted by {'SIGTERM' if terminated else 'Ctrl-C (SIGINT)'}; {kept}", err=True)
            ctx.exit(EXIT_SIGTERM if terminated else EXIT_SIGINT)


@click.group(cls=GeosegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Find rooftops in georeferenced aerial and satellite imagery."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)


@cli.command("evaluate")
@click.option("--pred", required=True, type=click.Path(),
              help="Predicted mask GeoTIFF (0/255, 0/1 or class ids) or vector file.")
@click.option("--truth", required=True, type=click.Path(),
              help="True mask GeoTIFF or vector file (GeoPackage, GeoJSON, Shapefile).")
@click.option("--aoi", type=click.Path(), default=None,
              help="Polygon file (any CRS): evaluate only inside it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--panels", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of image / truth / prediction with missed and false buildings coloured.")
@click.option("--image", type=click.Path(), default=None,
              help="Scene for the image column of --panels.")
@click.option("--iou-threshold", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="IoU a predicted and a true polygon need to match (default 0.5, as SpaceNet).")
@click.option("--class-id", type=click.IntRange(0, 254), default=None,
              help="Class evaluated in class-id masks (default 1, rooftop).")
@click.option("--resolution", type=click.FloatRange(0, min_open=True), default=None,
              help="Pixel size in metres when both inputs are vector files (default 0.25).")
@assume_crs_option("inputs")
@overwrite_option("Replace an existing --panels file.")
@progress_option
def evaluate_command(
    pred: str, truth: str, aoi: str | None, as_json: bool, panels: str | None,
    image: str | None, iou_threshold: float | None, class_id: int | None,
    resolution: float | None, assume_crs: str | None, overwrite: bool, progress_format: ProgressFormat,
) -> None:
    """Compare predicted rooftops with the truth: pixel and object (SpaceNet) metrics.

    Objects are matched one-to-one at IoU >= 0.5, greedily by descending IoU
    (ties: lower truth index, then lower prediction index).
    """
    import json

    from geoseg.evaluation import evaluate_files
    from geoseg.progress import progress_reporter

    if image is not None and panels is None:
        raise click.UsageError("--image is only used with --panels; add --panels panels.png")
    options = {k: v for k, v in (("iou_threshold", iou_threshold), ("class_id", class_id),
                                 ("resolution", resolution)) if v is not None}
    reporter = progress_reporter(progress_format)
    result = evaluate_files(pred, truth, aoi=aoi, panels=panels, image=image, assume_crs=assume_crs,
                            overwrite=overwrite, **options,
                            progress=lambda done, total: reporter.update("evaluate", done, total, unit="block"))
    reporter.finish()
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "panels": panels},
                              indent=2))
    else:
        click.echo(result.table())
        if panels is not None:
            click.echo(f"\npanels      {panels}")


@cli.command("train")
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="YAML config or preset name in configs/ (default: configs/default.yaml).")
@click.option("--data", multiple=True, type=click.Path(), metavar="PATH",
              help="Training data folder(s); repeat for several (overrides data.root).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for checkpoints, history.csv and learning_curves.png (default saved_models).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=5 (repeatable).")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, metavar="CKPT",
              help="Continue the run of this last.pt (optimizer, scheduler, epoch, early stopping).")
@device_option("Where to train (default: train.device, auto).")
@progress_option
def train_command(
    config_path: str | None, data: tuple[str, ...], out_dir: str | None,
    overrides: tuple[str, ...], resume: str | None, device: str | None, progress_format: ProgressFormat,
) -> None:
    """Train a rooftop segmentation model (DeepLabV3+ by default) on labelled scenes.

    With no options: dataset/ in the seed layout and configs/default.yaml.
    Under torchrun (torchrun --nproc_per_node N -m geoseg.train ...) every
    process trains with DistributedDataParallel; rank 0 writes the outputs.
    """
    import dataclasses
    import os

    from geoseg.config import load_config
    from geoseg.engine import fit
    from geoseg.progress import progress_reporter

    config = load_config(config_path or "default", overrides)
    train_cfg = config.train
    if out_dir is not None:
        train_cfg = dataclasses.replace(train_cfg, out_dir=out_dir)
    if device is not None:
        train_cfg = dataclasses.replace(train_cfg, device=device)
    data_cfg = dataclasses.replace(config.data, root=tuple(data)) if data else config.data
    config = dataclasses.replace(config, data=data_cfg, train=train_cfg)
    main_rank = os.environ.get("RANK", "0") == "0"
    reporter = progress_reporter(progress_format)
    finished: list[int] = []  # epochs whose checkpoints (last.pt among them) are saved

    def progress(event: Any) -> None:
        if event.kind in ("start", "epoch"):
            reporter.message(event.message, **({"epoch": event.epoch, "epochs": event.epochs}
                                               if event.kind == "epoch" else {}))
            if event.kind == "epoch":
                finished.append(event.epoch)
            return
        reporter.update(event.stage, event.step, event.steps, label=f"epoch {event.epoch}/{event.epochs} "
                        f"{event.stage}", unit="batch", epoch=event.epoch, epochs=event.epochs,
                        loss=event.loss, iou=event.iou)

    try:
        result = fit(config, resume=resume, progress=progress if main_rank else None, config_file=config_path)
    except KeyboardInterrupt:  # say what is kept: last.pt of the last finished epoch
        from pathlib import Path

        from geoseg.engine.records import LAST

        last = Path(config.train.out_dir) / LAST
        say_kept(f"kept {last} of epoch {finished[-1]} (continue with --resume {last})" if finished
                 else f"no epoch finished, {resume} is as it was" if resume
                 else "no epoch finished, no checkpoint was written")
        raise
    if main_rank:
        reporter.finish()
        best = result.best_metrics
        where = "val" if best.get("val_iou") is not None else "train"
        if best:
            click.echo(f"best {where} rooftop IoU {best[f'{where}_iou']:.4f} at epoch {best['epoch']}")
        click.echo(f"checkpoints in {result.out_dir}: {result.best_iou.name}, {result.best_loss.name}, "
                   f"{result.last.name}; history.csv, learning_curves.png")


@cli.command("chip")
@click.argument("scenes", nargs=-1, type=click.Path())
@click.option("--labels", multiple=True, type=click.Path(),
              help="One vector label file for all scenes, or one label raster per scene "
                   "(repeat the option, same order as SCENE).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder: images/, labels/ and index.gpkg.")
@click.option("--size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Chip side in pixels.")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Step between chips in pixels [default: --size, no overlap].")
@click.option("--resolution", type=click.FloatRange(0, min_open=True), default=None, metavar="METRES",
              help="Cut every scene on its grid at this ground resolution (read resampled: images bilinear, "
                   "labels nearest) [default: each scene as it is].")
@overwrite_option("Replace existing chips and index.")
@assume_crs_option()
@click.option("--demo", "demo_dir", type=click.Path(file_okay=False), default=None,
              help="Generate a synthetic scene in this folder and chip it into DIR/chips.")
def chip_command(
    scenes: tuple[str, ...], labels: tuple[str, ...], out_dir: str | None, size: int,
    stride: int | None, overwrite: bool, assume_crs: str | None, demo_dir: str | None,
    resolution: float | None,
) -> None:
    """Cut SCENE(s) (images or dataset folders) into georeferenced GeoTIFF chips.

    Writes OUT/images/<scene>_<row>_<col>.tif (row, col: pixel offsets in the
    scene), OUT/labels/... when labels are given (class ids, 255 = ignore), and
    OUT/index.gpkg (layer 'chips': footprints, scene, window, file paths).
    """
    from geoseg.chipping import chip_demo, chip_scenes

    if demo_dir is not None:
        if scenes or out_dir:
            raise click.UsageError("--demo takes no SCENE and no --out")
        image, result = chip_demo(demo_dir, size=size, overwrite=overwrite)
        click.echo(f"generated {image}")
    else:
        if not scenes:
            raise click.UsageError("give at least one SCENE (or --demo DIR)")
        if out_dir is None:
            raise click.UsageError("missing option '--out'")
        result = chip_scenes(scenes, out_dir=out_dir, labels=labels, size=size, stride=stride,
                             overwrite=overwrite, assume_crs=assume_crs, resolution=resolution)
    click.echo(f"wrote {len(result.images)} chips from {result.scenes} scene(s) to "
               f"{result.out_dir} (index: {result.index}, layer 'chips')")


@cli.command("predict")
@click.argument("scenes", nargs=-1, required=True, metavar="SCENE...")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Polygon output; the format follows the extension: .gpkg (layer 'rooftops', QGIS "
                   "style included), .geojson, .fgb, .shp.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None, metavar="CKPT",
              help="Checkpoint [default: saved_models/best_iou.pt].")
@click.option("--mask-out", default=None, metavar="PATH",
              help="Also write the uint8 class mask (255 = nodata). One scene: a .tif file. Several "
                   "scenes: a folder (gets SCENE_mask.tif files) or a template with {scene}, "
                   "e.g. masks/{scene}.tif.")
@click.option("--prob-out", default=None, metavar="PATH",
              help="Also write the rooftop probability (uint8: value/254, 255 = nodata; or float16 "
                   "with --prob-dtype); an instances model adds border and contact bands. File, folder "
                   "or {scene} template as for --mask-out.")
@click.option("--prob-dtype", type=click.Choice(["uint8", "float16"]), default="uint8", show_default=True,
              help="Storage of --prob-out.")
@click.option("--aoi", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Polygon file (any CRS; several polygons: their union): predict only there. Blocks and "
                   "chips outside it are not read or run, raster pixels outside it are nodata, polygons are "
                   "cut to it. With several scenes, those it does not touch are skipped with a warning.")
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="YAML config whose 'predict' section gives the defaults of the options below.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Chips per model call [default: 16 on a CPU, 128 on a GPU; predict.batch_size of --config].")
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help="Overlap between chips in pixels [default: a quarter of the chip].")
@click.option("--block-size", type=click.IntRange(min=16), default=None,
              help="Pixels per block processed at once (memory) [default: 2048].")
@click.option("--tta/--no-tta", default=None, help="Average the predictions of flipped chips.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Rooftop probability threshold [default: 0.5].")
@click.option("--min-area", type=click.FloatRange(min=0), default=None,
              help="Drop polygons smaller than this, in m² [default: 4].")
@click.option("--simplify", type=click.FloatRange(min=0), default=None,
              help="Simplification tolerance in metres, 0 for none [default: 0.25].")
@click.option("--regularize/--no-regularize", default=None,
              help="Square building outlines to their dominant directions [default: no].")
@device_option("Where the model runs [default: auto].")
@precision_option("auto: bf16 where the CPU/GPU has it; on a CPU without bf16, int8 for runs of 2000 chips "
                  "or more (with geoseg[onnx]), else fp32. int8: the model quantised by ONNX Runtime, "
                  "calibrated on chips of the scenes (CPU) [default: auto].", choices=PREDICT_PRECISIONS)
@click.option("--bands", default=None, metavar="B1,B2,...",
              help="Scene bands to feed the model instead of the checkpoint's: 1-based numbers and/or "
                   "names matched to the band descriptions, then colour interpretations (e.g. red,green,blue).")
@click.option("--resolution", "resolution", default=None, metavar="auto|native|METRES",
              help="Ground metres per pixel the model reads each scene at: auto (the checkpoint's, when the "
                   "scene's differs by more than 5%), native (as it is) or metres. The scene is read "
                   "resampled block by block; rasters are written on the scene's own grid [default: auto].")
@assume_crs_option()
@click.option("--rescale", is_flag=True,
              help="Map each band of a scene linearly onto the value range the model learned (its 1st-99th "
                   "percentiles onto the training data's), e.g. 16-bit imagery on a model trained on 8-bit; "
                   "without it such scenes are refused.")
@click.option("--preview", default=None, metavar="PATH",
              help="Also draw the scene (downsampled) with its polygons into a PNG. Several scenes: "
                   "a folder (gets SCENE_preview.png files) or a template with {scene}.")
@click.option("--asset", default=None, metavar="NAME",
              help="With STAC items as SCENE: the asset (key) of each item to predict [default: 'visual', "
                   "else the first RGB GeoTIFF].")
@compile_option("torch.compile the model: slower start (about 30 s), faster chips [default: on a "
                "CPU for scenes of 20000 chips or more, 4000 on a CPU with AMX].", negatable=True)
@click.option("--instances/--no-instances", default=None,
              help="Split touching buildings into one polygon each (seeded watershed on the border and "
                   "contact a model trained with model.target=instances predicts) [default: when the "
                   "checkpoint has them].")
@click.option("--seed-threshold", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --instances: a rooftop pixel seeds a building where its border and contact "
                   "probabilities are below this [default: 0.5].")
@overwrite_option("Replace existing outputs.")
@progress_option
def predict_command(
    scenes: tuple[str, ...], out: str, model_path: str | None, mask_out: str | None,
    prob_out: str | None, prob_dtype: ProbDtype, config_path: str | None, batch_size: int | None,
    overlap: int | None, block_size: int | None, tta: bool | None, threshold: float | None,
    min_area: float | None, simplify: float | None, regularize: bool | None, device: str | None,
    precision: str | None, bands: str | None, assume_crs: str | None, preview: str | None,
    compile_model: bool | None, instances: bool | None, seed_threshold: float | None, overwrite: bool,
    rescale: bool, progress_format: ProgressFormat, aoi: str | None, asset: str | None,
    resolution: str | None,
) -> None:
    """Find rooftops in SCENE(s) (files, folders, globs, URLs or STAC items) and write polygons to --out.

    A SCENE may also be remote: a URL (https://..., s3://..., gs://...) or a GDAL path
    (/vsicurl/..., /vsis3/...), of which only the windows needed are read, or a STAC
    item or item collection (.json file or URL), whose --asset is predicted for each item.
    All scenes go into one layer with a 'scene' attribute (reprojected to the
    first scene's CRS if they differ). Nothing is written unless the whole run
    succeeds. Under torchrun (torchrun --nproc_per_node N -m geoseg predict ...)
    each process predicts a share of the scenes on its own GPU and rank 0
    merges them into the one layer.
    """
    import dataclasses

    from geoseg.config import load_config
    from geoseg.inputs import check_model_path, resolve_scenes
    from geoseg.progress import progress_reporter
    from geoseg.resample import parse_resolution

    wanted = parse_resolution(resolution) if resolution is not None else None
    # Missing scenes or checkpoint are answered before torch and the model stack are imported.
    resolve_scenes(scenes, asset=asset)
    check_model_path(model_path)
    from geoseg.inference.job import predict

    band_list = None
    if bands is not None:
        from geoseg.bands import band_spec

        try:
            band_list = list(band_spec([b for b in bands.split(",") if b.strip()]))
        except ValueError as exc:
            raise click.BadParameter(f"{bands!r}: {exc}; give band numbers or names like 1,2,3 or red,green,blue",
                                     param_hint="--bands")
    # Defaults < --config's predict section < flags.
    flags = dict(batch_size=batch_size, overlap=overlap, block_size=block_size, tta=tta, threshold=threshold,
                 min_area=min_area, simplify=simplify, regularize=regularize, device=device, precision=precision,
                 compile=compile_model, instances=instances, seed_threshold=seed_threshold, resolution=wanted)
    config = dataclasses.replace(load_config(config_path).predict,
                                 **{k: v for k, v in flags.items() if v is not None})
    reporter = progress_reporter(progress_format)

    def progress(name: str, done: int, total: int) -> None:
        reporter.update("predict", done, total, label=name, unit="chip", scene=name)

    summary = predict(
        scenes, out=out, config=config, model_path=model_path, mask_out=mask_out, prob_out=prob_out,
        prob_dtype=prob_dtype, preview=preview, bands=band_list, assume_crs=assume_crs,
        rescale=rescale, overwrite=overwrite, config_file=config_path, progress=progress, aoi=aoi,
        asset=asset,
    )
    reporter.finish()
    for res in summary.results:
        n = res.polygon_count
        extra = "".join(f", {kind} {p}" for kind, p in (("mask", res.mask_path), ("prob", res.prob_path)) if p)
        at = f", read at {res.resolution:.3g} m/px" if res.resolution else ""
        click.echo(f"{res.name}: {n} polygons, {res.chips_predicted} chips in {res.seconds:.1f} s "
                   f"({res.chips_per_s:.1f} chips/s, {res.device}, {res.precision}"
                   f"{', compiled' if res.compiled else ''}{at}){extra}")
    if summary.shard.rank == 0:
        ranks = f" (merged from {summary.shard.world} ranks)" if summary.shard.active else ""
        click.echo(f"wrote {summary.features} polygons to {summary.out}{ranks}")
    for png in summary.previews:
        click.echo(f"preview {png}")


@cli.command("benchmark")
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None, metavar="CKPT",
              help="Checkpoint to benchmark (default: --encoder with random weights).")
@click.option("--encoder", default="resnet50", show_default=True,
              help="smp encoder of the DeepLabV3+ benchmarked when no --model is given.")
@click.option("--scene", type=click.Path(dir_okay=False), default=None,
              help="Scene to predict (default: a generated scene of --size).")
@click.option("--size", default="2048x2048", show_default=True, metavar="WxH",
              help="Size in pixels of the generated scene.")
@click.option("--tiles", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Predict N generated scenes of --size as one run, as geoseg predict does (a scene's last "
                   "chips share a batch with the next scene's), and each with batches of its own, to compare.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help="Chip overlap in pixels [default: a quarter of the chip].")
@device_option(default="auto")
@precision_option("auto: bf16 where the hardware has it. int8: the model quantised by ONNX Runtime, "
                  "calibrated on chips of the scene (CPU).", default="auto", choices=PREDICT_PRECISIONS)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed repeats (medians are reported).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads.")
@click.option("--scaling", default=None, metavar="N,N,...",
              help="Also predict square scenes of these sizes, each in a fresh process "
                   "(time and peak memory per size), e.g. 1000,5000,10000,20000.")
@click.option("--resolution", default="native", show_default=True, metavar="auto|native|METRES",
              help="Ground resolution the --scaling runs read their (0.3 m) scenes at, e.g. 0.6: each is "
                   "predicted on a grid of half its side and its mask written back on its own grid.")
@compile_option("torch.compile the model for the model-only and end-to-end measurements "
                "(the compile is untimed warm-up).", negatable=False)
@click.option("--train", "train_mode", is_flag=True,
              help="Measure training throughput instead: the real training step in fp32 and each "
                   "mixed precision the device has (or fp32 and --precision), from one run.")
@click.option("--agreement", default=None, metavar="SCENES",
              help="Instead: predict these scenes (file, folder or glob) with --model in fp32 and in "
                   "--precision (default bf16) and report the share of pixels whose class agrees.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def benchmark_command(
    model_path: str | None, encoder: str, scene: str | None, size: str, batch_size: int,
    overlap: int | None, device: str, precision: str, repeats: int, threads: int | None,
    scaling: str | None, compile_model: bool, train_mode: bool, agreement: str | None, as_json: bool,
    resolution: str, tiles: int,
) -> None:
    """Measure model-only vs end-to-end prediction speed, stages, memory and FLOP use."""
    import json

    from geoseg.benchmarks import AgreementResult, TrainBenchmark, benchmark
    from geoseg.resample import parse_resolution

    say = (lambda msg: None) if as_json else (lambda msg: click.echo(f"... {msg}", err=True))
    result = benchmark(
        model_path=model_path, encoder=encoder, scene=scene, size=size, batch_size=batch_size,
        overlap=overlap, device=device, precision=precision, repeats=repeats, threads=threads,
        scaling=scaling, compile=compile_model, train=train_mode, agreement=agreement, progress=say,
        resolution=parse_resolution(resolution), tiles=tiles,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    elif isinstance(result, TrainBenchmark):
        _echo_training(result)
    elif isinstance(result, AgreementResult):
        _echo_agreement(result)
    else:
        _echo_speed(result)


def _echo_speed(r: Any) -> None:
    click.echo(f"model      {r.model} on {r.device} ({r.precision}, {r.threads} threads, batch {r.batch_size}"
               f"{', torch.compile' if r.compiled else ''})")
    scenes = f"{r.tiles} scenes of " if r.tiles > 1 else ""
    click.echo(f"scene      {scenes}{r.scene} {r.scene_size[0]}x{r.scene_size[1]} px, {r.chips} chips of "
               f"{r.chip_size} px, overlap {r.overlap} px")
    click.echo(f"model only {r.model_chips_per_s:8.2f} chips/s")
    click.echo(f"end to end {r.e2e_chips_per_s:8.2f} chips/s   ratio {r.ratio:.3f} (e2e / model), "
               f"{r.model_calls} model calls")
    if r.own_batches_chips_per_s is not None:
        click.echo(f"own batches{r.own_batches_chips_per_s:8.2f} chips/s   each scene with batches of its own, "
                   f"{r.own_batches_calls} model calls; shared batches are "
                   f"{r.e2e_chips_per_s / r.own_batches_chips_per_s:.2f}x faster")
    if r.replay_chips_per_s is not None:
        click.echo(f"replayed   {r.replay_chips_per_s:8.2f} chips/s   end to end with the model's outputs replayed "
                   f"(its time zero): what the rest sustains here")
    click.echo(f"baseline   {r.baseline_chips_per_s:8.2f} chips/s   (fp32 per-chip loop); "
               f"geoseg is {r.speedup_vs_baseline:.2f}x faster")
    click.echo("stages     " + ", ".join(f"{k} {v:.2f} s" for k, v in r.stages.items())
               + f"  (wall {r.e2e_seconds:.2f} s; stages overlap in threads)")
    gpu = "" if r.peak_gpu_mb is None else f", GPU {r.peak_gpu_mb:.0f} MB"
    click.echo(f"memory     peak RSS {r.peak_rss_mb:.0f} MB{gpu}")
    click.echo(f"FLOPs      {r.flops_per_chip / 1e9:.1f} GFLOP/chip, matmul {r.matmul_tflops * 1000:.0f} GFLOP/s, "
               f"MFU {r.mfu:.1%}")
    for p in r.scaling:
        split = f", split {p.stages['split']:.1f} s" if "split" in p.stages else ""
        grid = f" (read at {p.resolution:.3g} m/px: {p.grid[0]}x{p.grid[1]})" if p.grid else ""
        click.echo(f"scaling    {p.width}x{p.height}{grid}: {p.chips} chips in {p.seconds:.1f} s "
                   f"({p.chips_per_s:.2f} chips/s), peak RSS {p.peak_rss_mb:.0f} MB, {p.polygons} polygons, "
                   f"vectorise {p.stages.get('vectorise', 0.0):.1f} s{split}")


def _echo_agreement(result: Any) -> None:
    out = result.to_dict()
    for s in result.scenes:
        click.echo(f"{s.scene:32} {s.agreement:9.5f}  ({s.pixels - s.agree} of {s.pixels} pixels differ)")
    click.echo(f"fp32 vs {result.precision} on {len(result.scenes)} scene(s), {result.device}: "
               f"{out['agreement']:.5f} of {out['pixels']} pixels agree; rooftop IoU between the two masks "
               f"{out['rooftop_iou']:.5f}")


def _echo_training(result: Any) -> None:
    out = result.to_dict()
    click.echo(f"training   {result.model} on {result.device} ({result.threads} threads, batch "
               f"{result.batch_size}, {result.chip_size} px chips, {result.steps} steps x {result.repeats})")
    for p in result.points:
        gpu = "" if p.peak_gpu_mb is None else f", peak GPU {p.peak_gpu_mb:.0f} MB"
        click.echo(f"{'fp' + p.precision if p.precision in ('32', '16') else p.precision:10} "
                   f"{p.chips_per_s:8.2f} chips/s  ({out['speedup_vs_fp32'].get(p.precision, 1):.2f}x fp32{gpu})")


@cli.command("export")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--out", required=True, type=click.Path(), metavar="FILE",
              help="The exported model: MODEL.onnx for ONNX (geoseg predict --model MODEL.onnx runs it).")
@click.option("--format", "export_format", default="onnx", show_default=True, metavar="[onnx|torchscript]",
              help="onnx: ONNX Runtime, TensorRT, OpenVINO, ...; torchscript: LibTorch/C++ "
                   "(deprecated by PyTorch).")
@click.option("--int8", "int8", multiple=True, metavar="SCENES",
              help="Quantise the ONNX model to int8, calibrated on chips spread over these scenes "
                   "(files, folders or globs; repeatable): what --precision int8 does at each predict, once.")
@overwrite_option("Replace an existing --out.")
def export_model_command(checkpoint: str, out: str, export_format: ExportFormat, int8: tuple[str, ...],
                         overwrite: bool) -> None:
    """Export the model of checkpoint CKPT to ONNX (or TorchScript), its self-description inside.

    The exported model takes normalised chips (N, bands, chip, chip), any batch size
    N, and returns logits (a model trained with data.stretch wants the chips stretched
    before they are normalised); the checkpoint's bands, stretch, normalisation, chip size, ground
    resolution, classes and target are stored in it (ONNX: metadata_props key
    'geoseg', JSON). Needs pip install 'geoseg[onnx]' for ONNX.
    """
    from geoseg.model_export import export_model

    result = export_model(checkpoint, out=out, format=export_format, overwrite=overwrite,
                          int8=list(int8) if int8 else None)
    m = result.meta
    kind = f"{result.format}, int8" if int8 else result.format
    click.echo(f"wrote {result.path} ({kind}, {m.arch}/{m.encoder}, {m.in_channels} bands, "
               f"{m.chip_size} px chips, {m.out_channels} outputs, any batch size) in {result.seconds:.1f} s")
    if result.format == "onnx":
        click.echo(f"predict with: geoseg predict SCENE.tif --model {result.path} --out roofs.gpkg")


# The name sessions before 27 documented: still accepted, not listed.
_export_alias = copy.copy(export_model_command)
_export_alias.hidden = True
cli.add_command(_export_alias, name="export-model")


@cli.command("quickstart")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False), default="geoseg-quickstart",
              show_default=True, help="Output folder (must be empty unless --overwrite).")
@overwrite_option("Replace the outputs of an earlier quickstart in --dir.")
@device_option("Where to train and predict.", default="auto")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs [default: train.epochs of configs/quickstart.yaml].")
def quickstart_command(out_dir: str, overwrite: bool, device: Device, epochs: int | None) -> None:
    """Generate scenes, train a small model, find the roofs of an unseen scene, evaluate them.

    A few minutes on a laptop CPU. Writes roofs.gpkg, mask.tif, preview.png and
    evaluation.json into --dir, with the training data, model and test scene
    beside them, and says how to open them in QGIS.
    """
    from geoseg.quickstart import run_quickstart

    def say(message: str) -> None:
        click.echo(f"... {message}", err=True)

    try:
        r = run_quickstart(out_dir, device=device, overwrite=overwrite, epochs=epochs,
                           progress=say)
    except KeyboardInterrupt:
        say_kept(f"the steps finished so far are kept in {out_dir} (start again with --overwrite)")
        raise
    s = r.seconds
    click.echo(r.table)
    click.echo("")
    click.echo(f"quickstart done in {s['total']:.0f} s (data {s['data']:.0f} s, training {s['train']:.0f} s "
               f"for {r.epochs} epochs, prediction {s['predict']:.0f} s, evaluation {s['evaluate']:.0f} s)")
    click.echo(f"rooftop IoU {r.iou:.4f}, object F1 {r.object_f1:.4f} on {r.scene}, a scene the model never saw")
    click.echo("")
    click.echo(f"outputs in {r.out_dir}/")
    rows = [
        (r.roofs, f"{r.polygons} rooftop polygons (layer 'rooftops', QGIS style included)"),
        (r.mask, "predicted mask (0 background, 1 rooftop, 255 nodata)"),
        (r.preview, "picture of the scene with the polygons drawn over it"),
        (r.evaluation, f"pixel and object metrics of {r.roofs.name} against the true buildings "
                       "(as geoseg evaluate --json)"),
        (r.scene, "the predicted scene (true roofs: " + r.truth_roofs.name + ")"),
        (r.checkpoint, "the trained model (learning curves: " + r.curves.name + ")"),
        (r.data_dir, "the generated training data (images/, labels/, buildings.gpkg)"),
    ]
    width = max(len(str(path)) for path, _ in rows)
    for path, what in rows:
        click.echo(f"  {str(path):<{width}}  {what}")
    click.echo("")
    click.echo("open in QGIS: drag roofs.gpkg, mask.tif and the scene into the QGIS window, or use "
               "Layer > Add Layer > Add Vector Layer... for")
    click.echo(f"  {r.roofs} (the layer comes styled) and Layer > Add Layer > Add Raster Layer... for {r.scene}")
    click.echo("next: geoseg train --data YOUR_DATASET, then geoseg predict YOUR_SCENE.tif --out roofs.gpkg "
               "--preview preview.png")


@cli.group("qgis")
def qgis_group() -> None:
    """geoseg inside QGIS: install the Processing plugin (Find rooftops, Evaluate rooftops, Train)."""


@qgis_group.command("install")
@click.option("--profile", default="default", show_default=True, help="QGIS user profile to install into.")
@click.option("--python", "python", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Python of the environment that runs geoseg for QGIS, e.g. a GPU environment's "
                   "bin/python [default: this one].")
def qgis_install_command(profile: str, python: str | None) -> None:
    """Copy the plugin into a QGIS profile, record the Python that runs geoseg, enable the plugin.

    The profile folder is <QGIS settings>/profiles/PROFILE ($QGIS_CUSTOM_CONFIG_PATH, else
    ~/.local/share/QGIS/QGIS3 on Linux, ~/Library/Application Support/QGIS/QGIS3 on macOS,
    %APPDATA%\\QGIS\\QGIS3 on Windows).
    """
    from geoseg.qgis_install import install_plugin

    r = install_plugin(profile=profile, python=python)
    click.echo(f"{'replaced' if r.replaced else 'installed'} geoseg's QGIS plugin in {r.plugin_dir}")
    click.echo(f"it runs geoseg {r.geoseg_version} with {r.python}")
    if r.enabled:
        click.echo(f"enabled in {r.settings}; restart QGIS (if QGIS is open, it may turn this off when it "
                   "closes: enable geoseg in Plugins > Manage and Install Plugins)")
    else:
        click.echo(f"{r.settings} could not be read as text, left as it was: enable geoseg in QGIS "
                   "(Plugins > Manage and Install Plugins)")
    click.echo("algorithms: Processing > Toolbox > geoseg (Find rooftops, Evaluate rooftops, Train a rooftop "
               "model); qgis_process run geoseg:findrooftops")


@qgis_group.command("uninstall")
@click.option("--profile", default="default", show_default=True, help="QGIS user profile to remove it from.")
def qgis_uninstall_command(profile: str) -> None:
    """Remove the plugin from a QGIS profile."""
    from geoseg.qgis_install import uninstall_plugin

    click.echo(f"removed {uninstall_plugin(profile=profile)}; restart QGIS")


@qgis_group.command("package")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.zip",
              help="The zip to write.")
@overwrite_option("Replace an existing --out.")
def qgis_package_command(out: str, overwrite: bool) -> None:
    """Zip the plugin for QGIS's plugin manager (Plugins > Manage and Install Plugins > Install from ZIP)."""
    from geoseg.qgis_install import package_plugin

    click.echo(f"wrote {package_plugin(out, overwrite=overwrite)}; it runs $GEOSEG_PYTHON -m geoseg or the "
               "geoseg on PATH, or run geoseg qgis install --python PATH to record an environment")


def main() -> None:
    """Console-script entry point."""
    with sigterm_as_interrupt():
        cli(prog_name="geoseg")


if __name__ == "__main__":
    sys.exit(main())
