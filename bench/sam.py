"""SAM with real weights on this CPU: zero-shot box prompts, prompt fine-tuning, auto-mask and export speed.

Run: python bench/sam.py --data DIR [--part zeroshot finetune speed] [--seeds 0 1 2] [--epochs 8]

``DIR`` holds ``nuclei`` and ``quokka`` as ``python bench/seg_data.py --out DIR --dataset nuclei`` (and
``--dataset quokka``) write them; the full 512x512 DSB2018 image with its 125 instances is written next to
them as ``nuclei_full`` from the same pinned stardist wheel. Parts (results merge into bench/results/sam.json):

- ``zeroshot``: MobileSAM vs LiteMedSAM with ground-truth boxes (one prompt per instance) on the quokka (IoU
  vs its polygon), the 16 nuclei tiles and the full nuclei image: mean instance IoU, Dice, mask AP; the
  single-mask output (``sam.multimask=false``) vs the best of three by predicted IoU; fp32 vs bf16 autocast.
- ``finetune``: on nuclei tiles split by ``stratified_mask_split`` (data.seed = 0, 1, 2; 8 train / 4 val /
  4 test tiles, the splits every segmentation benchmark here uses), test-tile metrics of zero-shot MobileSAM,
  its decoder + prompt encoder fine-tuned on cached embeddings (finetune=frozen), and + LoRA on the encoder.
- ``speed``: auto-mask masks/s at 1, 10 and 50 boxes per image (embedding computed once and reused, and
  end to end); encoder latency of MobileSAM, LiteMedSAM and DINOv2-S; the ONNX bundle's box -> mask latency
  and its agreement with torch.

Every training and evaluation goes through vfmtune's own API (`vfmtune.train`, the task's evaluation), so
the figures are what a user gets. With 4 test tiles (~30 nuclei) per seed, one nucleus moves the mean
instance IoU by ~0.3 points: read differences below ~2 points as noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, write_results
from PIL import Image

import vfmtune
from vfmtune.compose import load_config, typed
from vfmtune.config import DataConfig
from vfmtune.inference import score
from vfmtune.sam import SamPromptPredictor, create_sam
from vfmtune.tasks import get_task
from vfmtune.tasks.sam_prompter import SamPrompter

sys.path.insert(0, str(Path(__file__).parent))
MODELS = ("mobile_sam", "lite_medsam")


def nuclei_full(data: Path) -> Path:
    """The whole 512x512 DSB2018 image with its 125 instances (images/, masks/, instances/), from the pinned wheel."""
    from seg_arrays import percentile_to_uint8
    from seg_data import FLUO_PERCENTILES, SOURCES, WheelReader, cache_root

    root = data / "nuclei_full"
    if (root / "instances" / "img2d.png").is_file():
        return root
    reader = WheelReader(SOURCES["stardist"], cache_root() / "wheels")
    raw, _ = reader.tiff("stardist/data/images/img2d.tif")
    inst, _ = reader.tiff("stardist/data/images/mask2d.tif")
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(percentile_to_uint8(raw, *FLUO_PERCENTILES)).save(root / "images" / "img2d.png")
    Image.fromarray((inst > 0).astype(np.uint8)).save(root / "masks" / "img2d.png")
    Image.fromarray(inst.astype(np.uint16)).save(root / "instances" / "img2d.png")
    (root / "classes.txt").write_text("background\nnucleus\n")
    return root


def zero_shot(model: str, root: Path, split: str, work: Path, *extra: str) -> dict[str, float]:
    """Test-set metrics of the packaged SAM with ground-truth boxes, through the task's own evaluation."""
    fractions = [] if split == "test" else ["data.val_fraction=0", "data.test_fraction=0"]
    cfg = typed(load_config("task=sam_prompt", f"model={model}", f"data.root={root}", "data.num_workers=0", *fractions, *extra))
    task = get_task("sam_prompt")
    prepared = task.prepare(cfg, work)
    sam = SamPrompter(cfg, prepared.table.classes)
    module, loader = task.evaluation(cfg, sam, prepared, split)
    t0 = time.perf_counter()
    out = score(module, loader, task.metrics, sam.classes, split, cfg)
    return {**_headline(out, split), "seconds": round(time.perf_counter() - t0, 1)}


