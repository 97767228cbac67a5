"""utils/hardware.py: bf16 detection on simulated CPUs and GPUs (the probes are monkeypatched), the
precision and memory-format resolvers, one real subprocess under the AVX2 limits users set, and the
Runtime: resolved once per process (the network timed at most once, for every command), the same on
every DDP rank, remembered by no module."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from model.AuxNet import AuxNet
from utils import hardware
from utils.hardware import (cpu_bf16_support, cpu_has_native_bf16, resolve_channels_last, resolve_precision,
                            resolve_runtime)

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def fake_cpu(monkeypatch, flags=(), aten="AVX512", onednn=None, mkldnn=True):
    """Make the probes describe a CPU with these cpuinfo flags and these torch limits."""
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "_aten_capability", lambda: aten)
    monkeypatch.setattr(hardware, "_onednn_limit", lambda: onednn)
    monkeypatch.setattr(hardware, "_onednn_available", lambda: mkldnn)


def fake_cuda(monkeypatch, major, name="GPU"):
    monkeypatch.setattr(hardware, "_cuda_bf16", lambda device: (major >= 8, f"{name}, compute capability {major}.0"))


# --- which CPUs have native bf16 ----------------------------------------------------------------

@pytest.mark.parametrize("flags, aten, onednn, native, detail", [
    ({"avx2"}, "AVX2", None, False, "AVX2"),                                 # AMD EPYC Rome/Milan
    ({"avx2", "avx512_f"}, "AVX512", None, False, "AVX512"),                 # Skylake-SP: no BF16
    ({"avx512_f", "avx512_bf16"}, "AVX512", None, True, "AVX512-BF16"),      # Cooper Lake, Zen 4
    ({"avx512_bf16", "amx_bf16"}, "AVX512", None, True, "AMX-BF16"),         # Sapphire Rapids
    ({"avx512_bf16", "amx_bf16"}, "AVX2", None, False, "AVX2, limited by ATEN_CPU_CAPABILITY"),
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "AVX2", False, "limited by ONEDNN_MAX_CPU_ISA=AVX2"),
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "AVX512_CORE", False, "limited by ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "AVX512_CORE_BF16", True, "AVX512-BF16"),  # stops short of AMX
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "AVX512_CORE_AMX", True, "AMX-BF16"),
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "NONSENSE", False, "ONEDNN_MAX_CPU_ISA=NONSENSE not recognised"),
])
def test_cpu_bf16_support(monkeypatch, flags, aten, onednn, native, detail):
    fake_cpu(monkeypatch, flags, aten, onednn)
    assert cpu_bf16_support() == (native, detail)
    assert cpu_has_native_bf16() is native


def test_no_native_bf16_without_onednn(monkeypatch):
    fake_cpu(monkeypatch, {"avx512_bf16", "amx_bf16"}, mkldnn=False)
    assert cpu_bf16_support() == (False, "oneDNN unavailable or disabled in torch")


def test_onednn_limit_reads_both_names(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert hardware._onednn_limit() == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", " avx512_core_amx ")
    assert hardware._onednn_limit() == "AVX512_CORE_AMX"


def test_cpu_flags_fall_back_to_proc_cpuinfo(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    flags = hardware._cpu_flags()
    if Path("/proc/cpuinfo").exists() and sys.platform.startswith("linux"):
        assert flags and all(isinstance(f, str) for f in flags)


def test_native_bf16_is_false_under_the_avx2_limits():
    """A real process with the limits a user sets to emulate an AVX2-only CPU (e.g. AMD EPYC)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = ("from utils.hardware import cpu_has_native_bf16, resolve_precision; import torch; "
            "print(cpu_has_native_bf16(), resolve_precision('auto', torch.device('cpu'))[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "none"]


@pytest.mark.parametrize("major, minor, native", [(7, 0, False), (7, 5, False), (8, 0, True), (9, 0, True)])
def test_cuda_bf16_probe_reads_the_compute_capability(monkeypatch, major, minor, native):
    props = SimpleNamespace(name="GPU", major=major, minor=minor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.version, "hip", None)
    assert hardware._cuda_bf16(CUDA) == (native, f"GPU, compute capability {major}.{minor}")


# --- resolve_precision --------------------------------------------------------------------------

@pytest.mark.parametrize("flags, aten, chosen, reason", [
    ({"avx2"}, "AVX2", "none", "auto: fp32 (CPU without native bf16: AVX2)"),
    ({"avx512_bf16"}, "AVX512", "bf16", "auto: bf16 (CPU with native bf16: AVX512-BF16)"),
    ({"avx512_bf16", "amx_bf16"}, "AVX512", "bf16", "auto: bf16 (CPU with native bf16: AMX-BF16)"),
])
def test_auto_precision_on_cpu(monkeypatch, flags, aten, chosen, reason):
    fake_cpu(monkeypatch, flags, aten)
    assert resolve_precision("auto", CPU) == (chosen, reason)


@pytest.mark.parametrize("major, chosen, reason", [
    (9, "bf16", "auto: bf16 (CUDA H200, compute capability 9.0)"),
    (7, "fp16", "auto: fp16 with GradScaler (CUDA H200, compute capability 7.0, no native bf16)"),
])
def test_auto_precision_on_cuda(monkeypatch, major, chosen, reason):
    fake_cuda(monkeypatch, major, "H200")
    assert resolve_precision("auto", CUDA) == (chosen, reason)


def test_explicit_precision_is_kept_and_warns_when_emulated(monkeypatch):
    fake_cpu(monkeypatch, {"avx2"}, "AVX2")
    chosen, reason = resolve_precision("bf16", CPU)
    assert chosen == "bf16" and "emulated on this CPU: AVX2" in reason
    assert resolve_precision("none", CPU) == ("none", "fp32 (requested)")
    fake_cuda(monkeypatch, 7)
    chosen, reason = resolve_precision("bf16", CUDA)
    assert chosen == "bf16" and "no native bf16" in reason
    assert resolve_precision("fp16", CUDA) == ("fp16", "fp16 (requested)")
    fake_cpu(monkeypatch, {"avx512_bf16"})
    assert resolve_precision("bf16", CPU) == ("bf16", "bf16 (requested)")


def test_precision_errors():
    with pytest.raises(ValueError, match="'bf61' is not valid: expected one of auto | bf16 | fp16 | none"):
        resolve_precision("bf61", CPU)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


# --- resolve_channels_last ----------------------------------------------------------------------

def tiny_model():
    return AuxNet(1, 1, 1, depth=2, base_width=4)


@pytest.mark.parametrize("requested, reason", [(True, "channels_last (requested)"), (False, "contiguous (requested)")])
def test_explicit_memory_format_is_kept(requested, reason):
    assert resolve_channels_last(requested, CPU, tiny_model, (2, 1, 16, 16), "none") == (requested, reason)


def test_auto_memory_format_on_cpu_follows_the_measured_rule(monkeypatch):
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: pytest.fail("the CPU rule times nothing"))
    monkeypatch.setattr(hardware, "_onednn_available", lambda: True)
    channels_last, reason = resolve_channels_last("auto", CPU, tiny_model, (2, 1, 16, 16), "none")
    assert channels_last is True and reason.startswith("auto: channels_last (CPU with oneDNN")


