"""Benchmark: training-step throughput and peak memory of AuxNet beside MONAI's BasicUNet and SMP's Unet.

Every configuration -- model × input × precision × memory format (× torch.compile with
``--compile``) -- runs one full training step: forward, BCE-with-logits on the segmentation output,
backward, AdamW. Each runs in a fresh subprocess, so memory peaks do not bleed from one to the next
and ISA limits (``--isa avx2``) apply from torch's start.

Models (the parameter count of each is printed):

* ``auxnet``    -- ``AuxNet(in_channels=1, seg_classes=1, cls_classes=1, depth=5, base_width=16)``
  (``auxnet4`` / ``auxnet5``: depth 4 / 5, width 16, for the channels_last study);
* ``basicunet`` -- MONAI ``BasicUNet(spatial_dims=2, in_channels=1, out_channels=1,
  features=(16, 32, 64, 128, 256, 16))``;
* ``smp``       -- segmentation_models_pytorch ``Unet(encoder_name="resnet18", encoder_weights=None,
  in_channels=1, classes=1)``; skipped, with the reason printed, where SMP cannot be imported (it
  needs torchvision, which does not import beside torch's CPU wheel from the PyPI index).

Precisions: fp32 always; bf16 autocast where it is native (a CPU with AVX512-BF16 / AMX-BF16, see
:mod:`utils.hardware`, or CUDA compute capability >= 8); fp16 autocast with a GradScaler on CUDA.
``--precisions`` forces a list (e.g. to see emulated bf16 on an AVX2 CPU).

Columns: median seconds per step over ``--steps`` timed steps after ``--warmup`` untimed ones, and
their range (a wide one means other processes shared the CPU); images/s; peak memory in MB -- CUDA
``max_memory_allocated`` on a GPU, and on the CPU the growth of the process's resident set from
before the model is built to its peak (``VmHWM`` after a reset through /proc/self/clear_refs;
Linux) -- model, optimiser state and activations together; and the speed (images/s) and memory
ratios to BasicUNet in the same input, precision, memory format and compile mode (speed > 1:
faster than BasicUNet; memory < 1: smaller).

Usage:
    python bench/train.py                       # both inputs, every supported precision and format
    python bench/train.py --isa avx2            # the same under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
    python bench/train.py --threads 1           # steadier on a shared machine (OpenMP threads stall
                                                # when another process holds a core)
    python bench/train.py --compile --steps 8   # adds torch.compile rows
    python bench/train.py --models auxnet4,auxnet5 --inputs 8x1x128x128,8x1x256x256 --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.isolated import report, spawn  # noqa: E402

MODELS = ("auxnet", "basicunet", "smp", "auxnet4", "auxnet5")
LABELS = {
    "auxnet": "AuxNet d5 w16 +cls", "auxnet4": "AuxNet d4 w16 +cls", "auxnet5": "AuxNet d5 w16 +cls",
    "basicunet": "MONAI BasicUNet", "smp": "SMP Unet resnet18",
}
DEFAULT_MODELS = "auxnet,basicunet,smp"
DEFAULT_INPUTS = "8x1x256x256,16x1x128x128"
ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
FORMATS = ("contiguous", "channels_last")
REFERENCE = "basicunet"


# --------------------------------------------------------------------------------------------------
# Worker side: one configuration per process.

def model_factory(name: str):
    """A constructor of the model called ``name`` (see MODELS), its imports done, and a function from
    its output to the seg logits (None: the output is the logits)."""
    if name.startswith("auxnet"):
        from model.AuxNet import AuxNet

        depth = 4 if name == "auxnet4" else 5
        return (lambda: AuxNet(in_channels=1, seg_classes=1, cls_classes=1, depth=depth, base_width=16),
                lambda out: out.seg)
    if name == "basicunet":
        from monai.networks.nets import BasicUNet

        features = (16, 32, 64, 128, 256, 16)
        return lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=features), None
    if name == "smp":
        import segmentation_models_pytorch as smp

        return lambda: smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=1), None
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")


def smp_problem() -> str | None:
    """Why SMP cannot be benchmarked here, or None when it imports."""
    try:
        import segmentation_models_pytorch  # noqa: F401
    except (ImportError, RuntimeError) as error:  # a torchvision that imports but lacks its ops raises RuntimeError
        return f"{type(error).__name__}: {str(error).splitlines()[-1]}"
    return None


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_config(cfg: dict) -> dict:
    """One configuration: build, warm up, time; returns seconds per step and peak memory."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    make_model, seg_of = model_factory(cfg["model"])  # imports first: the peak counts the model, not its library
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
        base_mb = rss_mb("VmRSS")

    model = make_model()
    params = sum(p.numel() for p in model.parameters())
    fmt = torch.channels_last if cfg["format"] == "channels_last" else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt).train()
    b, c, h, w = cfg["input"]
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(b, c, h, w, generator=gen).to(device).contiguous(memory_format=fmt)
    target = (torch.rand(b, 1, h, w, generator=gen) > 0.5).float().to(device).contiguous(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward = torch.compile(model) if cfg["compile"] else model
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = forward(image)
        seg = seg_of(out) if seg_of else out
        loss = loss_fn(seg.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warm = [step() for _ in range(cfg["warmup"])]
    times = [step() for _ in range(cfg["steps"])]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else rss_mb("VmHWM") - base_mb
    return {"params": params, "seconds": statistics.median(times), "times": times, "warmup": warm, "peak_mb": peak}


def probe(device: str) -> dict:
    """What this process (with its ISA environment) can run: device, precisions, SMP."""
    import torch

    from utils.hardware import cpu_bf16_support

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    info = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "smp": smp_problem()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        native = props.major >= 8 or bool(torch.version.hip)
        info["hardware"] = f"{props.name}, compute capability {props.major}.{props.minor}"
        info["precisions"] = ["fp32"] + (["bf16"] if native else []) + ["fp16"]
        info["skipped"] = {} if native else {"bf16": "no native bf16 on this GPU"}
    else:
        native, detail = cpu_bf16_support()
        info["hardware"] = f"CPU ({detail}), {os.cpu_count()} cores"
        info["precisions"] = ["fp32", "bf16"] if native else ["fp32"]
        info["skipped"] = {"fp16": "fp16 autocast is for CUDA"}
        if not native:
            info["skipped"]["bf16"] = f"bf16 is emulated on this CPU ({detail})"
    return info


def worker(payload: str) -> None:
    cfg = json.loads(payload)
    result = probe(cfg["device"]) if cfg.get("probe") else run_config(cfg)
    report(result)


# --------------------------------------------------------------------------------------------------
# Parent side: spawn the workers, print the table.

def parse_input(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"input {text!r}: expected BxCxHxW, e.g. 8x1x256x256")
    return parts


def table(rows: list[dict]) -> str:
    header = ["model", "params", "input", "precision", "memory format", "s/step", "min–max s", "images/s", "peak MB",
              f"speed vs {LABELS[REFERENCE]}", f"memory vs {LABELS[REFERENCE]}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ref = {r["mode"]: r for r in rows if r["model"] == REFERENCE and "error" not in r}
    for r in rows:
        head = [LABELS[r["model"]], r.get("params_text", ""), r["input_text"], r["precision_text"], r["format_text"]]
        if "error" in r:
            lines.append("| " + " | ".join(head + [r["error"]] + [""] * 5) + " |")
            continue
        base = ref.get(r["mode"])
        speed = f"{base['seconds'] / r['seconds']:.2f}" if base else "–"
        memory = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base and base["peak_mb"] > 0 else "–"
        spread = f"{min(r['times']):.3f}–{max(r['times']):.3f}"
        lines.append("| " + " | ".join(head + [f"{r['seconds']:.3f}", spread, f"{r['images'] / r['seconds']:.1f}",
                                               f"{r['peak_mb']:.0f}", speed, memory]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), help="limit torch to this ISA (emulates such a CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--inputs", default=DEFAULT_INPUTS, help="comma-separated BxCxHxW")
    parser.add_argument("--precisions", help="comma-separated from fp32, bf16, fp16 (default: what the device "
                                             "supports natively)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated from " + ", ".join(FORMATS))
    parser.add_argument("--threads", type=int, help="torch CPU threads per configuration (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    formats = args.formats.split(",")
    unknown += [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown {', '.join(map(repr, unknown))}: models are {', '.join(MODELS)}; "
                     f"formats are {', '.join(FORMATS)}")
    inputs = [parse_input(text) for text in args.inputs.split(",")]
    env = {**os.environ, **ISA_ENV.get(args.isa, {})}
    info = spawn(__file__, {"probe": True, "device": args.device}, env, args.timeout)
    if "error" in info:
        sys.exit(f"probe failed: {info['error']}")
    precisions = args.precisions.split(",") if args.precisions else info["precisions"]
    limits = " ".join(f"{k}={v}" for k, v in ISA_ENV.get(args.isa, {}).items()) or "none"
    print(f"torch {info['torch']} on {info['device']}: {info['hardware']}; torch kernels {info['capability']}; "
          f"{args.threads or info['threads']} threads; ISA limits: {limits}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.warmup} warm-up + {args.steps} timed steps "
          f"(median) per configuration, each in a fresh process")
    for precision, why in info["skipped"].items():
        if precision not in precisions:
            print(f"skipped {precision}: {why}")
    if "smp" in models and info["smp"]:
        print(f"skipped SMP Unet: segmentation_models_pytorch does not import here ({info['smp']}); "
              "SMP and its timm import torchvision, and PyPI's torchvision is a CUDA build that fails beside "
              "torch's CPU wheel")
        models.remove("smp")

    rows = []
    modes = [False, True] if args.compile else [False]
    for shape in inputs:
        for precision in precisions:
            for fmt in formats:
                for compiled in modes:
                    for model in models:
                        cfg = {"model": model, "device": info["device"], "input": shape, "precision": precision,
                               "format": fmt, "compile": compiled, "steps": args.steps, "warmup": args.warmup,
                               "threads": args.threads}
                        result = spawn(__file__, cfg, env, args.timeout)
                        rows.append({**result, "model": model, "images": shape[0],
                                     "mode": (tuple(shape), precision, fmt, compiled),
                                     "input_text": "×".join(map(str, shape)), "precision_text": precision,
                                     "format_text": fmt + (" +compile" if compiled else ""),
                                     "params_text": f"{result['params'] / 1e6:.2f} M" if "params" in result else ""})
                        print(f"  {LABELS[model]}, {rows[-1]['input_text']}, {precision}, {rows[-1]['format_text']}: "
                              + (result["error"] if "error" in result else f"{result['seconds']:.3f} s/step"),
                              file=sys.stderr, flush=True)
    print()
    print(table(rows))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (above the thread count: other processes shared the CPU)")


if __name__ == "__main__":
    main()
