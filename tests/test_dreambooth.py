"""DreamBooth on tiny pipelines: learning, prior preservation, resume, outputs, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from _finetune_data import instance_folder, one_thread
from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.training.data import load_image_set
from consistent_diffusion.training.diffusion import encode_text
from consistent_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask, train_dreambooth
from consistent_diffusion.training.loop import run_training, step_generator

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # the fixture, imported


def fixed_batch_loss(task, seed: int = 1234) -> float:
    """Loss on one fixed batch (fixed images, timesteps and noise)."""
    with torch.no_grad():
        return float(task.loss(0, step_generator(seed, 0), CPU)[0])


def config(tmp_path, **overrides) -> DreamBoothConfig:
    options = dict(
        out=tmp_path / "run", instance_dir=instance_folder(tmp_path), instance_prompt="a photo of sks emoji",
        class_prompt="an emoji", steps=4, checkpoint_every=2, learning_rate=1e-3, progress=False,
    )
    options.update(overrides)
    return DreamBoothConfig(**options)


def test_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="instance_prompt"):
        config(tmp_path, instance_prompt=" ")
    with pytest.raises(ConfigError, match="class prompt"):
        config(tmp_path, prior_preservation=True, class_prompt=None)
    with pytest.raises(ConfigError, match="steps"):
        config(tmp_path, steps=0)
    with pytest.raises(ConfigError, match="mixed_precision"):
        config(tmp_path, mixed_precision="fp8")


def test_instance_images_any_mode_and_corrupt_files_named(tmp_path):
    folder = instance_folder(tmp_path, corrupt=True)
    with pytest.warns(UserWarning, match="broken.png"):
        loaded = load_image_set(folder, 32)
    assert len(loaded.images) == 3 and all(im.size == (32, 32) and im.mode == "RGB" for im in loaded.images)
    assert [p.name for p, _ in loaded.skipped] == ["broken.png"]
    empty = tmp_path / "only_broken"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"garbage")
    with pytest.raises(ImageInputError, match="x.png"), pytest.warns(UserWarning):
        load_image_set(empty, 32)


def test_encode_text_matches_pipeline(tiny_sd, tiny_sdxl):
    for pipe in (tiny_sd, tiny_sdxl):
        with torch.no_grad():
            ours, pooled = encode_text(pipe, ["a red circle", "sks"])
            reference = pipe.encode_prompt(prompt="a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
            assert torch.allclose(ours[:1], reference[0], atol=1e-6)
            if pooled is not None:
                assert torch.allclose(pooled[:1], reference[2], atol=1e-6)


def test_few_steps_change_weights_lower_loss_and_write_a_usable_model(tiny_sd, tmp_path):
    from consistent_diffusion.models.loading import load_pipeline

    cfg = config(tmp_path, prior_preservation=True, num_class_images=2, class_steps=2,
                 validation_prompts=("a photo of sks emoji",), validation_steps=2)
    task = DreamBoothTask(tiny_sd, cfg)
    before_weights = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    before = fixed_batch_loss(task)
    result = run_training(task, cfg, "dreambooth")
    assert fixed_batch_loss(task) < before
    changed = [k for k, v in tiny_sd.unet.state_dict().items() if not torch.equal(v, before_weights[k])]
    assert len(changed) > 0.5 * len(before_weights)
    out = cfg.out
    assert len(list((out / "class_images").rglob("class_*.png"))) == 2
    assert (out / "validation" / "step_000002" / "00.png").is_file()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "prior_loss" in json.loads((out / "log.jsonl").read_text().splitlines()[0])
    trained = load_pipeline(str(result.result))
    for name, value in trained.unet.state_dict().items():
        assert torch.equal(value, tiny_sd.unet.state_dict()[name])
    image = trained("a photo of sks emoji", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (32, 32)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    from consistent_diffusion.testing import tiny_sd_pipeline

    straight = tiny_sd_pipeline()
    cfg = config(tmp_path / "a", prior_preservation=True, num_class_images=2, class_steps=2)
    reference = train_dreambooth(cfg, straight)
    assert reference.step == 4

    class Killed(Exception):
        pass

    def kill_at_3(step: int, loss: float) -> None:
        if step == 3:  # after step 3, before its checkpoint would be written at 4
            raise Killed

    cfg_b = config(tmp_path / "b", prior_preservation=True, num_class_images=2, class_steps=2)
    with pytest.raises(Killed):
        train_dreambooth(cfg_b, tiny_sd_pipeline(), on_step_end=kill_at_3)
    class_files = sorted((cfg_b.out / "class_images").rglob("class_*.png"))
    stamps = [p.stat().st_mtime_ns for p in class_files]
    with pytest.raises(ConfigError, match="--resume"):
        train_dreambooth(config(tmp_path / "b", prior_preservation=True, num_class_images=2, class_steps=2),
                         tiny_sd_pipeline())
    with pytest.raises(ConfigError, match="learning_rate"):
        train_dreambooth(config(tmp_path / "b", prior_preservation=True, num_class_images=2, class_steps=2,
                                resume=True, learning_rate=5e-4), tiny_sd_pipeline())
    resumed_pipe = tiny_sd_pipeline()
    steps_seen = []
    resumed = train_dreambooth(
        config(tmp_path / "b", prior_preservation=True, num_class_images=2, class_steps=2, resume=True),
        resumed_pipe, on_step_end=lambda step, loss: steps_seen.append(step),
    )
    assert steps_seen == [3, 4], "resumes after the last checkpoint (step 2)"
    assert resumed.losses == reference.losses[2:]
    for name, value in straight.unet.state_dict().items():
        assert torch.equal(value, resumed_pipe.unet.state_dict()[name]), name
    assert [p.stat().st_mtime_ns for p in class_files] == stamps, "class images are reused, not regenerated"


def test_text_encoder_training_changes_it(tiny_sd, tmp_path):
    cfg = config(tmp_path, steps=2, train_text_encoder=True)
    before = {k: v.clone() for k, v in tiny_sd.text_encoder.state_dict().items()}
    train_dreambooth(cfg, tiny_sd)
    assert any(not torch.equal(v, before[k]) for k, v in tiny_sd.text_encoder.state_dict().items())


def test_sdxl_dreambooth_steps_lower_loss(tiny_sdxl, tmp_path):
    cfg = config(tmp_path, steps=3, checkpoint_every=3)
    task = DreamBoothTask(tiny_sdxl, cfg)
    before = fixed_batch_loss(task)
    run_training(task, cfg, "dreambooth")
    assert fixed_batch_loss(task) < before


def test_cli_dreambooth(tiny_sd_folder, tmp_path, capsys):
    from consistent_diffusion.cli.main import main

    argv = ["train", "dreambooth", "--model", str(tiny_sd_folder), "--instance-dir", str(instance_folder(tmp_path)),
            "--instance-prompt", "sks emoji", "--out", str(tmp_path / "cli"), "--steps", "2", "--checkpoint-every", "2",
            "--validation-steps", "2", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert (tmp_path / "cli" / "model" / "model_index.json").is_file()
    assert "use it with --model" in capsys.readouterr().out
    generate = ["generate", "--model", str(tiny_sd_folder), "--prompt", "sks emoji", "--seeds", "0", "--steps", "2"]
    assert main([*generate, "--dreambooth", str(tmp_path / "cli"), "--out", str(tmp_path / "with")]) == 0
    assert main([*generate, "--out", str(tmp_path / "without")]) == 0
    manifest = json.loads((tmp_path / "with" / "manifest.json").read_text())
    assert [m["name"] for m in manifest["methods"]] == ["dreambooth"]
    assert main(argv) == 2, "an existing run needs --resume"
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "dreambooth", "--instance-dir", "x", "--instance-prompt", "p", "--out", "o",
                 "--dtype", "float16"]) == 2
    assert "mixed-precision" in capsys.readouterr().err


def test_signal_checkpoints_and_stops_then_resume_finishes(tmp_path):
    import os
    import signal

    from consistent_diffusion.testing import tiny_sd_pipeline

    def interrupt_at_1(step: int, loss: float) -> None:
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # like Ctrl-C: finish the step, checkpoint, stop

    cfg = config(tmp_path, checkpoint_every=10)
    stopped = train_dreambooth(cfg, tiny_sd_pipeline(), on_step_end=interrupt_at_1)
    assert stopped.stopped and stopped.step == 1 and stopped.result is None
    assert (cfg.out / "checkpoints" / "step_000001.pt").is_file()
    finished = train_dreambooth(config(tmp_path, checkpoint_every=10, resume=True), tiny_sd_pipeline())
    assert finished.step == 4 and len(finished.losses) == 3 and finished.result is not None


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory):
    """A 2-step DreamBooth run (UNet and text encoder) on the tiny SD pipeline: (run folder, its images)."""
    from consistent_diffusion.testing import tiny_sd_pipeline

    tmp_path = tmp_path_factory.mktemp("dreambooth_method")
    pipe = tiny_sd_pipeline()
    result = train_dreambooth(config(tmp_path, steps=2, checkpoint_every=2, learning_rate=1e-2, train_text_encoder=True), pipe)
    return result.out, _sample(pipe)


def _sample(pipe, prompt: str = "a photo of sks emoji"):
    generator = [torch.Generator().manual_seed(0)]
    return pipe(prompt=[prompt], generator=generator, num_inference_steps=2, output_type="np").images


def test_dreambooth_method_swaps_the_weights_in_and_restores_them(dreambooth_run, tiny_sd):
    from consistent_diffusion.methods.base import GenerationContext, get_method
    from consistent_diffusion.methods.dreambooth import DreamBooth

    run, trained_images = dreambooth_run
    state = {k: v.clone() for k, v in tiny_sd.unet.state_dict().items()}
    text_state = {k: v.clone() for k, v in tiny_sd.text_encoder.state_dict().items()}
    base_images = _sample(tiny_sd)
    method = get_method("dreambooth", model=str(run))
    assert isinstance(method, DreamBooth)
    ctx = GenerationContext(pipe=tiny_sd, prompts=["a photo of sks emoji"], negative_prompts=None, generators=[])
    with method.applied(ctx):
        swapped = _sample(ctx.pipe)
    assert abs(swapped - trained_images).max() < 1e-5, "the base pipeline with DreamBooth weights = the trained pipeline"
    assert abs(swapped - base_images).max() > 1e-3
    assert all(torch.equal(v, state[k]) for k, v in tiny_sd.unet.state_dict().items()), "UNet restored exactly"
    assert all(torch.equal(v, text_state[k]) for k, v in tiny_sd.text_encoder.state_dict().items())
    assert abs(_sample(tiny_sd) - base_images).max() == 0


def test_dreambooth_method_under_a_lora_adapter_and_errors(dreambooth_run, tiny_sd, tiny_sdxl, tmp_path):
    from consistent_diffusion.methods.base import GenerationContext
    from consistent_diffusion.methods.dreambooth import DreamBooth
    from consistent_diffusion.training.lora import add_lora

    run, trained_images = dreambooth_run
    add_lora(tiny_sd.unet, rank=2, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0"))  # zero-init B: no effect yet
    ctx = GenerationContext(pipe=tiny_sd, prompts=["a photo of sks emoji"], negative_prompts=None, generators=[])
    with DreamBooth(model=str(run / "model")).applied(ctx):  # x.to_q.weight lands in x.to_q.base_layer.weight
        assert abs(_sample(ctx.pipe) - trained_images).max() < 1e-5
    with pytest.raises(ConfigError, match="another base model"), DreamBooth(model=str(run)).applied(
            GenerationContext(pipe=tiny_sdxl, prompts=["x"], negative_prompts=None, generators=[])):
        pass
    with pytest.raises(FileNotFoundError, match="DreamBooth run folder"):
        DreamBooth(model=str(tmp_path))


def _fake_dreambooth_folder(folder, value: float):
    """A minimal pipeline folder whose unet holds one tensor (what ``load_component_weights`` reads)."""
    from safetensors.torch import save_file

    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}", encoding="utf-8")
    save_file({"w": torch.full((2,), value)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_dreambooth_weight_cache_keys_on_the_weight_files(tmp_path):
    import os

    from consistent_diffusion.methods.dreambooth import load_component_weights

    _fake_dreambooth_folder(tmp_path, 1.0)
    assert float(load_component_weights(tmp_path)["unet"]["w"][0]) == 1.0
    folder_stat = (tmp_path / "unet").stat()
    _fake_dreambooth_folder(tmp_path, 2.0)  # the file is rewritten in place: the folder's mtime may not move
    os.utime(tmp_path / "unet", ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse clocks: force a new mtime
    assert float(load_component_weights(tmp_path)["unet"]["w"][0]) == 2.0, "a retrained model must not be served stale"
