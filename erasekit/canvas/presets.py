"""canvas-mini's preset provider: its concepts, their captions and the presets measured on it.

Used only when the pipeline *is* canvas-mini (its text encoder's config carries
``erasekit_world: canvas-mini``; :mod:`erasekit.presets`). The methods reach it through hooks of a
:class:`~erasekit.presets.ConceptContext`; each hook returns None where the papers' defaults apply
(a concept outside the world, a kind that is not the concept's label kind, a mix of kinds where a
preset needs one).

Why canvas-mini needs its own presets: its text encoder has only ever seen UnlearnCanvas captions
``"A {object} image in {style} style."``, so a concept is erased inside its captions, and its
small size lets a method run in minutes on a CPU with larger learning rates and fewer steps. Every
value below was chosen by measurement on canvas-mini (docs/benchmark.md, docs/methods/, benchmarks/sweeps):

- UCE ``canvas-style`` / ``canvas-object``: every caption of the concept erased, mapped to the same
  caption with the first style (object) not being erased, the other styles' (objects') captions
  and "" preserved, s_p 0.3, all 77 token rows (benchmarks/canvas_closed_form.py). RECE keeps its
  paper lam_r / epochs per kind (1e-3 / 1 styles, 0.1 / 1 objects).
- ESD: 400 steps, lr 1e-3, 20 DDIM steps, CFG 3, ESD-x; the attribute form by default (c = the
  label's short text "Van Gogh style.", c_from = each caption).
- SalUn ``canvas``: D_f = the concept's captions, c' = the caption with the next label, D_r = every
  other caption; 100 steps, 8 forget / 1 retain image per caption, cross-attention only, lr 1e-4
  (3e-4 when every concept is an object).
- AdvUnlearn: 300 iterations, lr 1e-3, k = 3 prefix tokens, 10 PGD steps, 20 DDIM steps; captions
  as c_e; objects in the attribute form with eta 3, styles as whole captions; retain = the other
  captions.
- SFD: c_f = every caption (all paraphrase templates) of the concept, c_o = the same caption with
  the next retained label of the same kind, C_r = every other caption; 400 distillation + 200
  forgetting iterations at batch 10 + 2, lr 3e-4 / 1e-4, kappa 1.5, lam_g_f 0.1, fp32 without
  gradient checkpointing (docs/methods/sfd.md).
- MACE ``canvas``: CFR on the captions as UCE's ``canvas-style`` / ``canvas-object`` (mapping: the first
  label not erased; the other labels' captions and "" preserved, s_p 0.3, lam 0.5), one rank-1 LoRA per
  concept for 50 steps at lr 1e-4 on rendered images with the renderer's masks (the object's silhouette,
  every pixel for a style) (benchmarks/sweeps/mace_canvas.json).
- SPM ``canvas``: 50 iterations at lr 2e-2, la_strength 10 (the reference's 1000 pins the adapter on this
  model), 4 anchors, 10 DDIM steps, the attribute form as ESD (benchmarks/sweeps/spm_canvas.json).
- Ring-A-Bell: pairs = each caption of the concept beside the same caption with every other label
  of its kind; population 64, 40 generations, the pairs' whole-word tokens, judged every 10
  generations (docs/methods/ring_a_bell.md).
- FMN: the concept's captions, one image each, the label's words re-steered without the end token;
  60 steps, lr 3e-4, batch 4, cross-attention only (docs/methods/fmn.md).
- CA: c* = each caption of the concept, c = the caption with the next label not erased; model-based loss,
  100 steps, lr 5e-4, batch 4, one anchor image per caption, every attention projection (``attn``: ``kv``
  kept Pop_Art) (docs/methods/ca.md).
"""

from __future__ import annotations

from .world import OBJECTS, PARAPHRASES, STYLES, caption, check_label, style_text

STYLE_TEXTS = tuple(style_text(s) for s in STYLES)
LISTS = {"style": STYLES, "object": OBJECTS}
UCE_TEMPLATES = {"canvas-style": tuple(caption(o, "{}") for o in OBJECTS),
                 "canvas-object": tuple(caption("{}", s) for s in STYLES)}
