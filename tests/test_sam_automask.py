"""`vfmtune auto-mask` on the tiny random-init SAM: prompt formats, one encoder pass per image, resuming,
atomic outputs, everything mode, and clear refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_instance_data, read_rows
from PIL import Image

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.cli import main
from vfmtune.commands.auto_mask import auto_mask
from vfmtune.data.images import DataError

TINY = ["sam.model=test_sam_tinyvit", "trainer.enable_progress_bar=false", "data.num_workers=0"]
BOXES = "image,x0,y0,x1,y1,label\nim00.png,10,8,34,28,red\nim01.png,10,8,34,28,green\nim01.png,30,40,52,60,red\n"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_instance_data(tmp_path / "data", n=3, coco=True)


def _run(tmp_path: Path, *args: str, name: str = "out") -> Path:
    auto_mask(overrides=[*TINY, *args, f"output={tmp_path / name}"], run_dir=tmp_path / f"{name}_run")
    return tmp_path / name


def test_auto_mask__writes_class_and_instance_maps_coco_and_review(data: Path, tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text(BOXES)
    out = _run(tmp_path, f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}")
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["green", "red"]  # CSV labels, sorted
    assert [im["file_name"] for im in coco["images"]] == ["im00.png", "im01.png"]  # only images with boxes
    assert all(a["segmentation"]["size"] == [72, 96] and "score" in a for a in coco["annotations"])
    ids = np.asarray(Image.open(out / "instances" / "im01.png"))
    assert ids.dtype == np.uint16 and set(np.unique(ids)) <= {0, 1, 2}
    classes = np.asarray(Image.open(out / "masks" / "im01.png"))
    assert set(np.unique(classes)) <= {0, 1, 2}
    rows = read_rows(out / "review.csv")
    assert [r["object"] for r in rows] == ["0", "0", "1"]
    assert all(("low_iou" in r["flags"]) == (float(r["predicted_iou"]) < 0.8) for r in rows)
    assert (out / "classes.txt").read_text().split() == ["background", "green", "red"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder_passes"] == 2 and summary["masks_new"] == 3  # one encoder pass per image, whatever its boxes


def test_auto_mask__csv_coco_and_yolo_boxes_give_the_same_masks(data: Path, tmp_path: Path) -> None:
    coco = json.loads((data / "annotations.json").read_text())
    rows, yolo = ["image,x0,y0,x1,y1,label"], tmp_path / "yolo"
    yolo.mkdir()
    (yolo / "classes.txt").write_text("red\ngreen\n")
    names = {1: "red", 2: "green"}
    for im in coco["images"]:
        lines = []
        for a in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            rows.append(f"{Path(im['file_name']).name},{x},{y},{x + w},{y + h},{names[a['category_id']]}")
            lines.append(f"{a['category_id'] - 1} {(x + w / 2) / 96} {(y + h / 2) / 72} {w / 96} {h / 72}")
        (yolo / f"{Path(im['file_name']).stem}.txt").write_text("\n".join(lines))
    (tmp_path / "b.csv").write_text("\n".join(rows) + "\n")
    outs = [_run(tmp_path, f"images={data / 'images'}", f"boxes={src}", name=n)
            for n, src in (("csv", tmp_path / "b.csv"), ("coco", data / "annotations.json"), ("yolo", yolo))]
    for f in ("im00.png", "im01.png", "im02.png"):
        ref = np.asarray(Image.open(outs[1] / "instances" / f))
        for o in (outs[0], outs[2]):
            assert np.array_equal(np.asarray(Image.open(o / "instances" / f)) > 0, ref > 0)


def test_auto_mask__rerun_skips_done_images_and_redoes_changed_ones(data: Path, tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text(BOXES)
    args = [f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}"]
    out = _run(tmp_path, *args)
    again = json.loads((_run(tmp_path, *args) / "summary.json").read_text())
    assert (again["images_resumed"], again["encoder_passes"]) == (2, 0)
    (tmp_path / "b.csv").write_text(BOXES.replace("im01.png,30,40", "im01.png,31,40"))
    changed = json.loads((_run(tmp_path, *args) / "summary.json").read_text())
    assert (changed["images_resumed"], changed["encoder_passes"]) == (1, 1)
    assert len(json.loads((out / "annotations.json").read_text())["annotations"]) == 3


def test_auto_mask__interrupted_run_leaves_no_folder_index_and_resumes(data: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vfmtune.sam.autolabel import AutoLabeller

    (tmp_path / "b.csv").write_text(BOXES)
    real, calls = AutoLabeller.label, []

    def crash_on_second(self: AutoLabeller, *a: object) -> dict:
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(AutoLabeller, "label", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}")
    out = tmp_path / "out"
    assert (out / "records" / "im00.json").is_file() and not (out / "records" / "im01.json").exists()
    assert not (out / "annotations.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(AutoLabeller, "label", real)
    summary = json.loads((_run(tmp_path, f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}") / "summary.json").read_text())
    assert (summary["images_resumed"], summary["masks"]) == (1, 3)


def test_auto_mask__clicks_join_boxes_or_stand_alone(data: Path, tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1,label,object\nim00.png,10,8,34,28,red,a\n")
    (tmp_path / "p.csv").write_text("image,x,y,positive,object,label\nim00.png,22,18,1,a,\nim00.png,30,25,0,a,\n"
                                    "im01.png,40,50,1,c1,green\n")
    out = _run(tmp_path, f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}", f"points={tmp_path / 'p.csv'}")
    rows = read_rows(out / "review.csv")
    assert [(r["image"], r["object"], r["label"]) for r in rows] == [("im00.png", "a", "red"), ("im01.png", "c1", "green")]


def test_auto_mask__everything_mode_without_prompts(data: Path, tmp_path: Path) -> None:
    out = _run(tmp_path, f"images={data / 'images' / 'im00.png'}", "auto_mask.points_per_side=4", "auto_mask.pred_iou_thresh=0",
               "auto_mask.stability_score_thresh=0")
    assert (out / "classes.txt").read_text().split() == ["background", "object"]
    assert json.loads((out / "summary.json").read_text())["encoder_passes"] == 1


@pytest.mark.parametrize(("rows", "message"), [
    ("im00.png,10,8,34,28,red\nnope.png,1,1,5,5,red\nim09.png,1,1,5,5,red\n", r"(?s)2 prompt rows.*row 3: image 'nope.png'.*row 4: image 'im09.png'"),
    ("im00.png,200,8,300,28,red\n", r"no area inside the 96x72 image"),
    ("im00.png,10,8,10,28,red\n", r"no area inside"),
    ("im00.png,34,8,10,28,red\n", r"x1 < x0"),
    ("im00.png,ten,8,34,28,red\n", r"'ten' is not a number"),
])
def test_auto_mask__bad_boxes_are_refused_before_anything_is_written(data: Path, tmp_path: Path, rows: str, message: str) -> None:
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1,label\n" + rows)
    with pytest.raises(DataError, match=message):
        _run(tmp_path, f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}")
    assert not (tmp_path / "out").exists()


def test_auto_mask__boxes_outside_are_clipped_and_counted_bad_ones_skipped_on_request(data: Path, tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1,label\nim00.png,-10,8,34,28,red\nim00.png,200,8,300,28,red\n")
    out = _run(tmp_path, f"images={data / 'images'}", f"boxes={tmp_path / 'b.csv'}", "auto_mask.on_bad_box=skip")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["boxes_clipped"], summary["prompts_skipped"], summary["masks_new"]) == (1, 1, 1)
    flags = [r["flags"] for r in read_rows(out / "review.csv")]
    assert flags[0].startswith("clipped") and flags[1].startswith("skipped: box")


def test_auto_mask__wrong_sam_family_checkpoint_names_it(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from vfmtune.sam import build_sam

    torch.save(build_sam("test_sam_vit").state_dict(), tmp_path / "vit.pt")
    with pytest.raises(SystemExit) as e:
        main(["auto-mask", *TINY, f"images={data / 'images'}", "sam.weights=file", f"sam.path={tmp_path / 'vit.pt'}",
              f"hydra.run.dir={tmp_path / 'r'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "WeightsError" in err and "does not fit test_sam_tinyvit" in err and "ViT SAM 32 wide" in err


def test_auto_mask__a_classifier_run_is_not_a_sam_checkpoint(data: Path, tmp_path: Path) -> None:
    from conftest import TINY as TINY_CLASSIFIER
    from conftest import make_imagefolder

    from vfmtune.choices import ConfigError

    images = make_imagefolder(tmp_path / "cls", {"cat": 6, "dog": 6})
    main(["train", *TINY_CLASSIFIER, f"data.root={images}", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'cls_run'}"])
    with pytest.raises(ConfigError, match="not a task=sam_prompt run"):
        _run(tmp_path, f"images={data / 'images'}", f"ckpt={tmp_path / 'cls_run'}")
