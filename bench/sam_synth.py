"""Cut-paste synthetic data for semantic segmentation (nuclei, buildings): real vs synthetic vs both, tested on real tiles.

Run: python bench/sam_synth.py --data DIR [--dataset nuclei] [--seeds 0 1 2] [--n 200] [--segment-args ...]
     [--variants real synthetic both] [--synth-args synth.objects_per_image=[1,3] ...]

For each split seed (`stratified_mask_split` of the dataset's tiles, as every segmentation benchmark here):

1. ``vfmtune synth objects=<a run of that split> n=N``: scenes made only from the training tiles' objects, pasted
   onto the training tiles themselves (their own objects kept: copy-paste), seeded by the split seed. Validation
   and test tiles are never cut from; training with ``data.synthetic`` would refuse them if they were.
2. ``task=segment`` (the segmentation issue's best model, `--segment-args`) trained on
   (a) the real training tiles, (b) the synthetic scenes only (a manifest: synthetic images as train, the
   split's real val/test tiles as val/test), (c) both (``data.synthetic=DIR``); all tested on the real test tiles.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

from common import write_results

import vfmtune


def split_run(data: Path, work: Path, seed: int, segment_args: list[str]) -> Path:
    """A run with no training whose splits.csv fixes the seed's split, prepared by task=segment with the same
    settings as the trained variants (a recipe's val/test fractions included), so the synthetic scenes' objects
    come from exactly the training tiles that variants (a) and (c) train on."""
    from vfmtune.compose import load_config, typed
    from vfmtune.run import start_run
    from vfmtune.tasks import get_task

    run = work / f"split_seed{seed}"
    if not (run / "splits.csv").is_file():
        config = typed(load_config("task=segment", f"data.root={data}", f"data.seed={seed}", *segment_args))
        get_task("segment").prepare(config, start_run(config, run, "train"))
    return run


def synthetic_only_manifest(synth: Path, run: Path, out: Path) -> Path:
    """``image,mask,split``: the synthetic scenes as train, the run's real val/test tiles as val/test."""
    rows = [(str(p), str(synth / "masks" / p.name), "train") for p in sorted((synth / "images").glob("*.png"))]
    with open(run / "splits.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] in ("val", "test"):
                image = Path(r["path"])
                rows.append((str(image), str(image.parent.parent / "masks" / f"{image.stem}.png"), r["split"]))
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "split"])
        writer.writerows(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--dataset", default="nuclei", choices=["nuclei", "buildings"], help="a folder of --data (bench/seg_data.py)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_sam_synth"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=200, help="synthetic scenes per seed")
    parser.add_argument("--segment-args", nargs="*", default=[], help="the segmentation task's best settings")
    parser.add_argument("--synth-args", nargs="*", default=[], help="`vfmtune synth` settings (synth.*); scenes are reused per --work")
    parser.add_argument("--variants", nargs="+", default=["real", "synthetic", "both"], choices=["real", "synthetic", "both"])
    parser.add_argument("--results", default="sam_synth")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    for seed in args.seeds:
        data = args.data / args.dataset
        run = split_run(data, args.work, seed, args.segment_args)
        synth = args.work / f"synth_seed{seed}"
        if not (synth / "synth.json").is_file():
            vfmtune.synth(overrides=[f"objects={run}", f"n={args.n}", f"seed={seed}", f"output={synth}", *args.synth_args], run_dir=args.work / f"synth_run{seed}")
        info = json.loads((synth / "synth.json").read_text())
        figures[f"synth.seed{seed}.images"], figures[f"synth.seed{seed}.instances"] = info["n_images"], info["n_instances"]
        manifest = synthetic_only_manifest(synth, run, args.work / f"synthetic_only_seed{seed}.csv")
        variants = {"real": [f"data.root={data}"], "synthetic": [f"data.manifest={manifest}"],
                    "both": [f"data.root={data}", f"data.synthetic={synth}"]}
        for name, data_args in ((k, v) for k, v in variants.items() if k in args.variants):
            overrides = ["task=segment", f"data.seed={seed}", *data_args, *args.segment_args]
            out = args.work / f"{name}_seed{seed}"
            if not (out / "metrics.json").is_file():
                vfmtune.train(overrides=overrides, run_dir=out)
            m = json.loads((out / "metrics.json").read_text())
            figures.update({f"segment.seed{seed}.{name}.{k.split('/', 1)[1]}": v for k, v in m.items()
                            if k.startswith("test/") and isinstance(v, float) and k.count("/") == 1})
            # a manifest does not say its images are synthetic: variant (b) trains on the scenes only
            synthetic = info["n_images"] if name == "synthetic" else m.get("train_images_synthetic")
            figures[f"segment.seed{seed}.{name}.train_images_synthetic"] = synthetic
    for name in args.variants:
        for metric in ("miou", "dice"):
            values = [figures[k] for seed in args.seeds if (k := f"segment.seed{seed}.{name}.{metric}") in figures]
            if values:
                figures[f"segment.{name}.{metric}.mean"] = round(statistics.mean(values), 4)
                figures[f"segment.{name}.{metric}.std"] = round(statistics.pstdev(values), 4)
    figures["segment.settings"] = " ".join(args.segment_args)
    figures["synth.settings"] = " ".join(args.synth_args)
    figures["dataset"] = args.dataset
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
