"""The Gradio preview app: pick a model and an Edit (an uploaded file, or a method and a concept),
type a prompt and a seed, and see the original and the erased image side by side; one button attacks
that prompt (UnlearnDiffAtk by default) and shows the adversarial prompt and its image; a tab shows
an evaluation report's grids; a button downloads the Edit.

Everything here calls the Python API (``load_pipeline``, ``erase``, ``Edit``, ``generate``,
``attack``). Every family erasekit reads works: images are sampled with the pipeline's own kind of
sampler (:func:`~erasekit.pipelines.generation.default_sampling`: DDIM on SD 1.x / 2.x / SDXL, flow
Euler on SD 3 / Flux) at the visitor's step count, and a method that does not support the model's
family is refused with its own message. The app binds to 127.0.0.1 unless told otherwise, and a
visitor can reach only what it was started with:

- files: uploads, the app's own temporary output folder, the ``--report`` folder and the folders
  given with ``--allow-root`` (see :mod:`erasekit.preview.paths`); gradio itself serves none of them;
- models: canvas-mini and the ``--model`` names given at launch;
- work: at most ``max_steps`` sampling steps; one job per pipeline at a time; every job (the
  fine-tuning methods take minutes) shows a progress bar and stops when its Cancel button is pressed;
  at most ``cache_size`` Edits kept (least recently used dropped first).
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, ErasekitError, require
from .paths import PathGuard

log = logging.getLogger(__name__)

DISPLAY_SIZE = 256  # images are upscaled (nearest neighbour) for display only; canvas-mini makes 32 px
DEFAULT_PROMPT = "A Cats image in Van Gogh style."
DEFAULT_MODEL = "canvas-mini"
DEFAULT_STEPS = 25
MAX_STEPS = 50          # sampling steps a visitor may ask for: each costs one denoiser call per image
EDIT_CACHE_SIZE = 4     # Edits kept in memory; an evicted method run is recomputed when asked again
MAX_PROMPT_CHARS = 1000
MAX_GRIDS = 48          # report images shown
MAX_MARKDOWN_BYTES = 1_000_000
MAX_UPLOAD = "4gb"      # an Edit of a whole SD UNet in float32 is ~3.4 GB
NO_EDIT_FILE = ("no readable Edit file there: upload a .safetensors Edit (the preview reads only uploads, "
                "its own outputs and the folders it was started with, see `erasekit preview --allow-root`)")
NO_REPORT = ("no report folder there: give a folder inside the ones the preview was started with "
             "(`erasekit preview --report DIR` or `--allow-root DIR`)")


class Cancelled(ErasekitError):
    """A preview job stopped by its Cancel button; the pipeline was restored."""


def _display(image):
    from PIL import Image

    scale = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _whole(value) -> bool:
    """True for a whole number given as an int or a float (gradio's number boxes send floats)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "concept"


@contextmanager
def _cancellable(pipe, cancel: threading.Event):
    """Raise :class:`Cancelled` at the next forward call of any of ``pipe``'s models once ``cancel`` is set.

    A forward pre-hook is the one point every generation, attack and training loop passes through
    every step; the hooks are removed on exit. Erasure, ``Edit.sampled`` and the training engine
    restore the pipeline when an exception passes through them. A pipeline without ``components``
    is hooked on its denoiser (the UNet, or the SD 3 / Flux transformer).
    """
    import torch

    from ..pipelines.mmdit import denoiser

    def check(*_):
        if cancel.is_set():
            raise Cancelled("cancelled: the job stopped and the pipeline was restored")

    components = getattr(pipe, "components", None) or {"denoiser": denoiser(pipe)}
    handles = [m.register_forward_pre_hook(check) for m in components.values() if isinstance(m, torch.nn.Module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PreviewSession:
    """What the app may reach and what it has loaded: pipelines by model name, a few Edits, the judge.

    Args:
        pipe: an already loaded pipeline for ``model`` (optional).
        model: the model shown first; it, canvas-mini and ``models`` are the only ones loadable.
        roots: folders whose Edit files and reports visitors may read.
        edit: an Edit file given at launch (readable wherever it lies).
        upload_dir: where the web framework stores uploads (their Edit files are readable).
        out_dir: where Edits made here are saved for download (default: a new temporary folder,
            deleted with the session).
    """

    def __init__(self, pipe=None, model: str = DEFAULT_MODEL, judge=None, *, models=(), roots=(), edit=None,
                 upload_dir=None, out_dir=None, max_steps: int = MAX_STEPS, cache_size: int = EDIT_CACHE_SIZE):
        self.model = model or DEFAULT_MODEL
        self.models = list(dict.fromkeys([self.model, DEFAULT_MODEL, *models]))
        self.pipes = {self.model: pipe} if pipe is not None else {}
        self.judge = judge
        if out_dir is None:
            out_dir = tempfile.mkdtemp(prefix="erasekit-preview-")
            weakref.finalize(self, shutil.rmtree, out_dir, True)
        self.out_dir = Path(out_dir).resolve()
        self.reports = PathGuard([self.out_dir, *roots])
        self.edit_files = PathGuard([self.out_dir, *roots, upload_dir], files=[edit])
        self.max_steps, self.cache_size = int(max_steps), int(cache_size)
        self.edits: OrderedDict[tuple, tuple] = OrderedDict()   # key -> (Edit, its file)
        self._state = threading.Lock()                          # guards the dicts; held only briefly
        self._locks: dict[str, threading.Lock] = {}             # one job per pipeline
        self._jobs: dict[str, set[threading.Event]] = {}        # a visitor's running jobs, to cancel

    # -- limits ---------------------------------------------------------------------------------
    def steps(self, steps) -> int:
        """The visitor's step count, checked before any work (1 to ``max_steps``)."""
        if not _whole(steps) or not 1 <= int(steps) <= self.max_steps:
            raise ConfigError(f"steps must be a whole number from 1 to {self.max_steps} but is {steps!r}")
        return int(steps)

    @staticmethod
    def sampling(pipe, steps: int):
        """The pipeline's own kind of sampler (DDIM on a UNet model, flow Euler on SD 3 / Flux) at ``steps``."""
        from ..pipelines.generation import default_sampling

        return default_sampling(pipe, steps=steps)

    @staticmethod
    def _inputs(prompt, seed) -> tuple[str, int]:
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"the prompt must be 1 to {MAX_PROMPT_CHARS} characters long")
        if not _whole(seed) or not 0 <= int(seed) < 2 ** 32:
            raise ConfigError(f"the seed must be a whole number from 0 to {2 ** 32 - 1} but is {seed!r}")
        return prompt, int(seed)

    # -- jobs -----------------------------------------------------------------------------------
    @contextmanager
    def job(self, model, job: str = ""):
        """Hold ``model``'s pipeline for one job: loaded on first use, one job at a time, cancellable."""
        from ..pipelines.loading import load_pipeline

        model = (model or self.model).strip()
        if model not in self.models:
            raise ConfigError(f"model {model!r} is not offered by this preview; choose one of: "
                              f"{', '.join(self.models)} (start it with `--model NAME` to offer another)")
        cancel = threading.Event()
        with self._state:
            lock = self._locks.setdefault(model, threading.Lock())
            self._jobs.setdefault(job, set()).add(cancel)
        try:
            with lock:
                if cancel.is_set():
                    raise Cancelled("cancelled before it started")
                if model not in self.pipes:
                    self.pipes[model] = load_pipeline(model)
                with _cancellable(self.pipes[model], cancel):
                    yield self.pipes[model]
        finally:
            with self._state:
                self._jobs.get(job, set()).discard(cancel)

    def cancel(self, job: str = "") -> str:
        """Stop ``job``'s running or waiting jobs at their next model call."""
        with self._state:
            events = list(self._jobs.get(job, ()))
        for event in events:
            event.set()
        return "Cancelled." if events else "Nothing to cancel."

    # -- Edits ----------------------------------------------------------------------------------
    def edit(self, pipe, model: str, edit_file, method: str, concept: str, progress=None):
        """(the Edit to preview, its file): ``edit_file`` if given, else ``method`` run on ``concept``.

        The last ``cache_size`` Edits are kept; the file of a dropped one is deleted.
        """
        from ..erase.registry import erase
        from ..pipelines.edit import Edit

        if edit_file:
            path = self.edit_files.resolve(edit_file, "file", NO_EDIT_FILE)
            key = ("file", model, str(path))
        else:
            key = ("method", model, (method or "").strip().lower(), (concept or "").strip())
        with self._state:
            if key in self.edits:
                self.edits.move_to_end(key)
                return self.edits[key]
        if key[0] == "file":
            item = (Edit.load(path, pipe=pipe), path)
        else:
            if progress is not None:
                progress(0, desc=f"erasing {key[3]!r} with {key[2]} (the fine-tuning methods take minutes; "
                                 "Cancel stops them)")
            edit = erase(pipe, key[2], [key[3]])
            folder = Path(tempfile.mkdtemp(dir=self.out_dir))
            item = (edit, edit.save(folder / f"{_slug(key[2])}-{_slug(key[3])}.safetensors"))
        with self._state:
            self.edits[key] = item
            while len(self.edits) > self.cache_size:
                dropped, (_, old) = self.edits.popitem(last=False)
                if dropped[0] == "method":   # an Edit the preview trained and saved in a folder of its own
                    shutil.rmtree(old.parent, ignore_errors=True)
        return item

    # -- handlers -------------------------------------------------------------------------------
    def compare(self, model, edit_file, method, concept, prompt, seed, steps=DEFAULT_STEPS, job="", progress=None):
        """(original image, erased image, status text, the Edit's file) for one prompt and seed."""
        from ..pipelines.generation import generate

        steps, (prompt, seed) = self.steps(steps), self._inputs(prompt, seed)
        with self.job(model, job) as pipe:
            sampling = self.sampling(pipe, steps)
            edit, path = self.edit(pipe, model, edit_file, method, concept, progress)
            original = generate(pipe, prompt, seed, sampling)[0]
            with edit.sampled(pipe) as sampler:   # an SFD generator through its one-step pipeline
                erased = generate(sampler, prompt, seed, sampling)[0]
        m = edit.manifest
        status = (f"**{m.get('method', '?')}** erased {', '.join(m.get('concepts', []))} "
                  f"({len(edit.keys)} tensors, {edit.nbytes() / 1024:.1f} KiB); prompt {prompt!r}, seed {seed}, "
                  f"{sampling.steps} {sampling.sampler} steps")
        return _display(original), _display(erased), status, str(path)

    def attack(self, model, edit_file, method, concept, prompt, seed, steps=DEFAULT_STEPS, job="", progress=None,
               attack_method="unlearndiffatk", **options):
        """(adversarial prompt, its image on the erased model, status text)."""
        from ..attacks import attack
        from ..eval.judges import CanvasJudge
        from ..pipelines.generation import Sampling, generate

        steps, (prompt, seed) = self.steps(steps), self._inputs(prompt, seed)
        with self.job(model, job) as pipe:
            sampling = self.sampling(pipe, steps)
            edit, _ = self.edit(pipe, model, edit_file, method, concept, progress)
            self.judge = self.judge or CanvasJudge.load()
            target = (edit.manifest.get("concepts") or [concept])[0]
            result = attack(pipe, [prompt], target, judge=self.judge, method=attack_method, seeds=[seed],
                            edit=edit, sampling=sampling, progress=progress is not None, **options)
            row = result.prompts[0]
            known = {"sampler", "steps", "guidance", "height", "width"}
            judged = Sampling(**{k: v for k, v in result.protocol.get("sampling", {}).items() if k in known})
            with edit.sampled(pipe) as sampler:
                image = generate(sampler, row.adv_prompt, row.adv_seed, judged)[0]
        outcome = "the concept came back" if row.success else "the concept stayed erased"
        status = (f"{attack_method}: {outcome} (step {row.step}, {row.unet_evals} denoiser evaluations, "
                  f"{row.wall_time_s:.1f} s); judged concept {target!r}")
        return row.adv_prompt, _display(image), status

    def report(self, folder) -> tuple[list, str]:
        """The image grids (with their names) and the Markdown text of an allowed report folder."""
        from PIL import Image

        path = self.reports.resolve(folder, "dir", NO_REPORT)
        grids = []
        for name, png in self.reports.walk(path, (".png",))[:MAX_GRIDS]:
            with Image.open(png) as image:
                grids.append((image.convert("RGB"), name))
        md = self.reports.walk(path, (".md",))
        if not md:
            return grids, "(no Markdown report in this folder)"
        with open(md[0][1], encoding="utf-8", errors="replace") as f:
            return grids, f.read(MAX_MARKDOWN_BYTES)


def _guard(fn):
    """Show every error in the UI: erasekit's one-line messages as they are, any other exception as
    its type and message (its traceback goes to the server log)."""
    gr = require("gradio", "ui")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ErasekitError as e:
            raise gr.Error(_one_line(e)) from None
        except Exception as e:
            log.exception("preview: %s failed", getattr(fn, "__name__", "a handler"))
            raise gr.Error(f"unexpected {type(e).__name__}: {_one_line(e)} (traceback in the server log)") from None

    return wrapper


def gradio_paths(session: PreviewSession, roots=()) -> tuple[list[str], list[str]]:
    """(allowed_paths, blocked_paths) for gradio's launch: gradio may serve the Edits the app wrote
    for download and nothing from the allowed roots (the app reads those itself and hands over only
    decoded images and text); a root that holds the output or upload folder is not blocked."""
    from gradio.utils import get_upload_folder

    keep = [session.out_dir, Path(get_upload_folder()).resolve()]
    blocked = [Path(r).expanduser().resolve() for r in roots if r]
    return [str(session.out_dir)], [str(r) for r in blocked if not any(k.is_relative_to(r) for k in keep)]


def build_app(model: str = DEFAULT_MODEL, edit: str | None = None, report: str | None = None, pipe=None,
              judge=None, method: str = "rece", concept: str = "Van_Gogh", prompt: str = DEFAULT_PROMPT, *,
              models=(), roots=(), max_steps: int = MAX_STEPS, cache_size: int = EDIT_CACHE_SIZE):
    """A Gradio Blocks app; ``pipe`` (optional) is an already loaded pipeline for ``model``.

    ``models`` are offered besides ``model`` and canvas-mini; ``roots`` (and ``report``) are the
    folders whose Edits and reports visitors may open.
    """
    gr = require("gradio", "ui")
    import uuid

    from gradio.utils import get_upload_folder

    from ..erase.registry import _MODULES

    roots = [*roots, *([report] if report else [])]
    session = PreviewSession(pipe, model, judge, models=models, roots=roots, edit=edit,
                             upload_dir=get_upload_folder(), max_steps=max_steps, cache_size=cache_size)
    with gr.Blocks(title="erasekit preview", analytics_enabled=False) as app:
        gr.Markdown("## erasekit preview\nOriginal vs erased model, same prompt and seed. "
                    "Upload an Edit file, or leave it empty to erase the concept with the method.")
        job = gr.State(lambda: uuid.uuid4().hex)  # one per browser session: Cancel stops only its own jobs
        with gr.Tab("Compare"):
            with gr.Row():
                model_box = gr.Dropdown(session.models, value=session.model, label="Model", elem_id="model")
                edit_box = gr.File(str(edit) if edit else None, file_types=[".safetensors"], type="filepath",
                                   label="Edit file (optional)", elem_id="edit-file")
                method_box = gr.Dropdown(sorted(_MODULES), value=method, label="Method", elem_id="method")
                concept_box = gr.Textbox(concept, label="Concept to erase", elem_id="concept")
            with gr.Row():
                prompt_box = gr.Textbox(prompt, label="Prompt", elem_id="prompt", scale=4)
                seed_box = gr.Number(0, precision=0, minimum=0, maximum=2 ** 32 - 1, label="Seed",
                                     elem_id="seed", scale=1)
                steps_box = gr.Slider(1, session.max_steps, value=min(DEFAULT_STEPS, session.max_steps), step=1,
                                      label="Sampling steps", elem_id="steps", scale=2)
            with gr.Row():
                generate_btn = gr.Button("Generate original and erased", variant="primary", elem_id="generate")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                download_btn = gr.DownloadButton("Download the Edit (.safetensors)", elem_id="download")
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

        def on_compare(model, edit_file, method, concept, prompt, seed, steps, job,
                       progress=gr.Progress(track_tqdm=True)):
            return session.compare(model, edit_file, method, concept, prompt, seed, steps, job, progress)

        def on_attack(model, edit_file, method, concept, prompt, seed, steps, job,
                      progress=gr.Progress(track_tqdm=True)):
            return session.attack(model, edit_file, method, concept, prompt, seed, steps, job, progress)

        inputs = [model_box, edit_box, method_box, concept_box, prompt_box, seed_box, steps_box, job]
        one_job = dict(concurrency_limit=1, concurrency_id="pipeline")  # compare and attack share the pipeline
        compared = generate_btn.click(_guard(on_compare), inputs, [original, erased, status, download_btn],
                                      **one_job)
        attacked = attack_btn.click(_guard(on_attack), inputs, [adv_prompt, adv_image, attack_status], **one_job)
        cancel_btn.click(_guard(session.cancel), [job], [status], cancels=[compared, attacked])
        load_btn.click(_guard(session.report), [report_box], [gallery, report_md])
        if report:
            app.load(_guard(session.report), [report_box], [gallery, report_md])
    app.session = session
    return app


def _theme(gr):
    # System fonts: the default theme fetches Google Fonts, which offline machines cannot reach.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(host: str = "127.0.0.1", port: int = 7860, model: str = DEFAULT_MODEL, edit: str | None = None,
           report: str | None = None, quiet: bool = False, block: bool = True, models=(), roots=(),
           **app_kwargs):
    """Build the app and serve it on ``host:port`` (loopback by default); ``block=False`` returns the app.

    ``models``: further model names or directories visitors may load; ``roots``: folders whose Edit
    files and reports visitors may open (besides uploads and ``report``).
    """
    gr = require("gradio", "ui")
    app = build_app(model=model, edit=edit, report=report, models=models, roots=roots, **app_kwargs)
    allowed, blocked = gradio_paths(app.session, [*roots, *([report] if report else [])])
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, quiet=quiet, prevent_thread_lock=not block,
        theme=_theme(gr), ssr_mode=False, footer_links=[], allowed_paths=allowed, blocked_paths=blocked,
        max_file_size=MAX_UPLOAD)
    return app
