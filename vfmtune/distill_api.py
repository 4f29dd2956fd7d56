"""`vfmtune distill` and `vfmtune pseudo-label`: from a trained vfmtune classifier (the teacher) to a
small student, and to teacher-labelled manifests.

Example:
    >>> import vfmtune
    >>> r = vfmtune.distill(overrides=["teacher=runs/teacher", "student=efficientnet_lite0"], run_dir="runs/lite0")
    >>> r["metrics"]["test/macro_f1"]
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from vfmtune.data.prepare import cache_root, list_images, prepare_data, scan_or_skip
from vfmtune.runner import (
    as_config_dict, build_trainer, compute_device, load_config, make_run_dir, overridden, write_run_report,
)
from vfmtune.backbones import data_config
from vfmtune.checkpoint import load_checkpoint
from vfmtune.config import Config, ConfigError
from vfmtune.data.datamodule import ClassificationData, ImageDataset
from vfmtune.data.images import DataError, load_image
from vfmtune.data.transforms import build_transforms
from vfmtune.embedding_cache import EmbeddingCache, file_digest, model_key, weights_digest
from vfmtune.tasks.classifier import Classifier
from vfmtune.tasks.distiller import UNLABELED, Distiller, resolve_student, student_weights_source

PSEUDO_LABEL_COLUMNS = ("path", "label", "confidence")


def with_student_defaults(overrides: Sequence[str]) -> list[str]:
    """`finetune=full` unless given: the default `frozen` group's 300 epochs at lr 3e-2 suit a linear head, not a CNN."""
    return list(overrides) if any(o.startswith("finetune=") for o in overrides) else ["finetune=full", *overrides]


def load_teacher(ckpt: str | Path, classes: Optional[Sequence[str]] = None) -> Classifier:
    """A frozen vfmtune classifier from `ckpt`, checked to be a classifier over `classes`.

    Raises:
        ConfigError: the checkpoint is not a vfmtune classifier (another task, e.g. a distilled student).
        DataError: its classes differ from the data's.
    """
    from vfmtune.api import load_model

    if not ckpt:
        raise ConfigError("This command needs teacher=PATH: a vfmtune classifier checkpoint or run directory.")
    hp = load_checkpoint(ckpt)["hyper_parameters"]
    task = hp.get("task", "classify")
    if task != "classify" or "classes" not in hp:
        raise ConfigError(f"teacher={ckpt} is a {task!r} checkpoint; a teacher must be a classifier trained by "
                          "`vfmtune train` (frozen, last-blocks, LoRA, ...).")
    if classes is not None and list(hp["classes"]) != list(classes):
        raise DataError(f"teacher={ckpt} was trained on classes {hp['classes']} but the data has {list(classes)}. "
                        "Fix: distil on data with the teacher's class set (same class folder names).")
    return load_model(ckpt).eval().requires_grad_(False)


class TeacherTargets(Dataset):
    """`(view, label, teacher embedding)`: images with the teacher's cached outputs attached."""

    def __init__(self, images: ImageDataset, embeddings: torch.Tensor) -> None:
        self.images, self.embeddings = images, embeddings

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        x, y = self.images[i]
        return x, y, self.embeddings[i]


def _unlabelled_paths(source: str, held_out: Sequence[str], on_bad: str, workers: int) -> list[str]:
    """Images of `data.unlabeled` (a folder, or a pseudo-label CSV's paths), refused if any is a val/test image."""
    src = Path(source).expanduser()
    if src.suffix.lower() == ".csv" and src.is_file():
        with open(src, newline="", encoding="utf-8-sig") as f:
            paths = [str((src.parent / row["path"]).resolve()) for row in csv.DictReader(f)]
    else:
        paths = list_images(source)
    ok = scan_or_skip(paths, on_bad, workers)
    paths = [p for p, good in zip(paths, ok) if good]
    held = {file_digest(p): p for p in held_out}
    leaked = [p for p in paths if file_digest(p) in held]
    if leaked:
        raise DataError(f"data.unlabeled={source}: {len(leaked)} image(s) are also validation/test images "
                        f"(e.g. {leaked[0]}). Teacher-labelled images may only be trained on; evaluation stays on "
                        "human-labelled data. Fix: remove them from the unlabelled folder.")
    return paths