def _headline(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    keys = ("instance_iou", "instance_dice", "mask_ap", "mask_ap50", "pq", "instances")
    return {k: round(float(metrics[f"{prefix}/{k}"]), 4) for k in keys if metrics.get(f"{prefix}/{k}") is not None}


def part_zeroshot(data: Path, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    sets = {"quokka": (data / "quokka", "train"), "nuclei_tiles": (data / "nuclei", "train"), "nuclei_full": (nuclei_full(data), "train")}
    for model in MODELS:
        for name, (root, split) in sets.items():
            for label, extra in (("", ()), (".multimask", ("sam.multimask=true",)), (".bf16", ("trainer.precision=bf16-mixed",))):
                if name == "nuclei_full" and label:
                    continue  # 125 boxes per variant: the tiles already answer these two questions
                r = zero_shot(model, root, split, work / f"zs_{model}_{name}{label}", *extra)
                print(f"zero-shot {model} {name}{label}: {r}")
                figures.update({f"zeroshot.{model}.{name}{label}.{k}": v for k, v in r.items()})
    return figures


def part_finetune(data: Path, work: Path, seeds: list[int], epochs: int, lora_epochs: int, extra: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    # bf16 autocast everywhere (zero-shot included, so the comparison is like for like): ~1.5x faster decoder
    # steps here; the zeroshot part measures what bf16 costs in accuracy.
    common = [f"data.root={data / 'nuclei'}", "model=mobile_sam", "data.num_workers=0", "trainer.enable_progress_bar=false",
              "trainer.precision=bf16-mixed", *extra]
    runs = {"decoder": ["finetune=frozen", f"trainer.max_epochs={epochs}"],
            "lora": ["finetune=lora", "finetune.rank=4", f"trainer.max_epochs={lora_epochs}"]}
    if lora_epochs == 0:  # --lora-epochs 0: the decoder fine-tune only
        del runs["lora"]
    for seed in seeds:
        zs = zero_shot("mobile_sam", data / "nuclei", "test", work / f"zs_seed{seed}", f"data.seed={seed}", *common[2:])
        figures.update({f"finetune.seed{seed}.zeroshot.{k}": v for k, v in zs.items()})
        for name, args in runs.items():
            run = work / f"{name}_seed{seed}"
            if not (run / "metrics.json").is_file():
                vfmtune.train(overrides=["task=sam_prompt", *common, f"data.seed={seed}", *args], run_dir=run)
            m = json.loads((run / "metrics.json").read_text())
            figures.update({f"finetune.seed{seed}.{name}.{k}": v for k, v in _headline(m, "test").items()})
            figures[f"finetune.seed{seed}.{name}.train_seconds"] = m["train_seconds"]
            figures[f"finetune.seed{seed}.{name}.epochs"] = m["epochs"]
            print(f"seed {seed} {name}: {_headline(m, 'test')} (zero-shot {zs['instance_iou']})")
            if name == "decoder":  # how well the decoder fits its own training tiles: the ceiling fine-tuning reaches
                fit = work / f"{name}_seed{seed}_train_split"
                if not (fit / "metrics.json").is_file():
                    vfmtune.evaluate(overrides=[f"ckpt={run}", "split=train", *common[1:]], run_dir=fit)
                train_m = json.loads((fit / "metrics.json").read_text())
                figures.update({f"finetune.seed{seed}.{name}.train_split.{k}": v for k, v in _headline(train_m, "train").items()})
    for name in ("zeroshot", *runs):
        for key in ("instance_iou", "mask_ap"):
            values = [figures[f"finetune.seed{s}.{name}.{key}"] for s in seeds if f"finetune.seed{s}.{name}.{key}" in figures]
            if values:
                figures[f"finetune.{name}.{key}.mean"] = round(statistics.mean(values), 4)
                figures[f"finetune.{name}.{key}.std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    figures["finetune.settings"] = " ".join([*common, *(w for name, args in runs.items() for w in (f"| {name}:", *args))])
    return figures


def _timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_speed(data: Path, work: Path, repeats: int) -> dict[str, Any]:
    from vfmtune.backbones import create_backbone
    from vfmtune.data.instances import instance_source, load_instances
    from vfmtune.sam.export import export_sam_onnx, verify_sam_export

    figures: dict[str, Any] = {}
    root = nuclei_full(data)
    table, refs = instance_source(DataConfig(root=str(root)), work / "cache")
    quokka_table, quokka_refs = instance_source(DataConfig(root=str(data / "quokka")), work / "cache")
    image = np.asarray(Image.open(table.paths[0]).convert("RGB"))
    boxes = np.array([_box(i.mask) for i in load_instances(refs[0])[0]])
    autocasts = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    encoders: dict[str, Any] = {}
    with torch.inference_mode():
        for model in MODELS:
            predictor = SamPromptPredictor(create_sam(model))
            x = predictor.model.preprocess(torch.as_tensor(predictor.sam.transform.apply_image(image)).permute(2, 0, 1)[None])
            for precision, autocast in autocasts.items():
                encoders[f"{model}.{precision}"] = (predictor.model.image_encoder, x, autocast)
                with autocast():
                    predictor.set_image(image)
                    for n in (1, 10, 50):
                        decode = _timed(lambda n=n, p=predictor: p.predict(boxes=boxes[:n]), repeats)
                        figures[f"speed.automask.{model}.{precision}.boxes{n}.masks_per_s_reused_embedding"] = round(n / decode, 2)
                        figures[f"speed.automask.{model}.{precision}.boxes{n}.decode_ms"] = round(1000 * decode, 1)
        for size in (224, 448):
            dino = create_backbone("dinov2_vits14", weights="packaged", img_size=size).eval()
            for precision, autocast in autocasts.items():
                encoders[f"dinov2_vits14_{size}px.{precision}"] = (dino, torch.randn(1, 3, size, size), autocast)
        times: dict[str, list[float]] = {k: [] for k in encoders}
        for enc, x, autocast in encoders.values():
            with autocast():
                enc(x)
        for _ in range(repeats):  # interleaved: background load hits every encoder alike
            for key, (enc, x, autocast) in encoders.items():
                with autocast():
                    t0 = time.perf_counter()
                    enc(x)
                    times[key].append(time.perf_counter() - t0)
    for key, values in times.items():
        figures[f"speed.encoder_ms.{key}"] = round(1000 * statistics.median(values), 1)
    for model in MODELS:
        for precision in autocasts:
            enc_s = figures[f"speed.encoder_ms.{model}.{precision}"] / 1000
            for n in (1, 10, 50):
                dec_s = figures[f"speed.automask.{model}.{precision}.boxes{n}.decode_ms"] / 1000
                figures[f"speed.automask.{model}.{precision}.boxes{n}.masks_per_s_end_to_end"] = round(n / (enc_s + dec_s), 2)
    for model in MODELS:
        sam = create_sam(model)
        bundle = work / f"onnx_{model}"
        info = export_sam_onnx(sam, bundle, multimask=False)
        (bundle / "bundle.json").write_text(json.dumps(info))
        quokka_box = np.array([_box(i.mask) for i in load_instances(quokka_refs[0])[0]])
        samples = [(table.paths[0], boxes[:20]), (quokka_table.paths[0], quokka_box)]
        v = verify_sam_export(sam, bundle, samples, multimask=False, min_mask_iou=0.9, repeats=repeats)
        figures.update({f"speed.onnx.{model}.{k}": v for k, v in v.items()})
    figures["speed.image"] = f"DSB2018 nuclei 512x512, ground-truth boxes; {repeats} repeats, median"
    return figures


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="root of bench/seg_data.py's nuclei and quokka")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_sam"))
    parser.add_argument("--part", nargs="+", choices=["zeroshot", "finetune", "speed"], default=["zeroshot", "finetune", "speed"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="decoder-only fine-tune epochs")
    parser.add_argument("--lora-epochs", type=int, default=4, help="0: no LoRA run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every fine-tune (e.g. optim.lr=3e-4)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    existing = RESULTS / "sam.json"
    if existing.is_file():  # parts run separately merge into one results file
        figures = {k: v for k, v in json.loads(existing.read_text()).items() if k.split(".")[0] in ("zeroshot", "finetune", "speed")}
    if "zeroshot" in args.part:
        figures = {k: v for k, v in figures.items() if not k.startswith("zeroshot.")} | part_zeroshot(args.data, args.work)
    if "finetune" in args.part:
        figures = {k: v for k, v in figures.items() if not k.startswith("finetune.")} | part_finetune(
            args.data, args.work, args.seeds, args.epochs, args.lora_epochs, args.extra)
    if "speed" in args.part:
        figures = {k: v for k, v in figures.items() if not k.startswith("speed.")} | part_speed(args.data, args.work, args.repeats)
    write_results("sam", figures)


if __name__ == "__main__":
    main()
