"""City hold-out accuracy on the OpenAerialMap building tiles: train on two cities, score the third.

For each held-out city this runs the same geoseg commands a user would:

    geoseg train --config oam_cpu --data DATA --set data.split_file=oam_val_CITY --out-dir OUT/CITY
    geoseg predict DATA/images/CITY_*.tif --model OUT/CITY/best_iou.pt \
        --mask-out OUT/CITY/masks --out OUT/CITY/roofs.gpkg

then scores every held-out tile against its label and adds the counts over the city:
pixel metrics from the masks (confusion counts summed over the tiles), object metrics
(SpaceNet matching at IoU >= 0.5) from the polygons of roofs.gpkg, the layer users get.
Writes OUT/summary.json (``--summary``) and prints a Markdown table.

    python examples/oam_holdout.py --data ../shared/data/hotosm-oam-buildings --out runs/oam
    python examples/oam_holdout.py --cities kampala --set train.epochs=3   # a quick try
    python examples/oam_holdout.py --extra-data ../shared/data/hotosm-oam-more --out runs/oam_more
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

CITIES = ("kampala", "catanduanes", "zanzibar")


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ratio(num: float, den: float, *, empty: float) -> float:
    return num / den if den else empty


def score_city(data: Path, city: str, out: Path, tiles: list[Path]) -> dict:
    """Pixel counts from the masks, object counts from the GeoPackage, summed over the tiles.

    Objects are scored against ``DATA/buildings.gpkg`` (one polygon per building, clipped to each
    tile) where the dataset has it: two houses that share a wall are two true objects. Objects of
    the label rasters (4-connected regions, touching houses merged) are kept as
    ``object_vs_label_regions`` for comparison with earlier reports.
    """
    from geoseg.evaluation import evaluate

    import tempfile

    import geopandas as gpd
    import rasterio
    import shapely

    px = dict(tp=0, fp=0, fn=0, tn=0)
    ob = dict(tp=0, fp=0, fn=0)
    raw = dict(tp=0, fp=0, fn=0)  # objects of the raw mask (no min-area, no simplification, no split)
    regions = dict(tp=0, fp=0, fn=0)  # the GeoPackage against the label rasters' regions
    buildings = data / "buildings.gpkg"
    polygons = gpd.read_file(out / "roofs.gpkg", layer="rooftops")
    with tempfile.TemporaryDirectory(prefix="oam-holdout-") as folder:  # per-tile layers and AOIs
        tmp = Path(folder)
        for tile in tiles:
            label = data / "labels" / tile.name
            mask = out / "masks" / f"{tile.stem}_mask.tif"
            by_mask = evaluate(mask, label).to_dict()
            own = tmp / f"{tile.stem}.gpkg"  # this tile's polygons (the layer holds the whole city)
            polygons[polygons["scene"] == tile.stem].to_file(own, layer="rooftops")
            by_poly = evaluate(own, label).to_dict()
            truth, mask_truth = by_poly, by_mask
            if buildings.exists():
                with rasterio.open(tile) as src:
                    aoi = tmp / f"{tile.stem}_aoi.gpkg"
                    gpd.GeoDataFrame(geometry=[shapely.box(*src.bounds)], crs=src.crs).to_file(aoi)
                truth = evaluate(own, buildings, aoi=aoi).to_dict()
                mask_truth = evaluate(mask, buildings, aoi=aoi).to_dict()
            for k in px:
                px[k] += by_mask["pixel"][k]
            for k in ob:
                ob[k] += truth["object"][k]
                raw[k] += mask_truth["object"][k]
                regions[k] += by_poly["object"][k]

    def objects(c: dict) -> dict:
        p = ratio(c["tp"], c["tp"] + c["fp"], empty=1.0 if not c["fn"] else 0.0)
        r = ratio(c["tp"], c["tp"] + c["fn"], empty=1.0 if not c["fp"] else 0.0)
        return {**c, "precision": p, "recall": r, "f1": ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"], empty=1.0)}

    tp, fp, fn, tn = px["tp"], px["fp"], px["fn"], px["tn"]
    pixel = {
        **px, "iou": ratio(tp, tp + fp + fn, empty=1.0), "precision": ratio(tp, tp + fp, empty=1.0),
        "recall": ratio(tp, tp + fn, empty=1.0), "f1": ratio(2 * tp, 2 * tp + fp + fn, empty=1.0),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn, empty=1.0),
    }
    return {"tiles": len(tiles), "pixel": pixel, "object": objects(ob), "object_raw_mask": objects(raw),
            "object_vs_label_regions": objects(regions),
            "object_truth": "buildings.gpkg" if buildings.exists() else "label regions"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/hotosm-oam-buildings", type=Path)
    ap.add_argument("--out", default="runs/oam", type=Path)
    ap.add_argument("--extra-data", action="append", default=[], type=Path, metavar="DIR",
                    help="more training folders (e.g. ../shared/data/hotosm-oam-more); the split file holds the "
                         "city out of them too, and scoring stays on --data's tiles of that city")
    ap.add_argument("--config", default="oam_cpu", help="geoseg preset or YAML file")
    ap.add_argument("--cities", default=",".join(CITIES))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--predict-args", default="", help="extra geoseg predict options, e.g. '--tta'")
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/CITY/best_iou.pt")
    ap.add_argument("--summary", default="summary.json", help="results file in OUT (e.g. summary_tta.json)")
    args = ap.parse_args(argv)

    geoseg = [sys.executable, "-m", "geoseg"]
    summary: dict[str, dict] = {}
    summary_path = args.out / args.summary
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    for city in [c.strip() for c in args.cities.split(",") if c.strip()]:
        out = args.out / city
        tiles = sorted((args.data / "images").glob(f"{city}_*.tif"))
        if not tiles:
            print(f"{args.data / 'images'}: no {city}_*.tif tiles; check --data", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        if not args.skip_train:
            data = [a for d in (args.data, *args.extra_data) for a in ("--data", str(d))]
            run([*geoseg, "train", "--config", args.config, *data, "--out-dir", str(out),
                 "--set", f"data.split_file=oam_val_{city}", *[a for s in args.overrides for a in ("--set", s)]])
        train_s: float | None = round(time.perf_counter() - t0, 1)
        run([*geoseg, "predict", *map(str, tiles), "--model", str(out / "best_iou.pt"), "--mask-out",
             str(out / "masks"), "--out", str(out / "roofs.gpkg"), "--overwrite", *shlex.split(args.predict_args)])
        result = score_city(args.data, city, out, tiles)
        history = (out / "history.csv").read_text().splitlines()
        if args.skip_train:  # the training time of the run that trained, if this file has it
            train_s = summary.get(city, {}).get("train_seconds")
        result.update(epochs=len(history) - 1, train_seconds=train_s, extra_data=[d.name for d in args.extra_data],
                      config=args.config, overrides=args.overrides, predict_args=args.predict_args)
        summary[city] = result
        args.out.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))

    print("\n| held-out city | tiles | rooftop IoU | pixel F1 | object P | object R | object F1 | epochs | train time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for city, r in summary.items():
        t = r["train_seconds"]
        print(f"| {city} | {r['tiles']} | {r['pixel']['iou']:.3f} | {r['pixel']['f1']:.3f} | "
              f"{r['object']['precision']:.3f} | {r['object']['recall']:.3f} | {r['object']['f1']:.3f} | "
              f"{r['epochs']} | {'-' if t is None else f'{t / 60:.1f} min'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
