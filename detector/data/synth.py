"""The deterministic synthetic COCO-format dataset: coloured shapes on textured backgrounds.

It is the embedded default dataset (`ensure_synthetic`): small enough to train a tiny detector
on a CPU in minutes, yet with what makes IoU-aware detection matter:
  * 5 classes (circle/ellipse, rectangle, triangle, cross, ring), 2-7 objects per image, sides
    of roughly 12-60 px on a 128 px image (scaled with `size`), varied aspect ratios, triangles
    at any rotation;
  * half of the new objects are placed to overlap an earlier one with box IoU 0.1-0.5 (in the
    default set ~60 % of objects end up in such a pair, mostly at IoU 0.1-0.3), so NMS and
    precise localisation decide the score; no pair exceeds IoU 0.5 and every object keeps
    >= 70 % of its pixels visible, so each box stays well defined;
  * boxes are TIGHT around each object's full (amodal) shape: computed from the rasterised mask.
    Shapes are filled with one flat colour and no anti-aliasing, so the box is exact;
  * backgrounds mix a gradient, stripes, soft blobs and pixel noise, varied per image; object
    colours are drawn at RGB distance >= 100 from what they cover and from their neighbours, so
    the task is learnable, not adversarial.

Every image comes from its own RNG seeded by (seed, split, index): the output is a pure function
of the arguments (byte-identical JSON and PNGs). Datasets are written into a hidden sibling
folder and renamed into place, so a folder that exists is complete.

Layout: `root/annotations/{train,val}.json`, `root/{train,val}/<id>.png` (file_name relative to
the split folder), and a marker `root/.ioulab_synth.json` recording the parameters.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

CLASSES = ("circle", "rectangle", "triangle", "cross", "ring")  # category ids 1..5
# Part of the cache key: bump it whenever the generated content changes.
GENERATOR_VERSION = 2
MARKER = ".ioulab_synth.json"
SPLIT_CODES = {"train": 0, "val": 1}

# Content knobs, in pixels of a 128 px image (scaled with the image size).
MIN_SIDE, MIN_LONG_SIDE, MAX_SIDE = 12.0, 16.0, 60.0  # shortest side; range of the long side
MIN_OBJECTS, MAX_OBJECTS = 2, 7
MIN_VISIBLE = 0.7        # fraction of an object's pixels that later objects must leave visible
MAX_PAIR_IOU = 0.5       # above this, greedy NMS at 0.5 could not keep both true boxes
OVERLAP_PROB = 0.5       # chance that a new object is placed to overlap an earlier one
OVERLAP_IOU = (0.1, 0.5)
MIN_CONTRAST = 100.0     # RGB distance of an object's colour to what it covers / touches
MAX_ATTEMPTS = 200       # placement tries per image (rejection sampling)


# ---------------------------------------------------------------- rendering one image

def render_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, list[dict]]:
    """Image `index` of `split`.

    Returns:
        image: uint8[size, size, 3] RGB.
        objects: in drawing (z) order, each {"category_id": 1..5, "bbox": [x, y, w, h] (ints,
            tight around `mask`), "area": mask pixel count, "color": [r, g, b],
            "mask": bool[size, size] (the full shape, including occluded pixels)}.
    """
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object is visible at each pixel
    objects: list[dict] = []
    visible: list[int] = []
    target = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    for _ in range(MAX_ATTEMPTS):
        if len(objects) >= target:
            break
        candidate = _try_place(rng, size, canvas, owner, objects, visible)
        if candidate is None:
            continue
        mask, color = candidate["mask"], candidate["color"]
        for k in np.unique(owner[mask]):
            if k >= 0:
                visible[k] -= int(np.count_nonzero(owner[mask] == k))
        canvas[mask] = color
        owner[mask] = len(objects)
        visible.append(candidate["area"])
        objects.append(candidate)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, objects


def _try_place(rng, size, canvas, owner, objects, visible) -> dict | None:
    """One random object that satisfies the overlap, visibility and contrast rules, or None."""
    scale = size / 128.0
    kind = int(rng.integers(len(CLASSES)))
    shape = _sample_shape(rng, kind, scale)
    ex, ey = shape["half_extent"]
    partner = int(rng.integers(len(objects))) if objects and rng.random() < OVERLAP_PROB else None
    if partner is None:
        cx, cy = rng.uniform(ex, size - ex), rng.uniform(ey, size - ey)
    else:
        # Offset from the partner's centre by a fraction of the summed half-extents: close
        # enough to overlap, far enough to leave the partner visible.
        p = objects[partner]
        theta, frac = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.85)
        cx = p["center"][0] + math.cos(theta) * (ex + p["half_extent"][0]) * frac
        cy = p["center"][1] + math.sin(theta) * (ey + p["half_extent"][1]) * frac
        cx, cy = min(max(cx, ex), size - ex), min(max(cy, ey), size - ey)
    mask = _rasterize(kind, shape, cx, cy, size)
    area = int(np.count_nonzero(mask))
    if area < 0.5 * (MIN_SIDE * scale) ** 2:
        return None
    bbox = tight_box(mask)
    ious = box_iou_xywh(bbox, [o["bbox"] for o in objects])
    if np.any(ious > MAX_PAIR_IOU):
        return None
    if partner is not None and not OVERLAP_IOU[0] <= ious[partner] <= OVERLAP_IOU[1]:
        return None
    covered = owner[mask]
    for k in np.unique(covered):
        if k >= 0 and visible[k] - np.count_nonzero(covered == k) < MIN_VISIBLE * objects[k]["area"]:
            return None
    color = _pick_color(rng, canvas, owner, mask, bbox, objects)
    if color is None:
        return None
    return {"category_id": kind + 1, "bbox": bbox, "area": area, "color": color, "mask": mask,
            "center": (cx, cy), "half_extent": (ex, ey)}


def _sample_shape(rng, kind: int, scale: float) -> dict:
    """Size/aspect/rotation of one shape; `half_extent` bounds its pixels around the centre."""
    # Sides under ~16 px are where a stride-8 CPU detector fails first (measured): the long
    # side starts at 16, only the short side of elongated shapes goes down to 12.
    long_side = rng.uniform(MIN_LONG_SIDE, MAX_SIDE) * scale
    min_ratio = {0: 0.6, 1: 0.4, 2: 0.7, 3: 0.75, 4: 0.75}[kind]
    short_side = max(long_side * rng.uniform(min_ratio, 1.0), MIN_SIDE * scale)
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    shape = {"w": w, "h": h, "half_extent": (w / 2, h / 2)}
    if kind == 2:  # triangle: base w, height h, apex shifted sideways, any rotation
        apex = rng.uniform(-0.25, 0.25) * w
        local = np.array([[-w / 2, h / 2], [w / 2, h / 2], [apex, -h / 2]])
        a = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        verts = local @ rot.T
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        shape["vertices"] = verts - (lo + hi) / 2  # centred on its own bounding box
        shape["half_extent"] = tuple((hi - lo) / 2)
    elif kind == 3:  # cross: arm thickness relative to each extent
        shape["arm"] = rng.uniform(0.28, 0.4)
    elif kind == 4:  # ring: inner radius relative to the outer one
        shape["inner"] = rng.uniform(0.45, 0.65)
    return shape


def _rasterize(kind: int, shape: dict, cx: float, cy: float, size: int) -> np.ndarray:
    """bool[size, size]: pixels whose centre lies inside the shape (no anti-aliasing)."""
    ex, ey = shape["half_extent"]
    x0, x1 = max(int(math.floor(cx - ex)), 0), min(int(math.ceil(cx + ex)), size)
    y0, y1 = max(int(math.floor(cy - ey)), 0), min(int(math.ceil(cy + ey)), size)
    dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]
    w, h = shape["w"], shape["h"]
    if kind == 0:
        inside = (dx / (w / 2)) ** 2 + (dy / (h / 2)) ** 2 <= 1.0
    elif kind == 1:
        inside = (np.abs(dx) <= w / 2) & (np.abs(dy) <= h / 2)
    elif kind == 2:
        inside = _in_triangle(shape["vertices"], dx, dy)
    elif kind == 3:
        ax, ay = shape["arm"] * w / 2, shape["arm"] * h / 2
        inside = (((np.abs(dx) <= w / 2) & (np.abs(dy) <= ay))
                  | ((np.abs(dx) <= ax) & (np.abs(dy) <= h / 2)))
    else:
        r2 = (dx / (w / 2)) ** 2 + (dy / (h / 2)) ** 2
        inside = (r2 <= 1.0) & (r2 >= shape["inner"] ** 2)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _in_triangle(verts: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Points (dx, dy) on the same side of all three edges of the triangle `verts` [3,2]."""
    sides = []
    for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0)):
        sides.append((bx - ax) * (dy - ay) - (by - ay) * (dx - ax))
    s0, s1, s2 = sides
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def _pick_color(rng, canvas, owner, mask, bbox, objects) -> list[int] | None:
    """A colour far (RGB distance) from the background it covers and from nearby objects."""
    refs = []
    bg = mask & (owner < 0)
    if bg.any():
        refs.append(canvas[bg].mean(axis=0))
    x, y, w, h = bbox
    for o in objects:  # neighbours within 2 px: same-coloured touching shapes would merge
        ox, oy, ow, oh = o["bbox"]
        if ox < x + w + 2 and x < ox + ow + 2 and oy < y + h + 2 and y < oy + oh + 2:
            refs.append(np.asarray(o["color"], dtype=np.float64))
    candidates = rng.integers(0, 256, size=(24, 3))
    if not refs:
        return [int(c) for c in candidates[0]]
    dist = np.linalg.norm(candidates[:, None, :] - np.stack(refs)[None], axis=-1).min(axis=1)
    good = np.flatnonzero(dist >= MIN_CONTRAST)
    return [int(c) for c in candidates[good[0]]] if good.size else None


