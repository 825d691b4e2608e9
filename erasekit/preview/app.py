"""The Gradio preview app: pick a model and an Edit (a file, or a method and a concept), type a
prompt and a seed, and see the original and the erased image side by side; one button attacks that
prompt (UnlearnDiffAtk by default) and shows the adversarial prompt and its image; a tab shows an
evaluation report's grids.

Everything here calls the Python API (``load_pipeline``, ``erase``, ``Edit``, ``generate``,
``attack``); the app only caches what it loaded. It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import ErasekitError, require

DISPLAY_SIZE = 256  # images are upscaled (nearest neighbour) for display only; canvas-mini makes 32 px
DEFAULT_PROMPT = "A Cats image in Van Gogh style."


def _display(image):
    from PIL import Image

    scale = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


class PreviewSession:
    """What the app has loaded: pipelines by model name, Edits by source, the judge.

    One lock serialises generation, because applying an Edit changes the shared pipeline in place.
    """

    def __init__(self, pipe=None, model: str = "canvas-mini", judge=None):
        self.pipes = {model: pipe} if pipe is not None else {}
        self.edits: dict[tuple, object] = {}
        self.judge = judge
        self.lock = threading.Lock()

    def pipe(self, model: str):
        from ..pipelines.loading import load_pipeline

        model = (model or "canvas-mini").strip()
        if model not in self.pipes:
            self.pipes[model] = load_pipeline(model)
        return self.pipes[model]

    def edit(self, model: str, edit_file: str, method: str, concept: str):
        """The Edit to preview: ``edit_file`` if given, else ``method`` run on ``concept`` (cached)."""
        from ..erase.registry import erase
        from ..pipelines.edit import Edit

        pipe = self.pipe(model)
        key = ("file", model, edit_file.strip()) if edit_file and edit_file.strip() else \
            ("method", model, method, (concept or "").strip())
        if key not in self.edits:
            if key[0] == "file":
                self.edits[key] = Edit.load(key[2], pipe=pipe)
            else:
                self.edits[key] = erase(pipe, method, [concept])
        return pipe, self.edits[key]

    def compare(self, model, edit_file, method, concept, prompt, seed):
        """(original image, erased image, status text) for one prompt and seed."""
        from ..pipelines.generation import generate

        with self.lock:
            pipe, edit = self.edit(model, edit_file, method, concept)
            original = generate(pipe, prompt, int(seed))[0]
            with edit.sampled(pipe) as sampler:   # an SFD generator through its one-step pipeline
                erased = generate(sampler, prompt, int(seed))[0]
        m = edit.manifest
        status = (f"**{m.get('method', '?')}** erased {', '.join(m.get('concepts', []))} "
                  f"({len(edit.keys)} tensors, {edit.nbytes() / 1024:.1f} KiB); prompt {prompt!r}, seed {int(seed)}")
        return _display(original), _display(erased), status

    def attack(self, model, edit_file, method, concept, prompt, seed, attack_method="unlearndiffatk", **options):
        """(adversarial prompt, its image on the erased model, status text)."""
        from ..attacks import attack
        from ..eval.judges import CanvasJudge
        from ..pipelines.generation import Sampling, generate

        with self.lock:
            pipe, edit = self.edit(model, edit_file, method, concept)
            self.judge = self.judge or CanvasJudge.load()
            target = (edit.manifest.get("concepts") or [concept])[0]
            result = attack(pipe, [prompt], target, judge=self.judge, method=attack_method, seeds=[int(seed)],
                            edit=edit, progress=False, **options)
            row = result.prompts[0]
            known = {"sampler", "steps", "guidance", "height", "width"}
            sampling = Sampling(**{k: v for k, v in result.protocol.get("sampling", {}).items() if k in known})
            with edit.sampled(pipe) as sampler:
                image = generate(sampler, row.adv_prompt, row.adv_seed, sampling)[0]
        outcome = "the concept came back" if row.success else "the concept stayed erased"
        status = (f"{attack_method}: {outcome} (step {row.step}, {row.unet_evals} UNet evaluations, "
                  f"{row.wall_time_s:.1f} s); judged concept {target!r}")
        return row.adv_prompt, _display(image), status


def report_files(folder: str) -> tuple[list, str]:
    """The image grids (PNG files, with their names) and the Markdown text of a report folder."""
    from PIL import Image

    path = Path(folder or "").expanduser()
    if not folder or not path.is_dir():
        raise ErasekitError(f"no report folder at {folder!r}: give the --out folder of `erasekit eval` or "
                            "`erasekit demo`")
    grids = [(Image.open(p).convert("RGB"), p.name) for p in sorted(path.rglob("*.png"))]
    md = sorted(path.rglob("*.md"))
    return grids, (md[0].read_text() if md else "(no Markdown report in this folder)")


def _guard(fn):
    """Show erasekit's one-line errors in the UI instead of a generic 'Error'."""
    import functools

    gr = require("gradio", "ui")

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except ErasekitError as e:
            raise gr.Error(" ".join(str(e).split())) from None

    return wrapper


