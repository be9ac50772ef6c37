"""GenEval (Ghosh et al. 2023) by the official rules: prompt metadata, detections -> per-image verdicts.

The benchmark ships `prompts/evaluation_metadata.jsonl`: 553 lines, one JSON object each,
  {"tag": ..., "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
   "exclude"?: [{"class", "count"}], "prompt": ...}
with tags single_object, two_object, counting, colors, position and color_attr. The judge is
mmdetection's Mask2Former Swin-S (COCO instance segmentation; `mask2former.py` runs it through
transformers) plus CLIP ViT-L/14 for colours. The rules below follow djghosh13/geneval
`evaluation/evaluate_images.py` (its defaults: threshold 0.3, counting_threshold 0.9,
max_objects 16, max_overlap 1.0 = no suppression, position_threshold 0.1, grey "#999" behind the
masked colour crops) and `evaluation/summary_scores.py` (overall = mean over tags of the share of
correct images); PeppaKing8/minit2i-jax `external/jax_geneval/evaluation.py` applies the same.

Per image:
  1. detections of each class are sorted by score, kept when score > threshold (counting prompts:
     > counting_threshold), the first max_objects kept, then greedy IoU suppression when
     max_overlap < 1;
  2. every `include` clause takes the `count` most confident detections of its class: too few
     fails; a `color` clause classifies those crops with CLIP and needs `count` of that colour; a
     `position` clause needs every one of them in `relation` to every object the referenced clause
     matched (a failed referenced clause fails this one too);
  3. every `exclude` clause fails when `count` or more of its class were kept.
The image is correct when no clause fails.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipelines import storage

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
# evaluate_images.py COLORS, in its order (the colour classifier's class order).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# evaluation/object_names.txt: COCO's 80 instance classes in the detector's label order, spelled as
# GenEval spells them (COCO's "mouse", "remote", "keyboard" become the three longer names).
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# The colour classifier's prompts (evaluate_images.py color_classification), {c} = a colour.
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
MASK_BACKGROUND = (153, 153, 153)   # "#999": what replaces the pixels outside an object's mask


@dataclass
class GenEvalRules:
    """The official options of evaluate_images.py (`--options key=value`), at their defaults."""
    threshold: float = 0.3             # keep a detection when its score is above this
    counting_threshold: float = 0.9    # ... above this on "counting" prompts
    max_objects: int = 16              # most detections kept per class
    max_overlap: float = 1.0           # IoU suppression among a class's detections; 1.0 = off
    position_threshold: float = 0.1    # relative_position margin, in units of the two box sizes


@dataclass
class Detection:
    box: np.ndarray                    # [4] x0, y0, x1, y1 in pixels (mmdet mask2bbox: x1, y1 exclusive)
    score: float
    mask: np.ndarray | None = None     # [H, W] bool, the instance mask


# ---------------------------------------------------------------------------------------------
# The metadata file


def _fail(where: str, what: str):
    raise ValueError(f"{where}: {what}")


def parse_metadata(obj, where: str) -> dict:
    """Check one metadata object against the published format; returns it unchanged."""
    if not isinstance(obj, dict):
        _fail(where, f"GenEval metadata must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("tag", "include", "prompt") if k not in obj]
    if missing:
        _fail(where, f"GenEval metadata lacks {', '.join(missing)}")
    if not isinstance(obj["tag"], str) or not isinstance(obj["prompt"], str):
        _fail(where, "GenEval tag and prompt must be strings")
    include = obj["include"]
    if not isinstance(include, list) or not include:
        _fail(where, "GenEval include must be a non-empty list")
    for i, req in enumerate(include):
        _check_clause(req, f"{where}: include[{i}]")
        if "color" in req and req["color"] not in COLORS:
            _fail(where, f"include[{i}] color {req['color']!r} is not one of {', '.join(COLORS)}")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                _fail(where, f"include[{i}] position must be [relation, index of an earlier clause] with relation in "
                             f"{', '.join(RELATIONS)}, got {pos!r}")
    exclude = obj.get("exclude", [])
    if not isinstance(exclude, list):
        _fail(where, "GenEval exclude must be a list")
    for i, req in enumerate(exclude):
        _check_clause(req, f"{where}: exclude[{i}]")
    return obj


def _check_clause(req, where: str) -> None:
    if not isinstance(req, dict) or "class" not in req or "count" not in req:
        _fail(where, f"a clause needs class and count, got {req!r}")
    if req["class"] not in CLASSES:
        _fail(where, f"class {req['class']!r} is not one of GenEval's 80 COCO names (object_names.txt)")
    if not isinstance(req["count"], int) or isinstance(req["count"], bool) or req["count"] < 1:
        _fail(where, f"count must be a positive integer, got {req['count']!r}")


def load_metadata(uri: str | Path) -> list[dict]:
    """evaluation_metadata.jsonl (local or s3://) -> checked metadata objects in file order."""
    uri = str(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"GenEval metadata {uri} does not exist")
    rows = []
    for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{uri}:{n}: not valid JSON: {err}") from err
        rows.append(parse_metadata(obj, f"{uri}:{n}"))
    if not rows:
        raise ValueError(f"GenEval metadata {uri} holds no prompts")
    return rows


# ---------------------------------------------------------------------------------------------
# Metadata from a free caption (the data-feedback critic's labeller on real training data)
#
# Hand-written: no library turns a caption into GenEval's clauses. It reads the forms GenEval's
# own prompts are written in (djghosh13/geneval prompts/create_prompts.py: "a/an" articles,
# number words, plurals by `+s`/`+es`, a colour word before its class, "A <relation> B" with B
# as clause 0), so every official prompt parses back to its metadata line, and applies the same
# reading to any caption: each mention of a COCO class becomes a clause.

NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10}
# Plurals ordinary English uses beside GenEval's `+s` / `+es` (make_plural).
IRREGULAR_PLURALS = {"person": ("people",), "knife": ("knives",), "sheep": ("sheep",), "skis": ("skis",),
                     "scissors": ("scissors",), "computer mouse": ("computer mice",), "bus": ("buses",)}