def _background(rng, size: int) -> np.ndarray:
    """float32[size, size, 3]: gradient + stripes + soft blobs + pixel noise, varied per image."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = coords[None, :], coords[:, None]
    c0, c1 = rng.uniform(30, 225, size=(2, 3))
    a = rng.uniform(0, 2 * math.pi)
    t = math.cos(a) * xx + math.sin(a) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.6:
        freq, phase, b = rng.uniform(3, 12), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * freq * (math.cos(b) * xx + math.sin(b) * yy) + phase)
        img = img + wave[..., None] * rng.uniform(-25, 25, size=3)
    for _ in range(int(rng.integers(0, 5))):
        bx, by = rng.uniform(0, 1, size=2)
        sigma = rng.uniform(0.04, 0.2)
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * sigma ** 2))
        img = img + blob[..., None] * rng.uniform(-40, 40, size=3)
    img = img + rng.normal(0, rng.uniform(2, 10), size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def tight_box(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of the pixels of a non-empty bool mask [H, W] (pixel i spans [i, i+1))."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def box_iou_xywh(box: list[int], others: list[list[int]]) -> np.ndarray:
    """IoU float[M] of one COCO xywh box with M others."""
    if not others:
        return np.zeros(0)
    o = np.asarray(others, dtype=np.float64)
    x, y, w, h = box
    iw = np.clip(np.minimum(x + w, o[:, 0] + o[:, 2]) - np.maximum(x, o[:, 0]), 0, None)
    ih = np.clip(np.minimum(y + h, o[:, 1] + o[:, 3]) - np.maximum(y, o[:, 1]), 0, None)
    inter = iw * ih
    return inter / (w * h + o[:, 2] * o[:, 3] - inter)


# ---------------------------------------------------------------- writing a dataset

def split_paths(root, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split` under a dataset root."""
    root = Path(root)
    return root / "annotations" / f"{split}.json", root / split


