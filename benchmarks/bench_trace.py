"""Tracing overhead benchmark: time and memory cost of recording cross-attention statistics.

Run: ``python benchmarks/bench_trace.py [--quick] [--check]`` (``nox -s bench``). Everything runs
offline on CPU with random weights, in one run:

1. Time: traced / untraced wall time of a denoising loop on a ``UNet2DConditionModel`` of SD-1.5
   geometry (built in code from the SD 1.5 UNet config, random weights) at 256 px (32x32 latent).
   The UNet is called directly with a classifier-free-guidance batch of 2, random text embeddings
   (2, 77, 768) and a fixed DDIM timestep list; no VAE or text encoder runs. The traced loop
   records the union of the statistics that daam, raw-attn, norm and norm-sq need
   ({"attn", "norm", "norm_sq"}; hrv-selective needs only "attn") under ``Tracer`` and its time
   includes building the ``Trace`` and ``attribute()`` of daam, raw-attn, norm and hrv-selective.
   To be robust to other jobs on a shared machine, each repetition runs the traced loop and an
   untraced loop (on a twin module sharing the same weight tensors) step by step in alternation,
   ABBA-ordered over steps and repetitions; the medians over repetitions are compared. Process CPU
   time is reported next to wall time.
2. Memory: peak resident set size of a 10-step vs a 50-step traced generation of the ``tiny-sd``
   fixture at 256 px, each in a fresh subprocess (torch's CPU allocations are not visible to
   tracemalloc): the RSS high-water mark (VmHWM, reset after model load and warm-up) over the traced
   generation and the methods. Also the bytes of the accumulated statistics (sum of ``nbytes`` of
   the tensors held by the tracer's recorders), which must not depend on the number of steps.

Benchmarks report, they do not assert: the exit code is 0 unless ``--check`` is given and a target
is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from evalkit.methods import HeadRelevance, create_method, get_method_class  # noqa: E402
from evalkit.trace import Trace, Tracer, find_cross_attention_layers, tokenize_prompt  # noqa: E402

PROMPT = "a photo of a cat sitting on a wooden chair"
WORDS = ("cat", "chair")
SIZE = 256  # pixels; VAE factor 8 -> 32x32 latent
GUIDANCE = 7.5
#: The methods timed on one trace.
TIMED_METHODS = ("daam", "raw-attn", "norm", "hrv-selective")
#: The statistics traced: the union of what these methods need.
TRACED_FOR = ("daam", "raw-attn", "norm", "norm-sq")
HRV_CONCEPT = "Animals"

TIME_TARGET = 1.10
MEMORY_TARGET = 1.05


# -- small pure helpers (unit-tested) --------------------------------------------------------------
def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; a zero denominator gives ``inf`` (or ``nan`` for 0 / 0)."""
    if denominator == 0:
        return float("nan") if numerator == 0 else float("inf")
    return numerator / denominator


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Ratio of the medians: ``median(numerators) / median(denominators)``."""
    return ratio(statistics.median(numerators), statistics.median(denominators))


def pair_order(i: int) -> tuple[str, str]:
    """Order of the traced and untraced call of pair ``i``: alternating, so consecutive pairs form
    ABBA blocks and a linear drift of machine speed affects both kinds equally."""
    return ("untraced", "traced") if i % 2 == 0 else ("traced", "untraced")


def traced_stats(methods: Iterable[str] = TRACED_FOR) -> frozenset[str]:
    """Union of the trace statistics that ``methods`` need."""
    out: frozenset[str] = frozenset()
    for name in methods:
        out |= get_method_class(name).needs
    return out


def recorder_nbytes(tracer: Tracer) -> int:
    """Bytes of every tensor the tracer's recorders hold (summed and per-step statistics)."""
    return sum(rec.nbytes() for rec in tracer.recorders)


@dataclass
class Row:
    """One line of the result table."""

    quantity: str
    measured: str
    target: str
    status: str  # "OK", "over" (target missed), "FAIL" (a property that must hold does not) or "info"


