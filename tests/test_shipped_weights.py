"""The package ships all its weights (embedded model, ControlNet, metric heads, probes, image-prompt
adapters) within 45 MB (issue 28's budget): a new asset that breaks it fails here."""

from consistent_diffusion.core.assets import ASSETS_DIR

WEIGHTS_BUDGET_BYTES = 45_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")


def shipped_weights():
    return {path.relative_to(ASSETS_DIR).as_posix(): path.stat().st_size
            for path in ASSETS_DIR.rglob("*") if path.is_file() and path.suffix in WEIGHT_SUFFIXES}


def test_all_shipped_weights_fit_the_budget():
    weights = shipped_weights()
    assert "embedded/unet/diffusion_pytorch_model.safetensors" in weights, "the scan must see the embedded UNet"
    total = sum(weights.values())
    listing = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(weights.items()))
    assert total <= WEIGHTS_BUDGET_BYTES, f"shipped weights {total / 1e6:.1f} MB > 45 MB: {listing}"
