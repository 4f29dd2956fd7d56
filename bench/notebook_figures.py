"""Run the notebooks at full size, time them, and save their tagged figures as the README's PNGs.

Run (one notebook at a time, serialised with the benchmarks):
    flock /tmp/vfmtune-bench.lock python bench/notebook_figures.py [01 02 ...] [--smoke]

Each notebook executes with nbclient in `--workdir` (default `runs/notebooks/<stem>/`, so its `runs/`
land there; the embedding cache is the user's, shared across runs), exactly as a user runs it top to
bottom: no code of its own is replaced. A code cell tagged `figure:<name>` gives `docs/figures/<name>.png`
from its PNG output (`<name>_<k>.png` when it has several). The executed notebook, outputs included,
is kept in the workdir for inspection (never commit it: `tests/test_notebooks.py` fails on outputs).
Wall time per notebook and per tagged cell, and the machine's load average before and after each
notebook (the 2 cores are shared), go to `bench/results/notebook_figures.json` (`--smoke`: nothing written
but the executed notebooks, a pipeline check in seconds).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from common import write_results
from nbclient import NotebookClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 300_000  # README figures stay small in git


def png_outputs(cell: dict) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def save_png(data: bytes, path: Path) -> int:
    """Write a notebook's PNG; one over MAX_BYTES is re-encoded with a 256-colour palette, then shrunk until it fits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image, scale = Image.open(io.BytesIO(data)).convert("RGB"), 1.0
    while len(data) > MAX_BYTES and scale > 0.3:
        size = (round(image.width * scale), round(image.height * scale))
        buffer = io.BytesIO()
        image.resize(size, Image.LANCZOS).quantize(256).save(buffer, format="PNG", optimize=True)
        data, scale = buffer.getvalue(), scale * 0.85
    path.write_bytes(data)
    return len(data)


def cell_seconds(cell: dict) -> float | None:
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not start or not end:
        return None
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return round((parse(end) - parse(start)).total_seconds(), 1)


def run_notebook(path: Path, workdir: Path, smoke: bool, figures: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    env_before = os.environ.get("VFMTUNE_SMOKE")
    os.environ["VFMTUNE_SMOKE"] = "1" if smoke else "0"
    # The kernel imports the vfmtune of this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    nb = nbformat.read(path, as_version=4)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        nbformat.write(nb, workdir / f"{path.stem}.executed.ipynb")
        if env_before is None:
            os.environ.pop("VFMTUNE_SMOKE")
        else:
            os.environ["VFMTUNE_SMOKE"] = env_before
    seconds = round(time.perf_counter() - t0, 1)
    out: dict = {f"{path.stem}.seconds": seconds, f"{path.stem}.date": datetime.now(timezone.utc).isoformat(timespec="seconds"), f"{path.stem}.load_avg_1min_before_after": [round(load_before[0], 1),
                                                                                           round(os.getloadavg()[0], 1)]}
    for cell in nb.cells:
        names = [t.removeprefix("figure:") for t in cell.get("metadata", {}).get("tags", []) if t.startswith("figure:")]
        for name in names:
            pngs = png_outputs(cell)
            if not pngs:
                raise RuntimeError(f"{path.name}: the cell tagged figure:{name} has no PNG output")
            for k, data in enumerate(pngs, start=1):
                target = figures / (f"{name}.png" if len(pngs) == 1 else f"{name}_{k}.png")
                if not smoke:
                    size = save_png(data, target)
                    out[f"{path.stem}.figure.{target.name}.bytes"] = size
            out[f"{path.stem}.cell.{name}.seconds"] = cell_seconds(cell)
    print(f"{path.name}: {seconds:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="prefixes such as 01 02 (default: every notebook)")
    parser.add_argument("--smoke", action="store_true", help="VFMTUNE_SMOKE=1: a pipeline check; no figures or results written")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "notebooks")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--results", default="notebook_figures")
    args = parser.parse_args()
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.notebooks:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in args.notebooks)]
    figures: dict = {"mode": "smoke" if args.smoke else "full size", "cpu_count": os.cpu_count()}
    for path in paths:
        figures.update(run_notebook(path, args.workdir / path.stem, args.smoke, args.figures))
    if not args.smoke:
        results = Path(__file__).parent / "results" / f"{args.results}.json"
        earlier = json.loads(results.read_text()) if results.is_file() else {}
        # Notebooks run one at a time: the other notebooks' figures from earlier runs stay.
        ran = {p.stem for p in paths}
        kept = {k: v for k, v in earlier.items() if k[:2].isdigit() and k.split(".")[0] not in ran}
        write_results(args.results, {**kept, **figures})

if __name__ == "__main__":
    sys.exit(main())
