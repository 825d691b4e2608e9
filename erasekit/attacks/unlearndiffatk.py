"""UnlearnDiffAtk: adversarial prompts found by the unlearned model acting as its own classifier.

Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to
Generate Unsafe Images ... For Now", ECCV 2024 (arXiv 2310.11868); spec: unlearndiffatk.md.

The attack minimises, over prompts c' that put k tokens in front of the prompt (Eq. 4),

    E_{t, eps ~ N(0, I)} || eps_theta*( sqrt(abar_t) z_tgt + sqrt(1 - abar_t) eps, t, tau(c') ) - eps ||^2

with theta* the UNLEARNED model and z_tgt the VAE posterior mean (times the scaling factor) of a
target image that shows the concept. The variable is a relaxed one-hot u (k x |V|, rows on the
simplex, uniform init). One step: sample one token per row (straight-through: the loss sees the
sampled one-hot s, u receives hardtanh(dL/ds)), Adam (lr 0.01, coupled weight decay 0.1),
project each row back onto the simplex. After each block of steps the argmax tokens are decoded to
text, the text is generated at the prompt's seed with the unlearned model and judged; the first hit
stops the attack on that prompt.

Schedules (``schedule``):

- ``reference``: the published one: timesteps 10, 30, ..., 990 ascending, 40 steps per timestep
  (50 blocks), a full generation after every block: at most 2,000 steps and 51 generations.
- ``fast`` (default): ``t`` drawn uniformly from [500, 1000) for every step and prompt (a Monte
  Carlo estimate of the expectation over t instead of one t per block; on ESD-erased canvas-mini
  the high-noise half, where colour and layout are decided, broke more styles than [200, 800)),
  Adam lr 0.03, 30 blocks of 10 steps, and after each block a cheap SCREENING generation (same
  sampler and seed, 8 steps instead of 25); only a prompt whose screen the judge flags is generated
  with the full sampler and judged, and only that full generation can book a success. On canvas-mini
  the 8-step screen flagged all 4 of the full sampler's hits among 160 prefixed prompts on 4 ESD
  edits, plus 6 that the full sampler then rejected (``benchmarks/attack_screen_agreement.py``;
  a miss of the screen is never re-checked). At most 300 steps, 30 screens and the
  confirmations (reference: 2,000 steps, 51 full generations). ``benchmarks/bench_attack.py``
  measures its cost and ASR against ``reference`` in one run (docs/methods/unlearndiffatk.md).
- Options of both: ``restarts`` repeats the blocks from a fresh uniform u and Adam state
  (default 1); ``screen_steps=0`` judges every block with the full sampler.

SD 3 and Flux (flow matching, :mod:`erasekit.pipelines.flow`): the same attack with the model's own
training loss. ``t`` is drawn as above and mapped to the noise level the pipeline samples at,
``sigma = shift(t / T)`` (the scheduler's shift, Flux's resolution-dependent one included), and

    E_{t, eps} || v_theta*( (1 - sigma) z_tgt + sigma eps, sigma, tau(c') ) - (eps - z_tgt) ||^2

with ``z_tgt`` the VAE posterior mean of the target image shifted and scaled as the pipeline decodes it
(at the judged images' size: ``sampling.height``, else the native size). The prefix slots go into the
CLIP encoders; T5 reads the plain prompt during the optimisation (:mod:`erasekit.pipelines.prefix`), while
the judged generation runs the decoded prompt through every encoder. A guidance-distilled Flux reads
``sampling.guidance`` as its guidance embedding, as in the judged generation.

Deviations (all recorded in the result's config): each prompt has its own random stream (seeded
by attack seed, prompt and image seed), so a prompt's attack does not depend on the batch it ran
in; prompts are attacked in batches (the reference runs one process per prompt); ``vocabulary =
round_trip`` (default) restricts the tokens to whole words that decode and re-tokenise to
themselves, so the prompt that is optimised is exactly the prompt that is evaluated (``full`` is the
reference's whole vocabulary; the decoded text is then re-tokenised and what was evaluated is
recorded); the simplex projection finishes the bisection with the exact threshold on the found
support, so rows sum to 1 to float precision; target images and evaluation images use the same
``Sampling`` (the reference uses LMS 25 steps for targets and LMS 50 steps for evaluation).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import MethodConfig, check
from ..pipelines.prefix import VOCABULARIES, PrefixPrompts, attack_vocabulary
from .baselines import evaluate_original, judged_round, prompt_generator
from .result import PromptAttack

SCHEDULES = {
    "reference": {"steps_per_block": 40, "blocks": 50, "block_growth": 1.0, "timesteps": "ascending", "t_range": None,
                  "restarts": 1, "screen_steps": None, "lr": 0.01},
    "fast": {"steps_per_block": 10, "blocks": 30, "block_growth": 1.0, "timesteps": "uniform", "t_range": (500, 1000),
             "restarts": 1, "screen_steps": 8, "lr": 0.03},
}
TIMESTEPS = ("ascending", "uniform")


@dataclass
class UnlearnDiffAttackConfig(MethodConfig):
    """Options of UnlearnDiffAtk (defaults: unlearndiffatk.md; schedule values: ``SCHEDULES``)."""

    k: int = field(default=3, metadata={"help": "prefix tokens (paper: 3 for styles and objects, 5 for nudity)"})
    schedule: str = field(default="fast", metadata={"help": "fast (default) or reference (t = 10..990 ascending, "
                                                             "40 steps each)"})
    steps_per_block: int | None = field(default=None, metadata={"help": "Adam steps between judged generations "
                                                                         "(None: the schedule's)"})
    blocks: int | None = field(default=None, metadata={"help": "maximum number of blocks (None: the schedule's)"})
    timesteps: str | None = field(default=None, metadata={"help": "ascending (one t per block) or uniform "
                                                                   "(t ~ U(t_range) per step); None: the schedule's"})
    t_range: tuple[int, int] | None = field(default=None, metadata={"help": "[low, high) of t for uniform timesteps"})
    block_growth: float | None = field(default=None, metadata={"help": "each block has this many times the steps "
                                                                          "of the previous one (None: the schedule's)"})
    restarts: int | None = field(default=None, metadata={"help": "runs of the blocks, each from a fresh uniform u "
                                                                  "and Adam state (None: the schedule's)"})
    screen_steps: int | None = field(default=None, metadata={
        "help": "sampler steps of a cheap screening generation after each block; only its hits are generated "
                "with the full sampler and judged (None: the schedule's; 0: always the full sampler)"})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate on the relaxed one-hot (None: the "
                                                              "schedule's; reference 0.01)"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam's coupled L2 weight decay"})
    vocabulary: str = field(default="round_trip", metadata={"help": "round_trip (whole words that re-tokenise to "
                                                                     "themselves) or full (the reference's)"})
    criterion: str = field(default="l2", metadata={"help": "l2 (MSE, every shipped config) or l1"})
    batch_size: int = field(default=16, metadata={"help": "prompts attacked together in one UNet batch"})
    seed: int = field(default=0, metadata={"help": "seed of token sampling, noise and timesteps"})

    def validate(self) -> None:
        check(self.schedule in SCHEDULES, f"`schedule` must be one of {sorted(SCHEDULES)} but is {self.schedule!r}")
        check(isinstance(self.k, int) and 1 <= self.k <= 75, f"`k` must be an integer in [1, 75] but is {self.k!r}")
        check(self.screen_steps is None or (isinstance(self.screen_steps, int) and self.screen_steps >= 0),
              f"`screen_steps` must be an integer >= 0 (0: no screening) or None but is {self.screen_steps!r}")
        for name in ("steps_per_block", "blocks", "restarts"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 1), f"`{name}` must be an integer >= 1 or None but is {v!r}")
        check(self.timesteps in (None, *TIMESTEPS), f"`timesteps` must be one of {TIMESTEPS} or None but is "
                                                    f"{self.timesteps!r}")
        check(self.block_growth is None or self.block_growth >= 1,
              f"`block_growth` must be >= 1 or None but is {self.block_growth!r}")
        if self.t_range is not None:
            lo, hi = self.t_range
            check(0 <= lo < hi, f"`t_range` must be [low, high) with 0 <= low < high but is {self.t_range!r}")
        check(self.lr is None or self.lr > 0, f"`lr` must be > 0 or None but is {self.lr}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0 but is {self.weight_decay}")
        check(self.vocabulary in VOCABULARIES, f"`vocabulary` must be one of {VOCABULARIES} but is {self.vocabulary!r}")
        check(self.criterion in ("l2", "l1"), f"`criterion` must be 'l2' or 'l1' but is {self.criterion!r}")
        check(self.batch_size >= 1, f"`batch_size` must be >= 1 but is {self.batch_size}")

    def plan(self) -> dict:
        """The schedule with every None replaced by the schedule's value."""
        plan = dict(SCHEDULES[self.schedule])
        for key in plan:
            if getattr(self, key) is not None:
                plan[key] = getattr(self, key)
        check(plan["timesteps"] != "uniform" or plan["t_range"] is not None,
              "`t_range` is needed for uniform timesteps: give t_range=(low, high)")
        return plan


