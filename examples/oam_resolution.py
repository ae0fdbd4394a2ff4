"""Held-out accuracy at other ground resolutions: a model trained at 0.15 m on 0.075 m and 0.30 m tiles.

``hotosm-oam-more`` holds the same ground as ``hotosm-oam-buildings`` (0.15 m, zoom 20) at
about 0.075 m (zoom 21) and 0.30 m (zoom 19). For each city, the model trained without that
city (``examples/oam_holdout.py``: MODELS/CITY/best_iou.pt) predicts the city's tiles at each
zoom twice, with the commands a user runs:

    geoseg predict MORE/images/CITY_z21_*.tif --model MODELS/CITY/best_iou.pt --resolution native ...
    geoseg predict MORE/images/CITY_z21_*.tif --model MODELS/CITY/best_iou.pt --resolution auto ...

(``native``: the tiles as they are; ``auto``: read at the model's 0.15 m), and the 0.15 m
tiles of ``hotosm-oam-buildings`` once, as the reference. Each run is scored as
``oam_holdout.score_city`` scores the hold-out (pixel IoU from the masks, which are on the
tiles' own grid either way; object F1 of the GeoPackage against ``buildings.gpkg``).
Writes OUT/summary.json and prints a Markdown table.

    python examples/oam_resolution.py --models /work/runs/rot_oam_cpu --out runs/oam_resolution
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oam_holdout import CITIES, run, score_city  # noqa: E402

ZOOMS = {"z21": "about 0.075 m", "z19": "about 0.30 m"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, type=Path, help="folder of MODEL/CITY/best_iou.pt (oam_holdout's --out)")
    ap.add_argument("--data", default="../shared/data/hotosm-oam-buildings", type=Path)
    ap.add_argument("--more", default="../shared/data/hotosm-oam-more", type=Path)
    ap.add_argument("--out", default="runs/oam_resolution", type=Path)
    ap.add_argument("--cities", default=",".join(CITIES))
    ap.add_argument("--predict-args", default="", help="extra geoseg predict options")
    ap.add_argument("--also", action="append", default=[], metavar="ZOOM:RESOLUTION",
                    help="more runs, e.g. z20:0.075 (the 0.15 m tiles read at 0.075 m: upsampled 2x)")
    args = ap.parse_args(argv)
    geoseg = [sys.executable, "-m", "geoseg"]
    summary: dict = {}
    summary_path = args.out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    for city in args.cities.split(","):
        model = args.models / city / "best_iou.pt"
        runs = [("z20", "auto", args.data)] + [(z, mode, args.more) for z in ZOOMS for mode in ("native", "auto")]
        runs += [(z, mode, args.data if z == "z20" else args.more) for z, mode in (a.split(":") for a in args.also)]
        for zoom, mode, data in runs:
            key = f"{city}/{zoom}/{mode}"
            if key in summary:
                continue
            tiles = sorted((data / "images").glob(f"{city}_{zoom}_*.tif"))
            if not tiles:
                continue
            out = args.out / city / f"{zoom}_{mode}"
            t0 = time.perf_counter()
            run([*geoseg, "predict", *map(str, tiles), "--model", str(model), "--resolution", mode,
                 "--mask-out", str(out / "masks"), "--out", str(out / "roofs.gpkg"), "--overwrite",
                 *args.predict_args.split()])
            seconds = time.perf_counter() - t0
            summary[key] = {**score_city(data, city, out, tiles), "seconds": seconds}
            args.out.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(summary, indent=2))
    print("| city | tiles | zoom | read at | pixel IoU | object F1 | precision | recall |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in summary.items():
        city, zoom, mode = key.split("/")
        print(f"| {city} | {r['tiles']} | {zoom} ({ZOOMS.get(zoom, 'about 0.15 m')}) | {mode} | "
              f"{r['pixel']['iou']:.3f} | {r['object']['f1']:.3f} | {r['object']['precision']:.3f} | "
              f"{r['object']['recall']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
