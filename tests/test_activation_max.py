"""Activation maximisation (:mod:`dacnn.analysis.activation_max`) on one model of every family."""

from __future__ import annotations

import pytest

from _helpers import SMALL, shared_model_names, small_model
from dacnn import list_models, model_info
from dacnn.analysis.activation_max import activation_maximisation, visualised_layers

SHARED = shared_model_names()
# one model per family, a shared variant where the family has one
FAMILY_EXAMPLES = sorted({model_info(n).family: n
                          for n in sorted(list_models(), key=SHARED.__contains__)}.values())


@pytest.mark.parametrize("name", FAMILY_EXAMPLES)
def test_activation_maximisation_runs_on_every_family(name: str) -> None:
    model = small_model(name)
    flags = [p.requires_grad for p in model.parameters()]
    layers = [n for n, _ in visualised_layers(model)]
    pick = [layers[0], layers[len(layers) // 2], layers[-1]]
    chans, height, width = model.info.input_size
    side = SMALL[model.info.family][1]
    images, names = activation_maximisation(model, (chans, side or height, side or width), (0.5,) * chans,
                                            (0.25,) * chans, filters=2, steps=2, layers=pick)
    assert names == list(dict.fromkeys(pick)) and images.shape[:2] == (len(names), 2)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags  # caller's model intact
    assert all(p.grad is None for p in model.parameters())
