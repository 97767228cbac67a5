"""Precision and memory format chosen from the hardware a run lands on, measured rather than assumed.

Why: bf16 autocast is ~2x faster than fp32 on a CPU with AVX512-BF16 or AMX-BF16, but on an
AVX2-only CPU (many AMD EPYC hosts) oneDNN emulates it and a training step is 10-30x *slower* than
in fp32 (AuxNet under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``). channels_last helps
convolutions on oneDNN and on tensor cores, by an amount that depends on the model, the input and
the precision. So for precision ``auto`` asks what torch itself reports (and what the user limited
it to with ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``); for the memory format it follows a
rule measured on CPUs (channels_last was never slower for AuxNet, see the note at ``_CPU_RULE``)
and times the actual model elsewhere, or anywhere with ``"measure"``.

Beside these choices, :func:`resolve_runtime` has the process's allocator keep the memory torch
frees (:func:`keep_freed_memory`).

Each resolver returns ``(choice, reason)``; the reason is one short sentence for the run's first
log line, e.g. ``"auto: fp32 (CPU without native bf16: AVX2)"``. :func:`resolve_runtime` takes every
such decision of a process once, into a frozen :class:`Runtime` that the launcher passes down; nothing
here remembers a decision.

This module imports nothing from the trainer or the config::

    from utils.hardware import resolve_precision, resolve_channels_last
    precision, why = resolve_precision("auto", torch.device("cpu"))
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "none")
AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

# oneDNN's dispatcher limits (ONEDNN_MAX_CPU_ISA), lowest first; aliases share a rank. Native bf16
# needs AVX512_CORE_BF16 or above (AVX512-BF16 dot products; AMX on the ranks above it).
_ONEDNN_ISAS: dict[str, int] = {
    "SSE41": 0, "AVX": 1, "AVX2": 2, "AVX2_VNNI": 3, "AVX2_VNNI_2": 4,
    "AVX512_CORE": 5, "AVX512_CORE_VNNI": 6, "AVX512_CORE_BF16": 7,
    "AVX512_CORE_FP16": 8, "AVX10_1_512": 8,
    "AVX512_CORE_AMX": 9, "AVX10_1_512_AMX": 9,
    "AVX512_CORE_AMX_FP16": 10, "AVX10_1_512_AMX_FP16": 10,
    "AVX10_2_512": 11, "AVX10_2_512_AMX_2": 12,
    "DEFAULT": 99, "ALL": 99,
}
_ONEDNN_BF16_RANK = _ONEDNN_ISAS["AVX512_CORE_BF16"]


# --------------------------------------------------------------------------------------------------
# Probes: small functions so tests can replace each one (monkeypatch) to simulate other hardware.

def _cpu_flags() -> frozenset[str]:
    """The CPU's bf16-relevant hardware features, as torch's cpuinfo sees them.

    ``torch.cpu.get_capabilities()`` (public in torch 2.13) reports the hardware, not what torch was
    limited to; a torch without it falls back to the flags line of /proc/cpuinfo (Linux only).
    """
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return frozenset(name for name, value in get().items() if value is True)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _aten_capability() -> str:
    """The vector ISA torch's own kernels dispatch to ("AVX512", "AVX2", ...); honours ATEN_CPU_CAPABILITY."""
    return torch.backends.cpu.get_cpu_capability()


def _onednn_limit() -> Optional[str]:
    """The user's ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA), upper-cased; None if unset."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value else None


def _onednn_available() -> bool:
    """oneDNN is built into torch and not switched off (``torch.backends.mkldnn.enabled``)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _cuda_bf16(device: torch.device) -> tuple[bool, str]:
    """(native bf16, "NAME, compute capability X.Y") of a CUDA (or ROCm) device."""
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return True, f"ROCm {props.name}"
    return props.major >= 8, f"{props.name}, compute capability {props.major}.{props.minor}"


# --------------------------------------------------------------------------------------------------
# Precision

