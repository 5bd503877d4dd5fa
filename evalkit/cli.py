"""Command line: ``evalkit attribute`` (generate once, trace once, attribute with several methods)
and ``evalkit methods`` (list registered methods). Input errors exit with code 2 and one line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: Errors that mean "the input was wrong": reported in one line, exit code 2. evalkit's own input
#: errors (unknown method or metric, word not in prompt, malformed suite, missing mask, model not
#: found) subclass these. torch is imported only by the commands that need it.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError)
#: The methods `evalkit attribute` runs when --methods is not given.
DEFAULT_METHODS = ("daam", "raw-attn", "norm", "hrv-selective", "concept-attention")
#: How denoiser kinds are named to users.
BACKBONE_NAMES = {"unet": "UNet", "transformer": "MM-DiT (SD3/Flux)"}
SET_HELP = ("override a suite key (repeatable; dotted keys, YAML values), e.g. --set sampler.steps=1 "
            "--set ground_truth.detector=/models/grounding-dino-tiny")


def _parse_value(text: str):
    """CLI parameter value: int, float, true/false, or string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """``["hrv-selective.k=20", ...]`` -> ``{"hrv-selective": {"k": 20}}``; names must be requested methods."""
    out: dict[str, dict] = {m: {} for m in methods}
    for item in items:
        head, sep, value = item.partition("=")
        method, dot, key = head.rpartition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--param {item!r} must look like METHOD.NAME=VALUE, e.g. hrv-selective.k=20")
        if method not in out:
            raise ValueError(f"--param {item!r} names method {method!r}, which is not in --methods {list(methods)}")
        out[method][key] = _parse_value(value)
    return out


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _print_rows(rows: dict[str, str]) -> int:
    """Names in an aligned column, then their description."""
    width = max(len(n) for n in rows)
    for name, text in rows.items():
        print(f"{name:<{width}}  {text}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Print one line per registered attribution method."""
    from .methods import available_methods

    return _print_rows(available_methods())


def cmd_metrics(args: argparse.Namespace) -> int:
    """Print one line per registered metric: name, direction, category and summary."""
    from .metrics import available_metrics

    return _print_rows({name: f"{'↑' if info.get('direction') == 'higher' else '↓'} "
                              f"{info.get('category', ''):<15} {info.get('summary', '')}"
                        for name, info in available_metrics().items()})


def cmd_protocols(args: argparse.Namespace) -> int:
    """Print one line per registered suite protocol."""
    from .protocols import available_protocols

    return _print_rows(available_protocols())


def cmd_check_method(args: argparse.Namespace) -> int:
    """Check an attribution method's invariants on the built-in models (evalkit.conformance): one line
    per invariant; exit 0 when all hold, 1 when one fails (an unknown method is bad input: 2)."""
    from .conformance import Conformance, parse_params, summarize

    conformance = Conformance(args.method, _split(args.models) or None, parse_params(args.param or []))
    print(f"check-method {conformance.label} on {', '.join(conformance.models)}")
    rows = summarize(conformance.run())
    width = max(len(r.invariant) for r in rows)
    for r in rows:
        where = "" if r.status == "PASSED" else f"[{r.model}] "
        print(f"{r.status:<7}  {r.invariant:<{width}}  {where}{r.message}")
    failed = [r.invariant for r in rows if r.status == "FAILED"]
    print(f"{len(failed)} of {len(rows)} invariants FAILED: {', '.join(failed)}" if failed
          else f"all {len(rows)} invariants hold")
    return 1 if failed else 0


def cmd_attribute(args: argparse.Namespace) -> int:
    """Generate once, trace once, write the image, per-method npz maps and overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import preflight
    from .methods import get_method_class
    from .models import load
    from .trace import generate, pipeline_tokenizer, tokenize_prompt

    explicit = args.methods is not None
    method_names = _split(args.methods) if explicit else list(DEFAULT_METHODS)
    if not method_names:
        raise ValueError("--methods is empty: name at least one method (see `evalkit methods`)")
    for name in method_names:
        get_method_class(name)  # unknown names fail before any model is loaded
    backbone = preflight.model_backbone(args.model)
    for name in list(method_names):
        kinds = get_method_class(name).backbones
        if backbone is not None and backbone not in kinds:
            why = (f"method {name!r} runs on {' and '.join(BACKBONE_NAMES[k] for k in sorted(kinds))} models; "
                   f"{args.model!r} is a {BACKBONE_NAMES[backbone]} model")
            if explicit:
                raise ValueError(f"--methods {name}: {why}")
            print(f"{name} skipped: {why}")
            method_names.remove(name)
    params = parse_method_params(args.param or [], method_names)
    given = {n: ", ".join(f"{n}.{k}={v}" for k, v in p.items()) for n, p in params.items()}  # as the user wrote
    preflight.check_sampling(args.steps, args.guidance, args.prompt, args.height, args.width)
    preflight.check_device(args.device)
    if "hrv-selective" in method_names:
        heads = preflight.model_head_names(args.model)
        hp = params["hrv-selective"]
        if "hrv" not in hp:
            found = preflight.hrv_for_model(args.model, heads)
            if found is None and explicit:
                raise ValueError(f"--methods hrv-selective: no head relevance vectors are known for model "
                                 f"{args.model!r}; pass --param hrv-selective.hrv=FILE (built with "
                                 "evalkit.analysis.build_hrv)")
            if found is None:
                print(f"hrv-selective skipped: no head relevance vectors are known for {args.model!r} "
                      "(pass --methods and --param hrv-selective.hrv=FILE to run it)")
                method_names.remove("hrv-selective")
            else:
                hp["hrv"] = found
        if "hrv-selective" in method_names:
            from .methods import HeadRelevance

            hrv = HeadRelevance.load(hp["hrv"])
            preflight.check_hrv_heads(hrv, heads, "hrv-selective", args.model)
            if "concept" not in hp and "Animals" not in hrv.vectors:  # the default concept: take the file's
                hp["concept"] = next(iter(hrv.vectors))
            if "k" not in hp and len(hrv.heads) < 30:  # the default 30 heads of SD's 128: the same share (23 %)
                hp["k"] = 0.23
    methods = [preflight.build("method", name, params[name], f"--param {given[name]}" if given[name]
                               else f"--methods {name}") for name in method_names]
    pipe = load(args.model, scheduler=args.scheduler, dtype=args.dtype, device=args.device)
    tokens = tokenize_prompt(pipeline_tokenizer(pipe), args.prompt, truncate=args.truncate)
    words = _split(args.words) or list(dict.fromkeys(w.text for w in tokens.words if w.text.isalnum()))
    for w in words:
        tokens.positions(w)  # a word not in the prompt fails before generating
    stats = set().union(*(m.needs for m in methods))
    # ConceptAttention's competitors: the requested words (phrases too), the prompt's other words, "background"
    concepts = list(dict.fromkeys([*words, *(w.text for w in tokens.words if w.text.isalnum()), "background"]))
    gen = generate(pipe, args.prompt, seeds=args.seed, steps=args.steps, guidance=args.guidance,
                   height=args.height, width=args.width, stats=stats, truncate=args.truncate, reading=args.reading,
                   concepts=concepts)
    trace, image = gen.traces[0], gen.images[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "image.png")
    summary = {"model": args.model, "prompt": args.prompt, "seed": args.seed, "tokens": list(trace.tokens.pieces),
               "words": words, "settings": trace.settings, "n_unet_calls": trace.n_steps, "methods": {}}
    for method in methods:
        attribution = method.attribute(trace, words)
        attribution.save_npz(out / f"{method.name}.npz")
        for word in words:
            fig, ax = plt.subplots(figsize=(4, 4))
            attribution.overlay(image, word, ax=ax)
            fig.savefig(out / f"{method.name}_{_safe(word)}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
        summary["methods"][method.name] = attribution.params
    (out / "attribution.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}/image.png and maps of {len(words)} word(s) for {', '.join(method_names)}")
    return 0


def _safe(word: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in word)


def cmd_suites(args: argparse.Namespace) -> int:
    """List the suites under suites/ with their descriptions."""
    from .suites import list_suites, load_suite

    for name in list_suites():
        spec = load_suite(name)
        print(f"{name:<22} {' '.join(spec.description.split())[:90]}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a suite file (schema, names, claims) and run the preflight a run would (methods and
    metrics built with their parameters, HRV heads, scheduler, data files, device)."""
    from .preflight import check_suite
    from .suites import load_suite, parse_set, resolve_model_hrv

    spec = resolve_model_hrv(load_suite(args.suite, parse_set(args.set or []) or None))
    check_suite(spec)
    print(f"{args.suite}: OK ({len(spec.methods)} methods, {len(spec.metrics)} metrics, {len(spec.expect)} claims)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a suite; exit 0 when no claim FAILED, 1 when one did (``--strict``: or is INCONCLUSIVE)."""
    from .suites import execute, parse_set
    from .suites.claims import exit_code

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 (the number of data items to evaluate), got {args.limit}")

    overrides: dict = {}
    if args.model:
        overrides["model"] = args.model
    if args.device:
        overrides["device"] = args.device
    if args.executor:
        overrides["executor"] = args.executor
    if args.ray_address:
        overrides["executor"] = args.executor or "ray"
        overrides["ray"] = {"address": args.ray_address}
    parse_set(args.set or [], overrides)
    result, _ = execute(args.suite, overrides=overrides or None, limit=args.limit, cache_dir=args.cache_dir,
                        reports_dir=args.reports_dir, tracking=not args.no_mlflow, tracking_uri=args.tracking_uri,
                        methods=_split(args.methods) or None, progress=not args.quiet,
                        plugins=_split(args.plugins) or None)
    return exit_code(result.claims, strict=args.strict)


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired differences of two runs (report folders or MLflow run ids) over the items both share."""
    from .reports.compare import compare_items, load_run_items, print_comparison

    if not 0.5 < args.confidence < 1:
        raise ValueError(f"--confidence must lie in (0.5, 1), got {args.confidence}")
    a = load_run_items(args.a, args.tracking_uri)
    b = load_run_items(args.b, args.tracking_uri)
    diffs = compare_items(a, b, confidence=args.confidence)
    print_comparison(diffs, args.a, args.b, args.confidence)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print a written report (a report folder or its report.md)."""
    path = Path(args.run)
    md = path / "report.md" if path.is_dir() else path
    if not md.is_file():
        raise FileNotFoundError(f"no report at {path}: pass a folder under reports/<suite>/<timestamp>/")
    print(md.read_text())
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the MLflow UI on 127.0.0.1 against the tracking store."""
    import subprocess

    from .tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    print(f"MLflow UI for {uri}: open http://127.0.0.1:{args.port}/#/experiments?workflowType=machine_learning "
          "(MLflow's model-training view, where an experiment opens on its runs table; docs/mlflow.md)")
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                            "--port", str(args.port)])


def build_parser() -> argparse.ArgumentParser:
    """The ``evalkit`` argument parser."""
    parser = argparse.ArgumentParser(prog="evalkit", description=__doc__)
    parser.add_argument("--plugins", default="",
                        help="comma-separated modules to import first (they register methods, metrics, protocols)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list registered attribution methods")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("metrics", help="list registered metrics (direction, category)")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("protocols", help="list registered suite protocols")
    p.set_defaults(func=cmd_protocols)

    p = sub.add_parser("check-method", help="check an attribution method's invariants on the built-in models")
    p.add_argument("method", help="registered name (--plugins imports user modules) or pkg.module:Class")
    p.add_argument("--models", default=None, help="comma-separated built-in models (default: every supported one)")
    p.add_argument("--param", action="append", help="constructor parameter NAME=VALUE (repeatable; JSON values)")
    p.set_defaults(func=cmd_check_method)

    p = sub.add_parser("attribute", help="generate once, trace once, attribute words with several methods")
    p.add_argument("--model", default="tiny-sd", help="built-in name, local diffusers folder, or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--reading", choices=("joint", "text"), default="joint",
                   help="SD3/Flux: joint-attention probabilities of the text keys as computed (joint) or "
                        "renormalized over the text keys (text)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", default=None, help="ddim, dpm-solver, pndm or euler (default: the model's)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; hrv-selective with the "
                        "model's own head relevance vectors, skipped when none are known; concept-attention "
                        "skipped on UNet models)")
    p.add_argument("--param", action="append", help="method parameter METHOD.NAME=VALUE (repeatable)")
    p.add_argument("--words", default=None, help="comma-separated words (default: every word of the prompt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than 77 tokens (with a warning)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("suites", help="list the suites")
    p.set_defaults(func=cmd_suites)
    p = sub.add_parser("validate", help="validate a suite file")
    p.add_argument("suite")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("run", help="run a suite: table, claims, MLflow, report")
    p.add_argument("suite", help="suite name under suites/ or a YAML path")
    p.add_argument("--model", default=None, help="override the suite's model (built-in, folder or hub id)")
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N data items")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the suite's rows: method ids, or a protocol suite's variant ids")
    p.add_argument("--cache-dir", default=".cache/evalkit")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit 1 when a claim is INCONCLUSIVE, too")
    p.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="where cases are computed (default: the suite's `executor:`, local)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (implies --executor ray; default: start a local cluster)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="paired differences of two runs over the items both share")
    p.add_argument("a", help="a reports/<suite>/<timestamp> folder or an MLflow run id")
    p.add_argument("b", help="a reports/<suite>/<timestamp> folder or an MLflow run id")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for run ids (default: sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("report", help="print a written report")
    p.add_argument("run", help="a reports/<suite>/<timestamp> folder")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 a claim FAILED, 2 bad input, 3 an environment or
    internal error, with the traceback in a log file)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_plugins = os.environ.get("EVALKIT_PLUGINS")
    try:
        for module in _split(args.plugins):
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ValueError(f"--plugins: cannot import {module!r} ({err}); is it on PYTHONPATH?") from err
        if args.plugins:  # executors that start other processes (Ray actors) import them there too;
            # scoped to this invocation, so an in-process caller's later runs do not inherit it
            os.environ["EVALKIT_PLUGINS"] = ",".join(_split(args.plugins))
        return int(args.func(args) or 0)
    except INPUT_ERRORS as err:
        print(f"evalkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evalkit: interrupted (a suite resumes from its cache on the next run)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `evalkit metrics | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as err:  # noqa: BLE001 - the last resort: one line and a log, exit 3
        from .preflight import EnvironmentProblem

        if isinstance(err, EnvironmentProblem):
            print(f"evalkit: environment error: {err}", file=sys.stderr)
            return 3
        log = _write_traceback(args)
        print(f"evalkit: internal error: {type(err).__name__}: {err} (traceback in {log})", file=sys.stderr)
        return 3
    finally:
        if previous_plugins is None:
            os.environ.pop("EVALKIT_PLUGINS", None)
        else:
            os.environ["EVALKIT_PLUGINS"] = previous_plugins


def _write_traceback(args: argparse.Namespace) -> Path:
    """Write the current exception's traceback to ``<reports>/<suite or command>/errors/<stamp>.log``
    (or the system temp folder when that is not writable); returns the file."""
    import tempfile
    import traceback
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = Path(getattr(args, "suite", "") or args.command).stem or "evalkit"
    text = f"evalkit {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    for root in (Path(getattr(args, "reports_dir", None) or "reports") / name / "errors", Path(tempfile.gettempdir())):
        try:
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"evalkit-{stamp}.log"
            path.write_text(text)
            return path.resolve()
        except OSError:
            continue
    return Path("(not written)")


if __name__ == "__main__":
    sys.exit(main())
