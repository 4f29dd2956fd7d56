"""`vfmtune synth`: cut-paste scenes (images, class maps, instance maps, COCO JSON) from annotated objects."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from vfmtune.cache_dir import cache_dir
from vfmtune.choices import ConfigError
from vfmtune.compose import to_container, typed
from vfmtune.config import Config, DataConfig, SynthCommand
from vfmtune.data.cutpaste import check_blend, compose, cut_objects, scene_from
from vfmtune.data.images import DataError
from vfmtune.data.instances import instance_source
from vfmtune.data.mask_sources import class_names
from vfmtune.data.prepare import list_images
from vfmtune.data.splits import load_splits
from vfmtune.data.synthetic import sha256_file, write_synthetic
from vfmtune.run import ConfigLike, command_config, make_run_dir


def object_images(objects: str, config: SynthCommand) -> tuple[list[str], list[str], list[str], str]:
    """`(paths, instance refs, classes, what they are)`: a run's training split, or every image of a dataset folder."""
    src = Path(objects).expanduser().resolve()
    run_config = src / ".hydra" / "config.yaml"
    if src.is_dir() and run_config.is_file():
        if not (src / "splits.csv").is_file():
            raise DataError.for_file(src, "run directory without splits.csv", "pass a run made by `vfmtune train`")
        trained = typed(OmegaConf.to_container(OmegaConf.load(run_config)), Config, strict=False)
        table, refs = instance_source(trained.data, cache_dir(config.cache_dir))
        splits = load_splits(src / "splits.csv")
        keep = [i for i, p in enumerate(table.paths) if splits.get(os.path.abspath(p)) == "train"]
        if not keep:
            raise DataError.for_file(src, "no training images of this run's data were found", "check that its data is still there")
        held = sum(1 for p in table.paths if splits.get(os.path.abspath(p)) in ("val", "test"))
        what = f"the training split of run {src} ({len(keep)} images; its {held} validation/test images are never used)"
    else:
        data = DataConfig(coco=str(src)) if src.suffix.lower() == ".json" else DataConfig(root=str(src))
        table, refs = instance_source(data, cache_dir(config.cache_dir))
        keep = list(range(len(table.paths)))
        what = f"every image of {src} ({len(keep)} images)"
    classes = class_names(table, 1 + max(1, _max_class(table.masks, keep)))
    return [table.paths[i] for i in keep], [refs[i] for i in keep], classes, what


def _max_class(masks: Sequence[str], keep: Sequence[int]) -> int:
    from vfmtune.data.masks import load_mask

    return max((int(np.max(np.where(m == 255, 0, m))) for m in (load_mask(masks[i]) for i in keep)), default=1)


def synth(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Write `n` cut-paste scenes made from the objects of `objects` (a training run's training split, or a
    dataset folder) onto `backgrounds` (plain images), or onto the objects' own images with their
    instances kept (copy-paste). Seeded by `seed`: the same inputs and seed write the same files.

    Returns:
        `{"run_dir", "output", "n_images", "n_instances", "objects"}`.

    Example:
        >>> vfmtune.synth(overrides=["objects=runs/train/nuclei", "n=200", "output=data/nuclei_synth"])
    """
    config = command_config(cfg, overrides, SynthCommand, "synth")
    if not config.objects:
        raise ConfigError("synth needs objects=RUN_OR_DIR: a `vfmtune train` run (its training split) or a dataset folder.")
    s = config.synth
    check_blend(s.blend)
    if s.objects_per_image[0] > s.objects_per_image[1] or s.objects_per_image[0] < 0:
        raise ConfigError(f"synth.objects_per_image={s.objects_per_image} must be [min, max] with 0 <= min <= max.")
    out_run = make_run_dir(run_dir, "synth")
    output = Path(config.output).expanduser() if config.output else out_run / "synth"
    paths, refs, classes, what = object_images(config.objects, config)
    objects = cut_objects(paths, refs, len(classes), s)
    if not objects:
        raise DataError(f"No object could be cut out of {what} (all below synth.min_area={s.min_area} px, or touching the "
                        "image edge with synth.skip_truncated=true).")
    if config.backgrounds:
        bg_paths = list_images(config.backgrounds)
        backgrounds = [scene_from(p, None, len(classes)) for p in bg_paths]
    else:
        bg_paths = paths
        backgrounds = [scene_from(p, r, len(classes)) for p, r in zip(paths, refs)]
    print(f"{len(objects)} objects cut from {what}; {len(backgrounds)} backgrounds")
    rng = np.random.default_rng(config.seed)
    scenes = [compose(backgrounds[int(rng.integers(len(backgrounds)))], objects, rng, s) for _ in range(config.n)]
    sources = [{"path": p, "sha256": sha256_file(p), "role": "objects"} for p in paths]
    sources += [{"path": p, "sha256": sha256_file(p), "role": "background"} for p in bg_paths if config.backgrounds]
    info = {"version": 1, "seed": config.seed, "settings": to_container(s), "objects_from": what, "n_objects": len(objects),
            "sources": sources, "pasted_per_scene": [sum(1 for x in sc.sources if x >= 0) for sc in scenes]}
    folder = write_synthetic(output, scenes, classes, info)
    n_instances = sum(len(sc.masks) for sc in scenes)
    print(f"{config.n} scenes, {n_instances} instances written to {folder}")
    return {"run_dir": str(out_run), "output": str(folder), "n_images": config.n, "n_instances": n_instances, "objects": what}
