"""`vfmtune explore RUN`: the data-look figures of a tiny run, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, make_imagefolder, read_rows
from PIL import Image

from vfmtune.cli import main

FIGURES = ("class_grid", "embedding_map", "leakage", "patch_pca", "misclassified_test")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("explore")
    images = make_imagefolder(base / "images", {"cat": 12, "dog": 12, "owl": 12})
    main(["train", *TINY, f"data.root={images}", f"hydra.run.dir={base / 'run'}"])
    return base / "run"


def test_explore__writes_figures_into_the_runs_plots(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "explore"
    main(["explore", str(run), "data.num_workers=0", "trainer.enable_progress_bar=false", "explore.patch_sizes=[32,64]",
          "explore.projections=[pca]", f"hydra.run.dir={out}"])
    for name in FIGURES:
        assert Image.open(run / "plots" / f"{name}.png").size[0] > 200, name
    summary = json.loads((out / "explore.json").read_text())
    assert summary["images"] == 36 and set(summary["figures"]) == set(FIGURES)
    assert summary["misclassified_test"] >= 0 and len(summary["outliers"]) == 8
    rows = read_rows(out / "leakage.csv")
    assert len(rows) == 6  # every test image with its nearest training image
    assert float(rows[0]["cosine_distance"]) <= float(rows[-1]["cosine_distance"])


def test_explore__python_api_and_output_folder(run: Path, tmp_path: Path) -> None:
    import vfmtune

    result = vfmtune.explore(overrides=[f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "data.num_workers=0", "explore.split=val",
                                        "explore.patch_sizes=[32]", "explore.projections=[pca]", f"explore.output={tmp_path / 'figs'}"],
                             run_dir=tmp_path / "e")
    assert Path(result["figures"]["misclassified_val"]).parent == tmp_path / "figs"


def test_explore__needs_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["explore", f"hydra.run.dir={tmp_path}"])
    assert "vfmtune explore RUN_DIR" in capsys.readouterr().err


def test_explore__unknown_key_lists_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["explore", "runs/x", "explore.colour=red"])
    assert "leakage_threshold" in capsys.readouterr().err


def test_explore__a_distilled_student(distill_runs: dict[str, Path], tmp_path: Path) -> None:
    # The figures of the student's run: its data and split, the frozen backbone's embeddings, the student's mistakes.
    main(["explore", str(distill_runs["student"]), "data.num_workers=0", "explore.patch_sizes=[32]", "explore.projections=[pca]",
          f"explore.output={tmp_path / 'plots'}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == set(FIGURES)
