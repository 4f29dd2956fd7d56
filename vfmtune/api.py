"""The functions behind every command; the CLI and notebooks both call these (one code path, two doors).

Example:
    >>> import vfmtune
    >>> result = vfmtune.train(overrides=["data.root=/data/parts", "trainer.max_epochs=5"], run_dir="runs/parts")
    >>> result["metrics"]["test/macro_f1"]
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
from torch.utils.data import Dataset, TensorDataset

from vfmtune.adapt.freeze import is_frozen, param_table
from vfmtune.adapt.head_init import init_head_from
from vfmtune.adapt.lora import load_adapter, merge_lora, save_adapter
from vfmtune.adapt.progressive import progressive_callback
from vfmtune.checkpoint import atomic_torch_save, load_checkpoint, resolve_checkpoint
from vfmtune.config import Config, ConfigError, safe_instantiate
from vfmtune.data.datamodule import ClassificationData, ImageDataset
from vfmtune.data.images import DataError
from vfmtune.data.prepare import SPLITS, Prepared, cache_root, list_images, prepare_data, scan_or_skip, train_class_counts
from vfmtune.data.splits import save_splits
from vfmtune.data.transforms import build_transforms
from vfmtune.embedding_cache import EmbeddingCache, model_key, weights_digest
from vfmtune.folds import Ensemble, aggregate, fold_checkpoints, fold_splits, is_cv_run, make_folds, save_folds
from vfmtune.memory import PeakMemory
from vfmtune.report import write_json
from vfmtune.rng import RNGState
from vfmtune.runner import as_config_dict, build_trainer, compute_device, load_config, make_run_dir, overridden, write_run_report
from vfmtune.sampling import build_sampler, check_imbalance_options, resample_embeddings
from vfmtune.tasks.classifier import Classifier


__all__ = ["cv", "embed", "evaluate", "export_merged", "fit", "load_config", "load_model", "predict", "train"]


def _datasets(
    cfg: dict[str, Any], model: Classifier, prepared: Prepared, splits: Sequence[str], use_cache: bool
) -> dict[str, Dataset]:
    """Per split: cached embeddings (frozen backbone) or images with train/eval transforms."""
    from vfmtune.backbones import data_config

    train_tf, eval_tf = build_transforms(data_config(model.backbone, cfg["backbone"]["img_size"]), cfg["data"]["augment"])
    if use_cache:
        key = model_key(cfg["backbone"]["name"], weights_digest(model.backbone), eval_tf)
        cache = EmbeddingCache(cache_root(cfg) / "embeddings" / key)
        paths, labels = prepared.subset("all")
        t0 = time.perf_counter()
        features = cache.embed(model.backbone, paths, eval_tf, cfg["data"]["batch_size"], cfg["data"]["num_workers"],
                               device=compute_device(cfg))
        print(f"embeddings ready in {time.perf_counter() - t0:.1f}s ({cache.folder})")
        model.embeddings_input = True
        by_path = dict(zip(paths, features))
        out = {}
        for split in splits:
            p, y = prepared.subset(split)
            feats = torch.stack([by_path[x] for x in p]) if p else torch.empty(0, features.shape[1])
            out[split] = TensorDataset(feats, torch.tensor(y, dtype=torch.long))
        return out
    return {
        split: ImageDataset(*prepared.subset(split), train_tf if split == "train" else eval_tf) for split in splits
    }


def _uses_cache(cfg: dict[str, Any], model: Classifier) -> bool:
    # A backbone that unfreezes later must see images from the start.
    return bool(cfg["finetune"]["cache_embeddings"]) and is_frozen(model.backbone) and not model.progressive


def train(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
    callbacks: Sequence[L.Callback] = (),
) -> dict[str, Any]:
    """Fine-tune a backbone + head; write checkpoints, metrics.json and plots into the run directory.

    With `ckpt=RUN/checkpoints/last.ckpt` the run resumes: weights, optimizer, lr schedule, the
    unfreezing state and the RNG state all continue where they stopped. LoRA runs also write a
    peft-standard adapter folder (`adapter/`) next to the checkpoints.

    Args:
        cfg: a composed config (`load_config(...)`), or None to compose one from `overrides`.
        overrides: Hydra override strings, exactly as on the command line.
        run_dir: where the run's files go (default `runs/train/<timestamp>`).
        callbacks: extra Lightning callbacks (Python API only).

    Returns:
        `{"run_dir": ..., "metrics": {...}, "best_checkpoint": ...}`.
    """
    config = as_config_dict(cfg, overrides)
    out = make_run_dir(run_dir, "train")
    if not (out / ".hydra" / "config.yaml").is_file():
        (out / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(config), out / ".hydra" / "config.yaml")
    L.seed_everything(config["seed"], workers=True, verbose=False)
    prepared = prepare_data(config, out)
    return fit(config, prepared, out, callbacks)


def fit(config: dict[str, Any], prepared: Prepared, out: Path, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train on an already prepared (scanned, split) dataset; `train` and each `cv` fold call this."""
    for split in ("train",) + (("val",) if config["data"]["val_fraction"] > 0 else ()):
        if split not in prepared.splits:
            raise DataError(f"The {split} split is empty. Fix: add images or change data.val_fraction / data.test_fraction.")
    counts = train_class_counts(prepared)
    model = Classifier(config, prepared.table.classes, class_counts=counts)
    if config["finetune"].get("head_from") and not config.get("ckpt"):  # a resumed run restores its own head
        print(f"Head initialised from {init_head_from(model, config['finetune']['head_from'])} (LP-FT)")
    unfreezing = progressive_callback(config, model)  # validates the schedule before any training
    use_cache = check_imbalance_options(config, _uses_cache(config, model), counts, prepared.table.classes)
    print(param_table(model.backbone, model.head))
    splits = [s for s in SPLITS if s in prepared.splits]
    datasets = _datasets(config, model, prepared, splits, use_cache)
    if config["resample"]["method"] != "none":
        x, y = datasets["train"].tensors
        datasets["train"] = TensorDataset(*resample_embeddings(x, y, config["resample"], prepared.table.classes, config["seed"]))
    train_labels = datasets["train"].tensors[1].tolist() if use_cache else prepared.subset("train")[1]
    data = ClassificationData(
        datasets,
        batch_size=config["data"]["batch_size"],
        num_workers=0 if use_cache else config["data"]["num_workers"],
        train_sampler=build_sampler(config["data"]["sampler"], train_labels, config["seed"]),
    )
    has_val = "val" in splits
    monitor = config["monitor"] if has_val else None
    # last.ckpt is its own checkpoint, written every epoch: Lightning's save_last only rewrites it in
    # epochs where the monitored metric improved, which would resume runs from a stale epoch.
    last_cb = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    best_cb = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max", auto_insert_metric_name=False, enable_version_counter=False
    ) if monitor else None
    memory = PeakMemory()
    callbacks = [*([best_cb] if best_cb else []), last_cb, RNGState(), memory, *([unfreezing] if unfreezing else []), *callbacks]
    stop = config["early_stopping"]
    if stop["enabled"] and has_val:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=stop["patience"], min_delta=stop["min_delta"]))
    callbacks += [safe_instantiate(c, f"callbacks[{i}]") for i, c in enumerate(config["callbacks"])]
    trainer = build_trainer(config, out, callbacks)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=str(resolve_checkpoint(config["ckpt"])) if config.get("ckpt") else None)
    train_seconds = time.perf_counter() - t0
    best = (best_cb.best_model_path if best_cb else "") or last_cb.best_model_path
    metrics: dict[str, Any] = {}
    if has_val:
        trainer.validate(model, datamodule=data, ckpt_path=best, verbose=False)
        metrics.update(model.eval_results["val"])
    if "test" in splits:
        trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
        metrics.update(model.eval_results["test"])
    metrics.update({"best_checkpoint": str(best), "epochs": trainer.current_epoch, "train_seconds": round(train_seconds, 2),
                    **memory.figures})
    result = {"run_dir": str(out), "metrics": metrics, "best_checkpoint": str(best)}
    if trainer.is_global_zero:
        if config["finetune"]["mode"] == "lora":
            # The best weights are loaded by validate/test above; ship them as a small adapter.
            result["adapter"] = str(save_adapter(model, out / "adapter"))
            print(f"LoRA adapter (peft format) + head: {result['adapter']}")
        write_run_report(metrics, prepared.table.classes, out, ("val", "test"))
    return result