def generate_synthetic(out_dir, num_train: int = 512, num_val: int = 128, size: int = 128,
                       seed: int = 0, progress: bool = True) -> Path:
    """Write the synthetic dataset to `out_dir` and return its absolute path.

    `out_dir` may be missing, empty, or a previous synthetic dataset (replaced); anything else
    raises FileExistsError rather than mixing our files into someone's folder.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
            raise FileExistsError(
                f"{out_dir} is not empty and is not an ioulab synthetic dataset (no {MARKER}); "
                "refusing to overwrite it: pass an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_to_sibling(out_dir, num_train, num_val, size, seed, progress)
    try:
        if out_dir.exists():
            # Move the old one aside first: a rename cannot replace a non-empty folder.
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_synthetic(cache_root=None, **kwargs) -> Path:
    """The embedded default dataset: generated once into a cache folder, reused afterwards.

    Folder: `<cache_root or $IOULAB_CACHE or ~/.cache/ioulab>/synth/<params-key>`. kwargs are
    those of `generate_synthetic` (num_train, num_val, size, seed, progress). Safe to call from
    several processes at once: each writes a private sibling and renames it into place; a loser
    of the race discards its copy and uses the winner's.
    """
    params = {"num_train": 512, "num_val": 128, "size": 128, "seed": 0}
    unknown = set(kwargs) - set(params) - {"progress"}
    if unknown:
        raise TypeError(f"ensure_synthetic got unexpected arguments {sorted(unknown)}")
    progress = kwargs.pop("progress", True)
    params.update(kwargs)
    root = Path(cache_root or os.environ.get("IOULAB_CACHE") or Path.home() / ".cache" / "ioulab")
    final = root.expanduser().absolute() / "synth" / _params_key(**params)
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_to_sibling(final, progress=progress, **params)
    try:
        os.rename(tmp, final)
    except OSError as err:
        if not (final / MARKER).is_file():  # not a lost race: something else sits there
            raise FileExistsError(f"cannot publish the synthetic dataset at {final}: the folder "
                                  f"exists but is not a finished dataset ({err})") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _params_key(num_train: int, num_val: int, size: int, seed: int) -> str:
    return f"v{GENERATOR_VERSION}-train{num_train}-val{num_val}-px{size}-seed{seed}"


def _write_to_sibling(final: Path, num_train: int, num_val: int, size: int, seed: int,
                      progress: bool) -> Path:
    """Write the dataset into a new hidden sibling of `final`; return that folder."""
    if min(num_train, num_val) < 0 or size < 32 or seed < 0:
        raise ValueError(f"need num_train, num_val >= 0, size >= 32, seed >= 0; got "
                         f"{num_train}, {num_val}, {size}, {seed}")
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        (tmp / "annotations").mkdir()
        params = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed}
        counts = {}
        with tqdm(total=num_train + num_val, desc="synthetic dataset", unit="img",
                  disable=not progress) as bar:
            for split, num in (("train", num_train), ("val", num_val)):
                coco = _write_split(tmp, split, num, size, seed, params, bar)
                ann_file, _ = split_paths(tmp, split)
                ann_file.write_text(json.dumps(coco, separators=(",", ":")))
                counts[split] = {"images": num, "boxes": len(coco["annotations"])}
        # The marker goes last: it is what identifies a finished synthetic dataset.
        marker = {"generator_version": GENERATOR_VERSION, "params": params, "counts": counts}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _write_split(root: Path, split: str, num: int, size: int, seed: int, params: dict,
                 bar) -> dict:
    """Render and save the PNGs of one split; return its COCO dict."""
    _, img_dir = split_paths(root, split)
    img_dir.mkdir()
    images, annotations = [], []
    for index in range(num):
        image, objects = render_sample(seed, split, index, size)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(image).save(img_dir / file_name, format="PNG", compress_level=6)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "license": 1})
        for obj in objects:  # listed in drawing order: later annotations lie on top
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj["category_id"], "bbox": obj["bbox"],
                                "area": obj["area"], "iscrowd": 0})
        bar.update(1)
    return {
        "info": {"description": f"ioulab synthetic shapes ({split})",
                 "version": str(GENERATOR_VERSION), "year": 2025,
                 "contributor": "ioulab", "url": "", "date_created": "",
                 "ioulab_params": params},
        "licenses": [{"id": 1, "name": "CC0 1.0",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CLASSES)],
    }