def cpu_bf16_support() -> tuple[bool, str]:
    """Whether bf16 autocast runs natively on this CPU, and a few words why.

    True only where the hardware has AVX512-BF16 or AMX-BF16 *and* torch may use it: its own kernels
    at AVX512 (``ATEN_CPU_CAPABILITY``) and oneDNN at AVX512_CORE_BF16 or above
    (``ONEDNN_MAX_CPU_ISA``). Anything below that emulates bf16, which is far slower than fp32.

    Returns:
        ``(native, detail)``; detail names the feature used ("AMX-BF16", "AVX512-BF16") or what stands
        in the way ("AVX2", "AVX2, limited by ATEN_CPU_CAPABILITY", "limited by ONEDNN_MAX_CPU_ISA=AVX2").
    """
    flags = _cpu_flags()
    hardware = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    aten = _aten_capability()
    if hardware is None:
        return False, aten
    if aten != "AVX512":
        return False, f"{aten}, limited by ATEN_CPU_CAPABILITY"
    if not _onednn_available():
        return False, "oneDNN unavailable or disabled in torch"
    limit = _onednn_limit()
    if limit is not None:
        rank = _ONEDNN_ISAS.get(limit)
        if rank is None:
            return False, f"ONEDNN_MAX_CPU_ISA={limit} not recognised"
        if rank < _ONEDNN_BF16_RANK:
            return False, f"limited by ONEDNN_MAX_CPU_ISA={limit}"
        if hardware == "AMX-BF16" and rank < _ONEDNN_ISAS["AVX512_CORE_AMX"]:
            hardware = "AVX512-BF16"  # the limit stops oneDNN short of AMX; AVX512-BF16 remains
    return True, hardware


def cpu_has_native_bf16() -> bool:
    """True only where the CPU has AVX512-BF16 or AMX-BF16 and torch is not limited below it.

    See :func:`cpu_bf16_support` for the reason when False.
    """
    return cpu_bf16_support()[0]


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The autocast precision to train with on ``device``.

    ``auto``: CUDA with native bf16 (compute capability >= 8.0, or ROCm) → bf16; older CUDA → fp16
    (the trainer then uses a GradScaler); a CPU with native bf16 (:func:`cpu_has_native_bf16`) →
    bf16; anything else → "none" (fp32). An explicit choice is kept, with a warning in the reason
    when the hardware only emulates it.

    Args:
        requested: one of :data:`PRECISIONS`.
        device: where the model trains.

    Returns:
        ``(chosen, reason)``: chosen in {"bf16", "fp16", "none"} (a key of :data:`AMP_DTYPES`);
        reason a short sentence for the run's first log line.

    Raises:
        ValueError: ``requested`` is not a known precision, or fp16 on a device without CUDA.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not valid: expected one of {' | '.join(PRECISIONS)}")
    device = torch.device(device)
    if requested == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA GPU (device is {device.type}): use auto, bf16 or none")
    if device.type == "cuda":
        native, what = _cuda_bf16(device)
        has = f"CUDA {what}"
        fallback = "fp16", f"auto: fp16 with GradScaler (CUDA {what}, no native bf16)"
        emulated = f"bf16 (requested; CUDA {what} has no native bf16: auto would pick fp16)"
    elif device.type == "cpu":
        native, what = cpu_bf16_support()
        has = f"CPU with native bf16: {what}"
        fallback = "none", f"auto: fp32 (CPU without native bf16: {what})"
        emulated = f"bf16 (requested; emulated on this CPU: {what}, 10-30x slower than fp32 where measured)"
    elif requested == "auto":
        return "none", f"auto: fp32 (no precision rule for device type {device.type!r})"
    else:
        return requested, f"{_label(requested)} (requested)"
    if requested == "auto":
        return ("bf16", f"auto: bf16 ({has})") if native else fallback
    if requested == "bf16" and not native:
        return "bf16", emulated
    return requested, f"{_label(requested)} (requested)"


def _label(precision: str) -> str:
    return "fp32" if precision == "none" else precision


