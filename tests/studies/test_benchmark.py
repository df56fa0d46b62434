"""The benchmark measures and reports what it says, on machines without TensorFlow; the
backend's tables (peak FLOP/s, compiler options, dtypes) answer as documented."""

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, need_torch

from alexnet_jax.model import backend
from alexnet_jax.model.alexnet import AlexNet
from alexnet_jax.studies import benchmark


def test_train_flops_are_the_papers():
  assert benchmark.train_flops_per_image(AlexNet(), 227) == pytest.approx(4.346e9, rel=1e-3)
  # Only the shapes count: the one-tower torchvision net has its own figure.
  assert benchmark.train_flops_per_image(AlexNet(variant="torchvision"), 224) == pytest.approx(
    6 * 714.2e6, rel=1e-3
  )


def test_peaks_by_device_kind():
  assert backend.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert backend.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert backend.peak_flops("TPU v5 lite", "float32") is None  # not in the table: MFU left out
  assert backend.peak_flops("cpu", "float32") is None


def test_unsupported_dtype_is_named(monkeypatch):
  backend.check_dtype("bfloat16")  # the CPU computes in bfloat16

  def refuse(*args, **kwargs):
    raise NotImplementedError("no bf16 convolutions here")

  monkeypatch.setattr(jax.lax, "conv_general_dilated", refuse)
  with pytest.raises(
    ValueError, match="bfloat16 is not supported on cpu .*no bf16 convolutions here; use float32"
  ):
    backend.check_dtype("bfloat16")


@pytest.mark.parametrize(
  "case, message",
  [
    (
      benchmark.Case("2x1", "float32", 3),
      "batch 3 does not divide over mesh 2x1's data axis of size 2",
    ),
    (benchmark.Case("3x3", "float32", 9), "mesh 3x3 needs 9 devices; this process has 8"),
    (benchmark.Case("two", "float32", 2), "use 'none' or DATAxMODEL"),
    (
      benchmark.Case("none", "float32", 2, compiler_options="fast"),
      "unknown compiler option set 'fast': use one of xla, eigen_conv, no_ynnpack",
    ),
  ],
)
def test_bench_bad_cases_are_named(case, message):
  with pytest.raises(ValueError, match=message):
    benchmark.build(case, "paper", 67)


@pytest.mark.long  # 30 s; the bench command's own test (slow) covers the report's form
def test_bench_report_without_a_known_peak_leaves_mfu_out():
  report = benchmark.run([benchmark.Case("1x2", "float32", 2, "plain")], "paper", 67, 1, 0.01)
  (result,) = report["results"]
  assert report["images_per_sec"] == result["images_per_sec"] > 0
  assert "no peak FLOP/s known for 'cpu'" in report["mfu_note"] and "mfu" not in result
  assert report["peak_memory_gb"] == "not available on cpu" and result["memory_gb"] > 0
  assert result["ops_impl"] == "plain" and result["train_ratio_to_first"] == 1.0
  assert "| 1x2 | float32 | 2 | plain | backend |" in benchmark.markdown(report)


