"""The web app's page (Gradio): three tabs over ``app.jobs``, no logic of its own.

- **Make a series**: prompts, seeds, steps, guidance, size and the method stack (img2img, StyleAligned,
  consistent subject, DDPM edit, an image prompt: style and/or subject image with an IP-Adapter and
  a scale each, LoRA files with weights, a DreamBooth run, ControlNet with a preprocessor preview,
  the low-memory switches); live progress; the contact sheet and each image; the manifest and a zip
  to download; the scores with their validation status.
- **Fine-tune a subject**: 3-20 images, LoRA or DreamBooth, progress with the loss, cancel (keeps
  the last checkpoint); the result is offered to "Make a series" at once.
- **Compare**: run the quick bench or open a report folder: the table, plots, claims, images and
  the advisor with its constraints.

One job runs at a time (the queue's concurrency limit is 1; a second request waits and sees its
place). A failing job shows its error in the page (``gr.Error``) and the app keeps serving.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from consistent_diffusion.app import image_prompt, jobs
from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.models.loading import default_steps

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web-font download
ALL_BLOCKS = "all blocks"  # the image prompt's block choice without an InstantStyle preset


def _fail(error: Exception) -> Exception:
    """A job's error as the page shows it."""
    import gradio as gr

    return gr.Error(str(error).splitlines()[0] if str(error) else type(error).__name__)


