"""Weights saved under a family's older names still load, give the old outputs, and keep the
parameter order (so an optimizer state saved before a rename resumes bitwise).

The fixtures in ``tests/data/legacy/`` were written by the code *before* the renames (commit in
``state_keys.json``; ``tests/data/legacy/make_legacy.py`` says how): they are that code's own output,
not ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dacnn import checkpoint as ckpt
from dacnn import create_model
from dacnn.compact_format import load_state_into
from dacnn.errors import CheckpointError
from dacnn.models.convmixer import ConvMixer
from dacnn.shared_kernel import SharedKernel

LEGACY = Path(__file__).parent / "data" / "legacy"
OLD = json.loads((LEGACY / "state_keys.json").read_text())
WEIGHTS = sorted(p.stem for p in LEGACY.glob("*.safetensors"))


def _build(stem: str) -> torch.nn.Module:
    meta = ckpt.read_sidecar(LEGACY / f"{stem}.safetensors")
    if meta["model"] == "ConvMixer":
        return ConvMixer(**meta["model_kwargs"])
    return create_model(meta["model"], **meta["model_kwargs"])


@pytest.mark.parametrize("name", sorted(OLD["models"]))
def test_old_keys_map_onto_todays_in_the_same_order(name):
    with torch.device("meta"):
        model = create_model(name)
    old = [(ckpt.current_key(model, k), tuple(shape)) for k, shape in OLD["models"][name]]
    assert old == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    old_params = [ckpt.current_key(model, k) for k, _ in OLD["models"][name]]
    names = [n for n, _ in model.named_parameters()]
    assert [k for k in old_params if k in set(names)] == names  # optimizer state is indexed in this order


@pytest.mark.parametrize("stem", WEIGHTS)
def test_old_weight_files_load_and_give_the_old_outputs(stem):
    model = _build(stem)
    ckpt.load_weights(model, LEGACY / f"{stem}.safetensors")
    outputs = torch.load(LEGACY / "outputs.pt", weights_only=True)
    x = outputs["input"][:, : model.info.input_size[0]] if hasattr(model, "info") else outputs["input"]
    with torch.no_grad():
        got = model.eval()(x)
    torch.testing.assert_close(got, outputs[stem], rtol=1e-5, atol=1e-6)
    kernels = [m for m in model.modules() if isinstance(m, SharedKernel)]
    owners = [n for n, m in model.named_modules() if isinstance(m, SharedKernel)]
    assert kernels and all(".kernels." in f".{n}" for n in owners)


@pytest.mark.parametrize("stem", ["dacnn", "lrunet_1x"])
def test_old_files_load_through_the_sidecar_and_the_export_loader(stem):
    model, meta = ckpt.load_model_file(LEGACY / f"{stem}.safetensors")
    assert meta["model"] == stem
    fresh = _build(stem)
    load_state_into(fresh, load_file(str(LEGACY / f"{stem}.safetensors")), {})  # the old names as stored
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_file_that_fits_no_name_still_fails_with_its_keys(tmp_path):
    model = create_model("dacnn", depth=5, width=8)
    other = create_model("dacnn", depth=6, width=8)
    ckpt.save_weights(other, tmp_path / "w.safetensors", {"model": "dacnn", "model_kwargs": {}})
    with pytest.raises(CheckpointError, match="do not match the model"):
        ckpt.load_weights(model, tmp_path / "w.safetensors")
