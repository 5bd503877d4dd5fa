"""Build the head relevance vectors shipped with the ShapesWorld model (fixtures/shapesworld/hrv.json).

Concepts are ShapesWorld's word classes (shape nouns, colours, sizes, relations); generations use
held-out ShapesWorld prompts. Deterministic: ``python tools/build_shapesworld_hrv.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evalkit.analysis import build_hrv
from evalkit.builtin_models import BUILTIN_MODELS
from evalkit.models import load
from evalkit.shapesworld import dataset
from evalkit.shapesworld.scene import COLORS, RELATIONS, SHAPES, SIZES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="shapesworld", help="the built-in name or a trained pipeline folder")
    ap.add_argument("--out", default=None, help="default: hrv.json in the model's folder")
    args = ap.parse_args()
    folder = Path(BUILTIN_MODELS.get(args.model, args.model))
    args.out = args.out or str(folder / "hrv.json")
    pipe = load(args.model)
    concepts = {
        "Shapes": list(SHAPES),
        "Colors": list(COLORS),
        "Sizes": list(SIZES),
        "Relations": [r.split()[0] for r in RELATIONS],
    }
    prompts = [it.prompt for it in dataset(args.generations, 10_000 + args.seed)]
    hrv = build_hrv(pipe, concepts, prompts, n_generations=args.generations, seed=args.seed, steps=args.steps,
                    guidance=4.0, model_name="shapesworld")
    hrv.save(args.out)
    print(f"wrote {args.out}: {len(hrv.heads)} heads, concepts {list(hrv.vectors)}")


if __name__ == "__main__":
    main()
