"""Small generated datasets in a protocol's real layout (``benchmark-data synth``), for smoke runs and tests.

``make_synthetic_dataset(out, n_train, n_val, seed, protocol=...)`` writes the layout of ``protocol.dataset``
through its data source (NYUD_MT: ``benchmark.nyud_data.make_synthetic``). The PASCAL_MT generator lives here:

Every file has the real format, so the loader reads it through the same code path as real data: RGB JPEGs,
``LabelMap`` uint16 ``.mat`` files, PASCAL-Part ``anno`` structs (1x1 struct with ``imname`` and a 1xN
``objects`` struct array of ``class``/``class_ind``/``mask``/``parts``; ``parts`` a 1xK struct array of
``part_name``/``mask``, or a 0x0 array), semseg PNGs (about a quarter as VOC12 palette PNGs with a 255 ring
around objects, the rest grayscale pascal-context PNGs), RGB normals PNGs, grayscale saliency PNGs and the
``ImageSets/Context`` split files.

The labels are learnable from the pixels, so a short training run beats chance on every task:

- semseg: each object class has its own colour (cat orange, car green, bottle purple, bird blue, tvmonitor a
  white frame around a dark screen, person in part colours); the background (class 0) is a beige wall over a
  grey floor, or sky over grass;
- human_parts: persons are built from head/torso/arms/legs in six distinct colours, one per part group; some
  persons have no part annotation (PASCAL-Part has those) and some images have no person (all ignored);
- sal: every object is salient, the background is not;
- normals: domes (cat, bird), cylinders (car, bottle, person parts) and flat surfaces (wall, floor, tv) are
  shaded by a fixed light, so the shading encodes the normal; sky, grass and bird are not normals-valid
  Context classes, so their normals are ignored, as in the real data.

Generation is deterministic for a seed (image k uses ``default_rng([seed, k])``; the ``.mat`` header carries no
timestamp), and 64 + 16 images take well under a second.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image

from benchmark.dataset import db_info
from benchmark.pascal_data import FILES, SPLIT_FILE
from benchmark.protocol import PASCAL_CONTEXT, Protocol

# Light direction for the shading (unit vector, same (x, y, z) convention as the normals PNGs).
_LIGHT = np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: benchmark.synth (deterministic)"

# (VOC class id, context class name, RGB albedo, normals shape)
_OBJECTS = {
    "cat": (8, "cat", (230, 130, 40), "dome"),
    "car": (7, "car", (40, 170, 70), "hcyl"),
    "bottle": (5, "bottle", (150, 60, 170), "vcyl"),
    "bird": (3, "bird", (60, 90, 220), "dome"),
    "tvmonitor": (20, "tvmonitor", (235, 235, 235), "flat"),
}
_PERSON = 15
# Part group colours: head, torso, upper arms, lower arms, upper legs, lower legs.
_PART_COLOURS = {
    1: (235, 190, 160),
    2: (200, 30, 40),
    3: (40, 190, 200),
    4: (230, 220, 50),
    5: (40, 60, 170),
    6: (110, 70, 30),
}
_BACKGROUNDS = {
    "indoor": (("wall", (200, 190, 160), (0.0, 0.0, 1.0)), ("floor", (130, 135, 140), (0.0, -0.8, 0.6))),
    "outdoor": (("sky", (150, 195, 245), (0.0, 0.0, 1.0)), ("grass", (120, 160, 60), (0.0, -0.8, 0.6))),
}


def voc_palette() -> list[int]:
    """The usual PASCAL VOC colour map (class id bits spread over the high bits of R, G, B), 256 * 3 values."""
    pal = []
    for c in range(256):
        r = g = b = 0
        for k in range(8):
            r |= ((c >> 0) & 1) << (7 - k)
            g |= ((c >> 1) & 1) << (7 - k)
            b |= ((c >> 2) & 1) << (7 - k)
            c >>= 3
        pal += [r, g, b]
    return pal


@dataclass
class _Scene:
    h: int
    w: int
    albedo: np.ndarray  # float [H, W, 3]
    normals: np.ndarray  # float [H, W, 3] unit
    context: np.ndarray  # uint16 [H, W]
    semseg: np.ndarray  # uint8 [H, W]
    instance: np.ndarray  # int [H, W], -1 background, else object index
    parts: np.ndarray  # uint8 [H, W] part group for person pixels (0 elsewhere)
    part_names: np.ndarray  # int [H, W] index into _PART_NAMES (-1 none)
    objects: list[dict] = field(default_factory=list)  # name, class_ind, has_parts


_PART_NAMES = ["hair", "head", "neck", "torso", "luarm", "ruarm", "llarm", "rlarm", "lhand", "rhand"]
_PART_NAMES += ["luleg", "ruleg", "llleg", "rlleg", "lfoot", "rfoot"]
_PART_GROUP = {"hair": 1, "head": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "rlarm": 4}
_PART_GROUP |= {"lhand": 4, "rhand": 4, "luleg": 5, "ruleg": 5, "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _paint(scene: _Scene, mask: np.ndarray, colour, normals: np.ndarray, context_id: int, cls: int, inst: int):
    scene.albedo[mask] = colour
    scene.normals[mask] = normals[mask]
    scene.context[mask] = context_id
    scene.semseg[mask] = cls
    scene.instance[mask] = inst
    scene.parts[mask] = 0
    scene.part_names[mask] = -1


def _shape_normals(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normals of a dome / horizontal or vertical cylinder / flat patch; u, v in [-1, 1] across the shape."""
    z = np.zeros_like(u)
    if kind == "dome":
        n = np.stack([0.85 * u, 0.85 * v, np.sqrt(np.clip(1 - 0.72 * (u**2 + v**2), 0.05, None))], -1)
    elif kind == "hcyl":
        n = np.stack([z, 0.85 * v, np.sqrt(np.clip(1 - 0.72 * v**2, 0.05, None))], -1)
    elif kind == "vcyl":
        n = np.stack([0.85 * u, z, np.sqrt(np.clip(1 - 0.72 * u**2, 0.05, None))], -1)
    else:
        n = np.stack([z, z, np.ones_like(u)], -1)
    return _unit(n)


