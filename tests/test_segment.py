"""Semantic segmentation (task=segment): train / evaluate / predict through the CLI on generated
images and masks, the heads, losses, mask metrics and tiled inference."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_mask_folder, read_rows
from PIL import Image

from vfmtune.choices import SegHead, SegLoss
from vfmtune.cli import main
from vfmtune.metrics import MaskMetrics
from vfmtune.seg_losses import SegmentationLoss, soft_dice
from vfmtune.tasks.seg_heads import LightDecoder, LinearHead, SkipDecoder, build_seg_head
from vfmtune.tiling import sliding_window
from vfmtune.windows import blend_weights, window_starts

SEG = [*TINY, "task=segment", "trainer.max_epochs=30"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("segment")
    data = make_mask_folder(base / "data", n=30)
    main(["train", *SEG, f"data.root={data}", f"hydra.run.dir={base / 'run'}"])
    return {"data": data, "run": base / "run", "base": base}


def test_train__metrics_plots_and_learning(seg_run: dict[str, Path]) -> None:
    metrics = json.loads((seg_run["run"] / "metrics.json").read_text())
    for key in ("test/miou", "test/dice", "test/pixel_accuracy", "test/boundary_iou", "val/miou", "test/iou/disc", "test/dice/square"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # Bright discs on noise: even a frozen random tiny ViT's linear probe must find most of them.
    assert metrics["test/iou/disc"] > 0.35 and metrics["test/iou/background"] > 0.85
    assert len(metrics["test/confusion_matrix"]) == 3
    for name in ("per_class_iou_test.png", "curves.png", "overlays_test.png"):
        assert Image.open(seg_run["run"] / "plots" / name).size[0] > 100
    ckpt = torch.load(seg_run["run"] / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["task"] == "segment" and ckpt["hyper_parameters"]["window"] == 48
    assert ckpt["hyper_parameters"]["classes"] == ["background", "disc", "square"]


def test_evaluate__recomputes_test_metrics(seg_run: dict[str, Path], tmp_path: Path) -> None:
    main(["evaluate", f"ckpt={seg_run['run']}", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"])
    trained = json.loads((seg_run["run"] / "metrics.json").read_text())
    scored = json.loads((tmp_path / "metrics.json").read_text())
    # evaluate resizes the normalised image where training resized it as uint8: a few edge pixels may flip
    assert scored["test/miou"] == pytest.approx(trained["test/miou"], abs=0.01)
    assert sum(map(sum, scored["test/confusion_matrix"])) == sum(map(sum, trained["test/confusion_matrix"]))


def test_predict__mask_per_image_at_full_resolution_tiled(seg_run: dict[str, Path], tmp_path: Path) -> None:
    tiles = [np.asarray(Image.open(p)) for p in sorted((seg_run["data"] / "images").glob("*.png"))[:9]]
    mosaic = np.concatenate([np.concatenate(tiles[r * 3 : r * 3 + 3], 1) for r in range(3)], 0)  # 144 px: 3x the training tiles
    (tmp_path / "in").mkdir()
    Image.fromarray(mosaic).save(tmp_path / "in" / "mosaic.png")
    Image.fromarray(tiles[0]).save(tmp_path / "in" / "tile.png")
    main(["predict", f"ckpt={seg_run['run']}", f"images={tmp_path / 'in'}", "overlay=true", f"hydra.run.dir={tmp_path / 'out'}"])
    rows = {Path(r["path"]).name: r for r in read_rows(tmp_path / "out" / "predictions.csv")}
    assert set(rows) == {"mosaic.png", "tile.png"}
    mask = Image.open(tmp_path / "out" / "masks" / "mosaic.png")
    assert mask.mode == "P" and mask.size == (144, 144) and set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    assert float(rows["mosaic.png"]["share_disc"]) > 0.02  # discs are found in the tiled image too
    assert Image.open(tmp_path / "out" / "overlays" / "tile.png").mode == "RGB"


def test_frozen_run__patch_tokens_cached_once(seg_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import os

    cache = os.environ["VFMTUNE_CACHE"]
    main(["train", *SEG, "trainer.max_epochs=1", f"data.root={seg_run['data']}", f"hydra.run.dir={tmp_path / 'a'}"])
    shards = sorted(Path(cache).glob("embeddings/*/*.safetensors"))
    main(["train", *SEG, "trainer.max_epochs=1", "segment.loss=focal_dice", f"data.root={seg_run['data']}", f"hydra.run.dir={tmp_path / 'b'}"])
    assert "patch tokens ready" in capsys.readouterr().out
    assert sorted(Path(cache).glob("embeddings/*/*.safetensors")) == shards  # nothing recomputed


@pytest.mark.parametrize("overrides", [["segment.head=decoder"], ["finetune=last_blocks", "finetune.n_blocks=1", "segment.head=linear_ms"]],
                         ids=["decoder_cached", "last_blocks_images"])
def test_train__heads_and_adaptation(seg_run: dict[str, Path], tmp_path: Path, overrides: list[str]) -> None:
    main(["train", *SEG, "trainer.max_epochs=3", *overrides, f"data.root={seg_run['data']}", f"hydra.run.dir={tmp_path}"])
    assert 0.0 <= json.loads((tmp_path / "metrics.json").read_text())["test/miou"] <= 1.0


def test_coco_source__rasterised_and_trained(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    data = make_mask_folder(tmp_path / "folder", n=24)
    images, annotations = [], []
    for i, path in enumerate(sorted((data / "images").glob("*.png"))):
        mask = np.asarray(Image.open(data / "masks" / path.name))
        images.append({"id": i, "file_name": path.name, "height": 48, "width": 48})
        for category in (1, 2):
            if (mask == category).any():
                rle = mask_utils.encode(np.asfortranarray((mask == category).astype(np.uint8)))
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category, "iscrowd": 0,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}]}
    (data / "images" / "annotations.json").write_text(json.dumps(coco))
    main(["train", *SEG, "trainer.max_epochs=2", f"data.coco={data / 'images' / 'annotations.json'}", f"hydra.run.dir={tmp_path / 'run'}"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"test/iou/disc", "test/iou/square"} <= set(metrics)


def test_bad_mask__stops_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_mask_folder(tmp_path / "data", n=12)
    bad = data / "masks" / "img_003.png"
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(bad)  # class 7 of 3
    with pytest.raises(SystemExit) as exc:
        main(["train", *SEG, f"data.root={data}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Fix" in err


def test_no_data__names_the_three_layouts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", *TINY, "task=segment", f"hydra.run.dir={tmp_path}"])
    assert "images/ and DIR/masks/" in capsys.readouterr().err


def test_heads__shapes() -> None:
    x = torch.randn(2, 64 * 4, 4, 4)
    assert build_seg_head(SegHead.linear_ms, 256, 3)(x).shape == (2, 3, 4, 4)
    assert isinstance(build_seg_head(SegHead.linear, 256, 3), LinearHead)
    decoder = build_seg_head(SegHead.decoder, 256, 3, decoder_dim=32)
    assert isinstance(decoder, LightDecoder) and decoder(x).shape == (2, 3, 16, 16)  # x4: two x2 upsampling steps
    skip = build_seg_head(SegHead.decoder_skip, 256, 3, decoder_dim=32)
    assert isinstance(skip, SkipDecoder) and skip(x, torch.randn(2, 3, 56, 56)).shape == (2, 3, 28, 28)  # half the image


def test_decoder_skip__trains_on_images_and_exports(seg_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import onnxruntime as ort

    main(["train", *SEG, "trainer.max_epochs=3", "segment.head=decoder_skip", f"data.root={seg_run['data']}", f"hydra.run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert "reads the images too" in out and "patch tokens ready" not in out  # a frozen backbone, but no token cache
    assert 0.0 <= json.loads((tmp_path / "run" / "metrics.json").read_text())["test/miou"] <= 1.0
    main(["export", f"ckpt={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'export'}"])
    bundle = tmp_path / "export" / "bundle"
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["export_metrics"]["max_abs_diff_probs"] <= 1e-4 and info["export_metrics"]["pixel_agreement"] == 1.0
    session = ort.InferenceSession(str(bundle / info["fp32_model"]))
    assert session.run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})[0].shape == (1, 3, 32, 32)  # logits at 1/2


def test_encoder_stem__imagenet_cnn_levels_in_its_own_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfmtune.backbones import create_backbone
    from vfmtune.tasks.seg_heads import EncoderStem
    from vfmtune.tasks.segmenter import Segmenter
    from vfmtune.weights import WeightsError

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's; Lite0 wants 0.5 / 0.5
    stem = EncoderStem(create_backbone("timm/tf_efficientnet_lite0", weights="packaged"), mean, std).eval()
    lite0 = create_backbone("timm/tf_efficientnet_lite0", weights="packaged").eval()
    assert stem.channels == (16, 24) and len(stem.cnn.blocks) == 2  # pruned after the stride-4 stage
    image = torch.rand(1, 3, 64, 64)
    ours = stem((image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        theirs = lite0.forward_intermediates((image - 0.5) / 0.5, indices=(0, 1), intermediates_only=True)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours, theirs))
    def config(cnn: str) -> dict:
        return {"task": "segment", "backbone": {"name": "timm/test_vit", "weights": "none", "img_size": 64},
                "segment": {"head": "decoder_skip", "skip_encoder": cnn}}

    model = Segmenter(config("timm/tf_efficientnet_lite0"), ["a", "b"])
    assert torch.equal(model.head.stem.cnn.conv_stem.weight, lite0.conv_stem.weight)  # ImageNet weights, offline
    reloaded = Segmenter(config("timm/tf_efficientnet_lite0"), ["a", "b"], load_weights=False)  # as a checkpoint is read
    assert not torch.equal(reloaded.head.stem.cnn.conv_stem.weight, lite0.conv_stem.weight)
    reloaded.load_state_dict(model.state_dict())
    assert torch.equal(reloaded.head.stem.cnn.conv_stem.weight, lite0.conv_stem.weight)
    with pytest.raises(ValueError, match="strides \\[16, 16\\], not 2 and 4"):
        Segmenter(config("timm/test_vit"), ["a", "b"], load_weights=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="segment.skip_encoder=timm/resnet18: no packaged weights"):
        Segmenter(config("timm/resnet18"), ["a", "b"])  # offline: fails fast, naming the setting


def test_losses__ignore_only_batch_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    ignored = torch.full((2, 8, 8), 255)
    for name in SegLoss:
        loss = SegmentationLoss(name)(logits, ignored)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()


def test_soft_dice__perfect_and_worst() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert soft_dice(perfect, target).item() == pytest.approx(0.0, abs=1e-3)
    assert soft_dice(-perfect, target).item() > 0.95  # 1 up to the smoothing term


def test_class_weights_from_training_pixels() -> None:
    from vfmtune.compose import typed
    from vfmtune.seg_losses import build_seg_loss

    loss = build_seg_loss(typed({"segment": {"loss": "ce", "class_weights": "balanced"}}).segment, [900, 100])
    assert loss.weights.tolist() == pytest.approx([1000 / 1800, 1000 / 200])


def test_mask_metrics__golden_iou_dice_ignore() -> None:
    spec = MaskMetrics()
    metrics = spec.build(["bg", "fg"])
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 0]]])  # the 255 pixel is predicted 0: ignored
    spec.update(metrics, torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float(), target)
    out = spec.results(metrics.compute(), "test", ["bg", "fg"])
    # bg: tp 3, fp 1, fn 1 -> IoU 3/5, Dice 6/8; fg: tp 2, fp 1, fn 1 -> IoU 2/4, Dice 4/6
    assert out["test/iou/bg"] == pytest.approx(0.6) and out["test/iou/fg"] == pytest.approx(0.5)
    assert out["test/miou"] == pytest.approx(0.55) and out["test/dice"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert out["test/pixel_accuracy"] == pytest.approx(5 / 7)


def test_window_starts__cover_with_overlap() -> None:
    starts = window_starts(900, 256, 0.25)
    assert starts[0] == 0 and starts[-1] == 900 - 256
    assert all(b - a <= 256 * 0.75 for a, b in itertools.pairwise(starts))
    assert window_starts(100, 256, 0.25) == [0]
    assert blend_weights(8).max() == 1.0 and blend_weights(8).min() > 0


def test_sliding_window__seamless_for_a_translation_invariant_model() -> None:
    # A per-pixel model: tiling must reproduce the whole-image answer, seams and all windows blended.
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], 1)

    image = torch.linspace(-1, 1, 200 * 180).reshape(1, 1, 200, 180).expand(1, 3, 200, 180).contiguous()
    tiled = sliding_window(predict, image, size=32, window=32, overlap=0.25)
    assert tiled.shape == (1, 2, 200, 180)
    torch.testing.assert_close(tiled[:, 0], image[:, 0], atol=0.02, rtol=0)