def _path(value: Any) -> str | None:
    """A Gradio file/image value (a path string, a dict with "path", or None) as a path."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return str(getattr(value, "name", value))


class App:
    """The page's state: the pipeline, where jobs write, upload limits, the running training."""

    def __init__(self, load_pipe: Any, out_root: str | os.PathLike, limits: jobs.UploadLimits | None = None,
                 model_label: str = "embedded", model_argv: list[str] | None = None, bench_workers: int = 1,
                 ip_adapters: list[str] | None = None) -> None:
        self.load_pipe, self.out_root, self.model_label = load_pipe, Path(out_root), model_label
        self.model_argv, self.bench_workers = model_argv, bench_workers  # the bench on processes (CLI-loadable model)
        self.limits = limits or jobs.UploadLimits()
        self.ip_adapters = list(ip_adapters or [])  # IP-Adapter folders offered in the image prompt section
        self._pipe: Any = None
        self._loading = threading.Lock()  # the page's first load and a job may ask for the pipeline at once
        self._adapters: tuple | None = None
        self.cancel = threading.Event()
        self.trained: list[str] = []  # LoRA folders / DreamBooth runs trained in this session

    @property
    def pipe(self) -> Any:
        with self._loading:
            if self._pipe is None:
                self._pipe = self.load_pipe()
        return self._pipe

    # -- make a series ---------------------------------------------------------------------

    def make_series(self, prompts: str, seeds: str, steps: float, guidance: float, size: float, negative: str,
                    init_image: Any, strength: float, style_on: bool, style_image: Any, style_prompt: str,
                    subject: str, edit_image: Any, edit_prompt: str, edit_skip: float, lora_files: Any,
                    lora_weight: float, trained: str | None, control_image: Any, control_preprocess: str,
                    control_scale: float, offload: str = "none", vae_slicing: bool = False,
                    vae_tiling: bool = False, attention_slicing: bool = False, ip_style_image: Any = None,
                    ip_style_adapter: str | None = None, ip_style_scale: float = 1.0, ip_subject_image: Any = None,
                    ip_subject_adapter: str | None = None, ip_subject_scale: float = 1.0,
                    ip_preset: str = ALL_BLOCKS, progress: Any = None) -> tuple:
        import gradio as gr

        progress = progress or gr.Progress(track_tqdm=True)
        loras = [(p, float(lora_weight)) for p in (_path(f) for f in (lora_files or [])) if p]
        dreambooth = None
        if trained:
            if (Path(trained) / "pytorch_lora_weights.safetensors").is_file():
                loras.append((trained, float(lora_weight)))
            else:
                dreambooth = trained
        form = jobs.SeriesForm(
            prompts=prompts, seeds=seeds, steps=int(steps), guidance=float(guidance), size=int(size) or None,
            negative_prompt=negative, init_image=_path(init_image), strength=float(strength), style_aligned=style_on,
            style_image=_path(style_image), style_prompt=style_prompt or "", subject=subject or "",
            edit_image=_path(edit_image), edit_source_prompt=edit_prompt or "", edit_skip=int(edit_skip),
            loras=loras, dreambooth=dreambooth, control_image=_path(control_image),
            control_preprocess=control_preprocess or "canny", control_scale=float(control_scale),
            offload=None if offload in (None, "none") else offload, vae_slicing=bool(vae_slicing),
            vae_tiling=bool(vae_tiling), attention_slicing=bool(attention_slicing),
            image_prompt=image_prompt.ImagePromptForm(
                style_image=_path(ip_style_image), style_adapter=ip_style_adapter or "",
                style_scale=float(ip_style_scale), subject_image=_path(ip_subject_image),
                subject_adapter=ip_subject_adapter or "", subject_scale=float(ip_subject_scale),
                preset=None if ip_preset in (None, ALL_BLOCKS) else ip_preset),
        )
        try:
            progress(0.0, desc="loading the model")
            job = jobs.make_series(self.pipe, form, self.out_root, self.limits)
        except (ConsistentDiffusionError, ValueError, OSError) as error:
            raise _fail(error) from error
        rows = [[name, "–" if s["value"] is None else f"{s['value']:.3f}",
                 {True: "validated", False: "not validated (read with care)", None: "never validated"}[s["validated"]],
                 s["note"]] for name, s in job.scores.items()]
        return (str(job.contact_sheet), [str(p) for p in job.images], rows, str(job.manifest), str(job.archive),
                f"wrote {job.folder}")

    def image_prompt_section(self) -> tuple:
        """The image prompt section filled for the loaded model: each slot's adapter choices and
        default, and a one-line note (why there is none, or what is offered)."""
        import gradio as gr

        if self._adapters is None:
            try:
                self._adapters = image_prompt.adapter_choices(self.pipe, self.ip_adapters)
            except (ConsistentDiffusionError, ValueError, OSError) as error:
                return gr.update(), gr.update(), f"Image prompt unavailable: {str(error).splitlines()[0]}"
        names, defaults, reason = self._adapters
        note = (f"{reason[:1].upper()}{reason[1:]}." if reason else
                f"Adapters for this model: {', '.join(f'`{n}`' for n in names)} (or type a folder in the released layout).")
        return (gr.update(choices=names, value=defaults["style"]), gr.update(choices=names, value=defaults["subject"]),
                note)

    def control_preview(self, image: Any, preprocess: str) -> Any:
        """What the ControlNet will see for the uploaded image (the preprocessor's output)."""
        path = _path(image)
        if not path:
            return None
        try:
            jobs.check_image(path, self.limits, "control image")
            from consistent_diffusion.core.images import load_image
            from consistent_diffusion.methods.controls import make_control

            return load_image(path) if preprocess == "none" else make_control(preprocess, path)
        except (ConsistentDiffusionError, ValueError) as error:
            raise _fail(error) from error

    # -- fine-tune ---------------------------------------------------------------------------

    def train(self, files: Any, kind: str, prompt: str, steps: float, progress: Any = None) -> tuple:
        import gradio as gr

        progress = progress or gr.Progress()
        self.cancel.clear()
        paths = [p for p in (_path(f) for f in (files or [])) if p]
        losses: list[float] = []

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            progress(step / max(1, int(steps)), desc=f"step {step}/{int(steps)}, loss {loss:.4f}")

        try:
            # a fresh float32 copy to train: the series pipeline stays as loaded
            result = jobs.train_subject(self.load_pipe(), paths, self.out_root, kind=kind, instance_prompt=prompt,
                                        steps=int(steps), on_step=on_step, cancel=self.cancel, limits=self.limits)
        except (ConsistentDiffusionError, ValueError, OSError) as error:
            raise _fail(error) from error
        if result.cancelled:
            return (f"cancelled; the last checkpoint (step {result.steps}) is in {result.run / 'run'}: resume with "
                    f"`consistent-diffusion train {kind} ... --out {result.run / 'run'} --resume`",
                    gr.update(), _loss_rows(losses))
        artifact = str(result.result if kind == "lora" else result.run / "run")
        self.trained.append(artifact)
        message = f"trained {result.steps} steps: {artifact}; it is now in 'Make a series' (prompt with '{prompt}')"
        return message, gr.update(choices=self.trained, value=artifact), _loss_rows(losses)

    def stop(self) -> str:
        self.cancel.set()
        return "cancelling after the current step..."

    # -- compare -----------------------------------------------------------------------------

    def open_report(self, folder: str) -> tuple:
        try:
            opened = jobs.open_report(folder)
        except (ConsistentDiffusionError, OSError) as error:
            raise _fail(error) from error
        self._report = opened["report"]
        claims = [[c["claim"], c["verdict"], c["evidence"]] for c in opened["claims"]]
        table = {"headers": opened["columns"], "data": opened["rows"]}
        return (table, claims, "\n".join(opened["plots"]), opened["images"], f"opened {folder}")

    def run_bench(self, progress: Any = None) -> tuple:
        import gradio as gr

        progress = progress or gr.Progress()
        from consistent_diffusion.bench.suite import load_suite

        total = len(load_suite("quick").cells)
        progress(0, desc=f"0/{total} cells (fine-tunings first)")

        def counted(done: int, total: int) -> None:
            progress(done / total, desc=f"{done}/{total} cells")

        try:
            folder = jobs.run_quick_bench(self.load_pipe, self.out_root, model_argv=self.model_argv,
                                          workers=self.bench_workers, on_progress=counted,
                                          on_prepare=lambda line: progress(0, desc=line))
        except (ConsistentDiffusionError, OSError) as error:
            raise _fail(error) from error
        return (*self.open_report(str(folder))[:4], f"bench written to {folder}")

    def advise(self, needs: str, have: str, no_training: bool, min_text: float, min_diversity: float,
               max_seconds: float) -> str:
        from consistent_diffusion.bench.advisor import Constraints

        report = getattr(self, "_report", None)
        if report is None:
            raise _fail(ConsistentDiffusionError("open a report or run the bench first"))
        try:
            constraints = Constraints(have=have, allow_training=not no_training, min_text=min_text or None,
                                      min_diversity=min_diversity or None, max_seconds=max_seconds or None)
            return jobs.advice(report, needs, constraints)
        except ConsistentDiffusionError as error:
            raise _fail(error) from error