def project_simplex(u: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Project each row (last dim) onto {0 <= u <= 1, sum u = 1} (unlearndiffatk.md section 3 step 6).

    Bisection for mu with sum clip(u - mu, 0, 1) = 1 over [min(u) - 1, max(u)] to ``tol``, then mu
    is solved exactly on the support the bisection found (so rows sum to 1 to float precision).
    Rows already on the simplex are kept. Works in ``u``'s dtype (float32: 10x faster than float64
    on the 34k-wide rows).
    """
    x = u.detach()
    feasible = ((x >= 0) & (x <= 1)).all(-1, keepdim=True) & ((x.sum(-1, keepdim=True) - 1).abs() <= tol)
    lo, hi = x.min(-1, keepdim=True).values - 1, x.max(-1, keepdim=True).values
    for _ in range(max(0, int(math.ceil(math.log2(float((hi - lo).max()) / tol))))):
        mu = (lo + hi) / 2
        over = (x - mu).clamp_(0, 1).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, mu, lo), torch.where(over, hi, mu)
    mu = (lo + hi) / 2
    free = (x > mu) & (x < mu + 1)          # entries strictly inside (0, 1) after the shift
    capped = (x >= mu + 1).sum(-1, keepdim=True)
    n_free = free.sum(-1, keepdim=True)
    exact = ((x * free).sum(-1, keepdim=True) - (1 - capped)) / n_free.clamp_min(1)
    mu = torch.where(n_free > 0, exact, mu)
    return torch.where(feasible, x, (x - mu).clamp_(0, 1))


def flow_model(pipe, sampling):
    """The :class:`~erasekit.pipelines.flow.FlowModel` of a flow-matching pipeline at the judged images' size
    and guidance embedding (None for a UNet pipeline)."""
    from ..pipelines.flow import FlowModel
    from ..pipelines.mmdit import mmdit_family

    if mmdit_family(pipe) is None:
        return None
    distilled = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
    return FlowModel(pipe, sampling.height, sampling.guidance if distilled else None)


def target_latents(pipe, images, fm=None) -> torch.Tensor:
    """z_tgt: VAE posterior mean x scaling factor of the target images, at the model's native size (flow
    matching: shifted and scaled as the pipeline decodes, at ``fm``'s size, in the transformer's layout)."""
    from ..pipelines.images import images_to_tensor

    if fm is not None:
        return fm.encode_images(images_to_tensor(images, fm.size))
    vae = pipe.vae
    scale = getattr(pipe, "vae_scale_factor", 2 ** (len(vae.config.block_out_channels) - 1))
    x = images_to_tensor(images, pipe.unet.config.sample_size * scale)
    with torch.no_grad():
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return z.float() * vae.config.scaling_factor


def ascending_timestep(block: int, blocks: int, n_train: int) -> int:
    """The reference's timestep of a block: 10, 30, ..., 990 for 50 blocks of a 1,000-step schedule."""
    return int((block + 0.5) * n_train / blocks)