def _box(yy, xx, y0, y1, x0, x1) -> np.ndarray:
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def _add_person(scene: _Scene, rng: np.random.Generator, yy, xx, inst: int, context_id: int) -> None:
    h = rng.uniform(0.55, 0.9) * scene.h
    cx = rng.uniform(0.25, 0.75) * scene.w
    top = rng.uniform(0.0, max(scene.h - h, 1e-3))
    s = h / 8.0  # body unit: head radius ~ s/1.1, torso 3s tall, legs 4s
    pieces = [  # (name, mask, kind); later pieces are drawn over earlier ones
        ("luleg", _box(yy, xx, top + 4.4 * s, top + 6.2 * s, cx - 0.9 * s, cx - 0.05 * s), "vcyl"),
        ("ruleg", _box(yy, xx, top + 4.4 * s, top + 6.2 * s, cx + 0.05 * s, cx + 0.9 * s), "vcyl"),
        ("llleg", _box(yy, xx, top + 6.2 * s, top + 7.6 * s, cx - 0.85 * s, cx - 0.1 * s), "vcyl"),
        ("rlleg", _box(yy, xx, top + 6.2 * s, top + 7.6 * s, cx + 0.1 * s, cx + 0.85 * s), "vcyl"),
        ("lfoot", _box(yy, xx, top + 7.6 * s, top + 8.0 * s, cx - 1.1 * s, cx - 0.1 * s), "flat"),
        ("rfoot", _box(yy, xx, top + 7.6 * s, top + 8.0 * s, cx + 0.1 * s, cx + 1.1 * s), "flat"),
        ("torso", _box(yy, xx, top + 1.9 * s, top + 4.6 * s, cx - 1.1 * s, cx + 1.1 * s), "vcyl"),
        ("neck", _box(yy, xx, top + 1.6 * s, top + 1.95 * s, cx - 0.35 * s, cx + 0.35 * s), "vcyl"),
        ("luarm", _box(yy, xx, top + 2.0 * s, top + 3.3 * s, cx - 1.7 * s, cx - 1.1 * s), "vcyl"),
        ("ruarm", _box(yy, xx, top + 2.0 * s, top + 3.3 * s, cx + 1.1 * s, cx + 1.7 * s), "vcyl"),
        ("llarm", _box(yy, xx, top + 3.3 * s, top + 4.4 * s, cx - 1.75 * s, cx - 1.15 * s), "vcyl"),
        ("rlarm", _box(yy, xx, top + 3.3 * s, top + 4.4 * s, cx + 1.15 * s, cx + 1.75 * s), "vcyl"),
        ("lhand", _box(yy, xx, top + 4.4 * s, top + 4.8 * s, cx - 1.75 * s, cx - 1.15 * s), "dome"),
        ("rhand", _box(yy, xx, top + 4.4 * s, top + 4.8 * s, cx + 1.15 * s, cx + 1.75 * s), "dome"),
        ("head", ((yy - (top + 0.85 * s)) ** 2 + (xx - cx) ** 2) <= (0.85 * s) ** 2, "dome"),
        ("hair", (((yy - (top + 0.85 * s)) ** 2 + (xx - cx) ** 2) <= (0.85 * s) ** 2) & (yy < top + 0.45 * s), "dome"),
    ]
    for name, mask, kind in pieces:
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        u = (xx - (xs.min() + xs.max()) / 2) / max((xs.max() - xs.min()) / 2, 0.5)
        v = (yy - (ys.min() + ys.max()) / 2) / max((ys.max() - ys.min()) / 2, 0.5)
        group = _PART_GROUP[name]
        colour = np.array(_PART_COLOURS[group], float) * (0.8 if name == "hair" else 1.0)
        _paint(
            scene, mask, colour, _shape_normals(kind, np.clip(u, -1, 1), np.clip(v, -1, 1)), context_id, _PERSON, inst
        )
        scene.parts[mask] = group
        scene.part_names[mask] = _PART_NAMES.index(name)