def _loss_rows(losses: list[float]) -> list[list[float]]:
    return [[i + 1, round(loss, 5)] for i, loss in enumerate(losses)][-200:]


def _image_upload(gr: Any, **options: Any) -> Any:
    """An image upload field whose file the job checks: Gradio decodes an upload before the job
    sees it, and a corrupt file fails there with a long message naming its cache; such a file's path
    is handed on instead, and the job's upload check (``uploads.check_image``) says in one line
    what is wrong with it."""
    image = gr.Image(type="filepath", **options)
    decode = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except Exception:
            return getattr(payload, "path", None)

    image.preprocess = preprocess
    return image


def _image_prompt_section(gr: Any) -> tuple[list[Any], Any]:
    """The image prompt accordion: per slot an image, its adapter (choices filled on page load) and a
    scale; the InstantStyle blocks. Returns (inputs in ``App.make_series`` order, the note)."""
    from consistent_diffusion.methods.ip_adapter.method import PRESET_NAMES

    inputs = []
    with gr.Accordion("Image prompt (IP-Adapter): style and/or subject from an image", open=False,
                      elem_id="image-prompt"):
        note = gr.Markdown("Looking for adapters...", elem_id="ip-note")
        with gr.Row():
            for slot in image_prompt.SLOTS:
                with gr.Column(min_width=160):
                    inputs.append(_image_upload(gr, label=f"{slot.capitalize()} image", height=180,
                                                elem_id=f"ip-{slot}-image"))
                    inputs.append(gr.Dropdown(choices=[], label=f"Adapter carrying the {slot}", allow_custom_value=True,
                                              elem_id=f"ip-{slot}-adapter"))
                    inputs.append(gr.Slider(0, 2, value=1.0, step=0.05, label=f"{slot.capitalize()} scale",
                                            elem_id=f"ip-{slot}-scale"))
        inputs.append(gr.Radio([ALL_BLOCKS, *PRESET_NAMES], value=ALL_BLOCKS, elem_id="ip-preset",
                               label="Blocks the images act in (InstantStyle presets; for every adapter)"))
    return inputs, note


