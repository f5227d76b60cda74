import json

import pytest
import torch

from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.models.loading import load_pipeline, model_identity, parse_dtype, set_scheduler


@pytest.mark.parametrize(("fixture", "class_name"), [("tiny_sd_folder", "StableDiffusionPipeline"),
                                                     ("tiny_sdxl_folder", "StableDiffusionXLPipeline")])
def test_folder_loads_detected_class_with_identity(request, fixture, class_name):
    folder = request.getfixturevalue(fixture)
    pipe = load_pipeline(str(folder))
    assert type(pipe).__name__ == class_name
    identity = model_identity(pipe)
    assert identity.kind == "folder"
    assert identity.pipeline_class == class_name
    assert len(identity.fingerprint) == 64
    assert pipe.unet.dtype == torch.float32


def test_fingerprint_changes_when_weights_change(tmp_path):
    from consistent_diffusion.testing import save_tiny_pipeline

    first = model_identity(load_pipeline(str(save_tiny_pipeline(tmp_path / "a", seed=0)))).fingerprint
    second = model_identity(load_pipeline(str(save_tiny_pipeline(tmp_path / "b", seed=1)))).fingerprint
    assert first != second


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model not found"):
        load_pipeline(str(tmp_path / "nope" / "model"))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ModelNotFoundError, match="unsupported model file type"):
        load_pipeline(str(path))


def test_hub_id_offline_fails_fast_with_local_folder_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError) as raised:
        load_pipeline("someone/not-cached-model")
    message = str(raised.value)
    assert "--model DIR" in message and "not in the local Hugging Face cache" in message
    assert raised.value.__cause__ is None  # no stack trace from deep inside huggingface_hub


def test_unknown_scheduler_names_accepted_ones(tiny_sd):
    with pytest.raises(ConfigError, match="accepted: ddim"):
        set_scheduler(tiny_sd, "fancy")


def test_set_scheduler_keeps_config(tiny_sd):
    set_scheduler(tiny_sd, "euler_a")
    assert type(tiny_sd.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert tiny_sd.scheduler.config.beta_end == 0.012


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("float8")


def test_empty_spec_rejected():
    with pytest.raises(ConfigError):
        load_pipeline("  ")


def test_model_index_unreadable(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="unreadable"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_single_file_checkpoint_loads_offline_with_config_folder(tmp_path, kind):
    from consistent_diffusion.models.export import save_single_file
    from consistent_diffusion.testing import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "folder", kind=kind)
    original = load_pipeline(str(folder))
    checkpoint = save_single_file(original, tmp_path / "model.safetensors")
    pipe = load_pipeline(str(checkpoint), config=str(folder))
    assert type(pipe) is type(original)
    assert model_identity(pipe).kind == "single_file"
    for name, tensor in original.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name


def test_single_file_without_config_offline_says_how_to_fix(tmp_path, tiny_sd, monkeypatch):
    from consistent_diffusion.models.export import save_single_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    checkpoint = save_single_file(tiny_sd, tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="--config DIR"):
        load_pipeline(str(checkpoint))
