"""devices: selection logic on fake probe results, the real probes here, OpenVINO compile, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from devices import (
    Device,
    Kind,
    Plan,
    ProbeReport,
    Runtime,
    Use,
    detect_devices,
    plan_training,
    probe_openvino,
    select_inference_device,
)
from devices.commands import device_option, devices_command
from toolkit.errors import DeviceError, EdgetuneError

ROOT = Path(__file__).resolve().parents[1]

TORCH_USES = (Use.TRAIN_HEAD, Use.EXTRACT_FEATURES, Use.FINETUNE_BACKBONE)
INFER_USES = (Use.EXTRACT_FEATURES, Use.RUN_EXPORTED)


def torch_dev(id: str, kind: Kind = Kind.GPU) -> Device:
    return Device(Runtime.TORCH, kind, id, f"fake {id}", TORCH_USES, ("fp32",))


def ov_dev(name: str, kind: Kind) -> Device:
    return Device(
        Runtime.OPENVINO, kind, f"openvino:{name}", f"fake {name}", INFER_USES, ("fp32", "fp16"),
        static_shapes=kind is Kind.NPU,
    )


def ort_dev(provider: str, kind: Kind = Kind.CPU) -> Device:
    return Device(Runtime.ONNXRUNTIME, kind, f"ort:{provider}", provider, INFER_USES)


CPU = torch_dev("cpu", Kind.CPU)
CUDA0, CUDA1 = torch_dev("cuda:0"), torch_dev("cuda:1")
OV_CPU, OV_GPU, OV_NPU = ov_dev("CPU", Kind.CPU), ov_dev("GPU", Kind.GPU), ov_dev("NPU", Kind.NPU)
ORT_CPU = ort_dev("CPUExecutionProvider")
ORT_OV = ort_dev("OpenVINOExecutionProvider")
ORT_CUDA = ort_dev("CUDAExecutionProvider", Kind.GPU)


def ids(plan: Plan) -> tuple[str, str]:
    return plan.features.id, plan.head.id


# --- plan_training: auto ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "available, expected",
    [
        ([CPU], ("cpu", "cpu")),
        ([CPU, ORT_CPU], ("ort:CPUExecutionProvider", "cpu")),
        ([CPU, OV_CPU, ORT_CPU], ("openvino:CPU", "cpu")),
        ([CPU, CUDA0, CUDA1, OV_CPU, ORT_CPU, ORT_CUDA], ("cuda:0", "cuda:0")),
        ([CPU, OV_CPU, OV_NPU, ORT_CPU], ("openvino:NPU", "cpu")),
        ([CPU, OV_CPU, OV_GPU, OV_NPU], ("openvino:NPU", "cpu")),
        ([CPU, OV_CPU, OV_GPU], ("openvino:GPU", "cpu")),
        ([CPU, ORT_CPU, ORT_OV], ("ort:OpenVINOExecutionProvider", "cpu")),
        ([CPU, OV_CPU, ORT_CPU, ORT_OV], ("openvino:CPU", "cpu")),
        ([CPU, torch_dev("xpu:0"), OV_GPU], ("openvino:GPU", "xpu:0")),
        ([CPU, torch_dev("mps"), OV_CPU], ("mps", "mps")),
    ],
)
def test_auto_plan(available, expected):
    plan = plan_training("auto", available)
    assert ids(plan) == expected
    assert plan.features.id in plan.reason and plan.head.id in plan.reason
    assert json.loads(json.dumps(plan.to_json()))["features"]["id"] == expected[0]


def test_auto_reason_names_the_engine():
    assert plan_training("auto", [CPU, OV_CPU, OV_NPU]).reason == (
        "features on openvino:NPU (OpenVINO NPU), head on cpu"
    )


@pytest.mark.parametrize(
    "available, expected",
    [
        ([CPU, OV_CPU, OV_NPU, ORT_OV], "cpu"),
        ([CPU, CUDA0, OV_NPU], "cuda:0"),
        ([CPU, torch_dev("xpu:0")], "xpu:0"),
    ],
)
def test_finetune_backbone_forces_torch(available, expected):
    plan = plan_training("auto", available, finetune_backbone=True)
    assert ids(plan) == (expected, expected)
    assert "torch" in plan.reason


# --- plan_training: explicit --------------------------------------------------------------------

@pytest.mark.parametrize(
    "request_, available, expected",
    [
        ("cpu", [CPU, CUDA0, OV_NPU], ("cpu", "cpu")),
        ("cuda", [CPU, CUDA0, CUDA1], ("cuda:0", "cuda:0")),
        ("cuda:1", [CPU, CUDA0, CUDA1], ("cuda:1", "cuda:1")),
        ("openvino:NPU", [CPU, CUDA0, OV_NPU], ("openvino:NPU", "cuda:0")),
        ("openvino:npu", [CPU, OV_NPU], ("openvino:NPU", "cpu")),
        ("openvino:CPU", [CPU, OV_CPU, OV_GPU], ("openvino:CPU", "cpu")),
        ("openvino:GPU", [CPU, ov_dev("GPU.0", Kind.GPU), ov_dev("GPU.1", Kind.GPU)],
         ("openvino:GPU.0", "cpu")),
        ("openvino:GPU.0", [CPU, OV_GPU], ("openvino:GPU", "cpu")),
        ("ort:OpenVINOExecutionProvider", [CPU, ORT_CPU, ORT_OV], ("ort:OpenVINOExecutionProvider", "cpu")),
        ("ort:openvino", [CPU, ORT_CPU, ORT_OV], ("ort:OpenVINOExecutionProvider", "cpu")),
    ],
)
def test_explicit_plan(request_, available, expected):
    assert ids(plan_training(request_, available)) == expected


def test_finetune_backbone_with_inference_only_device_is_refused():
    with pytest.raises(DeviceError, match=r"needs a torch device.*one of: cpu, cuda:0"):
        plan_training("openvino:NPU", [CPU, CUDA0, OV_NPU], finetune_backbone=True)
    with pytest.raises(DeviceError, match="torch device"):
        plan_training("ort:CPUExecutionProvider", [CPU, ORT_CPU], finetune_backbone=True)


@pytest.mark.parametrize(
    "request_", ["cuda", "cuda:2", "openvino:NPU", "openvino:GPU", "ort:CUDAExecutionProvider", "mps"]
)
def test_absent_device_error_lists_available(request_):
    available = [CPU, CUDA0, OV_CPU, ORT_CPU] if request_ == "cuda:2" else [CPU, OV_CPU, ORT_CPU]
    with pytest.raises(DeviceError) as caught:
        plan_training(request_, available)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"Device '{request_}' is not available here.")
    assert "Available: cpu, " in message and "ort:CPUExecutionProvider (see `edgetune devices`)." in message


def test_absent_message_exact():
    with pytest.raises(DeviceError) as caught:
        plan_training("cuda", [CPU, OV_CPU, ORT_CPU])
    assert str(caught.value) == (
        "Device 'cuda' is not available here. Available: cpu, openvino:CPU, "
        "ort:CPUExecutionProvider (see `edgetune devices`)."
    )
    assert isinstance(caught.value, EdgetuneError)


@pytest.mark.parametrize("request_", ["gpu", "cuda0", "openvino", "openvino:", "ort:", "tpu:0", "cuda:x", ""])
def test_bad_syntax_lists_accepted_forms(request_):
    with pytest.raises(DeviceError, match=r"Unknown device .*Accepted forms: auto, cpu, cuda\[:N\]"):
        plan_training(request_, [CPU])


def test_no_torch_means_no_training():
    with pytest.raises(DeviceError, match="needs PyTorch"):
        plan_training("auto", [OV_CPU, ORT_CPU])


# --- select_inference_device --------------------------------------------------------------------

@pytest.mark.parametrize(
    "runtime, available, expected",
    [
        (Runtime.OPENVINO, [CPU, OV_CPU, OV_GPU, OV_NPU, ORT_CPU], "openvino:NPU"),
        (Runtime.OPENVINO, [CPU, OV_CPU, ORT_CPU], "openvino:CPU"),
        ("onnxruntime", [CPU, OV_NPU, ORT_CPU, ORT_OV], "ort:OpenVINOExecutionProvider"),
        (Runtime.ONNXRUNTIME, [CPU, ORT_CPU, ORT_CUDA], "ort:CUDAExecutionProvider"),
        (Runtime.TORCH, [CPU, CUDA0, OV_NPU], "cuda:0"),
        (None, [CPU, OV_CPU, ORT_CPU], "openvino:CPU"),
    ],
)
def test_inference_auto(runtime, available, expected):
    assert select_inference_device("auto", available, runtime=runtime).id == expected


def test_inference_explicit_and_errors():
    available = [CPU, OV_CPU, ORT_CPU]
    assert select_inference_device("openvino:CPU", available, runtime="openvino") is OV_CPU
    assert select_inference_device("ort:cpu", available) is ORT_CPU
    with pytest.raises(DeviceError, match="runs on openvino. Use one of: openvino:CPU"):
        select_inference_device("ort:CPUExecutionProvider", available, runtime=Runtime.OPENVINO)
    with pytest.raises(DeviceError, match="Device 'openvino:NPU' is not available here. Available: cpu"):
        select_inference_device("openvino:NPU", available, runtime=Runtime.OPENVINO)
    with pytest.raises(DeviceError, match="for openvino"):
        select_inference_device("auto", [CPU, ORT_CPU], runtime=Runtime.OPENVINO)


# --- the real probes on this machine ------------------------------------------------------------

@pytest.fixture(scope="module")
def real() -> ProbeReport:
    return detect_devices(refresh=True)


def test_real_probes(real):
    by_id = {device.id: device for device in real.devices}
    assert {"cpu", "openvino:CPU", "ort:CPUExecutionProvider"} <= set(by_id)
    assert real.problems == []
    for device in real.devices:
        assert device.name and device.uses, device
        assert isinstance(device.runtime, Runtime) and isinstance(device.kind, Kind)
    assert "fp32" in by_id["openvino:CPU"].precisions
    assert detect_devices() is real  # cached
    plan = plan_training("auto", real.devices)
    assert plan.head.runtime is Runtime.TORCH


def test_probe_failure_is_reported_not_raised(monkeypatch, caplog):
    import openvino

    def broken_core(*args, **kwargs):
        raise RuntimeError("plugin xml is\ncorrupt")

    monkeypatch.setattr(openvino, "Core", broken_core)
    report = probe_openvino()
    assert report.devices == []
    assert report.problems == ["openvino: Core() failed: RuntimeError: plugin xml is corrupt"]
    assert "Core() failed" in caplog.text

    merged = detect_devices(runtimes=["openvino", "onnxruntime"], refresh=True)
    assert merged.problems == report.problems
    assert [d.id for d in merged.devices] == ["ort:CPUExecutionProvider"]
    monkeypatch.undo()
    healthy = detect_devices(runtimes=["openvino", "onnxruntime"], refresh=True)  # no poisoned cache
    assert healthy.problems == [] and "openvino:CPU" in healthy.ids()


def test_missing_package_is_silent(monkeypatch):
    from devices import probe

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ModuleNotFoundError
    assert probe_openvino() == ProbeReport([], [])
    assert probe.is_missing_package(ModuleNotFoundError("x", name="openvino.runtime"), "openvino")
    assert not probe.is_missing_package(ImportError("libfoo.so: cannot open"), "openvino")


# --- OpenVINO compile helpers -------------------------------------------------------------------

def tiny_ov_model():
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([-1, 3, 8, 8], ov.Type.f32, name="x")
    weights = ops.constant(np.full((4, 3, 3, 3), 0.1, np.float32))
    conv = ops.convolution(x, weights, [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([ops.relu(conv)], [x], "tiny")


def test_compile_config(monkeypatch):
    from devices.openvino_compile import compile_config, default_cache_dir, needs_static_shapes

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    config = compile_config("openvino:NPU", cache_dir=Path("/tmp/x"))
    assert config["CACHE_DIR"] == "/tmp/x"
    assert str(config["PERFORMANCE_HINT"]).endswith("THROUGHPUT")
    import openvino as ov

    assert config["INFERENCE_PRECISION_HINT"] == ov.Type.f16
    latency = compile_config(OV_CPU, latency=True)
    assert str(latency["PERFORMANCE_HINT"]).endswith("LATENCY")
    assert "INFERENCE_PRECISION_HINT" not in latency
    assert latency["CACHE_DIR"] == str(default_cache_dir())
    assert default_cache_dir().parts[-2:] == ("edgetune", "ov_cache")
    assert needs_static_shapes("openvino:NPU") and needs_static_shapes(OV_NPU)
    assert not needs_static_shapes("openvino:CPU") and not needs_static_shapes(OV_GPU)
    with pytest.raises(DeviceError):
        compile_config(CPU)


ALL_FLAGS = "fpu sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx512_bf16 avx_vnni amx_tile amx_bf16 amx_int8"


@pytest.fixture
def sapphire_rapids(monkeypatch, tmp_path):
    """/proc/cpuinfo of a CPU with every flag edgetune looks at (bf16 and AMX included)."""
    import devices.probe

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Fake Xeon\nflags\t\t: {ALL_FLAGS}\n")
    monkeypatch.setattr(devices.probe, "CPUINFO", str(cpuinfo))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    return monkeypatch


@pytest.mark.parametrize("cap, expected", [
    (None, ALL_FLAGS.split()[1:]),
    ("ALL", ALL_FLAGS.split()[1:]),
    ("AVX2", ["sse4_2", "avx", "avx2", "fma", "f16c"]),
    ("avx512_core_vnni", ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni"]),
    ("AVX512_CORE_BF16", ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"]),
])
def test_isa_cap_hides_the_flags_above_it(sapphire_rapids, cap, expected):
    from devices.probe import bf16_units, cpu_flags

    if cap:
        sapphire_rapids.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert list(cpu_flags()) == expected
    assert list(cpu_flags(capped=False)) == ALL_FLAGS.split()[1:]
    assert bf16_units() == ("avx512_bf16" in expected)


def test_isa_cap_compiles_in_f32_and_tunes_apart(sapphire_rapids):
    """A bf16 CPU held below bf16 must not get bf16 compute (OpenVINO 2026.4 reads CPUID, picks bf16
    and crashes in the capped kernels), and its tuning is not the uncapped CPU's."""
    import openvino as ov

    from devices.openvino_compile import compile_config
    from devices.openvino_tuning import machine_key

    assert "INFERENCE_PRECISION_HINT" not in compile_config(OV_CPU)
    uncapped = machine_key()
    sapphire_rapids.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert "INFERENCE_PRECISION_HINT" not in compile_config(OV_CPU)  # bf16 kernels stay allowed
    sapphire_rapids.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert compile_config(OV_CPU)["INFERENCE_PRECISION_HINT"] == ov.Type.f32
    assert compile_config("openvino:NPU")["INFERENCE_PRECISION_HINT"] == ov.Type.f16  # only the CPU is capped
    assert machine_key() != uncapped and machine_key().endswith("ONEDNN_MAX_CPU_ISA=AVX2")