def load_model(ckpt: str | Path) -> Classifier | Ensemble | Any:
    """A trained model from a checkpoint file, run directory or LoRA adapter folder (loaded with
    weights_only=True): a `Classifier`, a distilled student (`Distiller`), or for a `vfmtune cv` run
    directory the `Ensemble` of its fold models."""
    if is_cv_run(ckpt):
        members = [load_model(d) for d in fold_checkpoints(ckpt)]
        digests = {weights_digest(m.backbone) for m in members} if all(is_frozen(m.backbone) for m in members) else set()
        return Ensemble(members, shared_backbone=len(digests) == 1).eval()
    if Path(ckpt).is_dir() and (Path(ckpt) / "adapter_config.json").is_file():
        return load_adapter(ckpt)
    checkpoint = load_checkpoint(ckpt)
    hp = checkpoint["hyper_parameters"]
    if hp.get("task") == "distill":
        from vfmtune.tasks.distiller import Distiller

        student = Distiller(hp["config"], hp["classes"], teacher_info=hp["teacher_info"], load_weights=False)
        student.load_state_dict(checkpoint["state_dict"])
        return student.eval()
    model = Classifier(hp["config"], hp["classes"], load_weights=False, class_counts=hp.get("class_counts"))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def _classifier_only(model: Any, ckpt: str) -> Classifier | Ensemble:
    if not isinstance(model, (Classifier, Ensemble)):
        raise ConfigError(f"ckpt={ckpt} is a distilled student: its test metrics are in its run's metrics.json; "
                          "to run it, `vfmtune export ckpt=...` and use vfmtune.runtime.Predictor on the bundle.")
    return model


