"""ONNX export: one initializer per shared kernel, a BatchNorm node per use, onnxruntime = PyTorch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dacnn
from dacnn.export import export_onnx, inspect_file, max_abs_diff, onnx_sharing_report

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def calibrated(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = dacnn.create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():  # per-use BNs that differ, so a wrong BN/kernel pairing shows
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(2):
            model(torch.randn(16, *model.info.input_size))
    return model.eval()


@pytest.mark.parametrize("name, kwargs", [("dacnn14", {"width": 16}), ("dacnn18_mix_reg", {"width": 4})])
def test_shared_kernel_is_one_initializer_and_bn_kept(tmp_path, name, kwargs):
    model = calibrated(name, num_classes=10, **kwargs)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path)
    assert report.exporter == "torchscript"
    counts = dacnn.count_params(model)
    tensors = len(list(model.parameters())) + sum(1 for b in model.buffers() if b.is_floating_point())
    values = counts.unique + sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert report.initializers <= tensors
    assert report.initializer_values <= values  # nothing stored twice, nothing folded into copies
    assert report.shared_copies and all(n == 1 for n in report.shared_copies.values())
    assert set(report.shared_copies) == {s.name for s in counts.shared}
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report.batchnorm_nodes == bns  # one per use, not folded into the shared kernel
    # the graph's nodes read the shared initializer once per use
    graph = onnx.load(str(path)).graph
    for shared in counts.shared:
        (init,) = [
            i
            for i in graph.initializer
            if tuple(i.dims) == shared.shape
            and torch.equal(
                torch.from_numpy(onnx.numpy_helper.to_array(i).copy()),
                dict(model.named_parameters())[shared.name].detach(),
            )
        ]
        readers = sum(init.name in node.input for node in graph.node)
        assert readers == shared.uses
        # `dacnn inspect` reads the same off the file
        (row,) = [r for r in inspect_file(path).rows if r.name == init.name]
        assert row.uses == shared.uses and row.shape == shared.shape
    x = torch.randn(5, *model.info.input_size)  # batch differs from export: dynamic axis
    assert max_abs_diff(path, model, x) <= 1e-4


def test_constant_folding_would_duplicate_the_kernel(tmp_path):
    """Why export_onnx turns folding off: Conv+BN folding writes one kernel copy per use."""
    model = calibrated("dacnn14", width=16, num_classes=10)
    path = tmp_path / "folded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, do_constant_folding=True
        )
    report = onnx_sharing_report(path, model)
    assert report.batchnorm_nodes == 0 and report.shared_copies["kernels.anchor.weight"] == 0
    assert report.initializer_values > dacnn.count_params(model).per_use * 0.9


def test_lrunet_batch_stays_dynamic(tmp_path):
    """LruNet's TorchScript trace bakes batch 1 into its final reshape: the dynamo exporter takes over."""
    model = calibrated("lrunet_1x", layer_reuse=2, in_chans=1)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, input_size=(1, 28, 28))
    assert len(report.shared_copies) == 8 and report.shared_stored_once
    assert report.batchnorm_nodes == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for batch in (1, 3):
        assert max_abs_diff(path, model, torch.randn(batch, 1, 28, 28)) <= 1e-4