def run_command(run: str, args: list[str], no_torch: bool = False) -> list[str]:
  """Runs `run` (a runpy call) as a command with `args` on 2 simulated devices; its stdout lines.

  Afterwards, in the same process, it asserts that neither TensorFlow nor the configs were
  loaded; `no_torch` makes `import torch` fail as on a machine without it."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  script = (
    "import runpy, sys\nsys.argv = sys.argv[1:]\n"
    + ("sys.modules['torch'] = None\n" if no_torch else "")
    + f"try:\n  {run}\nexcept SystemExit as e:\n  assert not e.code, e.code\n"
    "assert not {'tensorflow', 'ml_collections'} & set(sys.modules)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script, "command"] + args,
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()


@pytest.mark.slow
def test_bench_command_prints_json_last_and_imports_no_tensorflow():
  lines = run_command(
    "runpy.run_module('alexnet_jax.bench', run_name='__main__', alter_sys=True)",
    [
      "--batch_size=2",
      "--image_size=67",
      "--dtype=bfloat16",
      "--rounds=1",
      "--round_seconds=0.01",
      "--peak_tflops=1",
      "--compiler_options=backend,no_ynnpack",
    ],
  )
  report = json.loads(lines[-1])
  assert report["results"][0]["dtype"] == "bfloat16" and report["results"][0]["mfu"] > 0
  assert any(line.startswith("| none | bfloat16 | 2 | fast | backend |") for line in lines)
  assert any(line.startswith("| none | bfloat16 | 2 | fast | no_ynnpack |") for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("no_torch", [True, False])
def test_cpu_vs_torch_times_torch_only_where_installed(no_torch):
  """Both dtypes on both sides (eager only: torch.compile's compilation takes minutes), or
  without torch two of our option sets; the CPU's features as /proc/cpuinfo lists them, ratios
  against PyTorch's fastest side."""
  if not no_torch:
    need_torch()
  lines = run_command(
    "runpy.run_path('benchmarks/cpu_vs_torch.py', run_name='__main__')",
    [
      "--train_batch_size=2",
      "--eval_batch_size=4",
      "--torch_modes=eager",
      "--rounds=1",
      "--round_seconds=0.01",
    ]
    # Without torch: float32 with two option sets, every side counted as too slow for rounds
    # (timed once and said so).
    + (
      ["--max_step_seconds=0", "--dtypes=float32", "--compiler_options=backend,no_ynnpack"]
      if no_torch
      else []
    ),
    no_torch=no_torch,
  )
  report = json.loads(lines[-1])
  ours = (
    {"ours float32", "ours float32 no_ynnpack"} if no_torch else {"ours float32", "ours bfloat16"}
  )
  assert report["batch_size"] == {"train": 2, "eval": 4} and report["jax"] == jax.__version__
  with open("/proc/cpuinfo") as f:
    has = set(f.read().split())
  listed = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
  assert report["cpu"]["features"] == [f for f in listed if f in has]
  assert lines[0].startswith("CPU: ") and f"jax {jax.__version__}" in lines[1]
  for name in ours:
    r = report["results"][name]
    assert r["train_images_per_sec"] > 0 and r["eval_images_per_sec"] > 0, r
  if no_torch:
    assert set(report["results"]) == ours and report["torch"] is None
    assert report["torch_best"] == {"train": None, "eval": None}
    assert report["results"]["ours float32"]["train_x_torch_best"] is None
    assert "torch not installed: no baseline" in lines[1]
    assert all(r["train_timed_once"] and r["eval_timed_once"] for r in report["results"].values())
    assert "| ours float32 | " in lines[4] and " (once) | - |" in lines[4]
  else:
    assert set(report["results"]) == ours | {"torch eager float32", "torch eager bf16 autocast"}
    assert not report["results"]["ours float32"]["train_timed_once"]  # timed in the rounds
    for work in ("train", "eval"):
      best = report["torch_best"][work]
      assert report["results"][best][f"{work}_x_torch_best"] == 1.0
      assert report["results"]["ours float32"][f"{work}_x_torch_best"] > 0
    assert any(line.startswith("train: our best (ours ") for line in lines)


@pytest.mark.slow
def test_conv1_forms_are_checked_equal_then_timed():
  lines = run_command(
    "runpy.run_path('benchmarks/conv1_forms.py', run_name='__main__')",
    ["--batch_size=1", "--rounds=1", "--round_seconds=0.01"],
  )
  report = json.loads(lines[-1])
  assert set(report["results"]) == {
    f"{form} {p}"
    for form in ("conv", "patches", "space_to_depth")
    for p in ("forward", "kernel gradient")
  }
  assert report["results"]["conv forward"]["x_conv"] == 1.0
  assert all(r["ms"] > 0 for r in report["results"].values())


@pytest.mark.slow  # a process of its own (JAX's import)
@pytest.mark.parametrize(
  "arg, message",
  [
    (
      "--compiler_options=backend,fast",
      "--compiler_options: unknown fast; use some of backend, xla,",
    ),
    ("--torch_modes=eager,jit", "--torch_modes: unknown jit; use some of eager, compile"),
  ],
)
def test_cpu_vs_torch_bad_choices_are_one_line_before_any_work(arg, message):
  out = subprocess.run(
    [sys.executable, "benchmarks/cpu_vs_torch.py", arg],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1 and out.stdout == ""
  assert out.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), out.stderr[-500:]