def test_auto_memory_format_times_on_cpu_without_onednn(monkeypatch):
    monkeypatch.setattr(hardware, "_onednn_available", lambda: False)
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: {False: 0.2, True: 0.3})
    assert resolve_channels_last("auto", CPU, tiny_model, (2, 1, 16, 16), "none") == (
        False, "auto: contiguous (0.2 s vs 0.3 s/step)")


def test_auto_memory_format_times_off_the_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: {False: 0.3, True: 0.2})
    assert resolve_channels_last("auto", torch.device("meta"), tiny_model, (2, 1, 16, 16), "bf16") == (
        True, "auto: channels_last (0.2 s vs 0.3 s/step)")


def test_measured_memory_format_picks_the_faster_and_remembers_nothing(monkeypatch):
    calls = []

    def fake_timing(model, device, shape, precision, warmup, steps):
        calls.append(shape)
        return {False: 0.3, True: 0.2} if shape[0] == 2 else {False: 0.2, True: 0.3}

    monkeypatch.setattr(hardware, "time_memory_formats", fake_timing)
    assert resolve_channels_last("measure", CPU, tiny_model, (2, 1, 16, 16), "none") == (
        True, "measure: channels_last (0.2 s vs 0.3 s/step)")
    assert resolve_channels_last("measure", CPU, tiny_model, (2, 1, 16, 16), "none")[0] is True
    assert resolve_channels_last("measure", CPU, tiny_model, (4, 1, 16, 16), "none") == (
        False, "measure: contiguous (0.2 s vs 0.3 s/step)")
    # each call times: the decision is taken once per process by resolve_runtime, and kept by the caller
    # (before: a module-level cache answered the repeat)
    assert calls == [(2, 1, 16, 16), (2, 1, 16, 16), (4, 1, 16, 16)]


