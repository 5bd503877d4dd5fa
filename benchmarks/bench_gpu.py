"""GPU benchmark: evalkit's tracer vs an untraced generation vs castorini's daam 0.2.0, side by side.

Run: ``python benchmarks/bench_gpu.py --device cuda`` (``nox -s bench -- --device cuda``). In one
process, on one SD-1.5-geometry ``StableDiffusionPipeline`` built from configs with random weights
(UNet as in ``bench_trace.py``, SD's VAE and CLIP text-encoder geometry, the real CLIP BPE
tokenizer of the tiny-sd fixture, DDIM), at ``--size`` px (512), ``--steps`` (50), ``--dtype``
(float16), guidance 7.5, batch 1, each repetition runs, in a rotating order:

- ``untraced``: the pipeline alone;
- ``evalkit-attn``: evalkit's traced generation recording ``attn`` only (the floor);
- ``evalkit``: traced generation with the union of the statistics the four methods (daam, raw-attn, norm,
  hrv-selective) need, plus ``attribute()`` of each for two words;
- ``evalkit-percall``: the same with every attn2 layer recorded where it is called (``defer=False``), i.e.
  without grouping a UNet call's layers by geometry (see ``evalkit.trace.batch``);
- ``evalkit-perstep``: the same as ``evalkit`` with the norm statistics accumulated per step (each
  call's ``A * ||v W_O||``), i.e. without the attention-sum factorization (see ``LayerRecorder``);
- ``daam-0.2.0``: the same generation under ``daam.trace(pipe)``, then its global heat map and the
  two word maps.

First it counts, on the meta device (no arithmetic, any machine), the kernel-launching operators of one UNet
call at this geometry untraced, traced with the layers grouped, and traced layer by layer: at batch 1 a GPU
step is bound by launches, so their ratio is the device-independent part of the overhead. Then it prints
medians over ``--reps`` repetitions (after one warm-up of each), the ratios to the
untraced time, peak allocated GPU memory of each variant (relative to untraced), and whether
evalkit's image equals the untraced one bit for bit. Benchmarks report; with ``--check`` the exit
code is 1 when evalkit's ratio exceeds 1.03, its memory +3 %, or it is slower than daam. Last, one profiled
generation of ``untraced`` and ``evalkit`` (``--profile-steps``, 10) shows where the difference goes: wall vs
kernel time, counts of launches, synchronizations and allocations, and the operators whose CPU time grew.
``--quick`` is the CPU smoke run (tiny-sd fixture, 64 px, 2 steps, 1 repetition).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent

PROMPT = "a photo of a cat sitting on a wooden chair"
WORDS = ("cat", "chair")
GUIDANCE = 7.5
METHODS = ("daam", "raw-attn", "norm", "hrv-selective")
#: Operators that launch no kernel (aliases, allocation); views are recognized by their schema.
NO_KERNEL = frozenset({"_unsafe_view", "detach", "lift_fresh", "empty", "empty_strided", "empty_like"})
TARGET_TIME, TARGET_MEM = 1.03, 1.03


def build_sd15_pipeline(device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight StableDiffusionPipeline of SD 1.5 geometry (configs written here)."""
    from bench_trace import sd15_unet_config
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config())
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "fixtures" / "tiny-sd" / "tokenizer", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(device: str, fn):
    """(seconds, peak allocated bytes or None, result) of ``fn()``."""
    cuda = device.startswith("cuda")
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    dt = time.perf_counter() - t0
    return dt, (torch.cuda.max_memory_allocated() if cuda else None), out


