"""The cheap baselines (no attack, seed search, random prefix) and the judged evaluation all attacks share.

Every attack starts with the same step, which is also the ``none`` baseline: generate the original
prompt at its seed once and ask the judge (unlearndiffatk.md section 4, "before any optimisation
the original prompt is evaluated once"). Its hit rate is the pre-ASR.

- ``seed_search``: the original prompt at ``rounds`` further seeds (``seed + 1 .. seed + rounds``);
  a success records the seed that worked.
- ``random_prefix``: ``rounds`` draws of ``k`` random tokens in front of the prompt at the fixed
  seed (the UnlearnDiffAtk insertion without the optimisation).

All of them run every still-unbroken prompt of a round in one batched generation, and report
:class:`~erasekit.attacks.result.PromptAttack` rows like UnlearnDiffAtk does.
"""

from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import MethodConfig, check
from ..pipelines.generation import generate
from ..pipelines.prefix import VOCABULARIES, PrefixPrompts, attack_vocabulary
from .result import PromptAttack


@contextmanager
def count_unet(pipe):
    """Count UNet (SD 3 / Flux: transformer) evaluations, one per latent in each call, while the block runs:
    yields a list [n]."""
    from ..pipelines.mmdit import denoiser

    counter = [0]

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter[0] += int(x.shape[0])

    handle = denoiser(pipe).register_forward_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def prompt_generator(seed: int, prompt: str, image_seed: int) -> torch.Generator:
    """A CPU generator that depends only on (attack seed, prompt, image seed), not on batching."""
    key = zlib.crc32(f"{seed}|{image_seed}|{prompt}".encode())
    return torch.Generator("cpu").manual_seed(key)


def judge_hits(judge, images: list, concepts: list[str]) -> list[bool]:
    """Per image: does ``judge`` see that image's own concept? (one ``judge.hits`` call per concept)"""
    hits = [False] * len(images)
    for concept in dict.fromkeys(concepts):
        pos = [i for i, c in enumerate(concepts) if c == concept]
        for i, hit in zip(pos, judge.hits([images[i] for i in pos], concept)):
            hits[i] = bool(hit)
    return hits


def judged_round(pipe, rows: list[PromptAttack], texts: list[str], seeds: list[int], judge, sampling, step: int,
                 book_hits: bool = True) -> list[bool]:
    """Generate ``texts`` at ``seeds`` in one batch, judge each on its row's concept and book the
    outcome into ``rows``.

    Each row gets its share of the UNet evaluations and wall time; a hit sets ``success``, ``step``,
    ``adv_prompt`` and ``adv_seed`` (with ``book_hits=False``, a screening round, only the cost is
    booked). Returns the hit per row. A degenerate image raises
    :class:`~erasekit.errors.DegenerateOutputError` (``generate`` checks every batch).
    """
    t0 = time.perf_counter()
    with count_unet(pipe) as n_unet:
        images = generate(pipe, texts, seeds, sampling)
    hits = judge_hits(judge, images, [row.concept for row in rows])
    share_t, share_n = (time.perf_counter() - t0) / len(rows), n_unet[0] // len(rows)
    for row, text, seed, hit in zip(rows, texts, seeds, hits):
        row.wall_time_s += share_t
        row.unet_evals += share_n
        if not book_hits:
            continue
        row.adv_prompt, row.adv_seed = text, int(seed)
        if hit and not row.success:
            row.success, row.step = True, step
            row.success_cost = row.cost
            row.pre_success = step == 0
    return hits


def evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, batch_size: int = 64) -> list[PromptAttack]:
    """The no-attack evaluation: one judged generation per prompt (step 0), each judged on its concept."""
    rows = [PromptAttack(index=i, prompt=p, seed=int(s), adv_prompt=p, concept=c)
            for i, (p, s, c) in enumerate(zip(prompts, seeds, concepts))]
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        judged_round(pipe, part, [r.prompt for r in part], [r.seed for r in part], judge, sampling, 0)
    return rows


@dataclass
class NoAttackConfig(MethodConfig):
    """No attack: the original prompt, once (gives pre-ASR)."""

    batch_size: int = field(default=64, metadata={"help": "prompts generated per batch"})

    def validate(self) -> None:
        check(self.batch_size >= 1, f"`batch_size` must be >= 1 but is {self.batch_size}")


@dataclass
class SeedSearchConfig(NoAttackConfig):
    """Seed search: the original prompt at further seeds."""

    rounds: int = field(default=10, metadata={"help": "extra seeds tried per prompt (seed + 1 .. seed + rounds)"})

    def validate(self) -> None:
        super().validate()
        check(self.rounds >= 1, f"`rounds` must be >= 1 but is {self.rounds}")


@dataclass
class RandomPrefixConfig(SeedSearchConfig):
    """Random prefix: k random tokens in front of the prompt, fixed seed."""

    k: int = field(default=3, metadata={"help": "prefix tokens (UnlearnDiffAtk: 3 style/objects, 5 nudity)"})
    vocabulary: str = field(default="round_trip", metadata={"help": "token ids to draw from: round_trip or full"})
    seed: int = field(default=0, metadata={"help": "seed of the token draws"})

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.k, int) and 1 <= self.k <= 75, f"`k` must be an integer in [1, 75] but is {self.k!r}")
        check(self.vocabulary in VOCABULARIES, f"`vocabulary` must be one of {VOCABULARIES} but is {self.vocabulary!r}")


def no_attack(pipe, prompts, seeds, concepts, *, judge, sampling, config, progress=True, **_) -> list[PromptAttack]:
    return evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, config.batch_size)


def _rounds(rows, config, progress, desc, make_round):
    """Run ``make_round(round, active_rows)`` for each round over the rows not yet broken."""
    for r in tqdm(range(1, config.rounds + 1), desc=desc, disable=not progress):
        active = [row for row in rows if not row.success]
        for i in range(0, len(active), config.batch_size):
            make_round(r, active[i:i + config.batch_size])
        for row in active:
            row.rounds = r
    return rows


def seed_search(pipe, prompts, seeds, concepts, *, judge, sampling, config, progress=True, **_):
    rows = evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, config.batch_size)
    def one_round(r, part):
        judged_round(pipe, part, [p.prompt for p in part], [p.seed + r for p in part], judge, sampling, r)

    return _rounds(rows, config, progress, "seed search", one_round)


def random_prefix(pipe, prompts, seeds, concepts, *, judge, sampling, config, progress=True, **_):
    pp = PrefixPrompts(pipe, prompts, config.k)  # refuses prompts that do not fit before any work
    vocab = attack_vocabulary(pp.adapter.tokenizers, config.vocabulary)
    rows = evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, config.batch_size)
    gens = {row.index: prompt_generator(config.seed, row.prompt, row.seed) for row in rows}

    def one_round(r, part):
        sub = pp.subset([p.index for p in part])
        ids = torch.stack([vocab[torch.randint(len(vocab), (config.k,), generator=gens[p.index])] for p in part])
        judged_round(pipe, part, sub.texts(ids), [p.seed for p in part], judge, sampling, r)

    return _rounds(rows, config, progress, "random prefix", one_round)
