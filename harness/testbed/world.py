"""The synthetic visual world: scene specs, rendering, and per-patch ground truth.

A scene is a JSON-able spec (background parameters plus a list of objects with boxes); rendering
is a pure function of the spec, using only numpy, so the same spec gives the same pixels on every
machine. Because the world knows where every object is, it can say which of the 24x24 patches a
question's evidence lies in: something no real benchmark offers.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches a side -> 576 visual tokens

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "cross": "crosses", "diamond": "diamonds"}
COLORS = {
    "red": (220, 40, 40), "green": (40, 175, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
    "purple": (150, 60, 205), "orange": (245, 135, 25), "white": (238, 238, 238), "cyan": (40, 205, 215),
}
COLOR_NAMES = tuple(COLORS)

# 5x7 bitmap glyphs: a font of our own, so text renders identically whatever Pillow is installed.
GLYPHS = {
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "F": ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
    "H": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
    "K": ["10001", "10010", "10100", "11000", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
    "Z": ["11111", "00001", "00010", "00100", "01000", "10000", "11111"],
}
LETTERS = tuple(GLYPHS)

# Per-patch class ids used to supervise the vision tower: 0 background, then shapes, then letters.
KIND_CLASSES = ("background",) + SHAPES + LETTERS
COLOR_CLASSES = ("background",) + COLOR_NAMES


# ----------------------------------------------------------------------------- rendering

def _shape_mask(name: str, w: int, h: int) -> np.ndarray:
    """Boolean mask of a shape filling a w x h box (u, v in [-1, 1], v pointing down)."""
    v, u = np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.ones((h, w), bool)
    if name == "triangle":
        return np.abs(u) <= (v + 1) / 2
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "cross":
        return (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34)
    if name == "star":
        theta = np.arctan2(u, -v)  # 0 at the top point
        radius = np.sqrt(u * u + v * v)
        spikes = np.abs(np.cos(2.5 * theta))  # five points
        return radius <= 0.42 + 0.58 * spikes ** 4
    raise ValueError(f"unknown shape {name!r}; known: {SHAPES}")


def _letter_mask(name: str, w: int, h: int) -> np.ndarray:
    glyph = np.array([[c == "1" for c in row] for row in GLYPHS[name]])
    rows = np.minimum((np.arange(h) * 7) // h, 6)
    cols = np.minimum((np.arange(w) * 5) // w, 4)
    return glyph[rows][:, cols]


def object_mask(obj: dict) -> np.ndarray:
    """The object's own mask inside its box (before occlusion by later objects)."""
    x0, y0, x1, y1 = obj["box"]
    draw = _letter_mask if obj["kind"] == "letter" else _shape_mask
    return draw(obj["name"], x1 - x0, y1 - y0)


def render_background(bg: dict) -> np.ndarray:
    """Textured background: a tinted base, low-frequency blotches and pixel noise, never flat."""
    rng = np.random.default_rng(bg["seed"])
    base = np.array(bg["base"], np.float32)
    coarse = rng.normal(0.0, bg.get("blotch", 22.0), size=(7, 7, 3)).astype(np.float32)
    # Bilinear upsampling of the coarse grid to full size.
    pos = np.linspace(0, 6, IMAGE_SIZE, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), 5)
    f = (pos - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]
    smooth = rows[:, i0] * (1 - f[None]) + rows[:, i0 + 1] * f[None]
    noise_rng = np.random.default_rng(bg.get("noise_seed", bg["seed"] + 1))
    noise = noise_rng.normal(0.0, bg.get("noise", 7.0), size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    return base + smooth + noise


def render(scene: dict) -> np.ndarray:
    """Render a scene spec to a 336x336x3 uint8 array."""
    img = render_background(scene["bg"])
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        mask = object_mask(obj)
        region = img[y0:y1, x0:x1]
        region[mask] = np.array(obj["rgb"], np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def render_pil(scene: dict):
    from PIL import Image

    return Image.fromarray(render(scene))


# ----------------------------------------------------------------------------- ground truth

def visible_masks(scene: dict) -> np.ndarray:
    """[n_objects, 336, 336] bool: each object's pixels left visible after later objects are drawn."""
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, np.int32)
    for i, obj in enumerate(scene["objects"]):
        x0, y0, x1, y1 = obj["box"]
        sub = owner[y0:y1, x0:x1]
        sub[object_mask(obj)] = i
    return np.stack([owner == i for i in range(len(scene["objects"]))]) if scene["objects"] else \
        np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), bool)


def patch_coverage(masks: np.ndarray) -> np.ndarray:
    """[n, 576] share of each patch's pixels covered by each mask."""
    n = masks.shape[0]
    return masks.reshape(n, GRID, PATCH, GRID, PATCH).mean(axis=(2, 4)).reshape(n, GRID * GRID)


def evidence_patches(scene: dict, object_ids) -> list[int]:
    """Sorted raster indices of every patch holding at least one visible pixel of the given objects."""
    if not len(object_ids):
        return []
    cover = patch_coverage(visible_masks(scene)[list(object_ids)])
    return sorted(int(i) for i in np.flatnonzero(cover.max(axis=0) > 0))