def build(app: App) -> Any:
    """The Gradio Blocks page over ``app``."""
    import gradio as gr

    with gr.Blocks(title="consistent-diffusion") as page:
        gr.Markdown(f"# consistent-diffusion\nModel: `{app.model_label}`. Every job writes one folder under "
                    f"`{app.out_root}` with its manifest; the command line re-creates it.")
        with gr.Tab("Make a series"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompts = gr.Textbox(label="Prompts (one a line)", lines=4, elem_id="prompts",
                                         value="grinning face, twitter style\ncat face, twitter style")
                    seeds = gr.Textbox(label="Seeds", value="0 1 2 3", elem_id="seeds")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=default_steps(app.model_label), step=1, label="Steps",
                                          elem_id="steps")
                        guidance = gr.Slider(1, 15, value=5.0, step=0.5, label="Guidance")
                    size = gr.Number(value=0, precision=0, label="Size in pixels (0: the model's own)")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Accordion("img2img", open=False):
                        init_image = _image_upload(gr, label="Reference image", elem_id="init-image")
                        strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength")
                    with gr.Accordion("StyleAligned", open=False):
                        style_on = gr.Checkbox(label="Share the style of the first image (or a reference)")
                        style_image = _image_upload(gr, label="Style reference image")
                        style_prompt = gr.Textbox(label="...or a reference prompt")
                    with gr.Accordion("Consistent subject (no training)", open=False):
                        subject = gr.Textbox(label="Subject word of the prompts (e.g. cat)")
                    with gr.Accordion("DDPM edit of an uploaded image", open=False):
                        edit_image = _image_upload(gr, label="Image to edit")
                        edit_prompt = gr.Textbox(label="What the image shows (its inversion prompt)")
                        edit_skip = gr.Slider(0, 30, value=0, step=1, label="Steps to skip (more keeps more)")
                    with gr.Accordion("LoRA / DreamBooth", open=False):
                        lora_files = gr.File(file_count="multiple", label="LoRA files (.safetensors)")
                        lora_weight = gr.Slider(0, 1.5, value=1.0, step=0.05, label="LoRA weight")
                        trained = gr.Dropdown(choices=[], label="Trained in this session", allow_custom_value=True)
                    with gr.Accordion("ControlNet", open=False):
                        with gr.Row():
                            control_image = _image_upload(gr, label="Control source image")
                            control_view = gr.Image(label="What the ControlNet sees", interactive=False)
                        control_preprocess = gr.Dropdown(["canny", "silhouette", "scribble", "none"], value="canny",
                                                         label="Preprocessor")
                        control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
                    ip_inputs, ip_note = _image_prompt_section(gr)
                    with gr.Accordion("Low memory (same images, slower)", open=False):
                        offload = gr.Radio(["none", "model", "sequential"], value="none", label="CPU offload")
                        with gr.Row():
                            vae_slicing = gr.Checkbox(label="VAE slicing")
                            vae_tiling = gr.Checkbox(label="VAE tiling")
                            attention_slicing = gr.Checkbox(label="Attention slicing")
                    make = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=1):
                    status = gr.Markdown(elem_id="series-status")
                    sheet = gr.Image(label="Contact sheet", elem_id="contact-sheet", interactive=False)
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery")
                    scores = gr.Dataframe(headers=["metric", "value", "validation", "note"], label="Consistency",
                                          elem_id="scores")
                    manifest = gr.File(label="manifest.json")
                    archive = gr.File(label="The folder as a zip")
            control_image.change(app.control_preview, [control_image, control_preprocess], control_view)
            control_preprocess.change(app.control_preview, [control_image, control_preprocess], control_view)
            make.click(app.make_series,
                       [prompts, seeds, steps, guidance, size, negative, init_image, strength, style_on, style_image,
                        style_prompt, subject, edit_image, edit_prompt, edit_skip, lora_files, lora_weight, trained,
                        control_image, control_preprocess, control_scale, offload, vae_slicing, vae_tiling,
                        attention_slicing, *ip_inputs],
                       [sheet, gallery, scores, manifest, archive, status])
        with gr.Tab("Fine-tune a subject"):
            files = gr.File(file_count="multiple", label="3-20 images of the subject", elem_id="train-files")
            with gr.Row():
                kind = gr.Radio(["lora", "dreambooth"], value="lora", label="Method")
                instance = gr.Textbox(value="sks emoji", label="Token prompt (use it in your prompts)")
                train_steps = gr.Slider(10, 1000, value=200, step=10, label="Steps", elem_id="train-steps")
            with gr.Row():
                go = gr.Button("Train", variant="primary", elem_id="train")
                cancel = gr.Button("Cancel (keeps the last checkpoint)")
            train_status = gr.Markdown()
            loss = gr.Dataframe(headers=["step", "loss"], label="Loss")
            go.click(app.train, [files, kind, instance, train_steps], [train_status, trained, loss])
            cancel.click(app.stop, None, train_status, queue=False)
        with gr.Tab("Compare"):
            with gr.Row():
                folder = gr.Textbox(label="A bench output folder", scale=3, elem_id="report-folder")
                open_button = gr.Button("Open", elem_id="open-report")
                bench_button = gr.Button("Run the quick bench")
            compare_status = gr.Markdown()
            table = gr.Dataframe(label="Cells")
            claims = gr.Dataframe(headers=["claim", "verdict", "evidence"], label="Claims")
            plots = gr.HTML()
            with gr.Row():
                needs = gr.Textbox(value="style,object", label="Needs")
                have = gr.Radio(["reference-images", "text-only"], value="reference-images", label="I have")
                no_training = gr.Checkbox(label="No training")
            with gr.Row():
                min_text = gr.Number(value=0, label="Min text alignment (0: any)")
                min_diversity = gr.Number(value=0, label="Min diversity (0: any)")
                max_seconds = gr.Number(value=0, label="Max seconds per image (0: any)")
            advise_button = gr.Button("Advise", elem_id="advise")
            advice = gr.Textbox(label="Advice", lines=12, elem_id="advice")
            grid = gr.Gallery(label="Cells' images", columns=3)
            open_button.click(app.open_report, folder, [table, claims, plots, grid, compare_status])
            bench_button.click(app.run_bench, None, [table, claims, plots, grid, compare_status])
            advise_button.click(app.advise, [needs, have, no_training, min_text, min_diversity, max_seconds], advice)
        # the image prompt's adapter choices for the loaded model, filled beside any running job
        page.load(app.image_prompt_section, None, [ip_inputs[1], ip_inputs[4], ip_note], concurrency_limit=None,
                  show_progress="hidden")
    page.queue(default_concurrency_limit=1)  # one generation or training at a time; others wait in line
    return page


def launch(app: App, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the page; returns the Blocks (and keeps serving in a thread when ``block`` is False)."""
    import gradio as gr

    page = build(app)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False, inbrowser=False,
                max_file_size=app.limits.max_bytes, allowed_paths=[str(app.out_root.resolve())], quiet=True,
                theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"]),
                show_error=True)
    return page