def test_benchmark_sections_keep_cpu_classes_apart(sapphire_rapids, tmp_path):
    """A plain AVX2 board, an emulated one and an AVX-512 machine each write their own BENCHMARKS.md
    section: none of them may overwrite another's figures."""
    import devices.probe

    sapphire_rapids.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _common import isa_section

    assert isa_section("Training") == "Training"
    sapphire_rapids.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert isa_section("Training") == "Training (oneDNN held to AVX2)"
    sapphire_rapids.delenv("ONEDNN_MAX_CPU_ISA")
    avx2 = tmp_path / "avx2-cpuinfo"
    avx2.write_text("processor\t: 0\nmodel name\t: Fake EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n")
    sapphire_rapids.setattr(devices.probe, "CPUINFO", str(avx2))
    assert isa_section("Training") == "Training (plain AVX2 CPU)"


def test_engine_runs_under_an_avx2_cap(tmp_path):
    """Under an AVX2 cap the backbone runs (it segfaulted in bf16) and its f32 features follow this
    CPU's own (bf16 where it has bf16 units). A fresh process each: oneDNN reads the cap once."""
    script = (
        "import numpy as np\n"
        "from toolkit.features import create_engine\n"
        "e = create_engine('efficientnet_lite0', 'openvino', 'CPU')\n"
        "x = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)\n"
        "np.save('OUT', e.extract(x))\n"
    )
    feats = {}
    for cap in ("AVX2", None):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        out = tmp_path / f"{cap}.npy"
        done = subprocess.run([sys.executable, "-c", script.replace("OUT", str(out))], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        feats[cap] = np.load(out)
    a, b = feats["AVX2"], feats[None]  # b in bf16 where this CPU has it: close, not equal
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.99, cosine


def test_compile_model_on_cpu_writes_cache(tmp_path):
    from devices.openvino_compile import with_static_batch, compile_model

    model = tiny_ov_model()
    cache = tmp_path / "cache"
    compiled = compile_model(model, "openvino:CPU", cache_dir=cache, latency=True)
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    assert compiled(np.ones((2, 3, 8, 8), np.float32))[0].shape == (2, 4, 8, 8)
    assert any(cache.iterdir()), "CPU plugin supports EXPORT_IMPORT: a blob is cached"

    static = with_static_batch(model, 5)  # what an NPU gets
    assert str(static.input(0).get_partial_shape()) == "[5,3,8,8]"
    assert model.input(0).get_partial_shape().is_dynamic  # the caller's model is untouched


def test_static_shape_refuses_dynamic_image_size():
    import openvino as ov
    from openvino import opset13 as ops

    from devices.openvino_compile import with_static_batch

    x = ops.parameter([-1, 3, -1, -1], ov.Type.f32, name="x")
    with pytest.raises(DeviceError, match="fixed image size"):
        with_static_batch(ov.Model([ops.relu(x)], [x], "dyn"), None)


# --- CLI ----------------------------------------------------------------------------------------

def cli_group() -> click.Group:
    group = click.Group("edgetune")
    group.add_command(devices_command)

    @group.command("echo-device")
    @device_option()
    def echo_device(device):
        click.echo(device)

    return group


def test_cli_devices_json(real):
    result = CliRunner().invoke(cli_group(), ["devices", "--json"])
    assert result.exit_code == 0, result.output
    objects = json.loads(result.stdout)
    assert {"cpu", "openvino:CPU", "ort:CPUExecutionProvider"} <= {o["id"] for o in objects}
    for obj in objects:
        assert {"runtime", "kind", "id", "name", "uses", "precisions"} <= set(obj)
        assert obj["runtime"] in ("torch", "openvino", "onnxruntime") and obj["kind"] in ("CPU", "GPU", "NPU")


def test_cli_devices_table(real):
    result = CliRunner().invoke(cli_group(), ["devices"])
    assert result.exit_code == 0, result.output
    assert "openvino:CPU" in result.output and "runtime" in result.output


def test_device_option():
    runner = CliRunner()
    assert runner.invoke(cli_group(), ["echo-device"]).output.strip() == "auto"
    npu = runner.invoke(cli_group(), ["echo-device", "--device", "openvino:npu"])
    assert npu.output.strip() == "openvino:NPU"
    bad = runner.invoke(cli_group(), ["echo-device", "--device", "gpu"])
    assert bad.exit_code == 2 and "Accepted forms" in bad.output
    assert "openvino:NPU" in runner.invoke(cli_group(), ["echo-device", "--help"]).output


def test_import_is_light():
    code = (
        "import sys, devices, devices.commands, devices.openvino_compile\n"
        "heavy = [m for m in ('torch', 'openvino', 'onnxruntime', 'rich') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert devices.devices_command.name == 'devices'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.parametrize("wheel, plugin, cpu_only", [
    ("2.13.0+cpu", False, True), ("2.13.0+cpu", True, False),  # torch_npu adds Ascend NPUs to a CPU wheel
    ("2.13.0+cu126", False, False), ("2.13.0+rocm6.3", False, False), ("2.13.0+xpu", False, False),
    ("2.13.0", False, False),  # PyPI's default Linux wheel is the CUDA one; macOS wheels have MPS
])
def test_torch_probe_knows_a_cpu_only_wheel_without_importing_torch(monkeypatch, wheel, plugin, cpu_only):
    import importlib.metadata
    import importlib.util

    from devices.torch_probe import cpu_only_wheel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "version", lambda name: wheel)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if plugin else None) if name == "torch_npu" else real(name, *a))
    assert cpu_only_wheel() is cpu_only


def test_device_probe_imports_torch_only_where_it_has_more_than_the_cpu():
    code = ("import sys\n"
            "from devices.probe import detect_devices\n"
            "from devices.torch_probe import cpu_only_wheel\n"
            "found = detect_devices()\n"
            "assert any(d.id == 'cpu' for d in found.devices), found\n"
            "print(cpu_only_wheel(), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cpu_only, imported = out.stdout.split()[-2:]
    assert imported == str(cpu_only != "True")
