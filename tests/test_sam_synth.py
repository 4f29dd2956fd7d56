"""`vfmtune synth` (cut-paste scenes) and `data.synthetic` (training split only, never cut from val/test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAM_TINY, TINY, make_instance_data
from PIL import Image

pytest.importorskip("segment_anything", reason="vfmtune.sam needs: pip install segment-anything==1.0")

from vfmtune.cli import main
from vfmtune.commands.synth import synth
from vfmtune.config import SynthConfig
from vfmtune.data.cutpaste import CutObject, Scene, paste
from vfmtune.data.images import DataError


def _synth(tmp_path: Path, objects: Path, name: str, *args: str) -> Path:
    return Path(synth(overrides=[f"objects={objects}", "n=4", f"output={tmp_path / name}", *args], run_dir=tmp_path / f"{name}_run")["output"])


def test_synth__seeded_scenes_are_byte_identical_and_consistent(tmp_path: Path) -> None:
    data = make_instance_data(tmp_path / "d", n=4)
    a, b = _synth(tmp_path, data, "a"), _synth(tmp_path, data, "b")
    c = _synth(tmp_path, data, "c", "seed=1")
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 12
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    coco = json.loads((a / "annotations.json").read_text())
    for im in coco["images"]:
        stem = Path(im["file_name"]).stem
        ids = np.asarray(Image.open(a / "instances" / f"{stem}.png"))
        classes = np.asarray(Image.open(a / "masks" / f"{stem}.png"))
        assert ((ids > 0) == (classes > 0)).all()  # every labelled pixel belongs to exactly one instance
        assert len([x for x in coco["annotations"] if x["image_id"] == im["id"]]) == len(np.unique(ids[ids > 0]))
    info = json.loads((a / "synth.json").read_text())
    assert info["classes"] == ["background", "red", "green"] and len(info["sources"]) == 4
    assert all(lo >= 0 for lo in info["pasted_per_scene"])


@pytest.mark.parametrize("blend", ["none", "gaussian", "poisson"])
def test_synth__blends_onto_plain_backgrounds(tmp_path: Path, blend: str) -> None:
    if blend == "poisson":
        pytest.importorskip("cv2", reason="synth.blend=poisson uses OpenCV")
    data = make_instance_data(tmp_path / "d", n=3)
    backgrounds = tmp_path / "bg"
    backgrounds.mkdir()
    Image.fromarray(np.full((80, 100, 3), 90, np.uint8)).save(backgrounds / "grey.png")
    out = _synth(tmp_path, data, "s", f"backgrounds={backgrounds}", f"synth.blend={blend}", "synth.objects_per_image=[3,3]")
    info = json.loads((out / "synth.json").read_text())
    assert {s["role"] for s in info["sources"]} == {"objects", "background"}
    assert Image.open(out / "images" / "synth_00000.png").size == (100, 80)
    assert sum(info["pasted_per_scene"]) > 0


def test_paste__never_hides_more_than_max_occlusion() -> None:
    rng = np.random.default_rng(0)
    cfg = SynthConfig(rotation=0, flip=False, scale=[1.0, 1.0], color_jitter=0, blend="none", max_occlusion=0.2)
    scene = Scene(np.zeros((30, 30, 3), np.uint8))
    square = CutObject(np.full((10, 10, 3), 200, np.uint8), np.ones((10, 10), bool), 1, 0)
    for _ in range(30):
        paste(scene, square, rng, cfg)
    assert len(scene.masks) > 3
    assert all(m.sum() >= 0.8 * a for m, a in zip(scene.masks, scene.areas))
    assert not np.any(np.sum(scene.masks, axis=0) > 1)


def test_synth__refuses_an_existing_output_folder(tmp_path: Path) -> None:
    data = make_instance_data(tmp_path / "d", n=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        _synth(tmp_path, data, "taken")


def test_synthetic__from_a_run_adds_to_training_only_and_is_counted(sam_run: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMTUNE_CACHE", str(sam_run["cache"]))
    out = _synth(tmp_path, sam_run["run"], "from_run")
    info = json.loads((out / "synth.json").read_text())
    assert "training split" in info["objects_from"]
    splits = {r.split(",")[0]: r.split(",")[2] for r in (sam_run["run"] / "splits.csv").read_text().splitlines()[1:]}
    assert {s["path"] for s in info["sources"]} == {p for p, s in splits.items() if s == "train"}
    main(["train", "task=sam_prompt", *SAM_TINY, f"data.root={sam_run['data']}", f"data.synthetic={out}",
          f"hydra.run.dir={tmp_path / 'with_synth'}"])
    metrics = json.loads((tmp_path / "with_synth" / "metrics.json").read_text())
    real = json.loads((sam_run["run"] / "metrics.json").read_text())
    assert metrics["train_images_synthetic"] == 4 and metrics["train_images"] == real["train_images"] + 4
    assert metrics["test/instances"] == real["test/instances"]  # validation and test stay real


def test_synthetic__segmentation_trains_on_them_and_scores_real_images_only(sam_run: dict, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The same scenes feed task=segment: the class maps in masks/ train the segmenter; val/test stay the run's real tiles.
    monkeypatch.setenv("VFMTUNE_CACHE", str(sam_run["cache"]))
    out = _synth(tmp_path, sam_run["run"], "for_segment")
    seg = [*TINY, "task=segment", f"data.root={sam_run['data']}", "trainer.max_epochs=1", "data.num_workers=0"]
    main(["train", *seg, f"hydra.run.dir={tmp_path / 'real'}"])
    main(["train", *seg, f"data.synthetic={out}", f"hydra.run.dir={tmp_path / 'with_synth'}"])
    real, metrics = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("real", "with_synth"))
    assert metrics["train_images_synthetic"] == 4 and metrics["train_images"] == real["train_images"] + 4
    # the real images keep their split: validation and test are the same real tiles with or without scenes
    assert (tmp_path / "with_synth" / "splits.csv").read_text() == (tmp_path / "real" / "splits.csv").read_text()


def test_synthetic__cut_from_validation_or_test_images_is_refused(sam_run: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMTUNE_CACHE", str(sam_run["cache"]))
    leaky = _synth(tmp_path, sam_run["data"], "leaky")  # every image of the folder, held-out ones included
    with pytest.raises(SystemExit):
        main(["train", "task=sam_prompt", *SAM_TINY, f"data.root={sam_run['data']}", f"data.synthetic={leaky}",
              f"hydra.run.dir={tmp_path / 'refused'}"])
    with pytest.raises(DataError, match=r"(?s)image\(s\) its objects or backgrounds were cut from are validation/test"):
        from vfmtune.commands.train import train

        train(overrides=["task=sam_prompt", *SAM_TINY, f"data.root={sam_run['data']}", f"data.synthetic={leaky}"],
              run_dir=tmp_path / "refused2")


def test_synthetic__refused_for_tasks_without_masks(imagefolder: Path, tmp_path: Path) -> None:
    from conftest import TINY

    from vfmtune.choices import ConfigError
    from vfmtune.commands.train import train

    with pytest.raises(ConfigError, match="task=classify cannot use them"):
        train(overrides=[*TINY, f"data.root={imagefolder}", f"data.synthetic={tmp_path}"], run_dir=tmp_path / "r")
