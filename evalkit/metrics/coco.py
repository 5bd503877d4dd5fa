"""The 80 COCO object classes and the rule deciding whether a word names one (for DAAM's mIoU80).

Matching rules (``match=``), from strict to lenient; each includes the previous:

- ``"exact"`` (default; what DAAM's released evaluator does: ``word.lower()`` must be in its
  ``COCO80_LABELS``): lowercase, strip, collapse runs of whitespace, ``_`` and ``-`` to one space, then
  the string must equal a class name. Multi-word classes ("hair drier", "teddy bear", "hot dog")
  match only as the whole phrase; "bear" matches the class "bear", "drier" alone matches nothing.
- ``"plural"``: also the plural of a class name: irregular plurals from :data:`IRREGULAR_PLURALS`
  ("people" -> "person", "knives" -> "knife", "mice" -> "mouse"), then the last word with a
  trailing "es" or "s" removed ("buses", "wine glasses", "teddy bears"). Invariant plurals ("sheep",
  "skis", "scissors") are class names already.
- ``"synonyms"``: also the explicit synonym table :data:`SYNONYMS` (and the plurals of its entries),
  e.g. "sofa" -> "couch", "bike" -> "bicycle", "man" -> "person", "table" -> "dining table".

Why "exact" is the default: DAAM's numbers (paper 003, Table 1) were computed with it, so only it
reproduces mIoU80; the lenient rules are for datasets whose nouns are not COCO's spellings, and the
rule in use is a logged parameter of the metric.
"""

from __future__ import annotations

import re

MATCH_RULES = ("exact", "plural", "synonyms")

#: The 80 COCO "thing" classes in category-id order, spelled as COCO (and DAAM) spell them.
COCO80_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

_CLASS_SET = frozenset(COCO80_CLASSES)

#: Plurals that dropping "s"/"es" does not undo.
IRREGULAR_PLURALS: dict[str, str] = {
    "people": "person",
    "persons": "person",
    "knives": "knife",
    "mice": "mouse",
    "benches": "bench",
    "couches": "couch",
    "sandwiches": "sandwich",
    "buses": "bus",
    "busses": "bus",
}

#: Synonym -> COCO class, used only with ``match="synonyms"``. Deliberately short and unambiguous.
SYNONYMS: dict[str, str] = {
    "man": "person", "woman": "person", "men": "person", "women": "person", "boy": "person", "girl": "person",
    "child": "person", "children": "person", "kid": "person", "baby": "person", "lady": "person", "guy": "person",
    "bike": "bicycle", "motorbike": "motorcycle", "motor bike": "motorcycle", "scooter": "motorcycle",
    "aeroplane": "airplane", "plane": "airplane", "jet": "airplane", "airliner": "airplane",
    "automobile": "car", "ship": "boat",
    "sofa": "couch", "table": "dining table", "fridge": "refrigerator",
    "television": "tv", "tv set": "tv", "monitor": "tv",
    "cellphone": "cell phone", "phone": "cell phone", "mobile phone": "cell phone", "smartphone": "cell phone",
    "doughnut": "donut", "hotdog": "hot dog", "teddy": "teddy bear",
    "hair dryer": "hair drier", "hairdryer": "hair drier", "blow dryer": "hair drier",
    "ball": "sports ball", "soccer ball": "sports ball", "football": "sports ball", "basketball": "sports ball",
    "tennis ball": "sports ball", "racket": "tennis racket", "racquet": "tennis racket",
    "ski": "skis", "remote control": "remote", "computer mouse": "mouse", "houseplant": "potted plant",
    "plant": "potted plant", "wineglass": "wine glass", "mug": "cup", "necktie": "tie", "purse": "handbag",
}  # fmt: skip

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize_word(word: str) -> str:
    """Lowercase, strip, and collapse whitespace / ``_`` / ``-`` runs to single spaces."""
    return _SEPARATORS.sub(" ", word.strip().lower()).strip()


def _singulars(phrase: str) -> list[str]:
    if phrase in IRREGULAR_PLURALS:
        return [IRREGULAR_PLURALS[phrase]]
    head, _, last = phrase.rpartition(" ")
    prefix = f"{head} " if head else ""
    out = []
    if last in IRREGULAR_PLURALS:
        out.append(prefix + IRREGULAR_PLURALS[last])
    if last.endswith("es") and len(last) > 3:
        out.append(prefix + last[:-2])
    if last.endswith("s") and len(last) > 2:
        out.append(prefix + last[:-1])
    return out


def coco_class(word: str, match: str = "exact") -> str | None:
    """The COCO class that ``word`` names under rule ``match`` (see the module docstring), or None."""
    if match not in MATCH_RULES:
        raise ValueError(f"match must be one of {MATCH_RULES}, got {match!r}")
    w = normalize_word(word)
    if w in _CLASS_SET:
        return w
    if match == "exact":
        return None
    candidates = _singulars(w)
    if match == "synonyms":
        candidates = [w, *candidates]
    for c in candidates:
        if c in _CLASS_SET:
            return c
        if match == "synonyms" and c in SYNONYMS:
            return SYNONYMS[c]
    return None


def is_coco_class(word: str, match: str = "exact") -> bool:
    """Whether ``word`` names one of the 80 COCO classes under rule ``match``."""
    return coco_class(word, match) is not None