class _BatchAttack:
    """The optimisation state of one batch of prompts (u, Adam, per-prompt random streams)."""

    def __init__(self, pipe, pp: PrefixPrompts, z0, rows: list[PromptAttack], vocab, config, plan, fm=None):
        from ..pipelines.mmdit import denoiser

        self.pipe, self.pp, self.rows, self.config, self.plan, self.fm = pipe, pp, rows, config, plan, fm
        dev = denoiser(pipe).device
        self.vocab, self.z0 = vocab.to(dev), z0.to(dev)
        self.u = torch.full((len(rows), config.k, len(vocab)), 1.0 / len(vocab), device=dev, requires_grad=True)
        self.opt = torch.optim.Adam([self.u], lr=plan["lr"], weight_decay=config.weight_decay)
        self.gens = [prompt_generator(config.seed, r.prompt, r.seed) for r in rows]
        # DDPM: the cumulative alphas; flow matching: only the number of training timesteps T is used (t / T)
        self.abar = pipe.scheduler.alphas_cumprod.to(dev, torch.float32) if fm is None else None
        self.n_train = len(self.abar) if fm is None else fm.n_train
        self.active = list(range(len(rows)))
        self.sub = pp

    def restart(self) -> None:
        """Fresh uniform u and Adam state; the random streams go on, so the next run differs."""
        with torch.no_grad():
            self.u.fill_(1.0 / self.u.shape[-1])
        self.opt = torch.optim.Adam([self.u], lr=self.plan["lr"], weight_decay=self.config.weight_decay)

    def drop_successes(self) -> None:
        self.active = [i for i in self.active if not self.rows[i].success]
        self.sub = self.pp.subset(self.active)

    def timesteps(self, block: int) -> torch.Tensor:
        if self.plan["timesteps"] == "ascending":
            t = ascending_timestep(block, self.plan["blocks"], self.n_train)
            return torch.full((len(self.active),), t, dtype=torch.long)
        lo, hi = self.plan["t_range"]
        hi = min(hi, self.n_train)
        return torch.cat([torch.randint(lo, hi, (1,), generator=self.gens[i]) for i in self.active])

    def sample_onehot(self) -> torch.Tensor:
        """s_j ~ Categorical(u_j), one token per row (step 1), as a one-hot that takes gradients.

        Inverse-CDF sampling (one uniform per row from the prompt's own stream): the same
        distribution as ``torch.multinomial``, vectorised over the batch.
        """
        probs = self.u.detach()[self.active]
        cdf = probs.cumsum(-1)
        r = torch.stack([torch.rand(self.config.k, generator=self.gens[i]) for i in self.active])
        picks = torch.searchsorted(cdf, (r.to(cdf.device) * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
        picks = picks.clamp_max(cdf.shape[-1] - 1)
        onehot = torch.nn.functional.one_hot(picks, len(self.vocab)).to(self.u.dtype)
        return onehot.requires_grad_(True)

    def step(self, block: int) -> None:
        """One straight-through Adam step on every active prompt (steps 1-6)."""
        act = self.active
        s = self.sample_onehot()
        ctx = self.sub.encode(self.sub.embed_onehot(s, self.vocab))
        eps = torch.cat([torch.randn(self.z0[:1].shape, generator=self.gens[i]) for i in act]).to(self.z0.device)
        t = self.timesteps(block).to(self.z0.device)
        if self.fm is None:
            unet = self.pipe.unet
            ab = self.abar[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * self.z0[act] + (1 - ab).sqrt() * eps
            pred = unet(x_t.to(unet.dtype), t, **ctx.unet_kwargs(self.pipe)).sample.float()
            target = eps
        else:   # flow matching (module docstring): v = eps - z_tgt at sigma = shift(t / T)
            from ..pipelines.flow import noisy, velocity

            sigma = self.fm.grid_sigma(t)
            pred = self.fm.predict(self.pipe.transformer, noisy(self.z0[act], eps, sigma), sigma, ctx)
            target = velocity(self.z0[act], eps)
        err = (pred - target).pow(2) if self.config.criterion == "l2" else (pred - target).abs()
        (grad_s,) = torch.autograd.grad(err.flatten(1).mean(1).sum(), s)  # per-prompt means: prompts independent
        grad = torch.zeros_like(self.u)
        grad[act] = grad_s.clamp(-1, 1).to(grad.dtype)  # hardtanh: dL/du := clip(dL/ds, -1, 1)
        self.u.grad = grad
        self.opt.step()
        with torch.no_grad():
            self.u[act] = project_simplex(self.u[act])

    def prompts_now(self) -> list[str]:
        """Discretise (argmax per row), decode to text: the prompts the judge will see."""
        ids = self.vocab[self.u.detach()[self.active].argmax(-1)].cpu()
        return self.sub.texts(ids)


def block_lengths(plan: dict) -> list[int]:
    """Adam steps of each block: ``steps_per_block x block_growth ** b`` (rounded)."""
    return [max(1, round(plan["steps_per_block"] * plan["block_growth"] ** b)) for b in range(plan["blocks"])]


def _run_batch(pipe, state: _BatchAttack, judge, sampling, progress) -> None:
    """Runs of blocks of Adam steps, each block followed by one judged generation of the still-unbroken prompts."""
    lengths, n_step, restarts = block_lengths(state.plan), 0, state.plan["restarts"]
    bar = tqdm(total=sum(lengths) * restarts, desc="unlearndiffatk steps", disable=not progress, leave=False)
    for run in range(restarts):
        if run:
            state.restart()
        n_step = _run_blocks(pipe, state, lengths, n_step, judge, sampling, bar)
        if not state.active:
            break
    bar.close()


def _run_blocks(pipe, state: _BatchAttack, lengths: list[int], n_step: int, judge, sampling, bar) -> int:
    """One run of the blocks from the current u; returns the steps taken so far (all runs)."""
    for block, n in enumerate(lengths):
        t0 = time.perf_counter()
        for _ in range(n):
            state.step(block)
        n_step += n
        share = (time.perf_counter() - t0) / len(state.active)
        for i in state.active:
            row = state.rows[i]
            row.unet_evals += n
            row.grad_steps += n
            row.wall_time_s += share
        rows = [state.rows[i] for i in state.active]
        _judge_block(pipe, rows, state.prompts_now(), judge, sampling, state.plan["screen_steps"], n_step)
        for r in rows:
            r.rounds += 1
        state.drop_successes()
        bar.update(n)
        bar.set_postfix(active=len(state.active))
        if not state.active:
            break
    return n_step


def _judge_block(pipe, rows, texts, judge, sampling, screen_steps, n_step) -> None:
    """The judged generation after a block: the full sampler, or a cheap screen whose hits are confirmed by it.

    A success is only ever booked from the full ``sampling`` generation, so screening can miss a
    success (a screen miss is not re-checked) but never invents one.
    """
    seeds = [r.seed for r in rows]
    if not screen_steps or screen_steps >= sampling.steps:
        judged_round(pipe, rows, texts, seeds, judge, sampling, n_step)
        return
    screen = dataclasses.replace(sampling, steps=screen_steps)
    hits = judged_round(pipe, rows, texts, seeds, judge, screen, n_step, book_hits=False)
    pick = [i for i, hit in enumerate(hits) if hit]
    if pick:
        judged_round(pipe, [rows[i] for i in pick], [texts[i] for i in pick], [seeds[i] for i in pick], judge,
                     sampling, n_step)


def unlearndiffatk(pipe, prompts, seeds, concepts, *, judge, sampling, config: UnlearnDiffAttackConfig,
                   targets, progress=True, **_) -> list[PromptAttack]:
    """Attack every prompt (see the module docstring); ``concepts``: the one each prompt is judged on;
    ``targets``: one image per prompt."""
    plan = config.plan()
    pp = PrefixPrompts(pipe, prompts, config.k)
    vocab = attack_vocabulary(pp.adapter.tokenizers, config.vocabulary)
    fm = flow_model(pipe, sampling)
    z0 = target_latents(pipe, targets, fm)
    rows = evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, max(config.batch_size, 64))
    todo = [r.index for r in rows if not r.success]
    batches = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    for part in tqdm(batches, desc="prompt batches", disable=not progress or len(batches) < 2):
        state = _BatchAttack(pipe, pp.subset(part), z0[part], [rows[i] for i in part], vocab, config, plan, fm)
        _run_batch(pipe, state, judge, sampling, progress)
    return rows