def _student_config(config: dict[str, Any], teacher: Classifier, overrides: Sequence[str]) -> dict[str, Any]:
    """The run config: data defaults to the teacher's (same split, so test figures compare), data.* overrides apply."""
    given = overridden(overrides, "data")
    base = dict(teacher.config["data"])
    if any(o.split("=", 1)[0] in ("root", "manifest", "dataset") for o in given):
        base.update(root=None, manifest=None, dataset=None)  # a new source replaces the teacher's, not adds to it
    data = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(given))
    return {**config, "data": OmegaConf.to_container(data)}


def distill(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Train a small timm student from a frozen vfmtune classifier; metrics are the student's own.

    Data defaults to the teacher's data and split; `data.unlabeled=DIR` adds images the teacher labels
    (training only). With `data.augment.enabled=false` the teacher's embeddings come from the
    embedding cache (computed once, shared with `vfmtune train`); with augmentation it runs on every batch.

    Returns:
        `{"run_dir", "metrics", "best_checkpoint"}` like `train`.
    """
    if cfg is None:
        cfg = load_config(*with_student_defaults(overrides))
    config = as_config_dict(cfg, ())
    resolve_student(config["student"])  # bad names fail before anything loads
    out = make_run_dir(run_dir, "distill")
    teacher = load_teacher(config["teacher"])
    config = _student_config(config, teacher, overrides)
    config["distill"] = {**config["distill"], "weights": student_weights_source(config["student"], config["distill"]["weights"])}
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), out / ".hydra" / "config.yaml")
    L.seed_everything(config["seed"], workers=True, verbose=False)
    prepared = prepare_data(config, out)
    load_teacher(config["teacher"], prepared.table.classes)  # class check (cheap; weights already loaded once)
    for split in ("train", "val"):
        if split not in prepared.splits:
            raise DataError(f"The {split} split is empty. Fix: add images or change data.val_fraction / data.test_fraction.")
    model = Distiller(config, prepared.table.classes, teacher=teacher)
    d = config["data"]
    student_cfg = {**model.data_cfg, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # [0, 1] views, normalised per model
    train_tf, eval_tf = build_transforms(student_cfg, d["augment"])
    train_paths, train_labels = prepared.subset("train")
    if d.get("unlabeled"):
        held = [p for s in ("val", "test") for p in prepared.subset(s)[0]]
        extra = _unlabelled_paths(d["unlabeled"], held, d["on_bad_image"], d["num_workers"])
        print(f"{len(extra)} unlabelled images added to training (teacher soft targets only)")
        train_paths, train_labels = train_paths + extra, train_labels + [UNLABELED] * len(extra)
    datasets: dict[str, Dataset] = {s: ImageDataset(*prepared.subset(s), eval_tf) for s in ("val", "test") if s in prepared.splits}
    train_set: Dataset = ImageDataset(train_paths, train_labels, train_tf)
    if model.needs_teacher and config["distill"]["cache_teacher"] and not d["augment"]["enabled"]:
        # Deterministic views + frozen teacher: its outputs never change, so the embedding cache holds them
        # (same key as `vfmtune train` for this backbone; logits are the head applied to it, microseconds).
        t_cfg = teacher.config["backbone"]
        _, t_eval = build_transforms(data_config(teacher.backbone, t_cfg["img_size"]), {"enabled": False})
        cache = EmbeddingCache(cache_root(config) / "embeddings" / model_key(t_cfg["name"], weights_digest(teacher.backbone), t_eval))
        t0 = time.perf_counter()
        emb = cache.embed(teacher.backbone, train_paths, t_eval, d["batch_size"], d["num_workers"], device=compute_device(config))
        print(f"teacher outputs ready in {time.perf_counter() - t0:.1f}s ({cache.folder})")
        train_set = TeacherTargets(train_set, emb)
    elif model.needs_teacher:
        print("teacher runs on every batch (augmented views differ each epoch; set data.augment.enabled=false to cache it)")
    datasets["train"] = train_set
    data = ClassificationData(datasets, batch_size=d["batch_size"], num_workers=d["num_workers"])
    monitor = config["monitor"]
    ckpt_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max", save_last=True,
                              auto_insert_metric_name=False)
    callbacks: list[Any] = [ckpt_cb]
    stop = config["early_stopping"]
    if stop["enabled"]:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=stop["patience"], min_delta=stop["min_delta"]))
    trainer = build_trainer(config, out, callbacks)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - t0
    best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        if split in prepared.splits:
            getattr(trainer, "validate" if split == "val" else "test")(model, datamodule=data, ckpt_path=best, verbose=False)
            metrics.update(model.eval_results[split])
    metrics.update({"best_checkpoint": str(best), "epochs": trainer.current_epoch, "train_seconds": round(train_seconds, 2),
                    "teacher": str(config["teacher"]), "student": config["student"],
                    "student_params": sum(p.numel() for p in model.student.parameters())})
    write_run_report(metrics, prepared.table.classes, out, ("val", "test"))
    return {"run_dir": str(out), "metrics": metrics, "best_checkpoint": str(best)}


def pseudo_label(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Label `images=DIR` with `teacher=CKPT`: a CSV manifest `path,label,confidence` (auto-labelling).

    Rows below `pseudo_label.threshold` are left out. The manifest is marked teacher-labelled by its
    `confidence` column: it can feed training (`data.unlabeled=CSV`) but never validation or test.

    Example:
        >>> vfmtune.pseudo_label(overrides=["teacher=runs/teacher", "images=/data/new", "pseudo_label.threshold=0.9"])
    """
    config = as_config_dict(cfg, overrides)
    if not config.get("images"):
        raise ConfigError("pseudo-label needs images=DIR (a folder of images, searched recursively).")
    teacher = load_teacher(config["teacher"])
    threshold = float(config["pseudo_label"]["threshold"])
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"pseudo_label.threshold={threshold} must lie in [0, 1).")
    out = make_run_dir(run_dir, "pseudo-label")
    paths = list_images(config["images"])
    ok = scan_or_skip(paths, config["data"]["on_bad_image"], config["data"]["num_workers"])
    paths = [p for p, good in zip(paths, ok) if good]
    _, eval_tf = build_transforms(data_config(teacher.backbone, teacher.config["backbone"]["img_size"]), {"enabled": False})
    probs = []
    with torch.inference_mode():
        for i in range(0, len(paths), config["data"]["batch_size"]):
            batch = torch.stack([eval_tf(load_image(p)) for p in paths[i : i + config["data"]["batch_size"]]])
            probs.append(teacher(batch).softmax(-1))
    conf, label = torch.cat(probs).max(-1)
    target = Path(config["pseudo_label"]["output"] or out / "pseudo_labels.csv")
    target.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with open(target, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PSEUDO_LABEL_COLUMNS)
        for p, c, y in zip(paths, conf.tolist(), label.tolist()):
            if c >= threshold:
                writer.writerow([p, teacher.classes[y], f"{c:.6f}"])
                kept += 1
    print(f"{kept} of {len(paths)} images labelled at confidence >= {threshold}: {target}")
    return {"run_dir": str(out), "manifest": str(target), "n_labelled": kept, "n_images": len(paths)}


def is_teacher_labelled(manifest: str | Path) -> bool:
    """Whether a CSV manifest came from `pseudo-label` (it has a confidence column)."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return "confidence" in {c.strip().lower() for c in header}