def build_app(model: str = "canvas-mini", edit: str | None = None, report: str | None = None, pipe=None,
              judge=None, method: str = "rece", concept: str = "Van_Gogh", prompt: str = DEFAULT_PROMPT):
    """A Gradio Blocks app; ``pipe`` (optional) is an already loaded pipeline for ``model``."""
    gr = require("gradio", "ui")
    from ..erase.registry import _MODULES

    session = PreviewSession(pipe, model, judge)
    with gr.Blocks(title="erasekit preview", analytics_enabled=False) as app:
        gr.Markdown("## erasekit preview\nOriginal vs erased model, same prompt and seed. "
                    "Give an Edit file, or leave it empty to erase the concept with the method.")
        with gr.Tab("Compare"):
            with gr.Row():
                model_box = gr.Textbox(model, label="Model", elem_id="model")
                edit_box = gr.Textbox(str(edit or ""), label="Edit file (optional)", elem_id="edit-file")
                method_box = gr.Dropdown(sorted(_MODULES), value=method, label="Method", elem_id="method")
                concept_box = gr.Textbox(concept, label="Concept to erase", elem_id="concept")
            with gr.Row():
                prompt_box = gr.Textbox(prompt, label="Prompt", elem_id="prompt", scale=4)
                seed_box = gr.Number(0, precision=0, label="Seed", elem_id="seed", scale=1)
            generate_btn = gr.Button("Generate original and erased", variant="primary", elem_id="generate")
            with gr.Row():
                original = gr.Image(label="Original", format="png", interactive=False, elem_id="original")
                erased = gr.Image(label="Erased", format="png", interactive=False, elem_id="erased")
            status = gr.Markdown(elem_id="status")
            attack_btn = gr.Button("Attack this prompt (UnlearnDiffAtk)", elem_id="attack")
            with gr.Row():
                adv_prompt = gr.Textbox(label="Adversarial prompt", interactive=False, elem_id="adv-prompt")
                adv_image = gr.Image(label="Adversarial image (erased model)", format="png",
                                     interactive=False, elem_id="adv-image")
            attack_status = gr.Markdown(elem_id="attack-status")
        with gr.Tab("Report"):
            with gr.Row():
                report_box = gr.Textbox(str(report or ""), label="Report folder", elem_id="report-dir", scale=4)
                load_btn = gr.Button("Show report", elem_id="load-report", scale=1)
            gallery = gr.Gallery(label="Image grids", columns=2, format="png", object_fit="contain", height=420,
                                 elem_id="report-grids")
            report_md = gr.Markdown(elem_id="report-text")
        inputs = [model_box, edit_box, method_box, concept_box, prompt_box, seed_box]
        generate_btn.click(_guard(session.compare), inputs, [original, erased, status])
        attack_btn.click(_guard(session.attack), inputs, [adv_prompt, adv_image, attack_status])
        load_btn.click(_guard(report_files), [report_box], [gallery, report_md])
        if report:
            app.load(_guard(report_files), [report_box], [gallery, report_md])
    app.session = session
    return app


def _theme(gr):
    # System fonts: the default theme fetches Google Fonts, which offline machines cannot reach.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = "canvas-mini", edit: str | None = None,
           report: str | None = None, quiet: bool = False, block: bool = True, **app_kwargs):
    """Build the app and serve it on ``host:port`` (loopback by default); ``block=False`` returns the app."""
    gr = require("gradio", "ui")
    app = build_app(model=model, edit=edit, report=report, **app_kwargs)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, quiet=quiet, prevent_thread_lock=not block,
        theme=_theme(gr), ssr_mode=False, footer_links=[])
    return app