def _plurals(name: str) -> tuple[str, ...]:
    """GenEval's plural (make_plural: "+es" after s, else "+s", so its "benchs") and the English ones."""
    english = (name + "es" if name.endswith(("s", "x", "z", "ch", "sh")) else
               name[:-1] + "ies" if name.endswith("y") and name[-2] not in "aeiou" else name + "s")
    return tuple(dict.fromkeys((name + ("es" if name.endswith("s") else "s"), english, *IRREGULAR_PLURALS.get(name, ()))))


# (word tuple, class, plural?), longest first so "hot dog" wins over "dog" and "wine glass" over "glass".
_FORMS = sorted(((tuple(form.split()), cls, plural) for cls in CLASSES
                 for form, plural in ((cls, False), *((p, True) for p in _plurals(cls)))),
                key=lambda f: -len(f[0]))


def caption_metadata(caption: str) -> dict | None:
    """GenEval metadata for a caption: a clause per COCO class mention (count from its number word,
    exact with an `exclude` of count + 1 as GenEval's counting prompts are; colour from the word
    before it; "A left of/right of/above/below B" as a position clause on B), tagged as GenEval
    would tag it. None when the caption names no COCO class: such a caption cannot be judged."""
    words = "".join(c if c.isalnum() or c == "-" else " " for c in caption.lower().replace("-colored", "")).split()
    mentions: list[dict] = []         # {class, count, exact, color, start, end}
    i = 0
    while i < len(words):
        form = next((f for f in _FORMS if tuple(words[i:i + len(f[0])]) == f[0]), None)
        if form is None:
            i += 1
            continue
        cls, plural, start = form[1], form[2], i
        if cls in COLORS and any(tuple(words[i + 1:i + 1 + len(f[0])]) == f[0] for f in _FORMS):
            i += 1                    # "an orange car": the colour, not the fruit
            continue
        color = words[start - 1] if start >= 1 and words[start - 1] in COLORS else None
        j = start - (2 if color else 1)
        number = NUMBERS.get(words[j]) if j >= 0 else None
        count = number if number is not None and (number > 1) == plural else 1
        mentions.append({"class": cls, "count": count, "exact": plural and number is not None and number > 1,
                         "color": color, "start": j if number is not None else start - (1 if color else 0),
                         "end": start + len(form[0])})
        i = start + len(form[0])
    if not mentions:
        return None
    include: list[dict] = []
    exclude: list[dict] = []
    position = None
    if len(mentions) == 2:
        between = " ".join(words[mentions[0]["end"]:mentions[1]["start"]])
        position = next((r for r in RELATIONS if between == r or between.endswith(" " + r) or between == "to the " + r), None)
    order = [mentions[1], mentions[0]] if position else mentions       # GenEval: the reference object is clause 0
    for k, m in enumerate(order):
        clause = {"class": m["class"], "count": m["count"]}
        if m["color"]:
            clause["color"] = m["color"]
        if position and k == 1:
            clause["position"] = [position, 0]
        include.append(clause)
        if m["exact"]:
            exclude.append({"class": m["class"], "count": m["count"] + 1})
    colours = sum("color" in c for c in include)
    tag = ("position" if position else "color_attr" if colours >= 2 else "counting" if exclude
           else "colors" if colours else "two_object" if len(include) >= 2 else "single_object")
    meta = {"tag": tag, "include": include, "prompt": caption}
    if exclude:
        meta["exclude"] = exclude
    return meta


