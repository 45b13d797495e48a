"""mixprec.experiments.runner: which layer a run keeps in FP32 under the FP8 recipes."""

from __future__ import annotations

import pytest

from mixprec.experiments.models import CharGPT, CharLSTM, Discriminator, Generator, resnet_style_cnn
from mixprec.experiments.runner import kept_fp32, output_layer


@pytest.mark.parametrize(("build", "name"), [
    (lambda: resnet_style_cnn(width=8), "8"),
    (lambda: CharLSTM(20, hidden=16, embedding=8), "head"),
    (lambda: CharGPT(20, width=16, heads=2, layers=1, context=8), "head"),
    (lambda: Generator(latent=8, width=4), "net.6"),
    (lambda: Discriminator(width=4), "net.5"),
])
def test_the_output_layer_stays_fp32_only_under_fp8_recipes(build, name):
    model = build()
    assert output_layer(model) == name
    for recipe in ("fp8", "fp8-hybrid", "fp8-rne", "fp8-nominscale"):
        assert kept_fp32(model, recipe) == {name}
    for recipe in ("fp32", "fp16", "bf16", "fp16-noscale", "fp16-nomaster"):
        assert kept_fp32(model, recipe) == set()