def check_row(quantity: str, value: float, target: float, measured: str | None = None) -> Row:
    """A row whose status is OK when ``value <= target``."""
    return Row(quantity, measured or f"{value:.3f}", f"<= {target:.2f}", "OK" if value <= target else "over")


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned plain-text table with a header."""
    header = Row("quantity", "measured", "target", "status")
    cols = list(zip(*[(r.quantity, r.measured, r.target, r.status) for r in [header, *rows]]))
    widths = [max(len(c) for c in col) for col in cols]
    lines = []
    for i, r in enumerate([header, *rows]):
        cells = (r.quantity, r.measured, r.target, r.status)
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


# -- models ----------------------------------------------------------------------------------------
def sd15_unet_config() -> dict:
    """The Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def build_sd15_unet(seed: int = 0, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """SD-1.5-geometry UNet with random (default-initialized) weights; ``device="meta"`` is instant."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd15_unet_config())
    return unet.eval().requires_grad_(False)


def sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x training betas (fixed timestep list for a given step count)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def make_methods(head_names: Sequence[str], seed: int = 0) -> tuple[dict, str]:
    """The timed methods; hrv-selective uses the shipped SD v1.4 HRVs when they name exactly the
    model's heads, otherwise a random HRV over ``head_names``. Returns (methods, HRV description)."""
    hrv = HeadRelevance.load("sd14")
    if list(hrv.heads) == list(head_names):
        source = "shipped sd14 HRVs (head names match the model's 128 heads)"
    else:
        gen = torch.Generator().manual_seed(seed)
        vec = tuple(float(v) for v in torch.rand(len(head_names), generator=gen))
        hrv = HeadRelevance(model="random", heads=tuple(head_names), vectors={HRV_CONCEPT: vec}, words={})
        source = f"random HRV over the model's {len(head_names)} heads (sd14 names do not match)"
    methods = {}
    for name in TIMED_METHODS:
        params = {"hrv": hrv, "concept": HRV_CONCEPT} if name == "hrv-selective" else {}
        methods[name] = create_method(name, **params)
    return methods, source


# -- part 1: time ----------------------------------------------------------------------------------
def twin_module(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A second module object sharing ``unet``'s weight tensors (no copy), with its own processors:
    the untraced twin of a UNet under a :class:`Tracer`."""
    with torch.device("meta"):
        twin = UNet2DConditionModel(**unet.config)
    twin.load_state_dict(unet.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


@torch.no_grad()
def denoise_step(unet, scheduler, latents: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
    """One step of the pipeline's denoising loop: CFG batch [uncond; cond], guidance, scheduler step."""
    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    noise = unet(x, t, encoder_hidden_states=context).sample
    uncond, cond = noise.chunk(2)
    noise = uncond + GUIDANCE * (cond - uncond)
    return scheduler.step(noise, t, latents).prev_sample


class Clock:
    """Accumulates wall and process CPU time per kind ("traced", "untraced")."""

    def __init__(self) -> None:
        self.wall = {"untraced": 0.0, "traced": 0.0}
        self.cpu = {"untraced": 0.0, "traced": 0.0}

    def run(self, kind: str, fn: Callable, *args):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.wall[kind] += time.perf_counter() - w0
        self.cpu[kind] += time.process_time() - c0
        return out


def interleaved_rep(unet, twin, steps: int, rep: int, latents0: torch.Tensor, context: torch.Tensor,
                    make_trace: Callable[[Tracer], Trace], methods: dict, stats: frozenset[str]) -> dict:
    """One traced and one untraced denoising loop, run step by step in alternation: each step's
    untraced UNet call (on ``twin``) and traced call (on ``unet``, under a Tracer) run back to back,
    in ABBA order over steps and repetitions. The traced time includes entering/leaving the Tracer,
    building the Trace and ``attribute()`` of every method."""
    clock = Clock()
    sched = {"untraced": sd_scheduler(), "traced": sd_scheduler()}
    for s in sched.values():
        s.set_timesteps(steps)
    latents = {kind: latents0 * s.init_noise_sigma for kind, s in sched.items()}
    models = {"untraced": twin, "traced": unet}
    per_call: list[tuple[float, float]] = []
    tracer = Tracer(unet, stats, n_cond=1, cfg=True)
    clock.run("traced", tracer.__enter__)
    try:
        for i, t in enumerate(sched["traced"].timesteps):
            before = dict(clock.wall)
            for kind in pair_order(i + rep):
                latents[kind] = clock.run(kind, denoise_step, models[kind], sched[kind], latents[kind], t, context)
            per_call.append((clock.wall["traced"] - before["traced"], clock.wall["untraced"] - before["untraced"]))
    finally:
        clock.run("traced", tracer.__exit__, None, None, None)
    m0 = time.perf_counter()

    def attribute_all() -> None:
        trace = make_trace(tracer)
        for method in methods.values():
            method.attribute(trace, list(WORDS))

    clock.run("traced", attribute_all)
    return {"wall": clock.wall, "cpu": clock.cpu, "method_s": time.perf_counter() - m0, "per_call": per_call,
            "stat_bytes": recorder_nbytes(tracer), "n_steps": tracer.n_steps(),
            "identical": bool(torch.equal(latents["traced"], latents["untraced"]))}


def time_tracing(steps: int, reps: int, log: Callable[[str], None] = print) -> dict:
    """Traced vs untraced denoising loops of the SD-1.5-geometry UNet, interleaved call by call
    (see :func:`interleaved_rep`), ``reps`` times."""
    from evalkit.models import build_clip_tokenizer

    t0 = time.perf_counter()
    unet = build_sd15_unet()
    twin = twin_module(unet)
    log(f"  built SD-1.5-geometry UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, "
        f"random weights) in {time.perf_counter() - t0:.1f} s; torch threads: {torch.get_num_threads()}")
    layers = [info for info, _ in find_cross_attention_layers(unet)]
    methods, hrv_source = make_methods([n for layer in layers for n in layer.head_names()])
    stats = traced_stats()
    tokens = tokenize_prompt(build_clip_tokenizer(), PROMPT)
    latent_hw = (SIZE // 8, SIZE // 8)
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    latents0 = torch.randn(1, unet.config.in_channels, *latent_hw, generator=gen)

    def make_trace(tracer: Tracer) -> Trace:
        return Trace(prompt=PROMPT, tokens=tokens, layers=[info for info, _ in tracer.layers],
                     stats=tracer.item_stats(0), n_steps=tracer.n_steps(), latent_hw=latent_hw,
                     image_hw=(SIZE, SIZE))

    t0 = time.perf_counter()
    with torch.no_grad():  # warm-up: one UNet call (allocator, kernels)
        twin(torch.cat([latents0] * 2), 999, encoder_hidden_states=context)
    log(f"  warm-up UNet call (batch 2): {time.perf_counter() - t0:.1f} s")

    results = []
    for rep in range(reps):
        r = interleaved_rep(unet, twin, steps, rep, latents0, context, make_trace, methods, stats)
        results.append(r)
        log(f"  rep {rep + 1}/{reps}: traced {r['wall']['traced']:6.1f} s wall / {r['cpu']['traced']:6.1f} s CPU, "
            f"untraced {r['wall']['untraced']:6.1f} s wall / {r['cpu']['untraced']:6.1f} s CPU "
            f"(methods {r['method_s']:.2f} s; per UNet call traced/untraced: "
            f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in r['per_call'])})")
    return {
        "wall": {k: [r["wall"][k] for r in results] for k in ("traced", "untraced")},
        "cpu": {k: [r["cpu"][k] for r in results] for k in ("traced", "untraced")},
        "method_s": [r["method_s"] for r in results],
        "call_ratios": [ratio(a, b) for r in results for a, b in r["per_call"]],
        "stat_bytes": results[-1]["stat_bytes"],
        "n_steps": results[-1]["n_steps"],
        "identical": all(r["identical"] for r in results),
        "hrv_source": hrv_source,
        "stats": sorted(stats),
        "n_layers": len(layers),
        "n_heads": sum(layer.heads for layer in layers),
    }


# -- part 2: memory --------------------------------------------------------------------------------
def traced_generation(pipe, steps: int, size: int = SIZE, stats: Iterable[str] | None = None,
                      seed: int = 0, output_type: str = "pil") -> tuple[Tracer, Trace]:
    """One traced pipeline call, as :func:`evalkit.trace.generate` does it, keeping the tracer
    (``output_type="latent"`` skips the VAE decode)."""
    stats = traced_stats() if stats is None else frozenset(stats)
    tokens = tokenize_prompt(pipe.tokenizer, PROMPT)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    with Tracer(pipe.unet, stats, n_cond=1, cfg=True) as tracer:
        pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
             generator=torch.Generator().manual_seed(seed), output_type=output_type)
    trace = Trace(prompt=PROMPT, tokens=tokens, layers=[info for info, _ in tracer.layers],
                  stats=tracer.item_stats(0), n_steps=tracer.n_steps(), latent_hw=(size // scale, size // scale),
                  image_hw=(size, size), seed=seed)
    return tracer, trace


def stat_bytes_for_steps(pipe, steps: int, size: int = SIZE, stats: Iterable[str] | None = None,
                         output_type: str = "latent") -> int:
    """Bytes of the statistics accumulated by a ``steps``-step traced generation."""
    tracer, _ = traced_generation(pipe, steps, size, stats, output_type=output_type)
    return recorder_nbytes(tracer)


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux) in bytes, or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark of this process: VmHWM (Linux), else ``ru_maxrss``. Not ru_maxrss on
    Linux: it survives fork+exec, so a fresh child reports at least its parent's RSS at fork."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_rss_child(steps: int, size: int = SIZE, model: str = "tiny-sd") -> dict:
    """Run inside a fresh process: load ``model`` and warm up with an untraced 1-step generation at
    the same size; then reset the RSS high-water mark and run one traced ``steps``-step generation
    (VAE decode included) plus the timed methods. ``peak`` is the high-water mark over that traced
    part, ``baseline`` the RSS just before it."""
    from evalkit.models import load

    pipe = load(model)
    pipe(prompt=PROMPT, num_inference_steps=1, guidance_scale=GUIDANCE, height=size, width=size,
         generator=torch.Generator().manual_seed(0), output_type="pil")
    baseline = _proc_status_bytes("VmRSS")
    reset = reset_peak_rss()
    tracer, trace = traced_generation(pipe, steps, size)
    methods, _ = make_methods(trace.head_names())
    for method in methods.values():
        method.attribute(trace, list(WORDS))
    peak = peak_rss_bytes()
    if baseline is None:
        how = "ru_maxrss of the whole child process (no /proc: includes the parent's RSS at fork)"
    elif reset:
        how = "VmHWM reset (clear_refs) after load + warm-up, read after the traced generation"
    else:
        how = "VmHWM of the whole child process (clear_refs unavailable: includes load + warm-up)"
    return {"steps": steps, "n_steps": trace.n_steps, "baseline": baseline or 0, "peak": peak,
            "stat_bytes": recorder_nbytes(tracer), "method": how}