def _make_scene(rng: np.random.Generator, size_range: tuple[int, int]) -> _Scene:
    lo, hi = size_range
    h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
    if h == w:
        w = w + 1 if w < hi else w - 1
    context = db_info("context_classes.json")
    scene = _Scene(
        h,
        w,
        np.zeros((h, w, 3)),
        np.zeros((h, w, 3)),
        np.zeros((h, w), np.uint16),
        np.zeros((h, w), np.uint8),
        np.full((h, w), -1),
        np.zeros((h, w), np.uint8),
        np.full((h, w), -1),
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    (top_name, top_col, top_n), (bot_name, bot_col, bot_n) = _BACKGROUNDS[rng.choice(["indoor", "outdoor"])]
    horizon = rng.uniform(0.45, 0.7) * h
    for name, col, nrm, mask in ((top_name, top_col, top_n, yy < horizon), (bot_name, bot_col, bot_n, yy >= horizon)):
        scene.albedo[mask] = col
        scene.normals[mask] = _unit(np.array(nrm))
        scene.context[mask] = context[name]

    inst = 0
    for _ in range(int(rng.integers(1, 3))):
        name = str(rng.choice(list(_OBJECTS)))
        cls, ctx_name, colour, kind = _OBJECTS[name]
        ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        u, v = (xx - cx) / rx, (yy - cy) / ry
        mask = (u**2 + v**2 <= 1) if kind == "dome" else (np.abs(u) <= 1) & (np.abs(v) <= 1)
        if not mask.any():
            continue
        _paint(
            scene,
            mask,
            colour,
            _shape_normals(kind, np.clip(u, -1, 1), np.clip(v, -1, 1)),
            context[ctx_name],
            cls,
            inst,
        )
        if name == "tvmonitor":  # dark screen inside a white frame
            screen = mask & (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7)
            scene.albedo[screen] = (20, 30, 60)
        scene.objects.append({"name": name, "class_ind": cls, "parts": name == "cat" and rng.random() < 0.5})
        inst += 1
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        _add_person(scene, rng, yy, xx, inst, context["person"])
        if (scene.instance == inst).any():
            scene.objects.append({"name": "person", "class_ind": _PERSON, "parts": bool(rng.random() < 0.85)})
            inst += 1
    return scene


def _render(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    shade = 0.35 + 0.65 * np.clip(scene.normals @ _LIGHT, 0.0, None)
    img = scene.albedo * shade[..., None] + rng.normal(0.0, 4.0, scene.albedo.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _ring(mask: np.ndarray) -> np.ndarray:
    """One-pixel outer boundary of a mask (VOC draws a 255 'void' outline around objects)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _savemat(path: Path, data: dict) -> None:
    buf = io.BytesIO()
    scipy.io.savemat(buf, data, do_compression=True)
    raw = bytearray(buf.getvalue())
    raw[:116] = _MAT_HEADER.ljust(116, b" ")  # the default header holds a timestamp
    path.write_bytes(bytes(raw))


def _anno(image_id: str, scene: _Scene) -> np.ndarray:
    obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objects = np.empty((1, len(scene.objects)), dtype=obj_dtype)
    for k, obj in enumerate(scene.objects):
        mask = scene.instance == k
        parts = np.zeros((0, 0))
        if obj["parts"]:
            if obj["name"] == "person":
                names = [n for i, n in enumerate(_PART_NAMES) if ((scene.part_names == i) & mask).any()]
                pmasks = [((scene.part_names == _PART_NAMES.index(n)) & mask) for n in names]
            else:  # an animal with parts: must not reach the human_parts label
                ys = np.nonzero(mask)[0]
                upper = mask & (np.arange(scene.h)[:, None] < (ys.min() + ys.max()) / 2)
                names, pmasks = ["head", "torso"], [upper, mask & ~upper]
            if names:
                parts = np.empty((1, len(names)), dtype=[("part_name", "O"), ("mask", "O")])
                for j, (n, m) in enumerate(zip(names, pmasks, strict=True)):
                    parts[0, j] = (n, m.astype(np.uint8))
        objects[0, k] = (obj["name"], np.array([[float(obj["class_ind"])]]), mask.astype(np.uint8), parts)
    anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_id, objects)
    return anno


def _write_sample(root: Path, image_id: str, scene: _Scene, rng: np.random.Generator, voc: bool) -> None:
    def target(kind: str) -> Path:
        path = root / FILES[kind].format(id=image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    Image.fromarray(_render(scene, rng)).save(target("image"), quality=92)
    if voc:
        label = scene.semseg.copy()
        label[_ring(scene.instance >= 0)] = 255
        img = Image.fromarray(label, mode="P")
        img.putpalette(voc_palette())
        img.save(target("semseg_voc"), compress_level=1)
    else:
        Image.fromarray(scene.semseg, mode="L").save(target("semseg_context"), compress_level=1)
    normals_png = np.clip(np.rint((scene.normals + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(normals_png, mode="RGB").save(target("normals"), compress_level=1)
    sal = np.where(scene.instance >= 0, 255, 0).astype(np.uint8)
    Image.fromarray(sal, mode="L").save(target("sal"), compress_level=1)
    _savemat(target("labelmap"), {"LabelMap": scene.context})
    _savemat(target("human_parts"), {"anno": _anno(image_id, scene)})


def make_pascal_dataset(
    out: Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    size_range: tuple[int, int] = (40, 120),
    voc_fraction: float = 0.25,
) -> Path:
    """Write a generated PASCAL_MT dataset into the existing empty folder ``out`` (see the module docstring)."""
    ids = [f"{2008 + k % 4}_{k:06d}" for k in range(n_train + n_val)]
    order = np.random.default_rng([seed, 10**6]).permutation(len(ids))
    splits = {"train": [ids[i] for i in sorted(order[:n_train])], "val": [ids[i] for i in sorted(order[n_train:])]}
    for k, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, k])
        scene = _make_scene(rng, size_range)
        _write_sample(out, image_id, scene, rng, voc=bool(rng.random() < voc_fraction))
    for split, names in splits.items():
        path = out / SPLIT_FILE.format(split=split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return out


def make_synthetic_dataset(
    out: str | os.PathLike[str],
    n_train: int = 64,
    n_val: int = 16,
    seed: int = 0,
    *,
    protocol: Protocol = PASCAL_CONTEXT,
    size_range: tuple[int, int] = (40, 120),
    **options: Any,
) -> Path:
    """Write a complete generated dataset in the layout of ``protocol.dataset`` to ``out`` (which must not exist or
    be an empty folder) and return its path. ``options`` go to the data source's generator (PASCAL:
    ``voc_fraction``).

    It is built in a temporary folder beside ``out`` and moved into place at the end, so a failure leaves
    nothing behind.
    """
    from benchmark.dataset import data_source

    out = Path(out).expanduser()
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least one train and one val image, got n_train={n_train}, n_val={n_val}")
    if not (8 <= size_range[0] <= size_range[1]):
        raise ValueError(f"size_range must be (lo, hi) with 8 <= lo <= hi, got {size_range}")
    source = data_source(protocol)  # an unknown data source fails before anything is written
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty folder; expected a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        source.make_synthetic(tmp, n_train, n_val, seed, protocol, size_range=size_range, **options)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
