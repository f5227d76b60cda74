"""scripts/real_architectures.py: the published architectures are written down right (parameter
counts of the published checkpoints, built on the meta device: no memory, no download), and the
SD 1.5 and SDXL training-free rows run (slow: full-size models at a small image size)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_architectures.py"
sys.path.insert(0, str(SCRIPT.parent))  # its helper modules (real_arch_rows, real_arch_table), in any test order
# Parameter counts of the published checkpoints (UNet, VAE, text encoder(s)), as diffusers /
# transformers count them when loading runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
# and stabilityai/stable-diffusion-xl-base-1.0.
PUBLISHED = {
    "sd15": (859_520_964, 83_653_863, (123_060_480,)),
    "sd21": (865_910_724, 83_653_863, (340_387_840,)),
    "sdxl": (2_567_463_684, 83_653_863, (123_060_480, 694_659_840)),
}


def _script():
    spec = importlib.util.spec_from_file_location("real_architectures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_have_the_published_parameter_counts(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = _script().ARCHITECTURES[name]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae)
        texts = [(CLIPTextModelWithProjection if index else CLIPTextModel)(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))
            for index, config in enumerate(arch.text_encoders)]
    assert (_count(unet), _count(vae), tuple(_count(t) for t in texts)) == PUBLISHED[name]
    assert arch.scheduler["prediction_type"] == ("v_prediction" if name == "sd21" else "epsilon")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "jobs"), [("sd15", 2), ("sdxl", 1)])
def test_training_free_rows_run_on_the_real_architecture(name, jobs):
    """Every training-free row at 64 px (SD 1.5 through the two-process path the table uses)."""
    module = _script()
    table, results = module.run_architecture(name, size=64, batches=(2,), jobs=jobs)
    failed = [(r["row"], r["error"]) for r in results if r["error"]]
    assert not failed, failed
    assert len(results) == 16 + (jobs > 1) and "| plain | 2 | yes |" in table  # + the second process's plain
    assert any(r["row"].startswith("IP-Adapter") for r in results)
    inversion = next(r for r in results if r["row"].startswith("DDPM inversion"))
    bound = 1e-4 if name != "sdxl" else 1e-2  # exact up to rounding: float32, or bfloat16 (unit roundoff 3.9e-3)
    assert float(inversion["note"].rsplit(" ", 1)[-1]) < bound


# -- fast: the rows on a tiny pipeline, the table writer, the options (no big model) -------------


def _result(row, batch=2, cpu_s=10.0, peak_mb=100.0, process=0, error=None, **extra):
    return {"row": row, "batch": batch, "cpu_s": cpu_s, "wall_s": cpu_s / 2, "peak_mb": peak_mb,
            "peak_total_mb": extra.get("peak_total_mb"), "error": error, "note": "", "process": process}


BUILD = {"build_s": 1.0, "rss_mb": 4000.0, "gpu_mb": 3000.0, "params": "unet 860M"}


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_sdxl"])
def test_every_training_free_row_runs_on_a_tiny_pipeline(name, request, tmp_path):
    _script()
    from real_arch_rows import make_inputs, measure, training_free_rows

    pipe = request.getfixturevalue(name)
    rows = training_free_rows(pipe, make_inputs(pipe, 32, tmp_path), 32, (2, 3), steps=2)
    results = measure(rows)
    assert [(r["row"], r["error"]) for r in results if r["error"]] == []
    assert results[0]["row"] == "plain" and any(r["row"].startswith("IP-Adapter") for r in results)
    assert [r.label for r in rows if r.growth] == ["StyleAligned, batch 2", "consistent subject (subject mode), batch 2",
                                                   "StyleAligned, batch 3", "consistent subject (subject mode), batch 3"]
    assert float(next(r for r in results if r["row"].startswith("DDPM"))["note"].rsplit(" ", 1)[-1]) < 1e-4


def test_the_growth_process_builds_only_what_its_rows_need(tiny_sd, tmp_path):
    _script()
    from real_arch_rows import make_inputs, training_free_rows

    inputs = make_inputs(tiny_sd, 32, tmp_path, full=False)
    assert set(inputs) == {"image"}
    rows = training_free_rows(tiny_sd, inputs, 32, (2, 4))
    assert [r.label for r in rows if not r.growth] == ["plain"] and len(rows) == 5


def test_two_processes_share_the_rows_by_image_count():
    module = _script()
    from real_arch_rows import row_plan, split_rows

    rows = row_plan((2, 4, 8))
    first, second = split_rows(rows, 2)
    assert first[0] == second[0] == "plain"
    assert sorted(first[1:] + second[1:]) == sorted(r.label for r in rows[1:])  # every row once
    images = {r.label: r.batch for r in rows}
    assert abs(sum(images[label] for label in first[1:]) - sum(images[label] for label in second[1:])) <= 1
    assert split_rows(rows, 2) == [first, second]  # parent and children agree
    results = [_result(label, process=index) for index, part in enumerate((second, first)) for label in part]
    ordered = [r["row"] for r in module.in_table_order(results, rows)]
    assert ordered[:2] == ["plain", "plain"] and ordered[2:] == [r.label for r in rows[1:]]


def test_ratios_are_to_the_plain_row_of_the_same_process():
    from real_arch_table import markdown

    results = [_result("plain", cpu_s=10.0), _result("LoRA", cpu_s=15.0),
               _result("plain", cpu_s=20.0, process=1), _result("StyleAligned, batch 4", 4, cpu_s=40.0, process=1),
               _result("ControlNet", error="RuntimeError: boom", peak_mb=None)]
    table = markdown("SD 1.5", 256, 512, "float32", 2, results, BUILD)
    assert "| LoRA | 2 | yes | 15.0 | 1.50 | 100 |" in table
    assert "| plain (second process) | 2 | yes | 20.0 | 1.00 |" in table
    assert "| StyleAligned, batch 4 | 4 | yes | 40.0 | 2.00 |" in table
    assert "| ControlNet | 2 | **no**: RuntimeError: boom | 10.0 |  |  |" in table
    assert "peak extra RSS (MB)" in table and "on CPU" in table


def test_the_cuda_table_has_seconds_per_image_peak_vram_and_the_gpu_name():
    from real_arch_table import markdown

    results = [_result("plain", cpu_s=4.0, peak_total_mb=9000.0),
               _result("StyleAligned, batch 8", 8, cpu_s=16.0, peak_total_mb=15000.0)]
    table = markdown("SDXL", 1024, 1024, "float16", 20, results, BUILD, "cuda", "NVIDIA H200")
    assert "on NVIDIA H200" in table and "allocated 3000 MB" in table
    assert "| s / image | x plain (per image) | peak VRAM (MB) | peak extra VRAM (MB) |" in table
    assert "| plain | 2 | yes | 1.00 | 1.00 | 9000 | 100 |" in table  # wall 2 s / 2 images
    assert "| StyleAligned, batch 8 | 8 | yes | 1.00 | 1.00 | 15000 | 100 |" in table  # 8 s / 8 images, per image
    without = markdown("SDXL", 1024, 1024, "float16", 20, results, BUILD, "cuda", "NVIDIA H200", ratios=False)
    assert "x plain" not in without and "| StyleAligned, batch 8 | 8 | yes | 1.00 | 15000 | 100 |" in without


def test_memory_growth_per_image_and_its_extrapolation_to_the_native_size():
    from real_arch_table import extrapolated_per_image_mb, growth_summary, per_image_growth

    results = [_result(f"StyleAligned, batch {n}", n, peak_mb=300.0 + 250.0 * n) for n in (2, 4, 8)]
    results += [_result("consistent subject (subject mode), batch 2", 2, peak_mb=500.0),
                _result("consistent subject (subject mode), batch 4", 4, error="OOM", peak_mb=None)]
    slopes = per_image_growth(results)
    assert slopes["StyleAligned"][0] == pytest.approx(250.0) and slopes["StyleAligned"][1] == [2, 4, 8]
    assert "consistent subject (subject mode)" not in slopes  # one measured batch: no slope
    assert extrapolated_per_image_mb(250.0, 512, 1024) == pytest.approx(1000.0)
    summary = growth_summary(results, 512, 1024)
    assert "250 MB per image at 512 px" in summary and "1.0 GB per image at 1024 px" in summary
    assert "extrapolation" in summary


def test_device_and_size_options(monkeypatch):
    module = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["--arch", "sd15", "--device", "cuda"], ["--arch", "sd15", "--device", "tpu"],
                 ["--arch", "sd15", "--size", "100"], ["--arch", "sd15", "sdxl", "--row", "plain"]):
        with pytest.raises(SystemExit):
            module.parse_args(argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        module.parse_args(["--arch", "sd15", "--device", "cuda", "--jobs", "2"])
    args = module.parse_args(["--device", "cuda", "--arch", "sd15", "sd21", "sdxl", "--rows", "all", "--steps", "20"])
    assert args.arch == ["sd15", "sd21", "sdxl"] and args.steps == 20
    native = [module.Settings.make(name, device="cuda") for name in args.arch]
    assert [(s.size, s.dtype) for s in native] == [(512, torch.float16), (768, torch.float16), (1024, torch.float16)]
    reduced = [module.Settings.make(name) for name in args.arch]
    assert [(s.size, s.dtype) for s in reduced] == [(256, torch.float32), (256, torch.float32), (512, torch.bfloat16)]
    child = module.Settings.make("sdxl", 512, "cpu", 2, (2, 4), ("batch",))
    again = module.parse_args(child.argv() + ["--group", "1"])
    assert module.Settings.make(again.arch[0], again.size, again.device, again.steps, tuple(again.batches),
                                tuple(again.only)) == child


def test_a_childs_log_gives_its_rows_and_build_record(tmp_path):
    module = _script()
    log = tmp_path / "growth.log"
    row = _result("plain")
    log.write_text("noise\n" + module.RESULT_PREFIX + json.dumps(row) + "\nTraceback ...\n"
                   + module.BUILD_PREFIX + json.dumps(BUILD) + "\n", encoding="utf-8")
    assert module._parse(log) == ([row], BUILD)


def test_a_child_process_measures_its_share_of_the_rows(tiny_sd, monkeypatch):
    module = _script()
    from real_arch_rows import split_rows

    monkeypatch.setattr(module, "build", lambda settings, training=False: (tiny_sd, BUILD))
    settings = module.Settings.make("sd15", 32, batches=(2,))
    reported = []
    results, record = module.run_rows(settings, 1, 2, report=reported.append)
    assert sorted(r["row"] for r in results) == sorted(split_rows(module.kept_rows(settings), 2)[1])
    assert reported == results and record == BUILD and not any(r["error"] for r in results)
