"""Exact prompt following on the synthetic world: parse a caption, find the shapes in the image, check.

The world draws solid, non-overlapping, axis-aligned shapes in a fixed palette on a mid-grey
background, so an image can be judged without a learned detector:
  colour   nearest palette colour per pixel (pixels far from every palette colour are ignored),
  objects  connected components of each colour (scipy.ndimage.label), tiny specks dropped,
  shape    fill ratio of the bounding box: square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5,
  position centroids of the two named objects.
Scores follow GenEval's task split (single object, two objects, counting, colours, position,
colour attribution) plus shapes: a prompt counts as correct only when every check that applies to
it passes.

Caption grammar (lower case, an optional "a photo of" in front and a final "." are ignored):
  caption  := object | object relation object | object "and" object
  object   := ("a" | "an" | "one" | "two" | "three" | "four" | 1..4) colour shape["s"]
  relation := "to the left of" | "left of" | "to the right of" | "right of" | "above" | "below"
e.g. "a red circle", "two blue squares", "a green triangle above a yellow circle",
     "a blue square to the left of a yellow triangle", "a red circle and a white square".

The palette, background and shapes are the renderer's own (pipelines/world.py), imported here so
the checks and the world can never disagree.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.world import BACKGROUND, PALETTE, SHAPES  # one definition of the world

RELATIONS = {  # caption phrase -> canonical relation
    "to the left of": "left of", "left of": "left of",
    "to the right of": "right of", "right of": "right of",
    "above": "above", "below": "below",
}
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
# Prompt categories (a prompt is in one) and checks scored over every prompt (colours, shapes) or
# over every two-object prompt (colour_attribution: each colour on its own shape, position aside).
CATEGORIES = ("single_object", "two_objects", "counting", "colours", "shapes", "position", "colour_attribution")
TWO_OBJECT_CATEGORIES = ("two_objects", "position")

# Fill ratio (component area / bounding-box area) boundaries, halfway between the ideal shapes.
SQUARE_MIN_FILL = (1.0 + np.pi / 4) / 2      # 0.89
CIRCLE_MIN_FILL = (np.pi / 4 + 0.5) / 2      # 0.64


@dataclass
class ObjectSpec:
    colour: str
    shape: str
    count: int = 1

    def __post_init__(self):
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; the world has {', '.join(PALETTE)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; the world has {', '.join(SHAPES)}")
        if not 1 <= int(self.count) <= 4:
            raise ValueError(f"count must be 1..4, got {self.count}")
        self.count = int(self.count)

    def phrase(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{NUMBER_WORDS[self.count]} {self.colour} {noun}"


@dataclass
class Prompt:
    objects: list[ObjectSpec]
    relation: str | None = None      # "left of" | "right of" | "above" | "below": objects[0] REL objects[1]

    @property
    def category(self) -> str:
        if self.relation:
            return "position"
        if len(self.objects) == 2:
            return "two_objects"
        return "counting" if self.objects[0].count > 1 else "single_object"

    def caption(self) -> str:
        if len(self.objects) == 1:
            return self.objects[0].phrase()
        joiner = {"left of": "to the left of", "right of": "to the right of"}.get(self.relation, self.relation or "and")
        return f"{self.objects[0].phrase()} {joiner} {self.objects[1].phrase()}"

    def to_spec(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_spec(cls, spec: dict) -> "Prompt":
        """From a JSON-style spec: {"objects": [{"colour"|"color", "shape", "count"}], "relation": ...}."""
        try:
            objects = [ObjectSpec(o.get("colour", o.get("color")), o["shape"], o.get("count", 1)) for o in spec["objects"]]
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"world spec {spec!r} lacks objects with colour/shape: {err}") from err
        relation = spec.get("relation")
        if relation is not None:
            relation = RELATIONS.get(relation)
            if relation is None:
                raise ValueError(f"unknown relation {spec.get('relation')!r}; use one of {', '.join(RELATIONS)}")
        if not 1 <= len(objects) <= 2 or (relation and len(objects) != 2):
            raise ValueError(f"world spec must name one object, or two objects (with an optional relation): {spec!r}")
        return cls(objects, relation)


def parse_caption(caption: str) -> Prompt:
    """A caption of the world grammar (see the module doc) -> Prompt; anything else is a ValueError."""
    text = re.sub(r"\s+", " ", caption.strip().lower().rstrip("."))
    text = re.sub(r"^(a photo of|an image of) ", "", text)
    words = text.split(" ")

    def obj(i: int) -> tuple[ObjectSpec, int]:
        if i + 3 > len(words):
            raise ValueError(f"caption {caption!r}: expected '<count> <colour> <shape>' at word {i + 1}")
        count_word, colour, noun = words[i:i + 3]
        count = COUNT_WORDS.get(count_word) or (int(count_word) if count_word.isdigit() else None)
        if count is None:
            raise ValueError(f"caption {caption!r}: {count_word!r} is not a count (a, one .. four)")
        shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
        if (count > 1) != (noun != shape):
            raise ValueError(f"caption {caption!r}: {count_word!r} does not agree with {noun!r}")
        return ObjectSpec(colour, shape, count), i + 3

    first, i = obj(0)
    if i == len(words):
        return Prompt([first])
    rest = " ".join(words[i:])
    for phrase, relation in sorted(RELATIONS.items(), key=lambda kv: -len(kv[0])):
        if rest.startswith(phrase + " "):
            second, j = obj(i + len(phrase.split(" ")))
            break
    else:
        if words[i] != "and":
            raise ValueError(f"caption {caption!r}: expected a relation ({', '.join(RELATIONS)}) or 'and' after {first.phrase()!r}")
        relation = None
        second, j = obj(i + 1)
    if j != len(words):
        raise ValueError(f"caption {caption!r}: unexpected words after the second object: {' '.join(words[j:])!r}")
    return Prompt([first, second], relation)


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions of the grammar, cycling through the four prompt categories (for eval and tune sets)."""
    rng = random.Random(seed)
    colours, out = list(PALETTE), []
    for i in range(n):
        kind = ("single_object", "counting", "two_objects", "position")[i % 4]
        a, b = rng.sample(colours, 2)
        sa, sb = rng.choice(SHAPES), rng.choice(SHAPES)
        if kind == "single_object":
            p = Prompt([ObjectSpec(a, sa)])
        elif kind == "counting":
            p = Prompt([ObjectSpec(a, sa, rng.randint(2, 4))])
        else:
            rel = rng.choice(["left of", "right of", "above", "below"]) if kind == "position" else None
            p = Prompt([ObjectSpec(a, sa), ObjectSpec(b, sb)], rel)
        out.append(p.caption())
    return out