_UCE_BASE = dict(erase_scale=1.0, preserve_scale=0.3, lamb=0.5, token_policy="all_77", preserve_empty=True)
_RECE = {"canvas-style": (1e-3, 1), "canvas-object": (0.1, 1)}
ESD = dict(steps=400, lr=1e-3, ddim_steps=20, sample_guidance=3.0, param_set="esd-x")
SALUN = dict(steps=100, lr=1e-4, alpha=0.5, images_per_prompt=8, retain_images_per_prompt=1, param_set="xattn")
SALUN_OBJECT_LR = 3e-4
ADVUNLEARN = dict(steps=300, lr=1e-3, k=3, pgd_steps=10, ddim_steps=20)
ADVUNLEARN_ATTRIBUTE_ETA = 3.0
RING_A_BELL = dict(population=64, generations=40, vocabulary="pairs", judge_every=10)
SFD = dict(iterations=200, distill_iterations=400, batch_size=10, forget_batch_size=2, lr_psi=3e-4, lr_theta=1e-4,
           adam_betas=(0.0, 0.999), adam_eps=1e-6, alpha=1.0, lam_g_r=1.0, lam_g_f=0.1, lam_sg_r=1.0, lam_sg_f=1.0,
           t_init=625, t_min=20, t_max=979, kappa=1.5, cfg_dropout=0.1, grad_clip=1.0, ema_decay=0.0,
           pseudo_label="next", mixed_precision="no", gradient_checkpointing=False)
FMN = dict(steps=60, lr=3e-4, batch_size=4, images_per_prompt=1, param_set="xattn", use_pooler=False)
CA = dict(steps=100, lr=5e-4, batch_size=4, images_per_prompt=1, param_set="attn", prior_preservation=False,
          anchor=None)
MACE = dict(rank=1, lr=1e-4, steps=50, preserve_scale=0.3, lamb=0.5, importance_sampling=True)
SPM = dict(steps=50, lr=2e-2, la_strength=10.0, anchors=4, ddim_steps=10, sample_guidance=3.0, eta=1.0)

# Inference-time methods (benchmarks/sweeps/sld_canvas_Van_Gogh.json, sld-fine_canvas_Van_Gogh.json,
# safree_canvas_Winter.json): the safety concept / concept prompts are the labels' short texts ("Van Gogh style.").
SLD = dict(warmup_steps=0, guidance_scale=5000.0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7)
# SAFREE's latent re-attention keeps the paper's setting: on canvas-mini it neither helps nor hurts UA/IRA
# (Winter 85 % / 100 % with and without it, 5 objects x 4 seeds; docs/methods/safree.md).
SAFREE = dict(alpha=0.01, self_validation=False, svf_max_steps=10, svf_k=2.5, svf_t0=5.333,
              latent_reattention=True, lra_s1=0.9, lra_s2=0.2, lra_steps=[0, 49])


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def label(concept: str) -> tuple[str, str] | None:
    """``("style" | "object", label)`` when ``concept`` names a canvas style or object, else None."""
    for kind, labels in LISTS.items():
        try:
            return kind, labels[check_label(concept, labels, kind)]
        except ValueError:
            pass
    return None


