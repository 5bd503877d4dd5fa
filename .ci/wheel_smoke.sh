#!/usr/bin/env bash
# Wheel smoke test: what a user's `pip install` gets must work without the checkout.
# Builds the sdist and, from it, the wheel (python -m build); checks that the wheel carries the built-in models,
# the suites, the HRVs and the license files; installs it into a fresh virtualenv (torch pinned as in noxfile.py)
# and, from an empty temporary folder, runs `evalkit attribute` on the ShapesWorld model, `evalkit suites`,
# `evalkit validate` of a user suite in ./suites, and `evalkit run task-a --limit 2`, offline.
# Env: EVALKIT_PYTHON (default python3.11, else python3), EVALKIT_TORCH (default the noxfile's pins),
# EVALKIT_SMOKE_KEEP=1 keeps the temporary folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${EVALKIT_PYTHON:-$(command -v python3.11 || command -v python3)}"
read -r -a TORCH <<< "${EVALKIT_TORCH:-torch==2.14.1 torchvision==0.29.1}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/evalkit-wheel.XXXXXX")"
if [[ "${EVALKIT_SMOKE_KEEP:-0}" == 1 ]]; then echo "wheel smoke: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
start=$SECONDS
step() { printf '\n== wheel smoke [%ss]: %s\n' "$((SECONDS - start))" "$*"; }
PIP=(--quiet --disable-pip-version-check)
# pip, without this machine's notes on index folders that lack a package (one line per package)
pip_q() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }

step "build sdist and wheel (isolated)"
"$PY" -m venv "$WORK/build-env"
pip_q "$WORK/build-env/bin/pip" install "${PIP[@]}" build
"$WORK/build-env/bin/python" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/evalkit-*.whl)"
ls -l "$WORK/dist"

step "wheel contents"
"$PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = [
    "evalkit/_fixtures/shapesworld/model_index.json",
    "evalkit/_fixtures/shapesworld/unet/diffusion_pytorch_model.safetensors",
    "evalkit/_fixtures/shapesworld/hrv.json",
    "evalkit/_fixtures/tiny-sd/model_index.json",
    "evalkit/_fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors",
    "evalkit/_suites/_defaults.yaml",
    "evalkit/_suites/task-a.yaml",
    "evalkit/_suites/data/ae_animal_animal.txt",
    "evalkit/data/hrv_sd14.json",
    "evalkit/data/NOTICE-hrv_sd14.md",
    "evalkit/resources.py",
]
missing = [n for n in need if n not in names]
missing += [f"*.dist-info/licenses/{lic}" for lic in ("LICENSE", "evalkit/data/NOTICE-hrv_sd14.md")
            if not any(n.endswith(f".dist-info/licenses/{lic}") for n in names)]
stray = sorted(n for n in names if n.startswith(("evalkit/_fixtures/", "evalkit/_suites/")) and n.endswith(".py"))
if missing or stray:
    sys.exit(f"wheel smoke: missing from the wheel: {missing}; scripts that must stay out: {stray}")
print(f"{len(names)} files, built-ins, suites, HRVs and licenses present")
EOF

step "fresh virtualenv: the wheel with ${TORCH[*]} (one resolve)"
"$PY" -m venv "$WORK/venv"
pip_q "$WORK/venv/bin/pip" install "${PIP[@]}" "${TORCH[@]}" "$WHEEL"

step "run from an empty folder"
mkdir "$WORK/empty"
cd "$WORK/empty"
unset PYTHONPATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg MLFLOW_TRACKING_URI="sqlite:///$WORK/empty/mlflow.db"
EK="$WORK/venv/bin/evalkit"
"$WORK/venv/bin/python" - <<'EOF'
import evalkit
from evalkit.builtin_models import BUILTIN_MODELS
from evalkit.resources import source_checkout
from evalkit.suites.loader import SUITES_DIR

assert "site-packages" in evalkit.__file__ and source_checkout() is None, evalkit.__file__
assert all((p / "model_index.json").is_file() for p in BUILTIN_MODELS.values()), BUILTIN_MODELS
print("built-ins from", BUILTIN_MODELS["shapesworld"].parent, "and", SUITES_DIR)
EOF
"$EK" attribute --model shapesworld --prompt "a red circle and a blue square" --words circle,square \
  --steps 10 --guidance 4 --out attribute
for f in image.png attribution.json daam.npz daam_circle.png hrv-selective.npz; do test -f "attribute/$f"; done
mkdir suites  # a user suite in ./suites, with the built-in defaults
printf 'include: _defaults.yaml\nname: mine\ndescription: a user suite\nmethods: [{name: daam}]\nmetrics: [{name: iou}]\n' \
  > suites/mine.yaml
"$EK" suites | tee suites.txt
grep -q '^task-a ' suites.txt
grep -q '^mine ' suites.txt
"$EK" validate mine
set +e
"$EK" run task-a --limit 2 --quiet
rc=$?
set -e
case $rc in
  0 | 1) echo "wheel smoke: evalkit run task-a --limit 2 exited $rc (0: no claim FAILED, 1: one did; both fine)" ;;
  *) echo "wheel smoke: evalkit run task-a --limit 2 exited $rc (2 bad input, 3 environment/internal error)"; exit 1 ;;
esac
test -d reports/task-a
step "passed (removing the temporary folder takes a while: torch's libraries)"