# ---------------------------------------------------------------------------------------------
# Finding shapes in an image


@dataclass
class Blob:
    colour: str
    shape: str
    area: int
    cy: float                 # centroid, pixels from the top
    cx: float                 # centroid, pixels from the left
    height: int               # bounding box
    width: int
    fill: float               # area / bounding-box area


def classify_shape(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


_COLOURS = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)   # [K+1, 3], background first
_NAMES = ["background", *PALETTE]


def colour_map(image: np.ndarray, max_distance: float = 80.0) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] index into (background, *PALETTE); -1 where no colour is near."""
    px = image[..., :3].astype(np.float32)
    d2 = ((px[:, :, None, :] - _COLOURS[None, None]) ** 2).sum(-1)                   # [H, W, K+1]
    idx = d2.argmin(-1)
    idx[np.take_along_axis(d2, idx[..., None], -1)[..., 0] > max_distance ** 2] = -1
    return idx


def find_objects(image: np.ndarray, min_area: int | None = None, max_distance: float = 80.0) -> list[Blob]:
    """The coloured shapes of an image: connected components of each palette colour.

    min_area drops specks (sampling noise, anti-aliased edges); default 0.3% of the image, >= 3 px.
    """
    # scipy.ndimage costs ~0.5 CPU-s to import; every process that reads a training config imports
    # this module (jobs.train.config -> jobs.evaluate), and only the ones that judge images need it.
    from scipy import ndimage

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    H, W = image.shape[:2]
    min_area = max(3, int(0.003 * H * W)) if min_area is None else min_area
    idx = colour_map(image, max_distance)
    blobs = []
    for k in range(1, len(_NAMES)):
        labels, n = ndimage.label(idx == k)                                            # 4-connected
        if n == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        centroids = ndimage.center_of_mass(labels > 0, labels, index=np.arange(1, n + 1))
        for area, (cy, cx), box in zip(areas, centroids, ndimage.find_objects(labels)):
            if area < min_area:
                continue
            h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
            fill = float(area) / (h * w)
            blobs.append(Blob(_NAMES[k], classify_shape(fill), int(area), float(cy), float(cx), h, w, fill))
    return blobs


# ---------------------------------------------------------------------------------------------
# Checking an image against a prompt


@dataclass
class Verdict:
    category: str
    colour: bool
    count: bool
    shape: bool
    position: bool | None            # None when the prompt names no relation
    correct: bool
    found: list[str] = field(default_factory=list)   # "red circle @ (x, y)" per blob, for slicing/debugging

    def record(self) -> dict:
        d = asdict(self)
        d["found"] = json.dumps(d["found"])
        return d


def _centre(blobs: list[Blob]) -> tuple[float, float, float, float]:
    """(cx, cy, mean width, mean height) of a group of blobs."""
    return (float(np.mean([b.cx for b in blobs])), float(np.mean([b.cy for b in blobs])),
            float(np.mean([b.width for b in blobs])), float(np.mean([b.height for b in blobs])))


def relation_holds(a: list[Blob], b: list[Blob], relation: str, margin: float = 0.1) -> bool:
    """A REL B on centroids, with a margin of `margin` x the mean object size (GenEval-style)."""
    if not a or not b:
        return False
    ax, ay, aw, ah = _centre(a)
    bx, by, bw, bh = _centre(b)
    mx, my = margin * (aw + bw) / 2, margin * (ah + bh) / 2
    return {"left of": ax < bx - mx, "right of": ax > bx + mx, "above": ay < by - my, "below": ay > by + my}[relation]


def check_image(image: np.ndarray, prompt: Prompt | str, min_area: int | None = None) -> Verdict:
    """Judge one [H, W, 3] uint8 image against a caption or Prompt.

    colour   every named colour is present;
    count    each object's colour appears exactly `count` times (by (colour, shape) when two objects
             share a colour);
    shape    at least `count` blobs of each object's colour have the named shape (at least one when
             the count is already wrong, so count and shape errors are told apart);
    position the relation holds between the two objects' centroids (shape-matched blobs when there
             are any, else all blobs of the colour).
    """
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    blobs = find_objects(image, min_area)
    shared = len(prompt.objects) == 2 and prompt.objects[0].colour == prompt.objects[1].colour
    colour_ok = count_ok = shape_ok = True
    groups = []
    for o in prompt.objects:
        same_colour = [b for b in blobs if b.colour == o.colour]
        matched = [b for b in same_colour if b.shape == o.shape]
        colour_ok &= bool(same_colour)
        count_ok &= len(matched if shared else same_colour) == o.count
        shape_ok &= len(matched) >= (o.count if len(same_colour) >= o.count else 1)
        groups.append(matched or same_colour)
    position = relation_holds(groups[0], groups[1], prompt.relation) if prompt.relation else None
    correct = colour_ok and count_ok and shape_ok and position is not False
    found = [f"{b.colour} {b.shape} @ ({b.cx:.1f}, {b.cy:.1f})" for b in blobs]
    return Verdict(prompt.category, colour_ok, count_ok, shape_ok, position, correct, found)


def summarize(verdicts: list[Verdict | dict]) -> dict[str, float]:
    """GenEval-style scores: per prompt category (share of prompts fully correct); `colours` and
    `shapes` (the colour and shape checks over every prompt, since every world prompt names both);
    `colour_attribution` (two-object prompts whose colours, counts and shapes all hold, each colour
    on its own shape as in GenEval's colour-attribution task, position aside); per check; and
    `overall` (mean over the categories present, as GenEval averages its tasks)."""
    rows = [v.record() if isinstance(v, Verdict) else v for v in verdicts]
    if not rows:
        return {}
    out: dict[str, float] = {}
    for cat in CATEGORIES:
        if cat in ("colours", "shapes"):
            out[cat] = float(np.mean([r[cat[:-1]] for r in rows]))
        elif cat == "colour_attribution":
            pairs = [r["colour"] and r["count"] and r["shape"] for r in rows if r["category"] in TWO_OBJECT_CATEGORIES]
            if pairs:
                out[cat] = float(np.mean(pairs))
        else:
            picked = [r["correct"] for r in rows if r["category"] == cat]
            if picked:
                out[cat] = float(np.mean(picked))
    out["overall"] = float(np.mean([out[c] for c in CATEGORIES if c in out]))
    for check in ("colour", "count", "shape", "position"):
        vals = [r[check] for r in rows if r[check] is not None]
        if vals:
            out[f"check_{check}"] = float(np.mean(vals))
    out["correct"] = float(np.mean([r["correct"] for r in rows]))
    return out
