"""Domain shift on the textile set: the same fabric through another camera, and what adaptation recovers.

Run: python bench/domain_shift.py [--severities 1 2] [--methods ...] [--extra precision=bf16] [--results domain_shift]

Source: the 2,000 textile images, split 70/10/20 (seed 0, stratified; the linear-probe benchmark's split).
Target: the same scenes through `vfmtune.camera_shift` at severity 1 and 2 (documented there): the
*training* images' shifted copies form the unlabelled adaptation pool (1,400), the *test* images'
shifted copies the labelled target test set (400) that no method sees while training or adapting.
Every method reports source-test and target-test macro-F1:
  none_224 / none_448     frozen DINOv2-S linear probe at 224 / 448 px, no adaptation
  adabn_448               the 448 px probe with its BatchNorm feature norm re-estimated on the pool
  adabn_routed_448        the same, keeping the source statistics too: a domain classifier routes each image
  tent_448                the same probe, entropy minimised through DINOv2's LayerNorms on the pool
  self_training_448       two rounds of class-balanced pseudo-labels (confidence >= 0.9) from the pool
  lora_224 / coral_224 / dann_224   LoRA r=8 fine-tunes at 224 px, plain or aligning source and pool features
                                    (alignment weight 1.0)
  dann_224_w01            DANN as above at adapt.weight=0.1
  oracle_448              the 448 px probe trained on the target's own labelled training images (the ceiling)
  student_before / _adabn  with --student RUN: a distilled student under the same shift, without and with AdaBN
Gap closed = (method - none) / (oracle - none) on target-test macro-F1, per severity.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from common import RESULTS, write_results

import vfmtune
from vfmtune.camera_shift import shift_folder
from vfmtune.data.sources import from_imagefolder, packaged_dataset
from vfmtune.data.splits import stratified_split

PROBE = ["finetune=frozen", "data.val_fraction=0.1", "data.test_fraction=0.2"]
LORA = ["finetune=lora", "optim.lr=1e-3", "optim.backbone_lr_scale=1.0", "head.feature_norm=false", "trainer.max_epochs=3",
        "early_stopping.enabled=false", "data.batch_size=16", "backbone.img_size=224"]
METHODS = ["none_224", "none_448", "adabn_448", "adabn_routed_448", "tent_448", "self_training_448", "oracle_448", "lora_224", "coral_224", "dann_224", "dann_224_w01"]
ALIGN_WEIGHT = {"coral_224": 1.0, "dann_224": 1.0, "dann_224_w01": 0.1}  # adapt.weight of the aligned LoRA runs


def make_domains(tmp: Path, severities: list[int]) -> dict:
    """Source manifest with the fixed split; per severity the unlabelled pool and the labelled target test."""
    root = packaged_dataset("textile")
    table = from_imagefolder(root)
    splits = stratified_split(table.labels, 0.1, 0.2, seed=0, classes=table.classes)
    source = tmp / "source.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *((p, table.classes[y], s) for p, y, s in zip(table.paths, table.labels, splits))])
    out = {"source": source, "root": str(root), "n": {s: splits.count(s) for s in ("train", "val", "test")}}
    for severity in severities:
        train = [p for p, s in zip(table.paths, splits) if s == "train"]
        test = [p for p, s in zip(table.paths, splits) if s == "test"]
        shift_folder(train, tmp / f"s{severity}" / "pool", severity, seed=severity, root=str(root))
        shift_folder(test, tmp / f"s{severity}" / "test", severity, seed=100 + severity, root=str(root))
        # the oracle's labelled target data: the pool with its labels, plus shifted val images for selection
        val = [p for p, s in zip(table.paths, splits) if s == "val"]
        shift_folder(val, tmp / f"s{severity}" / "oracle_val", severity, seed=200 + severity, root=str(root))
        rows = [(str(tmp / f"s{severity}" / "pool" / (str(Path(p).relative_to(root).with_suffix(".png")))), Path(p).parent.name, "train") for p in train]
        rows += [(str(tmp / f"s{severity}" / "oracle_val" / (str(Path(p).relative_to(root).with_suffix(".png")))), Path(p).parent.name, "val") for p in val]
        with open(tmp / f"s{severity}" / "oracle.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *rows])
    return out


def run_method(name: str, severity: int, tmp: Path, domains: dict, extra: list[str], cache: str) -> dict:
    s = tmp / f"s{severity}"
    common = [f"data.manifest={domains['source']}", "data.dataset=null", f"data.target_test={s / 'test'}",
              "trainer.enable_progress_bar=false", "data.num_workers=2", f"cache_dir={cache}", *extra]
    probe448 = [*PROBE, "backbone.img_size=448"]
    run_dir = tmp / "runs" / f"{name}_s{severity}"
    if (run_dir / "metrics.json").is_file():  # --keep: a finished method is read back, not rerun
        m = json.loads((run_dir / "metrics.json").read_text())
    elif name in ("none_224", "none_448"):
        size = name.split("_")[1]
        m = vfmtune.train(overrides=[*common, *PROBE, f"backbone.img_size={size}"], run_dir=run_dir)["metrics"]
    elif name in ("adabn_448", "adabn_routed_448", "tent_448"):
        base = tmp / "runs" / f"none_448_s{severity}"
        if not (base / "metrics.json").is_file():
            run_method("none_448", severity, tmp, domains, extra, cache)
        method = name.split("_")[0]
        routed = ["adapt.keep_source=true"] if "routed" in name else []
        m = vfmtune.adapt_model(overrides=[f"ckpt={base}", f"data.target={s / 'pool'}", f"data.target_test={s / 'test'}",
                                           f"adapt.method={method}", f"cache_dir={cache}", "data.num_workers=2", *routed, *extra],
                                run_dir=run_dir)["metrics"]
    elif name == "self_training_448":
        m = vfmtune.train(overrides=[*common, *probe448, f"data.target={s / 'pool'}", "adapt.method=self_training",
                                     "adapt.rounds=2", "adapt.threshold=0.9"], run_dir=run_dir)["metrics"]
    elif name == "oracle_448":
        oracle = [f"data.manifest={s / 'oracle.csv'}", "data.dataset=null", f"data.target_test={s / 'test'}",
                  "trainer.enable_progress_bar=false", "data.num_workers=2", f"cache_dir={cache}", *extra]
        m = vfmtune.train(overrides=[*oracle, *probe448, "data.test_fraction=0"], run_dir=run_dir)["metrics"]
    else:  # lora_224 / coral_224 / dann_224 / dann_224_w01
        method = name.split("_")[0]
        adapt = [] if method == "lora" else [f"data.target={s / 'pool'}", f"adapt.method={method}", f"adapt.weight={ALIGN_WEIGHT[name]}"]
        m = vfmtune.train(overrides=[*common, *LORA, "data.val_fraction=0.1", "data.test_fraction=0.2", *adapt], run_dir=run_dir)["metrics"]
    if name == "oracle_448":
        m["test/macro_f1"] = None  # its test split is the target's: no source-test figure
    return {"source_test_macro_f1": m.get("test/macro_f1"), "target_test_macro_f1": m.get("target/macro_f1"),
            "target_test_accuracy": m.get("target/accuracy"),
            **{k.replace("/", "."): v for k, v in m.items() if k.startswith("routing/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. precision=bf16")
    parser.add_argument("--keep", help="keep the shifted images and runs in this folder (reruns reuse them)")
    parser.add_argument("--student", help="a distilled student's run (trained on the same split): AdaBN before / after")
    parser.add_argument("--results", default="domain_shift")
    args = parser.parse_args()
    figures: dict = {"severities": args.severities, "extra": args.extra}
    previous = RESULTS / f"{args.results}.json"
    if previous.is_file():  # methods run in separate invocations merge into one table (same split, same shift)
        old = json.loads(previous.read_text())
        figures = {k: v for k, v in old.items() if k[0] == "s" and k[1].isdigit()} | figures
        figures["severities"] = sorted(set(old.get("severities", [])) | set(args.severities))
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        domains = make_domains(tmp, args.severities)
        figures.update({f"n_{k}": v for k, v in domains["n"].items()})
        cache = str(tmp / "cache")
        for severity in args.severities:
            for name in args.methods:
                for k, v in run_method(name, severity, tmp, domains, args.extra, cache).items():
                    figures[f"s{severity}.{name}.{k}"] = None if v is None else round(v, 4)
                print({k: v for k, v in figures.items() if k.startswith(f"s{severity}.{name}.")}, flush=True)
                write_results(args.results, {**figures, "partial": True})  # a method's figures survive a later failure
            if args.student:
                s = tmp / f"s{severity}"
                m = vfmtune.adapt_model(overrides=[f"ckpt={args.student}", f"data.target={s / 'pool'}", f"data.target_test={s / 'test'}",
                                                   "adapt.method=adabn", f"cache_dir={cache}", "data.num_workers=2", *args.extra],
                                        run_dir=tmp / "runs" / f"student_adabn_s{severity}")["metrics"]
                for when, prefix in (("before", "before/"), ("adabn", "")):
                    figures[f"s{severity}.student_{when}.source_test_macro_f1"] = round(m[f"{prefix}test/macro_f1"], 4)
                    figures[f"s{severity}.student_{when}.target_test_macro_f1"] = round(m[f"{prefix}target/macro_f1"], 4)
            none, oracle = figures.get(f"s{severity}.none_448.target_test_macro_f1"), figures.get(f"s{severity}.oracle_448.target_test_macro_f1")
            if none is not None and oracle is not None and oracle > none:
                for name in METHODS:
                    value = figures.get(f"s{severity}.{name}.target_test_macro_f1")
                    if value is not None and name not in ("oracle_448",):
                        figures[f"s{severity}.{name}.gap_closed_vs_none_448"] = round((value - none) / (oracle - none), 3)
    write_results(args.results, figures)


if __name__ == "__main__":
    main()
