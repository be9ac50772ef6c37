"""GenEval runner: the public prompt metadata + a detector from a user path -> per-tag scores.

GenEval (Ghosh et al. 2023) ships `evaluation_metadata.jsonl`, one prompt per line with a `tag`
(single_object, two_object, counting, colors, position, color_attr) and the objects the image must
`include` (class, count, optional color, optional position [relation, index of the reference
object]) and may list objects to `exclude` (class with a count the image must stay below). The
official judge is a Mask2Former detector (mmdetection) plus CLIP for colours; here the detector is
any transformers object-detection model (`AutoModelForObjectDetection`, e.g. a DETR or OWL-style
COCO detector saved locally) and colours come from a CLIP when one is given, else from the median
pixel of the box. Scores are therefore GenEval-style, not the leaderboard numbers, unless the
official detector is plugged in. Thresholds follow the paper's release: 0.3 to keep a detection,
0.9 for counting prompts, 0.1 x object size as the position margin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
THRESHOLD, COUNTING_THRESHOLD, POSITION_MARGIN = 0.3, 0.9, 0.1
# Reference RGB of GenEval's colour names, used only without a CLIP (median-pixel nearest colour).
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (235, 210, 40), "green": (40, 180, 60),
    "blue": (40, 80, 220), "purple": (150, 60, 190), "pink": (240, 150, 190), "brown": (120, 75, 40),
    "black": (20, 20, 20), "white": (245, 245, 245),
}


@dataclass
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]    # x0, y0, x1, y1 in pixels


def load_metadata(path: str | Path) -> list[dict]:
    """GenEval prompt metadata (JSONL): each line needs prompt, tag and include."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{n}: not valid JSON: {err}") from err
        missing = [k for k in ("prompt", "tag", "include") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: GenEval metadata lacks {', '.join(missing)}")
        rows.append(row)
    return rows


class Detector:
    """uint8 images [B, H, W, 3] -> detections per image, from a transformers detector folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", threshold: float = THRESHOLD):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"detector folder {path} does not exist or has no config.json")
        self.device, self.threshold = torch.device(device), threshold
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        self.model = AutoModelForObjectDetection.from_pretrained(str(path)).to(self.device).eval()
        self.id2label = self.model.config.id2label

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[list[Detection]]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [tuple(im.shape[:2]) for im in images]
        results = self.processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=sizes)
        return [
            [Detection(self.id2label[int(l)], float(s), tuple(float(v) for v in b))
             for s, l, b in zip(r["scores"], r["labels"], r["boxes"])]
            for r in results
        ]


def median_colour(image: np.ndarray, box: tuple[float, float, float, float]) -> str:
    """Nearest GenEval colour name to the median pixel of the box's central half (the fallback
    without a CLIP; the centre keeps background corners of round or thin objects out)."""
    bx0, by0, bx1, by1 = box
    qw, qh = (bx1 - bx0) / 4, (by1 - by0) / 4
    x0, y0, x1, y1 = (int(round(v)) for v in (bx0 + qw, by0 + qh, bx1 - qw, by1 - qh))
    crop = image[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)].reshape(-1, 3)
    med = np.median(crop, 0) if len(crop) else np.zeros(3)
    names = list(COLOURS)
    return names[int(np.argmin([((med - np.array(COLOURS[n])) ** 2).sum() for n in names]))]


def _relation(a: Detection, b: Detection, relation: str) -> bool:
    """Does box a stand in `relation` ("left of", "right of", "above", "below") to box b?"""
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    mx = POSITION_MARGIN * ((a.box[2] - a.box[0]) + (b.box[2] - b.box[0])) / 2
    my = POSITION_MARGIN * ((a.box[3] - a.box[1]) + (b.box[3] - b.box[1])) / 2
    checks = {"left of": ax < bx - mx, "right of": ax > bx + mx, "above": ay < by - my, "below": ay > by + my}
    if relation not in checks:
        raise ValueError(f"unknown GenEval relation {relation!r}")
    return checks[relation]


def judge(meta: dict, detections: list[Detection], colour_of=None) -> tuple[bool, str]:
    """(correct, reason) for one image. colour_of(detection) -> colour name, used for `color` checks."""
    floor = COUNTING_THRESHOLD if meta["tag"] == "counting" else THRESHOLD
    dets = [d for d in detections if d.score >= floor]
    matched: list[list[Detection]] = []
    for req in meta["include"]:
        found = sorted((d for d in dets if d.label == req["class"]), key=lambda d: -d.score)
        if len(found) < req.get("count", 1):
            return False, f"expected >= {req.get('count', 1)} {req['class']}, found {len(found)}"
        if "color" in req:
            if colour_of is None:
                raise ValueError("GenEval colour checks need a colour function (CLIP or median pixel)")
            coloured = [d for d in found if colour_of(d) == req["color"]]
            if len(coloured) < req.get("count", 1):
                return False, f"expected {req['color']} {req['class']}, found {[colour_of(d) for d in found]}"
            found = coloured
        matched.append(found)
    for req, found in zip(meta["include"], matched):
        if "position" in req:
            relation, ref = req["position"]
            if not _relation(found[0], matched[ref][0], relation):
                return False, f"{req['class']} not {relation} {meta['include'][ref]['class']}"
    for req in meta.get("exclude", []):
        n = sum(d.label == req["class"] for d in dets)
        if n >= req["count"]:
            return False, f"expected < {req['count']} {req['class']}, found {n}"
    return True, "ok"


def summarize(tags: list[str], correct: list[bool]) -> dict[str, float]:
    """Per-tag accuracy and `overall` = mean over the tags present (GenEval's headline number)."""
    out = {}
    for tag in TAGS:
        picked = [c for t, c in zip(tags, correct) if t == tag]
        if picked:
            out[tag] = float(np.mean(picked))
    for tag in sorted(set(tags) - set(TAGS)):
        out[tag] = float(np.mean([c for t, c in zip(tags, correct) if t == tag]))
    if out:
        out["overall"] = float(np.mean(list(out.values())))
    return out
