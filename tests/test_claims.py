"""The claims section: each claim is held, not held or not measurable from a report's numbers."""

from consistent_diffusion.bench.claims import (
    HELD,
    NOT_HELD,
    NOT_MEASURABLE,
    doubles_or_halves_error,
    evaluate_claims,
)


def cell(task, kind, stack=(), params=0, vae_psnr=None, **scores):
    return {"task": task, "kind": kind, "method": "+".join(m for m, _ in stack) or "plain",
            "stack": [{"method": m, **options} for m, options in stack],
            "scores": {name: {"aggregate": value} for name, value in scores.items()},
            "cost": {"trainable_parameters": params}, "reference_vae_psnr": vae_psnr}


def verdicts(cells):
    return {claim["claim"].split()[0]: claim["verdict"] for claim in evaluate_claims({"cells": cells})}


def test_nothing_measured_is_not_measurable():
    assert set(verdicts([]).values()) == {NOT_MEASURABLE}


def test_img2img_detail_loss():
    lower = [cell("t", "object", [("img2img", {"strength": s})], reference_fidelity=f) for s, f in ((0.4, 0.6), (0.8, 0.3))]
    assert verdicts(lower)["img2img"] == HELD
    higher = [cell("t", "object", [("img2img", {"strength": s})], reference_fidelity=f) for s, f in ((0.4, 0.3), (0.8, 0.6))]
    assert verdicts(higher)["img2img"] == NOT_HELD


def test_dreambooth_vs_lora():
    def cells(full, lora, lora_params=1_000):
        return [cell("o", "object", object=0.5),
                cell("o", "object", [("dreambooth", {})], params=3_000_000, object=full),
                cell("o", "object", [("lora", {})], params=lora_params, object=lora)]

    assert verdicts(cells(0.7, 0.6))["DreamBooth"] == HELD
    assert verdicts(cells(0.4, 0.3))["DreamBooth"] == NOT_HELD, "DreamBooth below plain"
    assert verdicts(cells(0.7, 0.8))["DreamBooth"] == NOT_HELD, "LoRA above DreamBooth"
    assert verdicts(cells(0.7, 0.6, lora_params=5_000_000))["DreamBooth"] == NOT_HELD, "LoRA not cheaper"


def test_controlnet_shape_not_identity():
    def cells(control, plain=0.2, identity=0.5):
        return [cell("s", "shape", shape=plain, reference_object=0.5),
                cell("s", "shape", [("controlnet", {})], shape=control, reference_object=identity)]

    assert verdicts(cells(0.45))["ControlNet"] == HELD
    assert verdicts(cells(0.3))["ControlNet"] == NOT_HELD
    assert verdicts(cells(0.45, identity=0.7))["ControlNet"] == NOT_HELD, "it copied the identity too"
    assert verdicts(cells(0.85, plain=0.7))["ControlNet"] == HELD, "halved the shape error"
    assert doubles_or_halves_error(0.4, 0.2) and doubles_or_halves_error(0.9, 0.8)
    assert not doubles_or_halves_error(0.3, 0.2) and not doubles_or_halves_error(0.85, 0.8)


def test_inversion_exact_and_controlled():
    def cells(psnr, edited):
        return [cell("t", "object", reference_object=0.5),
                cell("t", "object", [("ddpm_edit", {"skip": 0})], vae_psnr=26.0, reference_psnr=psnr),
                cell("t", "object", [("ddpm_edit", {"skip": 8})], reference_object=edited)]

    assert verdicts(cells(25.8, 0.7))["noise"] == HELD
    assert verdicts(cells(20.0, 0.7))["noise"] == NOT_HELD
    assert verdicts(cells(25.8, 0.4))["noise"] == NOT_HELD


def test_style_aligned():
    def cells(style, copies):
        return [cell("s", "style", style=0.8),
                cell("s", "style", [("style_aligned", {})], style=style, reference_object=copies),
                cell("s", "style", [("img2img", {"strength": 0.4})], style=0.9, reference_object=0.7)]

    assert verdicts(cells(0.9, 0.5))["StyleAligned"] == HELD
    assert verdicts(cells(0.7, 0.5))["StyleAligned"] == NOT_HELD
    assert verdicts(cells(0.9, 0.8))["StyleAligned"] == NOT_HELD, "copied the reference object"
