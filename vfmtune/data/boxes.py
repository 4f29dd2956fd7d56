"""Box and click prompts from annotation files, matched to images and checked before any mask is made.

Formats (`vfmtune auto-mask boxes=... points=...`):

- CSV with a header ``image,x0,y0,x1,y1,label[,object]``: pixel corners (x0, y0 top-left; x1, y1 exclusive
  bottom-right, as COCO's ``x + w``); ``object`` names the box so that clicks can join it (default: the
  row's position among its image's boxes, from 0).
- COCO JSON: every annotation's ``bbox`` ``[x, y, w, h]`` and its category's name (the annotation id is the object).
- YOLO: a folder of ``<image stem>.txt`` files, one ``class cx cy w h`` line per box (normalised to the
  image size); class names from ``classes.txt`` or ``obj.names`` in that folder, else ``class_<id>``.
- Clicks: CSV ``image,x,y,positive[,object][,label]`` (positive 1 = object, 0 = background). Clicks with the
  ``object`` of a box refine that box's prompt; the others form point prompts per ``object`` (then ``label``
  is required).

The ``image`` column is a path relative to the images folder, an absolute path, or a file name that is
unique in the folder. Rows naming images that are not there are all listed in one error.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vfmtune.choices import OnBadBox
from vfmtune.data.images import DataError
from vfmtune.data.masks import oriented_size


@dataclass
class ObjectPrompt:
    """What to segment for one object: a box and/or clicks, and its class name."""

    object_id: str
    label: str
    box: list[float] | None = None  # x0, y0, x1, y1
    points: list[tuple[float, float, int]] = field(default_factory=list)  # x, y, 1 = object / 0 = background
    flags: list[str] = field(default_factory=list)  # "clipped", ...


@dataclass
class Prompts:
    """Prompts per image path, the class names in id order (0 = background) and what the checks found."""

    by_image: dict[str, list[ObjectPrompt]]
    classes: list[str]
    clipped: int = 0
    skipped: list[tuple[str, ObjectPrompt, str]] = field(default_factory=list)  # (image, prompt, why)


class ImageIndex:
    """Finds an image of a folder by relative path, absolute path, file name or stem (when unique)."""

    def __init__(self, paths: Sequence[str], root: Path) -> None:
        self.root = root
        self.exact = {os.path.abspath(p): p for p in paths}
        self.relative = {Path(os.path.relpath(p, root)).as_posix(): p for p in paths}
        self.names: dict[str, list[str]] = {}
        for p in paths:
            self.names.setdefault(Path(p).name, []).append(p)
            self.names.setdefault(Path(p).stem, []).append(p)

    def find(self, name: str) -> str | None:
        name = name.strip()
        hit = self.exact.get(os.path.abspath(os.path.join(self.root, name))) or self.relative.get(Path(name).as_posix())
        if hit:
            return hit
        found = self.names.get(Path(name).name) or self.names.get(Path(name).stem) or []
        return found[0] if len(found) == 1 else None


def _rows(path: str, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    src = os.path.abspath(path)
    if not os.path.isfile(src):
        raise DataError.for_file(src, "prompt file not found", "pass an existing CSV / COCO JSON / YOLO folder")
    with open(src, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError.for_file(src, f"CSV header lacks {', '.join(missing)} (found {columns})",
                                     f"start the file with the header {','.join(required)}")
        reader.fieldnames = columns
        return [(reader.line_num, {k: (v or "").strip() for k, v in r.items() if k}) for r in reader]


def _number(value: str, where: str, problems: list[str]) -> float:
    try:
        return float(value)
    except ValueError:
        problems.append(f"{where}: {value!r} is not a number")
        return 0.0


def read_prompts(boxes: str | None, points: str | None, index: ImageIndex) -> Prompts:
    """Read the box file (CSV, COCO JSON or YOLO folder) and the click CSV into per-image object prompts.

    Raises:
        DataError: Rows naming images that are not in the folder, unreadable numbers, clicks without a
            box or label (each listed with its row), or an unknown file type.
    """
    by_image: dict[str, dict[str, ObjectPrompt]] = {}
    problems: list[str] = []
    order: list[str] = []
    if boxes:
        src = Path(boxes).expanduser()
        if src.is_dir():
            order = _yolo(src, index, by_image, problems)
        elif src.suffix.lower() == ".json":
            order = _coco(src, index, by_image, problems)
        else:
            for n, r in _rows(str(src), ("image", "x0", "y0", "x1", "y1", "label")):
                image = index.find(r["image"])
                if image is None:
                    problems.append(f"{src} row {n}: image {r['image']!r} is not in {index.root}")
                    continue
                box = [_number(r[k], f"{src} row {n}", problems) for k in ("x0", "y0", "x1", "y1")]
                objects = by_image.setdefault(image, {})
                oid = r.get("object") or str(len(objects))
                objects[oid] = ObjectPrompt(oid, r["label"], box)
            order = sorted({o.label for objs in by_image.values() for o in objs.values()})
    if points:
        for n, r in _rows(points, ("image", "x", "y", "positive")):
            image = index.find(r["image"])
            if image is None:
                problems.append(f"{points} row {n}: image {r['image']!r} is not in {index.root}")
                continue
            xy = (_number(r["x"], f"{points} row {n}", problems), _number(r["y"], f"{points} row {n}", problems))
            positive = r["positive"].lower() in ("1", "true", "yes", "positive", "+")
            oid = r.get("object") or f"click{n}"
            objects = by_image.setdefault(image, {})
            if oid not in objects:
                if not r.get("label"):
                    problems.append(f"{points} row {n}: object {oid!r} has no box, so the click needs a label")
                    continue
                objects[oid] = ObjectPrompt(oid, r["label"])
                if r["label"] not in order:
                    order.append(r["label"])
            objects[oid].points.append((*xy, int(positive)))
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{len(problems)} prompt rows cannot be used:\n{shown}{more}\nFix: name images as paths relative to "
                        f"{index.root} (or unique file names), and give every row numbers", problem=f"{len(problems)} bad prompt rows")
    return Prompts({img: list(objs.values()) for img, objs in by_image.items()}, ["background", *order])


def _coco(src: Path, index: ImageIndex, by_image: dict[str, dict[str, ObjectPrompt]], problems: list[str]) -> list[str]:
    data = json.loads(src.read_text())
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
    files = {int(im["id"]): str(im.get("file_name", "")) for im in data.get("images", [])}
    for a in data.get("annotations", []):
        where = f"{src} annotation {a.get('id')}"
        name = files.get(int(a.get("image_id", -1)))
        image = index.find(name) if name else None
        if image is None or "bbox" not in a:
            problems.append(f"{where}: {'no bbox' if image else f'image {name!r} is not in {index.root}'}")
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        label = names.get(int(a.get("category_id", -1)), f"class_{a.get('category_id')}")
        by_image.setdefault(image, {})[str(a.get("id"))] = ObjectPrompt(str(a.get("id")), label, [x, y, x + w, y + h])
    return [names[k] for k in sorted(names)]


def _yolo(folder: Path, index: ImageIndex, by_image: dict[str, dict[str, ObjectPrompt]], problems: list[str]) -> list[str]:
    names: list[str] = []
    for candidate in ("classes.txt", "obj.names"):
        if (folder / candidate).is_file():
            names = [line.strip() for line in (folder / candidate).read_text().splitlines() if line.strip()]
            break
    used: set[int] = set()
    for txt in sorted(folder.rglob("*.txt")):
        if txt.name == "classes.txt":
            continue
        rel = txt.relative_to(folder).with_suffix("").as_posix()
        image = index.find(rel) if "/" in rel else index.find(txt.stem)
        if image is None:
            problems.append(f"{txt}: no image {rel}.* in {index.root}")
            continue
        w, h = oriented_size(image)
        for n, line in enumerate(txt.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 5:
                problems.append(f"{txt} line {n}: expected 'class cx cy w h', got {line!r}")
                continue
            k = int(_number(parts[0], f"{txt} line {n}", problems))
            cx, cy, bw, bh = (_number(v, f"{txt} line {n}", problems) for v in parts[1:5])
            used.add(k)
            label = names[k] if k < len(names) else f"class_{k}"
            objects = by_image.setdefault(image, {})
            oid = str(len(objects))
            objects[oid] = ObjectPrompt(oid, label, [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    return names if names else [f"class_{k}" for k in range(max(used) + 1)] if used else []


def check_prompts(prompts: Prompts, on_bad_box: OnBadBox) -> Prompts:
    """Clip boxes that reach outside their image (counted, flagged), and refuse or skip (with ``on_bad_box``)
    boxes with no area inside it and clicks outside it, all before any mask is made.

    Raises:
        DataError: With ``on_bad_box=error``, every bad box or click, with its image.
    """
    bad: list[tuple[str, ObjectPrompt, str]] = []
    kept: dict[str, list[ObjectPrompt]] = {}
    clipped = 0
    for image, objects in prompts.by_image.items():
        w, h = oriented_size(image)
        for obj in objects:
            why = ""
            if obj.box is not None:
                x0, y0, x1, y1 = obj.box
                if x1 < x0 or y1 < y0:
                    why = f"box {obj.box} has x1 < x0 or y1 < y0 (corners are x0, y0, x1, y1)"
                else:
                    box = [min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)]
                    if box[2] <= box[0] or box[3] <= box[1]:
                        why = f"box {obj.box} has no area inside the {w}x{h} image"
                    elif box != obj.box:
                        obj.box, clipped = box, clipped + 1
                        obj.flags.append("clipped")
            outside = [p for p in obj.points if not (0 <= p[0] <= w and 0 <= p[1] <= h)]
            if outside and not why:
                why = f"click {outside[0][:2]} lies outside the {w}x{h} image"
            if why:
                bad.append((image, obj, why))
            else:
                kept.setdefault(image, []).append(obj)
    if bad and on_bad_box == OnBadBox.error:
        shown = "\n".join(f"  {img}: object {obj.object_id} ({obj.label}): {why}" for img, obj, why in bad[:50])
        raise DataError(f"{len(bad)} prompts cannot be used:\n{shown}\nFix: correct them, or set auto_mask.on_bad_box=skip to "
                        "skip them (they are counted and listed in review.csv)", problem=f"{len(bad)} bad prompts")
    if clipped:
        print(f"{clipped} boxes reached outside their image and were clipped to it (flagged 'clipped' in review.csv)")
    return Prompts(kept, prompts.classes, clipped, bad)
