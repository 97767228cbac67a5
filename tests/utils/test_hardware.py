"""utils/hardware.py: bf16 detection on simulated CPUs and GPUs (the probes are monkeypatched), the
precision and memory-format resolvers, and one real subprocess under the AVX2 limits users set."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from model.AuxNet import AuxNet
from utils import hardware
from utils.hardware import cpu_bf16_support, cpu_has_native_bf16, resolve_channels_last, resolve_precision

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
    monkeypatch.setattr(hardware, "_CHANNELS_LAST_CACHE", {})
    monkeypatch.setattr(hardware, "_onednn_available", lambda: False)
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: {False: 0.2, True: 0.3})
    assert resolve_channels_last("auto", CPU, tiny_model, (2, 1, 16, 16), "none") == (
        False, "auto: contiguous (0.2 s vs 0.3 s/step)")


def test_auto_memory_format_times_off_the_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "_CHANNELS_LAST_CACHE", {})
    monkeypatch.setattr(hardware, "time_memory_formats", lambda *args: {False: 0.3, True: 0.2})
    assert resolve_channels_last("auto", torch.device("meta"), tiny_model, (2, 1, 16, 16), "bf16") == (
        True, "auto: channels_last (0.2 s vs 0.3 s/step)")


def test_measured_memory_format_picks_the_faster_and_caches(monkeypatch):
    calls = []

    def fake_timing(model, device, shape, precision, warmup, steps):
        calls.append(shape)
        return {False: 0.3, True: 0.2} if shape[0] == 2 else {False: 0.2, True: 0.3}

    monkeypatch.setattr(hardware, "_CHANNELS_LAST_CACHE", {})
    monkeypatch.setattr(hardware, "time_memory_formats", fake_timing)
    assert resolve_channels_last("measure", CPU, tiny_model, (2, 1, 16, 16), "none") == (
        True, "measure: channels_last (0.2 s vs 0.3 s/step)")
    assert resolve_channels_last("measure", CPU, tiny_model, (2, 1, 16, 16), "none")[0] is True
    assert resolve_channels_last("measure", CPU, tiny_model, (4, 1, 16, 16), "none") == (
        False, "measure: contiguous (0.2 s vs 0.3 s/step)")
    assert calls == [(2, 1, 16, 16), (4, 1, 16, 16)]  # the repeat was answered from the cache


def test_measured_memory_format_really_times_and_keeps_the_rng(monkeypatch):
    monkeypatch.setattr(hardware, "_CHANNELS_LAST_CACHE", {})
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


def test_the_memory_format_is_resolved_once_per_process_and_setting(monkeypatch, tmp_path):
    """The run's first line and config.yaml are written by the main rank only: asking again must not
    time again (nor, under DDP, start a collective the other ranks never join)."""
    from configs import load_config
    from engines import builders

    calls = []

    def fake(requested, device, make_model, shape, precision):
        calls.append(requested)
        return False, "measure: contiguous (timed)"

    monkeypatch.setattr(builders, "resolve_channels_last", fake)
    monkeypatch.setattr(builders, "_MEMORY_FORMATS", {})
    cfg = load_config(None, ["CHANNELS_LAST=measure", f"RESULTS_DIR={tmp_path}"])
    assert builders.memory_format_of(cfg, CPU) == (False, "measure: contiguous (timed)")
    assert builders.memory_format_of(cfg, CPU) == (False, "measure: contiguous (timed)")
    assert calls == ["measure"]
    other = load_config(None, ["CHANNELS_LAST=true", f"RESULTS_DIR={tmp_path}"])
    builders.memory_format_of(other, CPU)
    assert calls == ["measure", True]


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
