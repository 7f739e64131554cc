"""Compact safetensors export: tensors stored once, size ratio, fp16/int8 round trips, inspect."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import dacnn
from dacnn.compact_format import load_exported, read_export
from dacnn.errors import CheckpointError, ConfigError
from dacnn.export import export_safetensors, format_report, inspect_file
from dacnn.quantize import dequantize_per_channel, quantize_per_channel
from dacnn.shared_kernel import anchored_uses, iter_shared_kernels


def calibrated(name: str, seed: int = 0, **kwargs: object) -> nn.Module:
    """A registered model with BN running statistics of real activations (outputs of sane scale)."""
    torch.manual_seed(seed)
    model = dacnn.create_model(name, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *model.info.input_size))
    return model.eval()


def prunable_like(model: nn.Module) -> list[str]:
    """Names of the unique conv/linear weights (what int8 quantises)."""
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


def shared_tensor_ids(model: nn.Module) -> set[int]:
    return {id(k.weight) for _, k in iter_shared_kernels(model)}


@pytest.mark.parametrize(
    "name", ["dacnn14", "dacnn34", "dacnn24_reg", "dacnn18_mix", "lrunet_1x", "convmixer_256_16_shared"]
)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_size_ratio_counts_every_tensor_once(tmp_path, name, dtype):
    model = dacnn.create_model(name)  # registered widths: all above 100k unique parameters
    # (ratio against params + float buffers: LruNet's per-use BatchNorm statistics are 27 % of its values)
    counts = dacnn.count_params(model)
    assert counts.unique > 100_000 and counts.shared
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    info = export_safetensors(model, tmp_path / "m.safetensors", dtype, model_name=name, model_kwargs={})
    file_bytes = (tmp_path / "m.safetensors").stat().st_size
    bytes_per_value = 4 if dtype == "fp32" else 2
    ratio = file_bytes / ((counts.unique + buffers) * bytes_per_value)
    assert ratio == pytest.approx(info.size_ratio)
    assert 1.0 < ratio <= 1.02
    # the free-weight twin would be several times bigger: the shared kernel really is stored once
    assert file_bytes < counts.per_use * bytes_per_value / 2


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_round_trip_keeps_tying_and_outputs(tmp_path, dtype):
    model = calibrated("dacnn14", width=32, num_classes=10)
    path = tmp_path / f"m-{dtype}.safetensors"
    export_safetensors(
        model, path, dtype, model_name="dacnn14", model_kwargs={"width": 32, "num_classes": 10}
    )
    loaded, header = load_exported(path)
    assert header.dtype == dtype and header.model == "dacnn14"
    # tied tensors stay single: one parameter per shared kernel, as in the source model
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    assert dacnn.count_params(loaded).unique == dacnn.count_params(model).unique
    assert len(shared_tensor_ids(loaded)) == 1
    assert anchored_uses(loaded)[id(loaded.kernels.anchor)] == anchored_uses(model)[id(model.kernels.anchor)]
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    scale = ref.abs().max().item()
    if dtype == "fp32":
        assert torch.equal(ref, out)
    elif dtype == "fp16":
        assert (ref - out).abs().max().item() <= 2e-3 * scale
    else:
        assert (ref - out).abs().max().item() <= 0.1 * scale
        assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.75
    # a change to the loaded shared kernel reaches every use
    with torch.no_grad():
        loaded.kernels.anchor.weight.zero_()
        assert not torch.allclose(loaded(x), out)


def test_int8_quantisation_per_output_channel():
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-3, 1, 8).view(-1, 1, 1, 1)
    w[3] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert q.abs().max() <= 127 and (q.flatten(1).abs().amax(1)[[0, 1, 2, 4, 5, 6, 7]] == 127).all()
    error = (dequantize_per_channel(q, scale) - w).abs().flatten(1).amax(1)
    assert (error <= scale / 2 + 1e-7).all()  # half a step per channel, small channels stay precise
    assert torch.equal(dequantize_per_channel(q, scale)[3], torch.zeros(4, 3, 3))


def test_int8_quantises_shared_kernel_once(tmp_path):
    model = calibrated("dacnn18_mix", width=8, num_classes=10)
    path = tmp_path / "m.safetensors"
    kwargs = {"width": 8, "num_classes": 10}
    info = export_safetensors(model, path, "int8", model_name="dacnn18_mix", model_kwargs=kwargs)
    _, header = read_export(path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.int8 for k in header.quantized)
        assert f.get_tensor("__vectors__").dtype == torch.float16  # BN vectors
        scales = f.get_tensor("__scales__")  # one per output channel of each quantised tensor, once
        assert scales.numel() == sum(f.get_tensor(k).shape[0] for k in header.quantized)
    kernels = [n + ".weight" for n, _ in iter_shared_kernels(model)]
    assert set(kernels) <= set(header.quantized) <= keys
    assert len(header.quantized) == len(set(header.quantized)) == len(list(prunable_like(model)))
    fp32 = export_safetensors(
        model, tmp_path / "f.safetensors", "fp32", model_name="dacnn18_mix", model_kwargs=kwargs
    )
    assert info.file_bytes < fp32.file_bytes / 3


def test_int8_scales_stay_float32(tmp_path):
    model = dacnn.create_model("dacnn14", width=8, num_classes=10).eval()
    with torch.no_grad():
        model.fc.weight[3] = 1e-7 * torch.randn(8)  # its scale would be subnormal in float16
    path = tmp_path / "m.safetensors"
    kwargs = {"width": 8, "num_classes": 10}
    export_safetensors(model, path, "int8", model_name="dacnn14", model_kwargs=kwargs)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("__scales__").dtype == torch.float32
        assert f.get_tensor("__scales__").numel() == 8 + 8 + 10  # stem, shared kernel once, classifier
    loaded, _ = load_exported(path)
    row, ref = loaded.fc.weight[3], model.fc.weight[3]
    assert (row - ref).abs().max() <= ref.abs().max() / 254 * 1.001


def test_fp16_overflow_is_an_error(tmp_path):
    model = dacnn.create_model("dacnn14", width=8)
    with torch.no_grad():
        model.stages[0][0][1].running_var[0] = 1e6
    with pytest.raises(ConfigError, match="float16 range"):
        export_safetensors(model, tmp_path / "m.safetensors", "fp16", model_kwargs={"width": 8})


def test_aliased_module_stored_once_and_retied(tmp_path):
    class TwoParents(nn.Module):  # one Linear registered under two names (the "several parents" kind)
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = self.a

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = TwoParents()
    path = tmp_path / "m.safetensors"
    export_safetensors(model, path, "fp32")
    _, header = read_export(path)
    assert header.aliases == {"b.weight": "a.weight", "b.bias": "a.bias"}
    loaded, _ = load_exported(path, TwoParents())
    assert loaded.a.weight is loaded.b.weight
    x = torch.randn(2, 64)
    assert torch.equal(model(x), loaded(x))


def test_metadata_rebuilds_model_and_keeps_meta(tmp_path):
    model = dacnn.create_model("dacnn18", width=16, num_classes=10, in_chans=1)
    path = tmp_path / "m.safetensors"
    export_safetensors(
        model,
        path,
        "fp16",
        model_name="dacnn18",
        model_kwargs={"width": 16, "num_classes": 10, "in_chans": 1},
        meta={"dataset": "fashion_mnist", "pad_to": 32},
    )
    loaded, header = load_exported(path)
    assert header.meta == {"dataset": "fashion_mnist", "pad_to": 32}
    assert header.params["unique"] == dacnn.count_params(model).unique
    assert [s[:2] for s in header.shared] == [("kernels.anchor.weight", 16)]
    assert loaded(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_bad_inputs_raise_named_errors(tmp_path):
    model = dacnn.create_model("dacnn14", width=8)
    export_safetensors(model, tmp_path / "m.safetensors")  # create_model recorded width=8 (model.info)
    stale = dacnn.create_model("dacnn14", width=8)
    stale.reset_classifier(7)
    with pytest.raises(ConfigError, match="model_kwargs"):  # the recorded kwargs no longer rebuild it
        export_safetensors(stale, tmp_path / "m.safetensors")
    export_safetensors(dacnn.create_model("dacnn14", num_classes=10), tmp_path / "m.safetensors")  # guessed
    with pytest.raises(ConfigError, match="bf8"):
        export_safetensors(model, tmp_path / "m.safetensors", "bf8")
    with pytest.raises(CheckpointError, match="no such file"):
        load_exported(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_exported(junk)
    path = tmp_path / "m.safetensors"
    export_safetensors(model, path, "fp32", model_name="dacnn14", model_kwargs={"width": 8})
    with pytest.raises(CheckpointError, match="do not fit|does not match"):
        load_exported(path, dacnn.create_model("dacnn14", width=16))


def test_inspect_reports_shared_tensors(tmp_path):
    model = dacnn.create_model("dacnn14", width=16, num_classes=10)
    path = tmp_path / "m.safetensors"
    export_safetensors(
        model, path, "int8", model_name="dacnn14", model_kwargs={"width": 16, "num_classes": 10}
    )
    report = inspect_file(path)
    assert report.model == "dacnn14" and report.kind == "dacnn compact export (int8)"
    assert [(r.name, r.uses) for r in report.shared] == [("kernels.anchor.weight", 12)]
    anchor = next(r for r in report.rows if r.name == "kernels.anchor.weight")
    assert anchor.dtype == "I8" and anchor.bytes == 16 * 16 * 9
    assert report.unique_params == dacnn.count_params(model).unique
    assert report.data_bytes < report.file_bytes
    text = format_report(report)
    assert "kernels.anchor.weight used 12x" in text and "12 (shared)" in text


def test_inspect_plain_safetensors_with_sidecar(tmp_path):
    from safetensors.torch import save_model

    model = dacnn.create_model("dacnn14", width=8, num_classes=10)
    path = tmp_path / "w.safetensors"
    save_model(model, str(path))
    path.with_suffix(".json").write_text(
        json.dumps({"model": "dacnn14", "model_kwargs": {"width": 8, "num_classes": 10}})
    )
    report = inspect_file(path)
    assert report.kind == "safetensors" and [r.name for r in report.shared] == ["kernels.anchor.weight"]
    assert len(report.rows) == len(model.state_dict())  # save_model keeps num_batches_tracked
