"""SAM to ONNX: the image encoder and the prompt-driven mask decoder, verified against torch on real images.

Two graphs, as Meta's own export splits them: ``encoder.onnx`` (a preprocessed image ``[1, 3, S, S]`` ->
``image_embeddings [1, C, g, g]``, run once per image) and ``decoder.onnx`` (segment-anything's
``SamOnnxModel``: embeddings + N prompts as points with labels, boxes as two corner points labelled 2
and 3 -> mask logits at the original image size, predicted IoU and low-res logits). The decoder picks
its mask the way :class:`vfmtune.sam.SamPromptPredictor` does (single-mask output, or the best of three
by predicted IoU with ``sam.multimask``), so the bundle reproduces auto-mask.

Verification runs the bundle through :class:`vfmtune.runtime.SamPredictor` (numpy + Pillow + onnxruntime:
the code an edge device runs) and the torch model through ``SamPromptPredictor`` on the same real
images and boxes; the export fails when any mask's IoU between the two is below ``export.min_mask_iou``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn
from torch.nn import functional as F

from vfmtune.choices import ConfigError
from vfmtune.config import ExportCommand
from vfmtune.data.images import load_image
from vfmtune.exporter import ExportError, fixed_size_tracing
from vfmtune.io import write_json
from vfmtune.sam.models import MinMaxSam
from vfmtune.sam.predictor import SamPromptPredictor


class SamDecoderOnnx(SamOnnxModel):
    """segment-anything's ONNX decoder wrapper with :class:`SamPromptPredictor`'s choice of mask.

    ``SamOnnxModel`` picks the multimask output for fewer than 3 points, which would give a box (2 corner
    points) another mask than SAM's single-mask output that box prompts use in torch.
    """

    def __init__(self, model: Sam, multimask: bool) -> None:
        super().__init__(model, return_single_mask=True)
        self.multimask = multimask

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """``SamOnnxModel.mask_postprocessing`` with the crop to the unpadded size traced as graph ops: the original
        slices with ``int(tensor)``, which the tracer turns into the dummy input's constant size."""
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        rows = torch.arange(prepadded[0], device=masks.device)
        cols = torch.arange(prepadded[1], device=masks.device)
        masks = masks.index_select(2, rows).index_select(3, cols)
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def select_masks(self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.multimask:
            best = torch.argmax(iou_preds[:, 1:], dim=1) + 1
        else:
            best = torch.zeros(len(iou_preds), dtype=torch.long, device=iou_preds.device)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), iou_preds[rows, best].unsqueeze(1)


class _Encoder(nn.Module):
    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


def export_sam_onnx(sam: Sam, folder: Path, multimask: bool, opset: int = 17) -> dict[str, Any]:
    """Write ``encoder.onnx``, ``decoder.onnx`` and the preprocessing facts into ``folder``; returns the bundle info."""
    folder.mkdir(parents=True, exist_ok=True)
    sam = sam.eval().float()
    size = int(sam.image_encoder.img_size)
    embed = (sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    low = int(sam.prompt_encoder.mask_input_size[0])
    try:
        with torch.no_grad(), fixed_size_tracing():
            torch.onnx.export(_Encoder(sam), (torch.randn(1, 3, size, size),), str(folder / "encoder.onnx"), input_names=["image"],
                              output_names=["image_embeddings"], opset_version=opset, dynamo=False)
            # One prompt per run, as Meta's export: the decoder repeats the embedding per prompt with a count the
            # tracer bakes in, so a prompt batch axis would not be dynamic; the runtime loops over prompts.
            inputs = (torch.randn(1, *embed), torch.randint(0, size, (1, 3, 2)).float(), torch.tensor([[2.0, 3.0, 1.0]]),
                      torch.zeros(1, 1, low, low), torch.zeros(1), torch.tensor([float(size), float(size)]))
            names = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
            torch.onnx.export(SamDecoderOnnx(sam, multimask), inputs, str(folder / "decoder.onnx"), input_names=names,
                              output_names=["masks", "iou_predictions", "low_res_masks"], opset_version=opset, dynamo=False,
                              dynamic_axes={"point_coords": {1: "points"}, "point_labels": {1: "points"},
                                            "masks": {2: "height", 3: "width"}})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"ONNX cannot express this SAM ({type(e).__name__}: {first}); try export.opset=<higher>.") from e
    return {"kind": "sam", "encoder": "encoder.onnx", "decoder": "decoder.onnx", "img_size": size, "embedding": list(embed),
            "low_res": low, "normalize": "minmax" if isinstance(sam, MinMaxSam) else "imagenet",
            "pixel_mean": sam.pixel_mean.flatten().tolist(), "pixel_std": sam.pixel_std.flatten().tolist(),
            "mask_threshold": float(sam.mask_threshold), "multimask": bool(multimask)}


