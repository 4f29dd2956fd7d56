"""task=sam_prompt end to end on the tiny random-init SAM: train (cached embeddings, LoRA), evaluate, auto-mask with
the fine-tuned run, score auto-mask outputs, export to ONNX and run the bundle without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAM_TINY, make_instance_data
from PIL import Image

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.choices import ConfigError
from vfmtune.cli import main


def test_train__writes_instance_metrics_per_class(sam_run: dict) -> None:
    metrics = json.loads((sam_run["run"] / "metrics.json").read_text())
    for prefix in ("val", "test"):
        for key in ("instance_iou", "instance_dice", "mask_ap", "mask_ap50", "pq", "instance_iou/red", "instance_iou/green"):
            assert f"{prefix}/{key}" in metrics, key
    assert metrics["embeddings_cached"] is True and metrics["train_images_synthetic"] == 0
    assert metrics["train_instances"] > 0 and (sam_run["run"] / "checkpoints" / "best.ckpt").is_file()
    hp = torch.load(sam_run["run"] / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["task"] == "sam_prompt" and hp["classes"] == ["background", "red", "green"]


def test_evaluate__reproduces_the_runs_test_metrics(sam_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMTUNE_CACHE", str(sam_run["cache"]))
    main(["evaluate", f"ckpt={sam_run['run']}", f"hydra.run.dir={tmp_path / 'eval'}"])
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((sam_run["run"] / "metrics.json").read_text())
    for key in ("test/instance_iou", "test/mask_ap", "test/pq", "test/instances"):
        assert got[key] == pytest.approx(trained[key], abs=1e-6), key


def test_auto_mask_with_the_run__and_evaluate_its_output_against_ground_truth(sam_run: dict, tmp_path: Path) -> None:
    from vfmtune.commands.auto_mask import auto_mask
    from vfmtune.commands.evaluate import evaluate

    data = sam_run["data"]
    out = Path(auto_mask(overrides=[f"ckpt={sam_run['run']}", f"images={data / 'images'}", f"boxes={_boxes_csv(data, tmp_path)}",
                                    "trainer.enable_progress_bar=false", f"output={tmp_path / 'labels'}"], run_dir=tmp_path / "am")["output"])
    info = json.loads((out / "annotations.json").read_text())["info"]
    assert info["model"]["model"] == "test_sam_tinyvit" and info["model"]["ckpt"] == str(sam_run["run"])
    metrics = evaluate(overrides=[f"predictions={out}", f"data.root={data}"], run_dir=tmp_path / "ev")["metrics"]
    assert metrics["all/instances"] == 24 and metrics["class_agnostic"] is False
    assert 0 <= metrics["all/instance_iou"] <= 1 and "all/pq/red" in metrics


def _boxes_csv(data: Path, tmp_path: Path) -> Path:
    """Ground-truth boxes of the instance folder as a CSV prompt file."""
    rows = ["image,x0,y0,x1,y1,label"]
    names = {1: "red", 2: "green"}
    for f in sorted((data / "instances").glob("*.png")):
        ids = np.asarray(Image.open(f))
        classes = np.asarray(Image.open(data / "masks" / f.name))
        for i in np.unique(ids[ids > 0]):
            ys, xs = np.nonzero(ids == i)
            rows.append(f"{f.name},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1},{names[int(classes[ys[0], xs[0]])]}")
    (tmp_path / "gt.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "gt.csv"


def test_export__onnx_bundle_matches_torch_and_runs_without_torch(sam_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMTUNE_CACHE", str(sam_run["cache"]))
    main(["export", f"ckpt={sam_run['run']}", f"hydra.run.dir={tmp_path / 'exp'}"])
    metrics = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    assert metrics["mask_iou_min"] >= 0.98 and metrics["embedding_max_abs_diff"] < 1e-3
    bundle = tmp_path / "exp" / "bundle"
    image = tmp_path / "im.png"
    Image.open(sam_run["data"] / "images" / "im01.png").save(image)
    code = ("import sys, vfmtune.runtime as r; r.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'the runtime imported torch'")
    done = subprocess.run([sys.executable, "-c", code, str(bundle), str(image), "10,8,34,28", "30,40,52,60"],
                          capture_output=True, text=True, check=True)
    assert len(done.stdout.strip().splitlines()) == 3  # one line per box, then where the masks went
    assert np.asarray(Image.open(tmp_path / "im.masks.png")).max() <= 2


def test_train_lora__adapters_train_on_images_and_the_run_reloads(tmp_path: Path) -> None:
    data = make_instance_data(tmp_path / "d", n=8)
    main(["train", "task=sam_prompt", *SAM_TINY, "finetune=lora", "finetune.rank=2", f"data.root={data}",
          f"hydra.run.dir={tmp_path / 'lora'}"])
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert metrics["embeddings_cached"] is False
    from vfmtune.loading import load_model

    model = load_model(tmp_path / "lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith(("sam.prompt_encoder", "sam.mask_decoder")) for n in names)
    assert any("image_encoder" in n and "lora_" in n for n in names)
    plain = model.merged_sam()
    assert not any("lora" in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize(("args", "message"), [
    (["finetune=last_blocks"], "finetune=frozen .* lora .* or full"),
    (["finetune.freeze=[nope.*]"], "finetune.freeze pattern 'nope.\\*' matches no"),
])
def test_train__unsupported_adaptation_is_named(tmp_path: Path, args: list[str], message: str) -> None:
    from vfmtune.commands.train import train

    data = make_instance_data(tmp_path / "d", n=6)
    with pytest.raises(ConfigError, match=message):
        train(overrides=["task=sam_prompt", *SAM_TINY, f"data.root={data}", *args], run_dir=tmp_path / "r")


def test_predict__points_to_auto_mask(sam_run: dict, tmp_path: Path) -> None:
    from vfmtune.commands.predict import predict

    with pytest.raises(ConfigError, match="vfmtune auto-mask ckpt=RUN"):
        predict(overrides=[f"ckpt={sam_run['run']}", f"images={sam_run['data'] / 'images'}"], run_dir=tmp_path)


def test_model_group__selects_the_sam(tmp_path: Path) -> None:
    from vfmtune.compose import load_config

    assert load_config("task=sam_prompt", "model=lite_medsam").sam.model == "lite_medsam"
    assert load_config("model=sam_vit_b", command="auto_mask").sam.model == "sam_vit_b"