def is_geneval(meta: dict | None) -> bool:
    """Does an image's metadata come from a GenEval metadata line?"""
    return bool(meta) and "tag" in meta and "include" in meta


# ---------------------------------------------------------------------------------------------
# The decision rules


def compute_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU with the official +1 pixel convention of evaluate_images.py compute_iou."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return float(inter / union) if union else 0.0


def group_detections(labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray | None,
                     tag: str, rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """Detector output (labels [K] indexing CLASSES, boxes [K, 4], scores [K], masks [K, H, W]) ->
    the kept detections per class name, most confident first (evaluate_image's filtering)."""
    floor = rules.counting_threshold if tag == "counting" else rules.threshold
    out: dict[str, list[Detection]] = {}
    for index, name in enumerate(CLASSES):
        picked = np.flatnonzero(labels == index)
        picked = picked[np.argsort(-scores[picked], kind="stable")]
        picked = [int(k) for k in picked if scores[k] > floor][:rules.max_objects]
        kept: list[Detection] = []
        while picked:
            best = picked.pop(0)
            kept.append(Detection(np.asarray(boxes[best], np.float64), float(scores[best]),
                                  None if masks is None else masks[best]))
            if rules.max_overlap < 1:
                picked = [k for k in picked if compute_iou(boxes[best], boxes[k]) < rules.max_overlap]
        if kept:
            out[name] = kept
    return out


def relative_position(a: Detection, b: Detection, threshold: float = GenEvalRules.position_threshold) -> set[str]:
    """Relations of a to b (evaluate_images.py relative_position): the centre offset, each axis
    shrunk towards 0 by threshold x (the two boxes' summed extent on that axis), then normalised by
    the raw offset's length; an axis whose share is beyond 0.5 names a relation."""
    boxes = np.stack([a.box[:4], b.box[:4]]).reshape(2, 2, 2)     # [object, corner, xy]
    centre_a, centre_b = boxes.mean(1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


ColourFn = Callable[[Sequence[Detection], str], list[str]]   # (objects, class name) -> a colour each


def judge(meta: dict, objects: dict[str, list[Detection]], colour_of: ColourFn | None = None,
          rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """(correct, reason) for one image: evaluate_images.py `evaluate`, clause by clause."""
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in meta["include"]:
        name, count = req["class"], req["count"]
        ok = True
        found = objects.get(name, [])[:count]
        if len(found) < count:
            ok = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if colour_of is None:
                    raise ValueError("GenEval colour clauses need a colour classifier (metrics.clip_model)")
                colours = colour_of(found, name)
                if colours.count(req["color"]) < count:
                    ok = False
                    seen = ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours)
                    reasons.append(f"expected {req['color']} {name}>={count}, found "
                                   f"{colours.count(req['color'])} {req['color']}; and {seen}")
            if "position" in req and ok:
                relation, target = req["position"]
                if matched[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for other in matched[target]:
                            rels = relative_position(obj, other, rules.position_threshold)
                            if relation not in rels:
                                ok = False
                                reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(rels))} target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        matched.append(found if ok else None)
    for req in meta.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def summarize(records: list[dict]) -> dict[str, float]:
    """summary_scores.py: per-tag share of correct images, `overall` = their mean over tags,
    `correct_images` and `correct_prompts` (a prompt counts when any of its images is correct).
    records: {"tag", "prompt", "correct"} per image."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_tag[r["tag"]].append(bool(r["correct"]))
        by_prompt[r["prompt"]].append(bool(r["correct"]))
    if not records:
        return {}
    out = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
    out["overall"] = float(np.mean([out[t] for t in by_tag]))
    out["correct_images"] = float(np.mean([bool(r["correct"]) for r in records]))
    out["correct_prompts"] = float(np.mean([any(v) for v in by_prompt.values()]))
    return out


# ---------------------------------------------------------------------------------------------
# The colour judge and the whole judge


def masked_crop(image: np.ndarray, det: Detection):
    """PIL crop the colour classifier sees: the image with everything outside the mask grey, cut
    to the box (evaluate_images.py ImageCrops with its defaults bgcolor #999, crop 1)."""
    from PIL import Image

    img = Image.fromarray(image).convert("RGB")
    if det.mask is not None:
        if det.mask.shape != image.shape[:2]:
            raise ValueError(f"mask {det.mask.shape} does not match image {image.shape[:2]}")
        blank = Image.new("RGB", img.size, MASK_BACKGROUND)
        img = Image.composite(img, blank, Image.fromarray(np.asarray(det.mask, bool)))
    return img.crop(tuple(float(v) for v in det.box[:4]))   # PIL rounds the box, as the official crop


class ColourClassifier:
    """CLIP zero-shot colour of masked crops: per colour, the mean of the three templates' unit
    text embeddings (re-normalised, clip_benchmark's zero_shot_classifier), argmax of cosine."""

    def __init__(self, clip):
        self.clip = clip                                   # a jobs.metrics.clip_score.ClipScorer
        self._weights: dict[str, torch.Tensor] = {}        # class name -> [colours, D]

    def weights(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            texts = [t.format(c=c, cls=name) for c in COLORS for t in COLOR_TEMPLATES]
            emb = self.clip.text_embeds(texts).view(len(COLORS), len(COLOR_TEMPLATES), -1)   # [C, T, D], unit rows
            mean = emb.mean(1)
            self._weights[name] = mean / mean.norm(dim=-1, keepdim=True)
        return self._weights[name]

    def __call__(self, image: np.ndarray, objects: Sequence[Detection], name: str) -> list[str]:
        feats = self.clip.image_embeds([masked_crop(image, d) for d in objects])             # [N, D], unit rows
        return [COLORS[int(i)] for i in (feats @ self.weights(name).T).argmax(-1)]


class GenEvalJudge:
    """A detector (mask2former.Mask2FormerDetector) + a CLIP (ClipScorer) -> per-image records."""

    def __init__(self, detector, clip=None, rules: GenEvalRules = GenEvalRules()):
        self.detector, self.rules = detector, rules
        self.colours = ColourClassifier(clip) if clip is not None else None

    def __call__(self, images: np.ndarray, metas: list[dict]) -> list[dict]:
        """uint8 images [B, H, W, 3] + their metadata -> {tag, prompt, correct, reason, details} each."""
        if self.colours is None and any("color" in r for m in metas for r in m["include"]):
            raise ValueError("GenEval colour prompts need metrics.clip_model (the official judge is CLIP ViT-L/14)")
        out = []
        for image, meta, inst in zip(images, metas, self.detector(images)):
            objects = group_detections(inst.labels, inst.boxes, inst.scores, inst.masks, meta["tag"], self.rules)
            colour_of = None if self.colours is None else (lambda objs, name, im=image: self.colours(im, objs, name))
            ok, reason = judge(meta, objects, colour_of, self.rules)
            details = {k: [[*map(float, d.box), d.score] for d in v] for k, v in objects.items()}
            out.append({"tag": meta["tag"], "prompt": meta["prompt"], "correct": ok, "reason": reason,
                        "details": json.dumps(details)})
        return out
