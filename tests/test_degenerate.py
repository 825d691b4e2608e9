"""A broken model is never reported as erased or held.

Its images (non-finite, or one flat colour) raise ``DegenerateOutputError`` at the first batch that
holds one: in ``generate``, in every attack, in ``evaluate`` (the edited model's images come first),
and through the CLI (exit 2, one line, no result file). Healthy images, canvas-mini's darkest and
plainest included, stay far above the flatness threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.errors import DegenerateOutputError
from erasekit.pipelines import Edit, Sampling, generate
from erasekit.pipelines.generation import DEGENERATE_STD, degenerate_reason

from _eval_helpers import ColourJudge, tiny_protocol

FAST = Sampling(steps=2, batch_size=1)


class AnyJudge(ColourJudge):
    """The colour judge, counting the images it is shown."""

    def __init__(self):
        self.seen = 0

    def classify(self, images):
        self.seen += len(images)
        return super().classify(images)


def _nan_weight(pipe) -> None:
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")


def _flat_decoder(pipe) -> None:
    """The VAE's last convolution zeroed: every image is its bias, one colour."""
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.zero_()


def _overflowing_edit(pipe) -> Edit:
    """A finite Edit (cross-attention values x 1e30, as an overflowing solve would make) that breaks the model."""
    keys = [n for n, _ in pipe.unet.named_parameters() if "attn2.to_v" in n]
    new = {f"unet/{k}": pipe.unet.get_parameter(k).detach() * 1e30 for k in keys}
    return Edit.from_weights(pipe, new, {"method": "uce", "concepts": ["Cubism"]}, low_rank=False)


def _count_unet(pipe) -> list[int]:
    calls = [0]
    pipe.unet.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


# -- the check itself -----------------------------------------------------------------------------
def test_degenerate_reason_names_non_finite_and_flat_images():
    rng = np.random.default_rng(0)
    textured = rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)
    assert degenerate_reason(textured) is None
    nan = textured.copy()
    nan[3, 4, 1] = np.nan
    assert "not finite" in degenerate_reason(nan)
    flat = np.broadcast_to(np.array([0.2, 0.5, 0.9], np.float32), (16, 16, 3))   # a colour, not grey
    assert "flat colour" in degenerate_reason(flat)
    assert "flat colour" in degenerate_reason(Image.new("RGB", (16, 16), (0, 0, 0)))      # black PIL
    assert "flat colour" in degenerate_reason(torch.full((3, 16, 16), 0.7))                # "pt" layout
    # spread just under / over the threshold in one channel
    for amp, flagged in ((0.5 * DEGENERATE_STD, True), (2 * DEGENERATE_STD, False)):
        img = flat.copy()
        img[..., 2] += np.where(np.indices((16, 16)).sum(0) % 2 == 0, amp, -amp)
        assert (degenerate_reason(img) is not None) == flagged, amp


def test_healthy_tiny_images_are_far_from_the_threshold(tiny_pipe):
    images = generate(tiny_pipe, ["a cat", "", "a black image"], [0, 1, 2], FAST, output_type="np", check=False)
    for a in images:
        assert degenerate_reason(a) is None
        assert a.reshape(-1, 3).std(0).max() > 10 * DEGENERATE_STD


def test_canvas_mini_images_are_far_from_the_threshold(canvas_pipe):
    from erasekit.canvas.world import caption

    prompts = [caption("Architectures", "Winter"), caption("Butterfly", "Watercolor"), caption("Cats", "Cubism"),
               "a black image", "a plain white image", ""]
    images = generate(canvas_pipe, prompts, list(range(len(prompts))), Sampling(steps=25), output_type="np")
    spreads = [float(a.reshape(-1, 3).std(0).max()) for a in images]
    assert min(spreads) > 20 * DEGENERATE_STD, dict(zip(prompts, spreads))


# -- generate -----------------------------------------------------------------------------------
def test_generate_stops_at_the_first_degenerate_batch(tiny_sd1):
    _nan_weight(tiny_sd1)
    calls = _count_unet(tiny_sd1)
    with pytest.raises(DegenerateOutputError, match="'a cat' at seed 0 .*not finite"):
        generate(tiny_sd1, ["a cat", "a dog", "a tree"], [0, 1, 2], FAST)
    assert calls[0] == FAST.steps   # the first batch only (one UNet call per step, CFG batched)
    with pytest.raises(DegenerateOutputError, match="latent is not finite"):
        generate(tiny_sd1, "a cat", 0, FAST, output_type="latent")
    # opt out: a caller that counts such images itself gets them
    assert len(generate(tiny_sd1, ["a cat", "a dog"], [0, 1], FAST, output_type="np", check=False)) == 2