def evaluate(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Recompute metrics.json for `ckpt` on a split (`split=test` by default) of its data, or of the
    data named by `data.*` overrides (e.g. `data.root=/new/images split=all`)."""
    config = as_config_dict(cfg, overrides)
    if not config.get("ckpt"):
        raise ConfigError("evaluate needs ckpt=PATH (a .ckpt file or a run directory).")
    out = make_run_dir(run_dir, "evaluate")
    model = _classifier_only(load_model(config["ckpt"]), config["ckpt"])
    trained = model.config
    data_cfg = OmegaConf.merge(OmegaConf.create(trained["data"]), OmegaConf.from_dotlist(overridden(overrides, "data")))
    run_cfg = {**trained, "data": OmegaConf.to_container(data_cfg), "cache_dir": config.get("cache_dir"), "trainer": config["trainer"], "logger": "none"}
    prepared = prepare_data(run_cfg, out)
    if prepared.table.classes != model.classes:
        unknown = sorted(set(prepared.table.classes) - set(model.classes))
        if unknown:
            raise DataError(f"Classes {unknown} are not among the checkpoint's classes {model.classes}.")
        index = {c: model.classes.index(c) for c in prepared.table.classes}
        prepared.table.labels = [index[prepared.table.classes[y]] for y in prepared.table.labels]
        prepared.table.classes = model.classes
    split = config["split"]
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"split={split!r} is not one of train, val, test, all.")
    if split != "all" and split not in prepared.splits:
        raise DataError(f"The {split} split of this data is empty; use split=all to evaluate every image.")
    metrics = _score(run_cfg, model, prepared, split, out)
    metrics["checkpoint"] = str(config["ckpt"])
    write_run_report(metrics, model.classes, out, (split,))
    return {"run_dir": str(out), "metrics": metrics}


def _score(run_cfg: dict[str, Any], model: Classifier | Ensemble, prepared: Prepared, split: str, out: Path) -> dict[str, Any]:
    """Metrics of `model` on one split (or "all"), keyed `<split>/<metric>`."""
    use_cache = _uses_cache(run_cfg, model) and (not isinstance(model, Ensemble) or model.shared_backbone)
    datasets = _datasets(run_cfg, model, prepared, ["all" if split == "all" else split], use_cache)
    data = ClassificationData({"test": next(iter(datasets.values()))}, run_cfg["data"]["batch_size"], 0 if use_cache else run_cfg["data"]["num_workers"])
    trainer = build_trainer(run_cfg, out, [], enable_checkpointing=False)
    trainer.test(model, datamodule=data, verbose=False)
    return {k.replace("test/", f"{split}/", 1): v for k, v in model.eval_results["test"].items()}


def predict(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Classify `images` (a folder or a file) with `ckpt`; writes predictions.csv (path, class, p_<class>...)."""
    from vfmtune.backbones import data_config

    config = as_config_dict(cfg, overrides)
    if not config.get("ckpt") or not config.get("images"):
        raise ConfigError("predict needs ckpt=PATH and images=DIR.")
    out = make_run_dir(run_dir, "predict")
    model = _classifier_only(load_model(config["ckpt"]), config["ckpt"])
    paths = list_images(config["images"])
    ok = scan_or_skip(paths, config["data"]["on_bad_image"], config["data"]["num_workers"])
    paths = [p for p, good in zip(paths, ok) if good]
    _, eval_tf = build_transforms(data_config(model.backbone, model.config["backbone"]["img_size"]), {"enabled": False})
    data = ClassificationData({"predict": ImageDataset(paths, [0] * len(paths), eval_tf)}, config["data"]["batch_size"], config["data"]["num_workers"])
    trainer = build_trainer({**config, "logger": "none"}, out, [], enable_checkpointing=False)
    probs = torch.cat(trainer.predict(model, datamodule=data))
    path = out / "predictions.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", *(f"p_{c}" for c in model.classes)])
        for p, row in zip(paths, probs.tolist()):
            writer.writerow([p, model.classes[max(range(len(row)), key=row.__getitem__)], *(f"{v:.6f}" for v in row)])
    print(f"{len(paths)} predictions written to {path}")
    return {"run_dir": str(out), "predictions": str(path)}