class CanvasPresets:
    """The provider of canvas-mini (see the module docstring for every value and its source)."""

    name = "canvas-mini"

    def preset_names(self, method: str) -> tuple[str, ...]:
        """The names this provider gives presets of ``method`` (``uce-templates``: UCE's template sets)."""
        return {"uce": tuple(UCE_TEMPLATES), "rece": tuple(UCE_TEMPLATES), "uce-templates": tuple(UCE_TEMPLATES),
                "esd": ("canvas",), "salun": ("canvas",), "fmn": ("canvas",), "ca": ("canvas",),
                "mace": ("canvas",), "spm": ("canvas",)}.get(method, ())

    # -- the world's concepts ------------------------------------------------------------------
    def concepts(self) -> list[str]:
        return list(STYLE_TEXTS) + list(OBJECTS)

    def knows(self, concept: str) -> bool:
        return label(concept) is not None

    def guess_kind(self, concept: str) -> str:
        return label(concept)[0]

    def check_kind(self, concept: str, kind: str) -> None:
        from ..errors import ConfigError

        found = label(concept)
        if found and kind in LISTS and kind != found[0]:
            raise ConfigError(f"{concept!r} is a canvas-mini {found[0]}, so kind={kind!r} does not fit: "
                              f"give kind={found[0]!r} or leave `kind` unset")

    def _label(self, ctx, concept: str) -> tuple[str, str] | None:
        """The concept's label when its kind is its label's kind (else the papers' defaults apply)."""
        found = label(concept)
        return found if found and ctx.kind_of(concept) == found[0] else None

    def _labels(self, ctx) -> list[tuple[str, str]] | None:
        found = [self._label(ctx, c) for c in ctx.concepts]
        return found if all(found) else None

    # -- prompts -----------------------------------------------------------------------------
    def prompts(self, ctx, concept: str) -> list[str] | None:
        """The concept's UnlearnCanvas captions (canvas-mini's text encoder saw nothing else)."""
        found = self._label(ctx, concept)
        if found is None:
            return None
        kind, lab = found
        return [caption(o, lab) for o in OBJECTS] if kind == "style" else [caption(lab, s) for s in STYLES]

    def attribute(self, ctx, concept: str) -> str | None:
        """The label's short text inside its captions ("Van Gogh style.", "A Cats image.")."""
        found = self._label(ctx, concept)
        if found is None:
            return None
        kind, lab = found
        return f"{style_text(lab)} style." if kind == "style" else f"A {lab} image."

    def retain_prompts(self, ctx) -> list[str] | None:
        """Every caption of the world (the caller drops those that mention an erased concept)."""
        return [caption(o, s) for o in OBJECTS for s in STYLES] if self._labels(ctx) else None

    # -- UCE / RECE --------------------------------------------------------------------------
    def uce_templates(self, ctx, name: str) -> tuple[str, ...] | None:
        return UCE_TEMPLATES.get(name)

    def uce_preset(self, ctx, name: str | None) -> tuple[str, dict] | None:
        """``canvas-style`` / ``canvas-object``: chosen when every concept is a style (an object)."""
        if name is None:
            kinds = {found[0] for found in self._labels(ctx) or [(None, None)]}
            if len(kinds) != 1 or None in kinds:
                return None
            name = f"canvas-{kinds.pop()}"
        if name not in UCE_TEMPLATES:
            return None
        names = STYLE_TEXTS if name == "canvas-style" else OBJECTS
        concepts = [style_text(c) for c in ctx.concepts]
        erased = {_key(c) for c in concepts}
        guide = next((n for n in names if _key(n) not in erased), "")   # the first name not erased
        return name, {**_UCE_BASE, "guide": guide, "preserve": names, "templates": UCE_TEMPLATES[name],
                      "concepts": concepts}

    def uce_presets(self) -> tuple[str, ...]:
        return tuple(UCE_TEMPLATES)

    def rece_defaults(self, ctx, uce_preset: str) -> tuple[float, int] | None:
        return _RECE.get(uce_preset)

    # -- ESD ---------------------------------------------------------------------------------
    def esd_preset(self, ctx, name: str | None) -> tuple[str, dict] | None:
        return ("canvas", dict(ESD)) if name in (None, "canvas") else None

    # -- SalUn -------------------------------------------------------------------------------
    def salun_plan(self, ctx, name: str | None, pseudo: str | None) -> dict | None:
        """D_f, D_r and c' over the caption grid (module docstring), or None off the world."""
        from ..errors import ConfigError

        if name not in (None, "canvas"):
            return None
        labels = self._labels(ctx)
        if labels is None:
            if name == "canvas":
                raise ConfigError(f"preset 'canvas' needs canvas styles or objects as concepts, got {ctx.concepts}")
            return None
        targets = set(labels)

        def swap(kind, lab):  # the fixed next label that is not itself a target (SalUn's next class)
            labs = LISTS[kind]
            i = labs.index(lab)
            nxt = next(labs[(i + d) % len(labs)] for d in range(1, len(labs) + 1)
                       if (kind, labs[(i + d) % len(labs)]) not in targets)
            return pseudo.replace(" ", "_") if pseudo else nxt

        forget, retain, pseudo_of = [], [], {}
        for s in STYLES:
            for o in OBJECTS:
                hit = ("style", s) in targets or ("object", o) in targets
                (forget if hit else retain).append(caption(o, s))
                if hit:
                    s2 = swap("style", s) if ("style", s) in targets else s
                    o2 = swap("object", o) if ("object", o) in targets else o
                    pseudo_of[caption(o, s)] = caption(o2.replace("_", " "), s2)
        values = dict(SALUN)
        if {kind for kind, _ in targets} == {"object"}:
            values["lr"] = SALUN_OBJECT_LR
        return {"preset": "canvas", "forget": forget, "retain": retain, "pseudo_of": pseudo_of, "values": values}

    # -- AdvUnlearn --------------------------------------------------------------------------
    def advunlearn_preset(self, ctx) -> tuple[str, dict]:
        return "canvas", dict(ADVUNLEARN)

    def advunlearn_form(self, ctx, concept: str) -> str | None:
        """``prompt_form="auto"``: objects in the attribute form, styles as whole captions (measured)."""
        found = self._label(ctx, concept)
        return None if found is None else ("attribute" if found[0] == "object" else "caption")

    def advunlearn_attribute_eta(self, ctx) -> float:
        return ADVUNLEARN_ATTRIBUTE_ETA

    # -- SFD ---------------------------------------------------------------------------------
    def sfd_preset(self, ctx) -> tuple[str, dict]:
        """SFD's numeric options on canvas-mini (any concept: they follow the model's size)."""
        return "canvas", dict(SFD)

    def sfd_prompts(self, ctx, pseudo_label: str, choose: bool = True) -> dict | None:
        """Words, safe choices per concept (``choose``), and the forget / retain captions when all are labels."""
        from ..errors import ConfigError

        labels = {c: self._label(ctx, c) for c in ctx.concepts}
        if not any(labels.values()):
            return None
        gone = {lab for lab in labels.values() if lab}
        words = {c: style_text(labels[c][1]) if labels[c] else c for c in ctx.concepts}
        choices = {}
        for c, found in labels.items():
            if not found or not choose:
                continue
            kind, lab = found
            pool = LISTS[kind]
            i = pool.index(lab)
            kept = [x for x in pool[i + 1:] + pool[:i] if (kind, x) not in gone]  # the next label first
            if not kept:
                raise ConfigError(f"every canvas {kind} is being forgotten, so none is left as the safe concept: "
                                  "give `override` or `safe_prompts`")
            choices[c] = [style_text(x) for x in (kept[:1] if pseudo_label == "next" else kept)]
        out = {"preset": "canvas", "words": words, "choices": choices, "forget": None, "retain": None}
        if all(labels.values()):
            templates = list(dict.fromkeys(PARAPHRASES))
            cells = [(o, s, t) for o in OBJECTS for s in STYLES for t in templates]
            hit = [bool({("object", o), ("style", s)} & gone) for o, s, _ in cells]
            out["forget"] = [caption(o, s, t) for (o, s, t), h in zip(cells, hit) if h]
            out["retain"] = [caption(o, s, t) for (o, s, t), h in zip(cells, hit) if not h]
        return out


    # -- FMN / CA ----------------------------------------------------------------------------
    def concept_words(self, ctx, concept: str) -> str | None:
        """The words a caption uses for the concept's label ("Van Gogh", "Cats"), which FMN re-steers."""
        found = self._label(ctx, concept)
        return None if found is None else style_text(found[1])

    def fmn_preset(self, ctx, name: str | None) -> tuple[str, dict] | None:
        """FMN on the concept's captions (``ctx.prompts``), one image each, values measured here."""
        if name not in (None, "canvas") or self._labels(ctx) is None:
            return None
        return "canvas", dict(FMN)

    def ca_plan(self, ctx, name: str | None) -> dict | None:
        """CA pairs: each caption of the concept (c*) with the same caption in the next label not erased (c)."""
        if name not in (None, "canvas"):
            return None
        plan = self.salun_plan(ctx, name, None)
        if plan is None:
            return None
        pairs = [(c_star, plan["pseudo_of"][c_star]) for c_star in plan["forget"]]
        return {"preset": "canvas", "pairs": pairs, "values": dict(CA)}

    # -- MACE / SPM --------------------------------------------------------------------------
    def mace_preset(self, ctx, name: str | None) -> tuple[str, dict] | None:
        """MACE on canvas-mini: CFR maps each caption of the concept onto the same caption with the first
        label not erased (UCE's canvas presets), preserving the other labels' captions and ""."""
        found = self.uce_preset(ctx, None) if name in (None, "canvas") else None
        if found is None:
            return None
        uce = found[1]
        erased = {_key(c) for c in uce["concepts"]}
        preserve = [t.format(p) for p in uce["preserve"] if _key(p) not in erased for t in uce["templates"]]
        return "canvas", {**MACE, "mapping": uce["guide"], "templates": list(uce["templates"]),
                          "preserve": [""] + preserve, "concepts": uce["concepts"]}

    def mace_images(self, ctx, concept: str, n: int, seed: int):
        """``n`` rendered images of the concept (uint8 n x 32 x 32 x 3) and where it is in each (n x 32 x 32):
        the object's silhouette for an object, every pixel for a style (a style paints the whole image)."""
        import numpy as np

        from .render import render, render_mask

        found = self._label(ctx, concept)
        if found is None:
            return None
        kind, lab = found
        cells = [(OBJECTS[i % len(OBJECTS)], lab) if kind == "style" else (lab, STYLES[i % len(STYLES)])
                 for i in range(n)]
        images = np.stack([np.asarray(render(o, s, seed * 1000 + i)) for i, (o, s) in enumerate(cells)])
        masks = np.stack([np.ones(images.shape[1:3], bool) if kind == "style" else render_mask(o, s, seed * 1000 + i)
                          for i, (o, s) in enumerate(cells)])
        return images, masks

    def spm_preset(self, ctx) -> tuple[str, dict]:
        """SPM's numeric options on canvas-mini (any concept: they follow the model's size)."""
        return "canvas", dict(SPM)

    # -- Ring-A-Bell -------------------------------------------------------------------------
    def concept_pairs(self, ctx, concept: str) -> list[tuple[str, str]] | None:
        """Caption pairs that differ only in the concept: each caption of the concept beside the same
        caption with every other label of its kind (Ring-A-Bell's concept vector)."""
        found = self._label(ctx, concept)
        if found is None:
            return None
        kind, lab = found
        if kind == "style":
            return [(caption(o, lab), caption(o, s)) for o in OBJECTS for s in STYLES if s != lab]
        return [(caption(lab, s), caption(o, s)) for s in STYLES for o in OBJECTS if o != lab]

    def ring_a_bell_preset(self, ctx) -> dict:
        """Ring-A-Bell's search size on canvas-mini (docs/methods/ring_a_bell.md)."""
        return dict(RING_A_BELL)

    # -- SLD / SAFREE (inference time) -------------------------------------------------------
    def _attributes(self, ctx) -> list[str] | None:
        texts = [self.attribute(ctx, c) for c in ctx.concepts]
        return None if None in texts else texts

    def sld_preset(self, ctx, name: str | None) -> tuple[str, dict] | None:
        """SLD away from the labels' short texts ("Van Gogh style."), with the measured values."""
        texts = self._attributes(ctx) if name is None else None
        return None if texts is None else ("canvas", {**SLD, "safety_concept": " ".join(texts)})

    def safree_preset(self, ctx, name: str | None) -> tuple[str, dict] | None:
        """SAFREE's subspace from the labels' short texts, with the measured self-validation values."""
        texts = self._attributes(ctx) if name is None else None
        return None if texts is None else ("canvas", {**SAFREE, "concept_prompts": texts})


PROVIDER = CanvasPresets()
