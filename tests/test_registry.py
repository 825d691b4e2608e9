"""The method registry's answers to bad input: one clear error, the pipeline left unchanged."""

import re

import pytest
import torch

import erasekit
from erasekit.errors import ConfigError


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("method, concepts, options, message", [
    ("uce", [], {}, "concepts must be a non-empty list"),
    ("uce", ["Van Gogh", "  "], {}, "concepts must be a non-empty list"),
    ("no-such-method", ["Van Gogh"], {}, "unknown method 'no-such-method'; choose one of:"),
    ("uce", ["Van Gogh"], {"no_such_option": 1}, "UCEConfig has no option 'no_such_option'; valid options:"),
    ("esd", ["Van Gogh"], {"preset": "huge"}, "`preset` must be one of"),
])
def test_bad_input_is_refused_and_the_pipeline_untouched(tiny_sd1, method, concepts, options, message):
    before = _state(tiny_sd1)
    with pytest.raises(ConfigError, match=re.escape(message)):
        erasekit.erase(tiny_sd1, method, concepts, **options)
    after = tiny_sd1.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_method_is_listed_with_a_config_class():
    listed = erasekit.methods()
    assert {"uce", "rece", "esd", "salun", "advunlearn", "sfd"} <= set(listed)
    assert all(hasattr(cls, "__dataclass_fields__") for cls in listed.values())
