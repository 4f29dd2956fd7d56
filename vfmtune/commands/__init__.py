"""One module per `vfmtune <command>`; each holds the function of the same name the façade exports.

`COMMANDS` maps the command-line verb to `module:function` and the config schema (`vfmtune.config.SCHEMAS`
key) it composes; modules are imported on use, so `vfmtune --help` answers without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    target: str  # "module:function"
    schema: str  # vfmtune.config.SCHEMAS key
    summary: str
    example: str
    positional: str | None = None  # `vfmtune <command> VALUE` means `<command> <positional>=VALUE`


COMMANDS: dict[str, Command] = {
    "train": Command("vfmtune.commands.train:train", "train", "fine-tune a backbone + head",
                     "vfmtune train data.root=/path/to/imagefolder"),
    "evaluate": Command("vfmtune.commands.evaluate:evaluate", "evaluate", "recompute metrics for a checkpoint",
                        "vfmtune evaluate ckpt=runs/train/<date>/checkpoints/best.ckpt"),
    "predict": Command("vfmtune.commands.predict:predict", "predict", "predict images with a checkpoint",
                       "vfmtune predict ckpt=RUN_DIR images=/path/to/images"),
    "embed": Command("vfmtune.commands.embed:embed", "embed", "build the frozen-backbone cache",
                     "vfmtune embed backbone=dinov2_vits14"),
    "cv": Command("vfmtune.commands.cv:cv", "cv", "stratified k-fold, fold ensemble", "vfmtune cv folds=5 loss=weighted_ce"),
    "export-merged": Command("vfmtune.commands.merge:export_merged", "merge", "merge a LoRA run into a plain checkpoint",
                             "vfmtune export-merged ckpt=RUN_DIR"),
    "distill": Command("vfmtune.commands.distill:distill", "distill", "teach a small CNN from a classifier",
                       "vfmtune distill teacher=RUN_DIR student=efficientnet_lite0"),
    "pseudo-label": Command("vfmtune.commands.pseudo_label:pseudo_label", "pseudo_label", "teacher labels -> CSV manifest",
                            "vfmtune pseudo-label teacher=RUN_DIR images=DIR pseudo_label.threshold=0.9"),
    "export": Command("vfmtune.commands.export:export", "export", "verified ONNX/TorchScript bundle",
                      "vfmtune export ckpt=RUN_DIR format=onnx quantize=int8"),
    "shift": Command("vfmtune.commands.shift:shift", "shift", "measure domain shift to new images",
                     "vfmtune shift ckpt=RUN_DIR target=/path/to/new/images"),
    "adapt": Command("vfmtune.commands.adapt:adapt_model", "adapt", "adapt a trained model to new images (adabn, tent)",
                     "vfmtune adapt ckpt=RUN_DIR data.target=DIR adapt.method=adabn"),
    "cache": Command("vfmtune.commands.cache:cache", "cache", "list (or clear) cached embeddings, weights, splits",
                     "vfmtune cache [clear=embeddings]"),
    "auto-mask": Command("vfmtune.commands.auto_mask:auto_mask", "auto_mask", "SAM: boxes / clicks -> masks, COCO",
                         "vfmtune auto-mask model=mobile_sam images=DIR boxes=boxes.csv"),
    "synth": Command("vfmtune.commands.synth:synth", "synth", "cut-paste scenes with masks, COCO",
                     "vfmtune synth objects=RUN n=200"),
    "explore": Command("vfmtune.commands.explore:explore", "explore", "data-look figures of a run -> RUN/plots",
                       "vfmtune explore RUN_DIR", positional="ckpt"),
}


def command_function(command: str) -> Callable:
    module, name = COMMANDS[command].target.split(":")
    return getattr(importlib.import_module(module), name)