def centre_patch(obj: dict) -> int:
    """Raster index of the patch holding the centre of the object's box (one patch per object)."""
    x0, y0, x1, y1 = obj["box"]
    cx, cy = min((x0 + x1) // 2, IMAGE_SIZE - 1), min((y0 + y1) // 2, IMAGE_SIZE - 1)
    return (cy // PATCH) * GRID + cx // PATCH


def patch_owner(scene: dict, min_cover: float = 0.15) -> np.ndarray:
    """[576] index of the object covering most of each patch, if it covers at least `min_cover`; else -1."""
    if not scene["objects"]:
        return np.full(GRID * GRID, -1)
    cover = patch_coverage(visible_masks(scene))
    return np.where(cover.max(axis=0) >= min_cover, cover.argmax(axis=0), -1)


# Most shapes of one kind a scene's patches are labelled with ("this many or more").
MAX_KIND_COUNT = 6


def kind_counts(scene: dict) -> dict[str, int]:
    """How many shapes of each kind the scene holds (every kind in SHAPES), capped at MAX_KIND_COUNT."""
    names = [o["name"] for o in scene["objects"] if o["kind"] == "shape"]
    return {k: min(names.count(k), MAX_KIND_COUNT) for k in SHAPES}


def patch_labels(scene: dict, min_cover: float = 0.15) -> dict[str, np.ndarray]:
    """Dense per-patch targets for the vision tower: kind, colour, object centre, grid position, and
    for a shape's patches how many shapes of its kind the scene holds (capped at MAX_KIND_COUNT;
    0 for letters and background); `object_size`: how many patches the patch's object is labelled on
    (0 for background).

    A patch takes the labels of the object covering most of it, if that covers at least `min_cover`.
    """
    kinds = np.zeros(GRID * GRID, np.int64)
    colors = np.zeros(GRID * GRID, np.int64)
    kind_count = np.zeros(GRID * GRID, np.int64)
    object_size = np.zeros(GRID * GRID, np.int64)
    center = np.zeros(GRID * GRID, np.float32)
    objs = scene["objects"]
    if objs:
        owner = patch_owner(scene, min_cover)
        has = owner >= 0
        kind_ids = np.array([KIND_CLASSES.index(o["name"]) for o in objs])
        color_ids = np.array([COLOR_CLASSES.index(o["color"]) for o in objs])
        per_kind = kind_counts(scene)
        counts = np.array([per_kind[o["name"]] if o["kind"] == "shape" else 0 for o in objs])
        kinds[has] = kind_ids[owner[has]]
        colors[has] = color_ids[owner[has]]
        kind_count[has] = counts[owner[has]]
        object_size[has] = np.bincount(owner[has], minlength=len(objs))[owner[has]]
        for o in objs:
            center[centre_patch(o)] = 1.0
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    position = np.stack([rows, cols], axis=1).astype(np.float32) / (GRID - 1)
    return {"kind": kinds, "color": colors, "center": center, "position": position, "kind_count": kind_count,
            "object_size": object_size}


# ----------------------------------------------------------------------------- scene sampling

def sample_background(rng: np.random.Generator) -> dict:
    level = rng.uniform(35, 95)
    tint = rng.uniform(-12, 12, size=3)
    return {"seed": int(rng.integers(2**31)), "base": [round(float(level + t), 2) for t in tint]}


def make_object(rng: np.random.Generator, kind: str, name: str, color: str, size: int, x: int, y: int) -> dict:
    jitter = rng.integers(-12, 13, size=3)
    rgb = [int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter)]
    if kind == "letter":
        w, h = (size * 5) // 7, size
    else:
        aspect = rng.uniform(0.85, 1.15)
        w, h = size, int(round(size * aspect))
    w, h = max(w, 4), max(h, 4)
    x0 = int(np.clip(x - w // 2, 0, IMAGE_SIZE - w))
    y0 = int(np.clip(y - h // 2, 0, IMAGE_SIZE - h))
    return {"kind": kind, "name": name, "color": color, "rgb": rgb, "box": [x0, y0, x0 + w, y0 + h]}


def _overlaps(box, boxes, margin: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in boxes)


def place_objects(rng: np.random.Generator, wanted: list[tuple[str, str, str, int]], margin: int = 4,
                  tries: int = 200) -> list[dict] | None:
    """Place (kind, name, colour, size) objects without overlap; None if they do not fit."""
    placed: list[dict] = []
    for kind, name, color, size in wanted:
        for _ in range(tries):
            x, y = rng.integers(size // 2, IMAGE_SIZE - size // 2, size=2)
            obj = make_object(rng, kind, name, color, size, int(x), int(y))
            if not _overlaps(obj["box"], [p["box"] for p in placed], margin):
                placed.append(obj)
                break
        else:
            return None
    return placed


def sample_size(rng: np.random.Generator, small_bias: float = 0.4) -> int:
    """Object sizes from about one patch to large regions, biased to small ones."""
    r = rng.random()
    if r < small_bias:
        return int(rng.integers(22, 32))
    if r < 0.85:
        return int(rng.integers(32, 64))
    return int(rng.integers(64, 112))