def embed(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Build (or reuse) the embedding cache of the configured backbone, frozen, for every image.

    Returns:
        `{"run_dir", "features" [N, D] tensor, "labels" [N], "splits" [N] ("train"/"val"/"test"),
        "paths" [N], "classes"}`: what scikit-learn or imbalanced-learn code needs, in a notebook too.
    """
    config = as_config_dict(cfg, overrides)
    out = make_run_dir(run_dir, "embed")
    prepared = prepare_data(config, out)
    model = Classifier({**config, "finetune": {**config["finetune"], "mode": "frozen"}}, prepared.table.classes)
    features = _datasets(config, model, prepared, ["all"], use_cache=True)["all"].tensors[0]
    print(f"{features.shape[0]} embeddings of size {features.shape[1]} cached")
    return {
        "run_dir": str(out),
        "features": features,
        "labels": list(prepared.table.labels),
        "splits": list(prepared.splits),
        "paths": list(prepared.table.paths),
        "classes": list(prepared.table.classes),
    }


def cv(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Stratified k-fold cross-validation (`folds=5`) over train+val; the test split stays held out.

    One model per fold in `<run_dir>/fold_<i>/`; `metrics.json` holds `<metric>/mean` and
    `<metric>/std` over the folds and `ensemble/test/<metric>` for the fold models' averaged
    probabilities on the test split. The run directory can be passed as `ckpt=` to `evaluate` and
    `predict`, which then use the ensemble.

    Example:
        >>> result = vfmtune.cv(overrides=["folds=5", "loss=weighted_ce"], run_dir="runs/cv5")
        >>> result["metrics"]["test/balanced_accuracy/mean"], result["metrics"]["test/balanced_accuracy/std"]
    """
    config = as_config_dict(cfg, overrides)
    out = make_run_dir(run_dir, "cv")
    if not (out / ".hydra" / "config.yaml").is_file():
        (out / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(config), out / ".hydra" / "config.yaml")
    prepared = prepare_data(config, out)
    classes = prepared.table.classes
    folds = make_folds(prepared.table.labels, prepared.splits, int(config["folds"]), config["data"]["seed"], classes)
    save_folds(out / "folds.csv", prepared.table.paths, prepared.table.labels, classes, folds)
    results = []
    for k in range(config["folds"]):
        print(f"\n=== fold {k + 1}/{config['folds']} ===")
        fold_dir = out / f"fold_{k}"
        fold = Prepared(prepared.table, fold_splits(prepared.splits, folds, k))
        save_splits(fold_dir / "splits.csv", prepared.table.paths, prepared.table.labels, classes, fold.splits)
        L.seed_everything(config["seed"], workers=True, verbose=False)
        results.append(fit(config, fold, fold_dir))
    # Written before the ensemble is loaded: cv.json is what marks this directory as a cv run.
    write_json(out / "cv.json", {"folds": config["folds"], "fold_runs": [f"fold_{k}" for k in range(config["folds"])]})
    metrics: dict[str, Any] = {**aggregate([r["metrics"] for r in results]), "folds": config["folds"]}
    if "test" in prepared.splits:
        ensemble = load_model(out)
        scored = _score({**config, "logger": "none"}, ensemble, prepared, "test", out)
        metrics.update({f"ensemble/{k}": v for k, v in scored.items()})
        write_run_report({k.removeprefix("ensemble/"): v for k, v in metrics.items() if k.startswith("ensemble/")}, classes, out, ("test",))
    write_json(out / "metrics.json", metrics)
    for name in ("balanced_accuracy", "macro_f1", "accuracy"):
        if f"test/{name}/mean" in metrics:
            line = f"  test {name:<18} {metrics[f'test/{name}/mean']:.4f} ± {metrics[f'test/{name}/std']:.4f} over {config['folds']} folds"
            if f"ensemble/test/{name}" in metrics:
                line += f"; ensemble {metrics[f'ensemble/test/{name}']:.4f}"
            print(line)
    return {"run_dir": str(out), "metrics": metrics, "fold_runs": [r["run_dir"] for r in results]}


def export_merged(
    cfg: Config | DictConfig | dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Merge a LoRA run's adapters into the backbone and write a plain checkpoint (`merged.ckpt`).

    Merged and unmerged logits are compared on random images; the max abs difference is reported and
    above `merge_atol` the export fails. The merged checkpoint loads in `evaluate` / `predict` like
    any other (`ckpt=RUN_DIR/merged.ckpt`).

    Example:
        >>> vfmtune.export_merged(overrides=["ckpt=runs/train/lora"])["max_abs_diff"]
        3.1e-07
    """
    config = as_config_dict(cfg, overrides)
    if not config.get("ckpt"):
        raise ConfigError("export-merged needs ckpt=PATH (a LoRA run directory, .ckpt file or adapter folder).")
    model = load_model(config["ckpt"])
    trained = model.config
    if trained["finetune"]["mode"] != "lora":
        raise ConfigError(f"ckpt={config['ckpt']} was trained with finetune.mode={trained['finetune']['mode']}, not lora: nothing to merge.")
    merged, diff = merge_lora(model, config["merge_atol"], trained["backbone"]["img_size"] or 224)
    plain = {**trained, "finetune": {**trained["finetune"], "mode": "frozen"}}
    out = make_run_dir(run_dir, "export-merged")
    state = {**{f"backbone.{k}": v for k, v in merged.state_dict().items()}, **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
    target = out / "merged.ckpt"
    atomic_torch_save({"state_dict": state, "hyper_parameters": {"config": plain, "classes": model.classes, "merged_from": str(config["ckpt"])}}, target)
    print(f"merged LoRA into the backbone: max abs logit diff {diff:.3g} (merge_atol={config['merge_atol']}); wrote {target}")
    return {"run_dir": str(out), "checkpoint": str(target), "max_abs_diff": diff}