# --------------------------------------------------------------------------------------------------
# Memory format

CHANNELS_LAST_CHOICES = (True, False, "auto", "measure")

# Why "auto" does not time on the CPU. A training step (AdamW, BCE) of AuxNet width 16, depth 4
# and 5, on 8x1x128^2, 8x1x256^2 and 16x1x128^2, in fp32 and bf16, on a 2-core Sapphire Rapids
# (AMX) and under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, took 0.48-1.03x as long in
# channels_last as contiguous (~0.5-0.8 with AMX, 0.83-1.00 for AVX2 fp32; the 1.03 within
# step-to-step noise), and its peak memory was 10-25% lower. Runs in separate processes vary by up
# to 30%: one showed 1.16 for depth 5 fp32 on 16x1x128^2, where two repeats gave 0.74 and an
# interleaved in-process comparison 0.76. Timing instead (1 warm-up + 2 timed steps per format)
# cost 1.0-1.8 s at start-up for depth 4 on 8x1x128^2 on a quiet machine (3 s under the AVX2
# limits) but 6-20 s on a shared one, and with two threads on loaded cores 2-step decisions (replayed from 8 interleaved steps) picked
# contiguous 3 times in 7 where channels_last was ~40% faster: OpenMP stalls add seconds to single
# steps. So on the CPU "auto" follows the measurements. They hold for AuxNet, not for every
# network (MONAI's BasicUNet was up to 1.5x *slower* in channels_last): for another model use
# "measure". On CUDA (unmeasured here) timing is synchronised and far less noisy, so "auto" times
# there.
_CPU_RULE = "auto: channels_last (CPU with oneDNN: AuxNet measured 0.5-1.0x the contiguous step time)"


def resolve_channels_last(
    requested: Union[bool, str],
    device: torch.device,
    make_model: Callable[[], nn.Module],
    input_shape: Sequence[int],
    precision: str,
    warmup: int = 1,
    steps: int = 2,
) -> tuple[bool, str]:
    """Whether to train in the channels_last memory format.

    ``True`` / ``False`` are kept. ``"auto"``: on a CPU with oneDNN, channels_last (a rule from
    measurements of AuxNet, see the note at ``_CPU_RULE``); elsewhere (CUDA, other devices, a CPU
    without oneDNN) as ``"measure"``.
    ``"measure"`` times ``warmup`` + ``steps`` forward+backward passes of a fresh ``make_model()``
    on random input in each format, interleaved so that a slow moment of the machine hits both,
    and picks the faster by each format's best step (contention only ever adds time). Each call
    times anew: take the decision once per process (:func:`resolve_runtime`). Global RNG state (CPU
    and CUDA) is left as it was, so seeding before or after this call gives the same run. Under DDP
    each rank measures on its own: let rank 0 decide and broadcast (``agree`` of
    :func:`resolve_runtime`), so that all ranks train alike.

    Args:
        requested: True, False, "auto" or "measure".
        device: where the model trains.
        make_model: builds the model to time (called once per measured decision, on the CPU).
        input_shape: one training batch, (B, C, H, W).
        precision: "bf16", "fp16" or "none", as returned by :func:`resolve_precision`.
        warmup, steps: untimed and timed passes per format.

    Returns:
        ``(channels_last, reason)``, e.g. ``(True, "auto: channels_last (0.29 s vs 0.37 s/step)")``.

    Raises:
        ValueError: ``requested`` is none of :data:`CHANNELS_LAST_CHOICES`; or ``precision`` is unknown.
    """
    if requested is True or requested is False:
        return requested, "channels_last (requested)" if requested else "contiguous (requested)"
    if requested not in ("auto", "measure"):
        raise ValueError(f"channels_last {requested!r} is not valid: expected true, false, 'auto' or 'measure'")
    if precision not in AMP_DTYPES:
        raise ValueError(f"precision {precision!r} is not valid: expected one of {' | '.join(AMP_DTYPES)}")
    device = torch.device(device)
    if requested == "auto" and device.type == "cpu" and _onednn_available():
        return True, _CPU_RULE
    # fork_rng restores the CPU generator, and the CUDA one of ``device`` when it is a GPU
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seconds = time_memory_formats(make_model(), device, input_shape, precision, warmup, steps)
    faster = seconds[True] < seconds[False]
    return faster, (f"{requested}: {'channels_last' if faster else 'contiguous'} "
                    f"({seconds[faster]:.3g} s vs {seconds[not faster]:.3g} s/step)")