def verify_sam_export(sam: Sam, folder: Path, samples: list[tuple[str, np.ndarray]], multimask: bool,
                      min_mask_iou: float, repeats: int = 3) -> dict[str, Any]:
    """Compare the bundle (run by `vfmtune.runtime`) with torch on real images and boxes; time both graphs.

    Args:
        sam: The source model.
        folder: The bundle (``bundle.json`` written).
        samples: ``(image path, boxes [N, 4] x0, y0, x1, y1)`` per image.
        multimask: As exported.
        min_mask_iou: The gate: every mask's IoU between export and torch.
        repeats: Timing repeats (median).
    """
    from vfmtune.runtime import SamPredictor

    runtime = SamPredictor(folder)
    predictor = SamPromptPredictor(sam)
    ious, emb_diff, logit_diff, score_diff = [], 0.0, 0.0, 0.0
    for path, boxes in samples:
        rgb = np.asarray(load_image(path))
        predictor.set_image(rgb)
        ref = predictor.predict(boxes=boxes, multimask_output=multimask)
        embedding, sizes = runtime.embed(path)
        got = runtime.predict((embedding, sizes), boxes=boxes)
        emb_diff = max(emb_diff, float(np.abs(embedding - predictor.sam.get_image_embedding().numpy()).max()))
        logit_diff = max(logit_diff, float(np.abs(got["low_res_logits"] - ref.low_res_logits.numpy()).max()))
        score_diff = max(score_diff, float(np.abs(got["scores"] - ref.iou.numpy()).max()))
        # Pixels whose torch logit lies within 1e-3 of the threshold can flip under any reordering of float sums
        # (a random-init model's logits all do); the IoU is taken over the others.
        logits = sam.postprocess_masks(ref.low_res_logits[:, None], predictor.sam.input_size, predictor.sam.original_size)[:, 0]
        sure = (logits - sam.mask_threshold).abs().numpy() > 1e-3
        a, b = got["masks"] & sure, ref.masks.numpy() & sure
        union = (a | b).reshape(len(a), -1).sum(1)
        ious += np.where(union > 0, (a & b).reshape(len(a), -1).sum(1) / np.maximum(union, 1), 1.0).tolist()
    path = samples[0][0]
    embedding, sizes = runtime.embed(path)
    times = {"encoder": [], "decoder_1_box": [], "decoder_10_boxes": []}
    boxes10 = np.tile(samples[0][1][:1], (10, 1))
    calls = {"encoder": lambda: runtime.embed(path),
             "decoder_1_box": lambda: runtime.predict((embedding, sizes), boxes=boxes10[:1]),
             "decoder_10_boxes": lambda: runtime.predict((embedding, sizes), boxes=boxes10)}
    for _ in range(repeats):  # interleaved, so background load hits every graph alike
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(1000 * (time.perf_counter() - t0))
    figures = {"verify_images": len(samples), "verify_masks": len(ious), "mask_iou_min": round(min(ious), 5),
               "mask_iou_mean": round(float(np.mean(ious)), 5), "embedding_max_abs_diff": emb_diff,
               "low_res_logit_max_abs_diff": logit_diff, "iou_prediction_max_abs_diff": score_diff,
               **{f"onnx_{k}_ms": round(statistics.median(v), 1) for k, v in times.items()}}
    print(f"ONNX vs torch on {len(samples)} real images, {len(ious)} boxes: mask IoU min {min(ious):.4f} mean "
          f"{np.mean(ious):.4f}; embedding diff {emb_diff:.2e}, low-res logit diff {logit_diff:.2e}; encoder "
          f"{figures['onnx_encoder_ms']} ms, decoder {figures['onnx_decoder_1_box_ms']} ms for 1 box")
    if min(ious) < min_mask_iou:
        raise ExportError(f"The ONNX SAM differs from torch: a mask overlaps its torch mask with IoU {min(ious):.4f} < "
                          f"export.min_mask_iou={min_mask_iou}: do not deploy it. Fix: try another export.opset.")
    return figures


def export_sam_run(model: Any, config: ExportCommand, task: Any, out: Path) -> dict[str, Any]:
    """`vfmtune export` for `task=sam_prompt`: a fine-tuned run (`ckpt=RUN`), or the configured SAM (no ckpt),
    verified on the test split of the run's data (or on `data.*`), with its ground-truth boxes."""
    import dataclasses

    from vfmtune.data.instances import load_instances
    from vfmtune.sam.models import create_sam

    if model is not None:
        sam, run_cfg, source = model.merged_sam(), model.config, str(config.ckpt)
    else:
        s = config.sam
        sam, run_cfg, source = create_sam(s.model, str(s.weights) if s.weights is not None else None, s.path), config, f"{s.model} (no run)"
    if config.quantize is not None or str(config.format) != "onnx":
        raise ConfigError("A SAM bundle is fp32 ONNX (format=onnx, no quantize): INT8 SAM decoders lose mask edges.")
    data_cfg = dataclasses.replace(run_cfg, data=config.data if model is None else run_cfg.data, cache_dir=config.cache_dir)
    prepared = task.prepare(data_cfg, out)
    split = "test" if "test" in prepared.splits else "all"
    paths, _ = prepared.subset(split)
    refs = dict(zip(prepared.table.paths, prepared.table.instances or []))
    samples = []
    for path in paths[: config.export.verify_images or len(paths)]:
        w, h = load_image(path).size
        found = load_instances(refs[path], (w, h))[0]
        # ground-truth boxes; an image without instances is checked with a centred box
        boxes = np.array([_box(i.mask) for i in found], float) if found else np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]])
        samples.append((path, boxes))
    bundle = Path(config.export.output or out / "bundle")
    multimask = run_cfg.sam.multimask
    info = export_sam_onnx(sam, bundle, multimask, config.export.opset)
    info.update({"model": run_cfg.sam.model, "source": source})
    write_json(bundle / "bundle.json", info)
    metrics = verify_sam_export(sam, bundle, samples, multimask, config.export.min_mask_iou, config.export.latency_repeats)
    metrics.update({"eval_split": split, "source_checkpoint": source, "model": run_cfg.sam.model})
    write_json(bundle / "bundle.json", {**info, "export_metrics": metrics})
    write_json(out / "metrics.json", metrics)
    print(f"SAM bundle written to {bundle} (python -m vfmtune.runtime {bundle} IMAGE X0,Y0,X1,Y1)")
    return {"bundle": str(bundle), "metrics": metrics}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