def test_measured_memory_format_really_times_and_keeps_the_rng(monkeypatch):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    channels_last, reason = resolve_channels_last("measure", CPU, tiny_model, (2, 1, 16, 16), "bf16")
    assert isinstance(channels_last, bool) and reason.startswith("measure: ") and "s/step" in reason
    assert torch.equal(torch.rand(3), expected)


def test_time_memory_formats_times_both_formats():
    seconds = hardware.time_memory_formats(tiny_model(), CPU, (2, 1, 16, 16), "none", warmup=0, steps=1)
    assert set(seconds) == {False, True} and all(0 < s < 10 for s in seconds.values())


def test_memory_format_errors():
    with pytest.raises(ValueError, match="channels_last 'yes' is not valid: expected true, false, 'auto' or 'measure'"):
        resolve_channels_last("yes", CPU, tiny_model, (2, 1, 16, 16), "none")
    with pytest.raises(ValueError, match="precision 'fp32' is not valid"):
        resolve_channels_last("measure", CPU, tiny_model, (2, 1, 16, 16), "fp32")


def test_first_tensor_of_outputs():
    t = torch.zeros(1)
    assert hardware._first_tensor(t) is t
    assert hardware._first_tensor((None, t)) is t
    with pytest.raises(TypeError, match="holds no tensor"):
        hardware._first_tensor((None, None))


# --- the Runtime: every decision once per process --------------------------------------------------

def test_runtime_of_a_cpu_without_native_bf16(monkeypatch):
    fake_cpu(monkeypatch, {"avx2"}, aten="AVX2")
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: pytest.fail("the CPU rule times nothing"))
    before = torch.get_num_threads()
    try:
        runtime = resolve_runtime(CPU, "auto", "auto", tiny_model, (2, 1, 16, 16), threads=1)
        assert torch.get_num_threads() == 1  # set before anything could be timed
    finally:
        torch.set_num_threads(before)
    assert (runtime.device, runtime.amp_dtype, runtime.channels_last, runtime.threads) == (CPU, None, True, 1)
    assert (runtime.precision, runtime.memory_format) == ("none", "channels_last")
    assert dict(runtime.notes) == {"MIXED_PRECISION": "auto: fp32 (CPU without native bf16: AVX2)",
                                   "CHANNELS_LAST": hardware._CPU_RULE}
    assert runtime.describe() == f"precision auto: fp32 (CPU without native bf16: AVX2), memory format {hardware._CPU_RULE}"