def time_memory_formats(
    model: nn.Module,
    device: torch.device,
    input_shape: Sequence[int],
    precision: str,
    warmup: int = 1,
    steps: int = 2,
) -> dict[bool, float]:
    """Best seconds per forward+backward pass of ``model`` in each memory format.

    The model is moved to ``device`` and converted in place between formats; the caller should pass
    a throwaway copy. The loss is the mean of the first output tensor, in fp32.

    Returns:
        ``{False: contiguous seconds, True: channels_last seconds}``.
    """
    device = torch.device(device)
    model = model.to(device).train()
    generator = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(*input_shape, generator=generator).to(device)
    dtype = AMP_DTYPES[precision]
    formats = {False: torch.contiguous_format, True: torch.channels_last}

    def step(channels_last: bool) -> float:
        model.to(memory_format=formats[channels_last])
        x = image.contiguous(memory_format=formats[channels_last])
        _synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = _first_tensor(model(x))
        out.float().mean().backward()
        _synchronize(device)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(warmup):
        for channels_last in formats:
            step(channels_last)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(steps):
        for channels_last in formats:
            best[channels_last] = min(best[channels_last], step(channels_last))
    return best


def _first_tensor(out) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, or a tuple such as AuxNetOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"model output {type(out).__name__} holds no tensor")


# --------------------------------------------------------------------------------------------------
# The runtime: every decision above, taken once per process

@dataclass(frozen=True)
class Runtime:
    """How this process runs the network, decided once (:func:`resolve_runtime`) and passed down to
    the trainer, the evaluations, the figures and predict, which read it and decide nothing.

    Attributes:
        device: where the network runs.
        amp_dtype: the autocast dtype (None = fp32).
        channels_last: whether the network and its inputs use the channels_last memory format.
        threads: torch's CPU threads in this process (intra-op).
        notes: why, per option: ``{"MIXED_PRECISION": reason, "CHANNELS_LAST": reason}`` (the run's
            first line, and the comments of its config.yaml).
    """

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    threads: int
    notes: Mapping[str, str]

    @property
    def precision(self) -> str:
        """The precision's name: "bf16", "fp16" or "none" (a key of :data:`AMP_DTYPES`)."""
        return next(name for name, dtype in AMP_DTYPES.items() if dtype == self.amp_dtype)

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def describe(self) -> str:
        """The choices and their reasons, for the run's first line."""
        return f"precision {self.notes['MIXED_PRECISION']}, memory format {self.notes['CHANNELS_LAST']}"


def resolve_runtime(
    device: torch.device,
    precision: str,
    channels_last: Union[bool, str],
    make_model: Callable[[], nn.Module],
    input_shape: Sequence[int],
    threads: Optional[int] = None,
    agree: Optional[Callable[[Any], Any]] = None,
) -> Runtime:
    """Take this process's runtime decisions, once: its CPU threads, precision and memory format (and
    its allocator's handling of freed memory, :func:`keep_freed_memory`).

    Args:
        device: where the network runs.
        precision: the requested precision, one of :data:`PRECISIONS` (:func:`resolve_precision`).
        channels_last: the requested memory format, one of :data:`CHANNELS_LAST_CHOICES`
            (:func:`resolve_channels_last`).
        make_model, input_shape: the network to time, and one batch's shape (B, C, H, W); used only
            when the memory format is timed.
        threads: torch's CPU threads for this process, set here before anything is timed (so the
            timing runs as the run will); None leaves torch's setting.
        agree: under DDP, a collective that returns rank 0's value of what every rank passes; called
            (on every rank alike) for an ``auto`` or ``measure`` memory format, so that every rank
            runs rank 0's choice.

    Returns:
        The :class:`Runtime`.

    Raises:
        ValueError: an unknown precision or memory format, or fp16 on a device without CUDA.
    """
    device = torch.device(device)
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)
    chosen, precision_reason = resolve_precision(precision, device)
    decision = resolve_channels_last(channels_last, device, make_model, input_shape, chosen)
    if agree is not None and not isinstance(channels_last, bool):
        decision = agree(decision)
    return Runtime(device=device, amp_dtype=AMP_DTYPES[chosen], channels_last=decision[0],
                   threads=torch.get_num_threads(),
                   notes=MappingProxyType({"MIXED_PRECISION": precision_reason, "CHANNELS_LAST": decision[1]}))