def measure_peak_rss(steps: int, size: int = SIZE, timeout: float = 600) -> dict:
    """:func:`peak_rss_child` in a fresh Python process; returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_peak-rss-child", str(steps), "--size", str(size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS child for {steps} steps failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step, 1 repetition, memory 2 vs 10 steps")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--steps", type=int, help="denoising steps per timed repetition (default 2)")
    parser.add_argument("--reps", type=int, help="repetitions of the interleaved traced/untraced loops (default 3)")
    parser.add_argument("--mem-steps", type=int, nargs=2, metavar=("FEW", "MANY"),
                        help="step counts compared for memory (default 10 50)")
    parser.add_argument("--skip-time", action="store_true", help="skip the SD-1.5 timing part")
    parser.add_argument("--size", type=int, default=SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--_peak-rss-child", dest="child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(peak_rss_child(args.child, args.size)))
        return 0

    steps = args.steps or (1 if args.quick else 2)
    reps = args.reps or (1 if args.quick else 3)
    few, many = args.mem_steps or ((2, 10) if args.quick else (10, 50))
    start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows: list[Row] = []
    stats = traced_stats()

    if not args.skip_time:
        log(f"[1/2] time: SD-1.5-geometry UNet, {args.size} px ({args.size // 8}x{args.size // 8} latent), CPU, "
            f"{steps} DDIM steps, CFG batch 2, {reps} repetitions of a traced and an untraced loop interleaved "
            "call by call (ABBA)")
        log("      the UNet denoising loop is timed directly: no VAE, no text encoder; random (2, 77, 768) "
            "text embeddings; the untraced loop runs on a twin module sharing the weights")
        res = time_tracing(steps, reps, log)
        wall_u, wall_t = statistics.median(res["wall"]["untraced"]), statistics.median(res["wall"]["traced"])
        cpu_u, cpu_t = statistics.median(res["cpu"]["untraced"]), statistics.median(res["cpu"]["traced"])
        log(f"  traced statistics {res['stats']} on {res['n_layers']} attn2 layers / {res['n_heads']} heads "
            f"= {res['stat_bytes']:,} bytes; methods {', '.join(TIMED_METHODS)} "
            f"(median {statistics.median(res['method_s']):.2f} s, included in traced time)")
        log(f"  hrv-selective: {res['hrv_source']}")
        wall_ratio = median_ratio(res["wall"]["traced"], res["wall"]["untraced"])
        cpu_ratio = median_ratio(res["cpu"]["traced"], res["cpu"]["untraced"])
        rows.append(check_row(f"traced/untraced wall time, SD-1.5 UNet {steps} steps + 4 methods",
                              wall_ratio, TIME_TARGET, f"{wall_ratio:.3f} ({wall_t:.1f} / {wall_u:.1f} s)"))
        rows.append(Row("traced/untraced CPU time (same runs)", f"{cpu_ratio:.3f} "
                        f"({cpu_t:.1f} / {cpu_u:.1f} s)", f"(<= {TIME_TARGET:.2f})", "info"))
        rows.append(Row("traced/untraced single UNet call (median of pairs)",
                        f"{statistics.median(res['call_ratios']):.3f}", "", "info"))
        rows.append(Row("traced/untraced final latents bit-identical", str(res["identical"]), "True",
                        "OK" if res["identical"] else "FAIL"))

    log(f"[2/2] memory: tiny-sd fixture (not SD-1.5), {args.size} px, traced {few} vs {many} steps, statistics "
        f"{sorted(stats)} + 4 methods, one fresh subprocess per step count")
    mem = {}
    for n in (few, many):
        mem[n] = measure_peak_rss(n, args.size)
        m = mem[n]
        log(f"  {n:>3} steps ({m['n_steps']} UNet calls): peak RSS {mib(m['peak'])}, baseline {mib(m['baseline'])}, "
            f"increment {mib(m['peak'] - m['baseline'])}, accumulated statistics {m['stat_bytes']:,} bytes")
    log(f"      peak RSS = {mem[few]['method']}; baseline = RSS after model load and an untraced 1-step "
        "warm-up generation at the same size")
    peak_ratio = ratio(mem[many]["peak"], mem[few]["peak"])
    rows.append(check_row(f"peak RSS {many}-step / {few}-step trace (tiny-sd)", peak_ratio, MEMORY_TARGET,
                          f"{peak_ratio:.3f} ({mib(mem[many]['peak'])} / {mib(mem[few]['peak'])})"))
    rows.append(Row(f"peak RSS increment over baseline, {few} / {many} steps",
                    f"{mib(mem[few]['peak'] - mem[few]['baseline'])} / "
                    f"{mib(mem[many]['peak'] - mem[many]['baseline'])}", "", "info"))
    same = mem[few]["stat_bytes"] == mem[many]["stat_bytes"]
    rows.append(Row(f"accumulated statistic bytes, {few} / {many} steps",
                    f"{mem[few]['stat_bytes']:,} / {mem[many]['stat_bytes']:,}", "equal", "OK" if same else "FAIL"))

    print()
    print(format_table(rows))
    print(f"\ntotal bench time: {time.perf_counter() - start:.0f} s")
    missed = [r.quantity for r in rows if r.status in ("over", "FAIL")]
    if missed:
        print(f"targets missed: {'; '.join(missed)}")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