def test_runtime_of_an_amx_cpu_and_requested_choices(monkeypatch):
    fake_cpu(monkeypatch, {"avx512_bf16", "amx_bf16"})
    runtime = resolve_runtime(CPU, "auto", False, tiny_model, (2, 1, 16, 16))
    assert (runtime.amp_dtype, runtime.channels_last) == (torch.bfloat16, False)
    assert dict(runtime.notes) == {"MIXED_PRECISION": "auto: bf16 (CPU with native bf16: AMX-BF16)",
                                   "CHANNELS_LAST": "contiguous (requested)"}
    with pytest.raises(ValueError, match="precision fp16 needs a CUDA GPU"):
        resolve_runtime(CPU, "fp16", "auto", tiny_model, (2, 1, 16, 16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        runtime.channels_last = True


def test_runtime_takes_rank_0s_memory_format_only_for_a_choice_it_did_not_type(monkeypatch):
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: {False: 0.2, True: 0.3})  # this rank: contiguous
    asked = []

    def rank_0s(decision):
        asked.append(decision)
        return True, "measure: channels_last (0.1 s vs 0.2 s/step)"

    runtime = resolve_runtime(CPU, "none", "measure", tiny_model, (2, 1, 16, 16), agree=rank_0s)
    assert asked == [(False, "measure: contiguous (0.2 s vs 0.3 s/step)")]
    assert runtime.channels_last is True and runtime.notes["CHANNELS_LAST"] == "measure: channels_last (0.1 s vs 0.2 s/step)"
    assert resolve_runtime(CPU, "none", False, tiny_model, (2, 1, 16, 16), agree=rank_0s).channels_last is False
    assert len(asked) == 1  # a typed choice is the same on every rank: no collective


def test_build_runtime_gives_a_cpu_process_the_thread_count_the_user_set(monkeypatch, tmp_path):
    from configs import load_config
    from engines.builders import build_runtime
    from utils.util import DistContext

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        runtime = build_runtime(load_config(None, [f"RESULTS_DIR={tmp_path}", "GPUs=[]"]), DistContext())
        assert torch.get_num_threads() == 1 and runtime.threads == 1
    finally:
        torch.set_num_threads(before)


def test_build_runtime_decides_again_each_call(monkeypatch, tmp_path):
    """No module remembers a decision: resolving twice times twice (a process resolves once, in the
    launcher or in predict, and passes its Runtime down)."""
    from configs import load_config
    from engines.builders import build_runtime
    from utils.util import DistContext

    calls = []
    monkeypatch.setattr(hardware, "time_memory_formats", lambda model, device, shape, *args: calls.append(shape)
                        or {False: 0.2, True: 0.1})
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    cfg = load_config(None, ["CHANNELS_LAST=measure", "BATCH_SIZE=3", "INPUT_SIZE=64", f"RESULTS_DIR={tmp_path}",
                             "GPUs=[]"])
    for _ in range(2):
        assert build_runtime(cfg, DistContext()).channels_last is True
    assert calls == [(3, cfg.INPUT_CHANNELS, 64, 64)] * 2


TINY_RUN = ["SYNTHETIC_IMAGES=4", "SYNTHETIC_SIZE=128", "INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=8",
            "BATCH_SIZE=4", "WARMUP_EPOCHS=0", "BASE_LR=0.01", "NUM_WORKERS=0", "TRAIN_EPOCHS=1", "GPUs=[]",
            "CHANNELS_LAST=measure"]
MEASURED = "measure: channels_last (0.1 s vs 0.2 s/step)"


def test_each_command_times_the_network_once_for_measure(monkeypatch, tmp_path, capsys):
    """CHANNELS_LAST=measure: a cross-validated training (two folds, each with its plots and its final
    whole-image evaluation), an eval and a predict each time the network once, and every part runs
    (and the run's first line and config.yaml report) that one decision."""
    from PIL import Image

    import main

    calls = []
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: calls.append(1) or {False: 0.2, True: 0.1})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runtime sets the threads of this (test) process
    before = torch.get_num_threads()
    try:
        assert main.main(["train", *TINY_RUN, "TEST_SPLIT=0.5", "CROSS_VALIDATION=true", f"RESULTS_DIR={tmp_path}",
                          "EXP_ID=x"]) == 0
        run = tmp_path / "x" / "run_001"
        assert calls == [1]
        first_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
        assert len(first_lines) == 2 and all(line.endswith(f"memory format {MEASURED}") for line in first_lines)
        assert f"# CHANNELS_LAST resolved here: {MEASURED}\n" in (run / "config.yaml").read_text()
        weights = run / "fold_0" / "best.pth"
        assert main.main(["eval", f"MODEL_WEIGHTS={weights}", "CHANNELS_LAST=measure", "GPUs=[]"]) == 0
        assert calls == [1, 1]
        summary = json.loads(next((run / "fold_0").glob("eval_best*.json")).read_text())
        assert summary["settings"]["memory_format"] == "channels_last"
        Image.fromarray((np.random.default_rng(0).random((80, 72)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
        assert main.main(["predict", f"MODEL_WEIGHTS={weights}", f"INPUT={tmp_path / 'a.png'}",
                          f"OUTPUT={tmp_path / 'out'}", "CHANNELS_LAST=measure", "GPUs=[]"]) == 0
        assert calls == [1, 1, 1]
    finally:
        torch.set_num_threads(before)


def _rank_runtime(rank: int, port: int, out: Path) -> None:
    """One rank of :func:`test_ddp_ranks_run_rank_0s_measured_memory_format`: each rank's timing
    prefers another format; the Runtime must be rank 0's on both."""
    from configs import load_config
    from engines.builders import build_runtime
    from utils.util import cleanup_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    hardware.time_memory_formats = lambda *args: {False: 0.2, True: 0.1} if rank == 0 else {False: 0.1, True: 0.2}
    ctx = init_distributed(rank, 2, rank, CPU)
    try:
        runtime = build_runtime(load_config(None, ["CHANNELS_LAST=measure", f"RESULTS_DIR={out}", "GPUs=[]"]), ctx)
    finally:
        cleanup_distributed()
    (out / f"rank{rank}.json").write_text(json.dumps([runtime.channels_last, runtime.notes["CHANNELS_LAST"]]))


def test_ddp_ranks_run_rank_0s_measured_memory_format(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_runtime, args=(port, tmp_path), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, MEASURED]


# --- COMPILE ------------------------------------------------------------------------------------

def test_compile_problem_names_the_missing_cpu_compiler_and_the_fix(monkeypatch):
    from engines.builders import compile_network
    from utils.util import RunError

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    problem = hardware.compile_problem(CPU)
    assert "C++ compiler" in problem and "c++ / g++ / clang++" in problem and "apt install g++" in problem
    with pytest.raises(RunError, match="COMPILE=true: torch.compile on the CPU needs a C\\+\\+ compiler.*"
                                       "set COMPILE=false"):
        compile_network(AuxNet(1, 1, 1, depth=2, base_width=4), CPU)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/opt/cc/bin/" + name if name == "my-cxx" else None)
    monkeypatch.setenv("CXX", "my-cxx -O2")  # CXX may carry flags: its first word is the compiler
    assert hardware.compile_problem(CPU) is None
    assert "not supported" in hardware.compile_problem(torch.device("meta"))


@pytest.mark.skipif(hardware.compile_problem(CPU) is not None, reason="no C++ compiler for inductor on this machine")
def test_a_compiled_network_computes_what_the_eager_one_does_and_keeps_its_state_dict_keys():
    from engines.builders import compile_network

    torch.manual_seed(0)
    eager = AuxNet(1, 1, 1, depth=2, base_width=4)
    compiled = AuxNet(1, 1, 1, depth=2, base_width=4)
    compiled.load_state_dict(eager.state_dict())
    compile_network(compiled, CPU)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load into a plain network
    x = torch.randn(2, 1, 16, 16)
    outputs = []
    for net in (eager, compiled):
        out = net(x)
        (out.seg.square().mean() + out.cls.sum() + out.fill.sum()).backward()
        outputs.append((out.seg.detach(), [p.grad for p in net.parameters()]))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(outputs[1][1], outputs[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert compiled._compiled_call_impl is not None  # it really went through torch.compile


# --------------------------------------------------------------------------------------------------
# keep_freed_memory

_FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from model.AuxNet import AuxNet
from model.fused import inference_copy
from utils.hardware import keep_freed_memory
set_ = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
net = inference_copy(AuxNet(1, 1, 1).eval().to(memory_format=torch.channels_last))
x = torch.rand(16, 1, 128, 128).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):  # warm-up: the heap grows to the batch's needs
        net.decode(*net.encode(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        net.decode(*net.encode(x))
print(set_, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 8)
"""


@pytest.mark.skipif(hardware._glibc_mallopt() is None, reason="glibc's malloc only (this C library is another)")
def test_keeping_freed_memory_ends_the_page_faults_of_prediction_batches():
    """Counted by the kernel (minor page faults, ``getrusage``) in fresh interpreters, over batches of
    16 windows of 128² through the default network's inference copy after a warm-up: by default,
    here, a batch faults in 10,000-20,000 pages (its feature maps, handed back to the system after
    the batch before); with freed memory kept, a tenth of that at most (measured: 0 in most
    batches, 2048 in a few)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
           and not k.startswith("MALLOC_")}
    counts = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _FAULTS.format(root=str(ROOT)), mode], env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        counts[mode] = done.stdout.split()
    assert counts["keep"][0] == "True" and counts["default"][0] == "None"
    default, kept = int(counts["default"][1]), int(counts["keep"][1])
    if default < 1000:
        pytest.skip(f"this glibc keeps freed maps by itself ({default} page faults per batch): nothing to end")
    assert kept * 10 <= default, counts


@pytest.mark.parametrize("variable, value", [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                             ("MALLOC_ARENA_MAX", "2"),
                                             ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_an_allocator_the_user_chose_is_left_as_it_is(monkeypatch, variable, value):
    calls = []
    monkeypatch.setattr(hardware, "_glibc_mallopt", lambda: lambda *args: calls.append(args) or 1)
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD", *hardware._ALLOCATOR_CHOICES):  # this shell's own choices
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert hardware.allocator_chosen_by_user() == variable
    assert hardware.keep_freed_memory() is False and calls == []
    monkeypatch.delenv(variable)
    assert hardware.allocator_chosen_by_user() is None and hardware.keep_freed_memory() is True
    assert calls == [(-3, 256 << 20), (-1, 512 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(hardware, "_glibc_mallopt", lambda: None)
    assert hardware.keep_freed_memory() is False