def variants(pipe, steps: int, size: int, seed: int, device: str):
    """The timed callables, by name (each returns the generated image as a numpy array)."""
    from bench_trace import make_methods

    from evalkit.methods import get_method_class
    from evalkit.trace import find_cross_attention_layers, generate

    heads = [n for info, _ in find_cross_attention_layers(pipe.unet) for n in info.head_names()]
    methods, _ = make_methods(heads)
    stats_all = sorted(set().union(*(get_method_class(m).needs for m in METHODS)))
    kw = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size)

    def gen():
        return torch.Generator("cpu").manual_seed(seed)

    def untraced():
        return np.asarray(pipe(PROMPT, generator=gen(), **kw).images[0])

    def evalkit_attn():
        g = generate(pipe, PROMPT, seeds=seed, steps=steps, guidance=GUIDANCE, height=size, width=size,
                     stats=["attn"])
        return np.asarray(g.images[0])

    def evalkit_all(defer: bool = True):
        g = generate(pipe, PROMPT, seeds=seed, steps=steps, guidance=GUIDANCE, height=size, width=size,
                     stats=stats_all, defer=defer)
        for name in METHODS:
            att = methods[name].attribute(g.traces[0], list(WORDS))
            for m in att.maps.values():
                m.sum().item()  # force the maps
        return np.asarray(g.images[0])

    def evalkit_per_step():  # the same, with norm statistics accumulated step by step (no factorization)
        from evalkit.trace.processor import TracingAttnProcessor

        real = TracingAttnProcessor.value_key
        TracingAttnProcessor.value_key = lambda self, context, edited: None
        try:
            return evalkit_all()
        finally:
            TracingAttnProcessor.value_key = real

    out = {"untraced": untraced, "evalkit-attn": evalkit_attn, "evalkit": evalkit_all,
           "evalkit-percall": lambda: evalkit_all(defer=False), "evalkit-perstep": evalkit_per_step}
    try:
        import daam  # noqa: F401
    except ImportError as err:
        print(f"daam 0.2.0 not importable ({err}); its column is skipped (pip install --no-deps daam==0.2.0)")
        return out

    def daam_ref():
        from daam import trace

        with trace(pipe) as tc:
            image = pipe(PROMPT, generator=gen(), **kw).images[0]
            heat = tc.compute_global_heat_map()
            for w in WORDS:
                heat.compute_word_heat_map(w).heatmap.sum().item()
        return np.asarray(image)

    out["daam-0.2.0"] = daam_ref
    return out


def count_launches(fn) -> int:
    """Kernel-launching ATen operators dispatched while ``fn()`` runs (views and allocations excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
                Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def launch_counts(unet, size: int, dtype: torch.dtype, stats) -> dict[str, int]:
    """Launches of one guided UNet call (batch 2, ``size`` px) untraced, traced grouped, traced per call; run on
    whatever device ``unet`` is on (the meta device computes nothing)."""
    import contextlib

    from evalkit.trace import Tracer

    dev = next(unet.parameters()).device
    latents = torch.zeros(2, unet.config.in_channels, size // 8, size // 8, dtype=dtype, device=dev)
    context = torch.zeros(2, 77, unet.config.cross_attention_dim, dtype=dtype, device=dev)
    t = torch.tensor(500, device=dev)
    out = {}
    for name, defer in (("untraced", None), ("evalkit", True), ("evalkit-percall", False)):
        tracer = contextlib.nullcontext() if defer is None else Tracer(unet, stats, n_cond=1, cfg=True, defer=defer)
        with tracer, torch.no_grad():
            unet(latents, t, encoder_hidden_states=context)  # the first call builds the cached keys
            out[name] = count_launches(lambda: unet(latents, t, encoder_hidden_states=context))
    return out


def print_launch_counts(size: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch counts of the SD-1.5-geometry UNet on the meta device, as a table."""
    from bench_trace import build_sd15_unet

    from evalkit.methods import get_method_class

    stats = sorted(set().union(*(get_method_class(m).needs for m in METHODS)))
    counts = launch_counts(build_sd15_unet(device="meta").to(dtype), size, dtype, stats)
    base = counts["untraced"]
    print(f"kernel launches per UNet call (SD-1.5 geometry, {size} px, {str(dtype).removeprefix('torch.')}, "
          f"statistics {stats}; counted on the meta device)")
    for name, n in counts.items():
        print(f"  {name:<16} {n:5d}  +{n - base:<4d} x{n / base:.3f}")
    return counts


#: Profiler events worth counting per generation: synchronizations stall a launch-bound GPU, allocations can
#: synchronize, and launches are the cost itself.
RUNTIME_EVENTS = ("cudaLaunchKernel", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                  "cudaMalloc", "cudaFree", "cudaMemcpyAsync")


