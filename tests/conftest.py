"""Shared fixtures: generated image folders and a tiny backbone, so every test runs in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A tiny timm ViT (0.3M params) at 64 px with random weights, and no worker processes. fp32: precision=auto
# would pick bf16 on some CPUs and not others (tests must not depend on the machine; for models this small,
# bf16 autocast is also slower); tests/test_precision.py covers bf16.
TINY = [
    "precision=fp32",
    "backbone.name=timm/test_vit",
    "backbone.weights=none",
    "backbone.img_size=64",
    "data.num_workers=0",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]

CLASS_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}


def make_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> None:
    """A noisy image whose mean colour identifies its class: learnable by a tiny model in 2 epochs."""
    noise = rng.integers(-40, 40, size=(size, size, 3))
    pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_imagefolder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        for i in range(n):
            make_image(root / cls / f"{cls}_{i:03d}.png", CLASS_COLOURS[cls], rng)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Splits and embeddings are cached under VFMTUNE_CACHE; each test gets its own unless it shares one on purpose.
    monkeypatch.setenv("VFMTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """40 images per class, 3 classes."""
    return make_imagefolder(tmp_path / "images", {"cat": 40, "dog": 40, "owl": 40})


# Distillation / export (issue 5): one tiny teacher and one distilled student, shared by their tests.
TINY_STUDENT = ["student=timm/test_efficientnet", "distill.weights=none", "data.augment.enabled=false"]


@pytest.fixture(scope="session")
def distill_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"images", "teacher", "student"}: a frozen test_vit classifier and a test_efficientnet student
    distilled from it (KD + feature distillation, cached teacher outputs)."""
    from vfmtune.cli import main

    base = tmp_path_factory.mktemp("distill")
    images = make_imagefolder(base / "images", {"cat": 20, "dog": 20, "owl": 20})
    # validated every epoch (not the frozen preset's every 5th): the teacher is the best of its 3 epochs
    main(["train", *TINY, f"data.root={images}", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1",
          f"hydra.run.dir={base / 'teacher'}"])
    main(["distill", *TINY, *TINY_STUDENT, f"teacher={base / 'teacher'}", "kd.feature_weight=0.5",
          f"hydra.run.dir={base / 'student'}"])
    return {"images": images, "teacher": base / "teacher", "student": base / "student"}


def section(key: str, /, **values: object) -> object:
    """One typed config section from plain values, validated like a composed config (enums, types)."""
    from vfmtune.compose import typed

    return getattr(typed({key: values}), key)


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header (predictions, splits, manifests)."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_mask_folder(root: Path, n: int = 24, size: int = 48, seed: int = 0, classes: tuple[str, ...] = ("background", "disc", "square")) -> Path:
    """`root/images/*.png` + `root/masks/*.png` + `root/classes.txt`: noisy images whose bright discs
    (class 1) and dark squares (class 2) are what the masks label; learnable by a tiny model."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        image = np.full((size, size, 3), 120, np.int64) + rng.integers(-30, 30, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        (cy, cx), r = rng.integers(10, size - 10, 2).tolist(), int(rng.integers(5, 9))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[disc] += 90
        mask[disc] = 1
        if len(classes) > 2 and i % 2 == 0:  # squares in half the images: a rarer class
            y0, x0 = rng.integers(0, size - 12, 2)
            square = (yy >= y0) & (yy < y0 + 10) & (xx >= x0) & (xx < x0 + 10) & ~disc
            image[square] -= 90
            mask[square] = 2
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"img_{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"img_{i:03d}.png")
    return root


# Segmentation distillation / export: a frozen test_vit segmenter and a test_efficientnet LR-ASPP student.
SEG_STUDENT = ["task=segment", "student=timm/test_efficientnet", "distill.weights=none", "data.augment.enabled=false"]


@pytest.fixture(scope="session")
def seg_distill_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"data", "teacher", "student"}: a frozen test_vit segmenter (linear probe on cached patch tokens) and
    a test_efficientnet student distilled from it (per-pixel KD, cached teacher logits)."""
    from vfmtune.cli import main

    base = tmp_path_factory.mktemp("seg_distill")
    data = make_mask_folder(base / "data", n=24)
    main(["train", *TINY, "task=segment", "trainer.max_epochs=10", f"data.root={data}", f"hydra.run.dir={base / 'teacher'}"])
    main(["distill", *TINY, *SEG_STUDENT, f"teacher={base / 'teacher'}", "trainer.max_epochs=4", "optim.lr=1e-2",
          f"hydra.run.dir={base / 'student'}"])
    return {"data": data, "teacher": base / "teacher", "student": base / "student"}


# SAM tasks and commands (issue 13): images with a few elliptic objects of two classes, in the layouts
# vfmtune.data.instances reads (masks/ class maps, instances/ 16-bit ids, annotations.json COCO RLE).
SAM_TINY = ["sam.model=test_sam_tinyvit", "data.num_workers=0", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", "data.batch_size=4", "sam.prompts_per_image=4"]


def make_instance_data(root: Path, n: int = 12, seed: int = 0, size: tuple[int, int] = (72, 96), coco: bool = False) -> Path:
    """`root/images`, `root/masks` (0 background, 1 red, 2 green), `root/instances` (uint16 ids) and `classes.txt`;
    with `coco`, also `annotations.json` (RLE). Every image holds 1-3 non-overlapping ellipses."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    h, w = size
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    yy, xx = np.ogrid[:h, :w]
    for i in range(n):
        pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        classes, ids = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint16)
        for k, (cy, cx) in enumerate(((18, 22), (50, 40), (30, 72))[: 1 + i % 3], start=1):
            c = 1 + (i + k) % 2
            ry, rx = rng.integers(6, 10, 2)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            pixels[m] = (210, 50, 50) if c == 1 else (50, 210, 50)
            classes[m], ids[m] = c, k
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c, "iscrowd": 0,
                                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                                "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        Image.fromarray(pixels).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(classes).save(root / "masks" / f"im{i:02d}.png")
        Image.fromarray(ids).save(root / "instances" / f"im{i:02d}.png")
        images.append({"id": i + 1, "file_name": f"images/im{i:02d}.png", "height": h, "width": w})
    (root / "classes.txt").write_text("background\nred\ngreen\n")
    if coco:
        import json

        categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
        (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


@pytest.fixture(scope="session")
def sam_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"data", "run", "cache"}: one tiny frozen-encoder task=sam_prompt run (cached embeddings), shared by the SAM tests."""
    from vfmtune.cli import main

    base = tmp_path_factory.mktemp("sam")
    cache = base / "cache"
    data = make_instance_data(base / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFMTUNE_CACHE", str(cache))
        main(["train", "task=sam_prompt", *SAM_TINY, f"data.root={data}", f"hydra.run.dir={base / 'run'}"])
    return {"data": data, "run": base / "run", "cache": cache}