def test_generate_refuses_flat_images_and_pil_output_is_unchanged(tiny_sd1):
    pil = generate(tiny_sd1, ["a cat", "a dog"], [0, 1], FAST)
    arrays = generate(tiny_sd1, ["a cat", "a dog"], [0, 1], FAST, output_type="np")
    assert all(np.array_equal(np.asarray(p), (a * 255).round().astype(np.uint8)) for p, a in zip(pil, arrays))
    _flat_decoder(tiny_sd1)
    with pytest.raises(DegenerateOutputError, match="flat colour"):
        generate(tiny_sd1, ["a cat", "a dog"], [0, 1], FAST)


# -- attacks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["none", "seed_search", "unlearndiffatk"])
def test_attack_on_a_broken_model_is_an_error_not_held(tiny_sd1, method):
    from erasekit.attacks import attack

    _nan_weight(tiny_sd1)
    judge = AnyJudge()
    options = {"rounds": 1} if method == "seed_search" else {"blocks": 1, "steps_per_block": 1} \
        if method == "unlearndiffatk" else {}
    with pytest.raises(DegenerateOutputError, match="nothing is reported as erased or held"):
        attack(tiny_sd1, ["A Cats image in Cubism style."], "Cubism", judge=judge, method=method, sampling=FAST,
               progress=False, **options)
    assert judge.seen == 0


def test_attack_with_a_broken_edit_fails_before_the_targets_and_restores_the_pipeline(tiny_sd1):
    from erasekit.attacks import attack

    edit = _overflowing_edit(tiny_sd1)
    before = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    calls = _count_unet(tiny_sd1)
    prompts = [f"A {o} image in Cubism style." for o in ("Cats", "Trees", "Towers")]
    with pytest.raises(DegenerateOutputError, match="not finite"):
        attack(tiny_sd1, prompts, judge=AnyJudge(), edit=edit, sampling=FAST, progress=False, blocks=1)
    assert calls[0] == FAST.steps   # one probe image with the Edit; no target was made
    assert all(torch.equal(before[k], v) for k, v in tiny_sd1.unet.state_dict().items())


# -- evaluate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("on_missing", ["fail", "count"])
def test_evaluate_a_broken_edit_fails_at_its_first_batch(tiny_sd1, on_missing, tmp_path):
    from erasekit.eval import evaluate

    edit = _overflowing_edit(tiny_sd1)
    calls = _count_unet(tiny_sd1)
    judge = AnyJudge()
    protocol = tiny_protocol(batch_size=4)
    with pytest.raises(DegenerateOutputError, match="broken"):
        evaluate(tiny_sd1, edit, protocol=protocol, judge=judge, targets=["Cubism"], fid=False, clip=False,
                 cache_dir=None, progress=False, out_dir=tmp_path, on_missing=on_missing)
    steps = protocol.sampling.steps
    # fail: the edited model's first batch; count: its batches (each counted missing), never the baseline
    assert calls[0] == (steps if on_missing == "fail" else steps * len(protocol) // 4)
    assert judge.seen == 0 and not (tmp_path / "report.json").exists()


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, clip_tokenizer_dir):
    from conftest import build_tiny

    path = tmp_path_factory.mktemp("degenerate") / "tiny"
    build_tiny("sd1", clip_tokenizer_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("command", [
    ["attack", "--attack", "none", "--prompt", "A Cats image in Cubism style."],
    ["attack", "--prompt", "A Cats image in Cubism style.", "-o", "blocks=1"],
    ["eval"],
])
def test_cli_exits_2_on_a_broken_edit_and_writes_nothing(capsys, tiny_model, tmp_path, command):
    from erasekit.cli.main import EXIT_USAGE, main
    from erasekit.pipelines import load_pipeline

    edit = _overflowing_edit(load_pipeline(tiny_model)).save(tmp_path / "broken.safetensors")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([*command, "--edit", str(edit), "--model", str(tiny_model), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_USAGE and len(lines) == 1 and lines[0].startswith("erasekit: error: "), err
    assert "degenerate" in err and "broken" in err
    assert not any(out.rglob("*.json"))
