"""`vfmtune auto-mask`: SAM turns boxes and clicks (or nothing: everything mode) into masks for a folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.choices import ConfigError
from vfmtune.config import AutoMaskCommand
from vfmtune.data.boxes import ImageIndex, check_prompts, read_prompts
from vfmtune.data.prepare import readable_images
from vfmtune.loading import load_model
from vfmtune.run import ConfigLike, command_config, make_run_dir


def auto_mask(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Masks for every prompted object of `images` (or every object SAM finds, without `boxes`/`points`).

    `model=mobile_sam` (default) / `lite_medsam` / `sam_vit_b` ... uses packaged or hub weights
    (`sam.weights`, `sam.path`); `ckpt=RUN` uses a `task=sam_prompt` run's fine-tuned SAM. Rerunning on the
    same `output` resumes: images whose outputs match their prompts and model are skipped.

    Returns:
        `{"run_dir", "output", "summary"}`; the output folder holds masks/, instances/, records/,
        annotations.json (COCO RLE), review.csv, classes.txt and summary.json.

    Example:
        >>> r = vfmtune.auto_mask(overrides=["images=data/photos", "boxes=data/boxes.csv"], run_dir="runs/labels")
        >>> r["summary"]["flagged_for_review"]
    """
    import torch

    from vfmtune.sam import create_sam
    from vfmtune.sam.autolabel import AutoLabeller, weights_identity
    from vfmtune.sam.embeddings import sam_autocast

    config = command_config(cfg, overrides, AutoMaskCommand, "auto_mask")
    torch.manual_seed(config.seed)  # random-init models (weights=none, test models) are the same model on every run
    if not config.images:
        raise ConfigError("auto-mask needs images=DIR (a folder, searched recursively, or one image).")
    paths = readable_images(config.images, config.data)
    root = Path(config.images).expanduser().resolve()
    root = root if root.is_dir() else root.parent
    prompts = None
    if config.boxes or config.points:
        prompts = check_prompts(read_prompts(config.boxes, config.points, ImageIndex(paths, root)), config.auto_mask.on_bad_box)
    if config.ckpt:
        model = load_model(config.ckpt)
        if not callable(getattr(model, "merged_sam", None)):
            raise ConfigError(f"ckpt={config.ckpt} is not a task=sam_prompt run; auto-mask needs a fine-tuned SAM run, "
                              "or no ckpt and model=mobile_sam / lite_medsam / sam_vit_b ...")
        sam, name, run_config = model.merged_sam(), model.config.sam.model, model.config
    else:
        s = config.sam
        sam, name, run_config = create_sam(s.model, str(s.weights) if s.weights is not None else None, s.path), s.model, config
    out = Path(config.output).expanduser() if config.output else make_run_dir(run_dir, "auto_mask")
    identity = {"model": name, "weights": weights_identity(sam), "ckpt": str(config.ckpt) if config.ckpt else None}
    classes = prompts.classes if prompts is not None else ["background", "object"]
    labeller = AutoLabeller(sam, config.auto_mask, config.sam.multimask, classes, out, identity, sam_autocast(run_config))
    summary = labeller.run(paths, root, prompts, progress=bool(config.trainer.get("enable_progress_bar", True)))
    return {"run_dir": str(run_dir or out), "output": str(out), "summary": summary}