def profile_once(device: str, fn) -> tuple[float, dict[str, tuple[int, float, float]]]:
    """(wall seconds, {event: (count, self CPU us, self device us)}) of one ``fn()`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - t0
    return wall, {e.key: (e.count, e.self_cpu_time_total, e.self_device_time_total) for e in prof.key_averages()}


def print_profile(device: str, fns: dict, names: Sequence[str] = ("untraced", "evalkit"), top: int = 10) -> dict:
    """Where the tracer's time goes: for each variant in ``names``, one profiled generation's wall time, summed
    device (kernel) time and runtime-call counts; then the operators whose self CPU time grew most from the
    first variant to the last. Wall time near the device time means GPU-bound; far above it, launch-bound."""
    runs = {}
    for name in names:
        fns[name]()  # warm
        runs[name] = profile_once(device, fns[name])
    print(f"\nprofile (one generation each; profiler overhead included) on {device}")
    print(f"  {'variant':<16} {'wall s':>8} {'kernels s':>10} " + " ".join(f"{e.removeprefix('cuda'):>14}"
                                                                        for e in RUNTIME_EVENTS))
    for name, (wall, events) in runs.items():
        device_s = sum(v[2] for k, v in events.items() if k not in RUNTIME_EVENTS) / 1e6
        counts = " ".join(f"{events.get(e, (0, 0, 0))[0]:>14d}" for e in RUNTIME_EVENTS)
        print(f"  {name:<16} {wall:8.3f} {device_s:10.3f} {counts}")
    first, last = runs[names[0]][1], runs[names[-1]][1]
    grown = sorted(((v[1] - first.get(k, (0, 0.0, 0.0))[1], k, v[0] - first.get(k, (0, 0, 0))[0])
                    for k, v in last.items()), reverse=True)[:top]
    print(f"  self CPU time added by {names[-1]} (ms, calls added):")
    for added_us, key, calls in grown:
        print(f"    {key[:60]:<60} {added_us / 1e3:8.2f} {calls:+7d}")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny-sd, 64 px, 2 steps, 1 repetition")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="steps of the profiled generations (untraced, evalkit) printed last; 0: no profile")
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.dtype, args.size, args.steps, args.reps = "cpu", "float32", 64, 2, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__}); "
              "run on a GPU machine or pass --quick for the CPU smoke run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    print_launch_counts(args.size, dtype)
    t0 = time.perf_counter()
    if args.quick:
        from evalkit.models import load

        pipe = load("tiny-sd", scheduler="ddim")
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = build_sd15_pipeline(args.device, dtype, args.seed)
    print(f"pipeline on {args.device} ({args.dtype}) built in {time.perf_counter() - t0:.1f} s; "
          f"{args.size} px, {args.steps} steps, guidance {GUIDANCE}, {args.reps} repetitions"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    fns = variants(pipe, args.steps, args.size, args.seed, args.device)
    names = list(fns)
    times = {n: [] for n in names}
    peaks = {n: [] for n in names}
    images = {}
    for n in names:  # warm-up (kernels, allocator), also the images compared below
        _, _, images[n] = measure(args.device, fns[n])
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for n in order:
            dt, peak, _ = measure(args.device, fns[n])
            times[n].append(dt)
            if peak is not None:
                peaks[n].append(peak)
    base_t = statistics.median(times["untraced"])
    base_m = max(peaks["untraced"]) if peaks["untraced"] else None
    print(f"\n{'variant':<16} {'median s':>9} {'x untraced':>11} {'peak MiB':>9} {'x untraced':>11}")
    summary = {}
    for n in names:
        t = statistics.median(times[n])
        m = max(peaks[n]) if peaks[n] else None
        mem = f"{m / 2**20:9.0f} {m / base_m:11.3f}" if m is not None else f"{'n/a':>9} {'n/a':>11}"
        print(f"{n:<16} {t:9.3f} {t / base_t:11.3f} {mem}")
        summary[n] = (t / base_t, (m / base_m) if m is not None else None)
    same = bool(np.array_equal(images["untraced"], images["evalkit"]))
    print(f"\nevalkit image bit-identical to untraced: {same}")
    if "daam-0.2.0" in summary:
        ratio = statistics.median(times["evalkit"]) / statistics.median(times["daam-0.2.0"])
        print(f"evalkit / daam time: {ratio:.3f}")
    ok = summary["evalkit"][0] <= TARGET_TIME and same
    if summary["evalkit"][1] is not None:
        ok = ok and summary["evalkit"][1] <= TARGET_MEM
    if "daam-0.2.0" in summary:
        ok = ok and summary["evalkit"][0] <= summary["daam-0.2.0"][0]
    print(f"targets (evalkit <= {TARGET_TIME}x time, <= {TARGET_MEM}x memory, not slower than daam, "
          f"bit-identical): {'met' if ok else 'missed'}")
    if args.profile_steps:
        print_profile(args.device, variants(pipe, min(args.profile_steps, args.steps), args.size, args.seed,
                                            args.device))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