# --------------------------------------------------------------------------------------------------
# The C library's allocator

#: glibc's malloc (:func:`keep_freed_memory`): blocks below this come from the heap, not from a fresh
#: mapping each (glibc adapts its own threshold, but only up to 32 MiB).
MMAP_THRESHOLD = 256 << 20
#: ... and freed memory at the top of the heap goes back to the system only past this much.
TRIM_THRESHOLD = 512 << 20
#: ``mallopt`` parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Environment variables through which a user chooses malloc's behaviour or another allocator.
_ALLOCATOR_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    """glibc's ``mallopt`` in this process, or None (another C library or platform)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc.mallopt


def allocator_chosen_by_user() -> Optional[str]:
    """What in the environment chose malloc's behaviour or another allocator, or None."""
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    named = [name for name in _ALLOCATOR_CHOICES if name in os.environ]
    if named:
        return named[0]
    preload = os.environ.get("LD_PRELOAD", "")
    return "LD_PRELOAD" if any(name in preload for name in _OTHER_ALLOCATORS) else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory this process frees for its next allocation, instead of
    handing it back to the system and faulting it in again page by page; True when it was set.

    Why: on the CPU, torch allocates every layer's output anew, and a batch's feature maps are
    large (16 windows of 128² with 16 channels in fp32: 16.8 MB each). glibc returned the freed maps
    to the system whenever the free top of its heap exceeded twice its adaptive mmap threshold, so
    each batch of prediction faulted them in again: 10,000-20,000 minor page faults per batch of
    the default network (``bench/inference.py``'s network), 8 % of its time in fp32. With
    :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` most batches fault in no page. The price: up to
    TRIM_THRESHOLD of freed memory stays with the process (the peak resident memory is what it was).

    Left as it is where the user chose (``GLIBC_TUNABLES`` with a malloc tunable, a ``MALLOC_*_``
    variable, or jemalloc / tcmalloc / mimalloc in ``LD_PRELOAD``) and where the C library is not glibc.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None or allocator_chosen_by_user() is not None:
        return False
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)


# --------------------------------------------------------------------------------------------------
# torch.compile

def compile_problem(device: torch.device) -> Optional[str]:
    """Why ``torch.compile`` (inductor) cannot build kernels for ``device`` here, or None if it can.

    On the CPU inductor compiles C++ at run time: it needs a C++ compiler (``CXX`` or ``c++``,
    ``g++``, ``clang++`` on the PATH). On a GPU it needs Triton (shipped with CUDA builds of torch).
    Checked before training, so a missing toolchain is one clear sentence instead of a traceback
    from inside the first compiled step.
    """
    if device.type == "cpu":
        candidates = [os.environ.get("CXX")] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
        if not any(shutil.which(c.split()[0]) for c in candidates):
            return (f"torch.compile on the CPU needs a C++ compiler at run time and none was found "
                    f"({' / '.join(candidates)} on the PATH; Debian/Ubuntu: apt install g++)")
        return None
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - every torch with inductor has it
            return None
        return None if has_triton() else "torch.compile on CUDA needs Triton, which this torch build lacks"
    return f"torch.compile is not supported here on {device.type}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
