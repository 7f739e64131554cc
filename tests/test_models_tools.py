"""PyTorch's own tools on every registered model (small builds, eval mode unless said otherwise):
``torch.export.export``, ``torch.fx.symbolic_trace``, ``torch.jit.trace``, ``torch.jit.script`` (a
documented refusal), ``torch.func.functional_call`` and ``vmap``, half and bfloat16 inference on the
CPU, the TorchScript-based ONNX exporter with a dynamic batch, and no private ``aten._*`` op on the
forward or backward path. Each check compares the tool's result with the eager model's.

Which export path stores each shared kernel once is checked in
:func:`test_which_export_path_keeps_a_shared_kernel_once` (the README's table).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch.func import functional_call, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import small_input, small_model
from dacnn import AnchoredConv2d, count_params, list_models
from dacnn.models import lrunet_ops

MODELS = list_models()


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    model = small_model(name).eval()
    return model, small_input(model)


@pytest.mark.parametrize("name", MODELS)
def test_torch_export(name: str) -> None:
    model, x = _model(name)
    with torch.no_grad():
        want = model(x)
    lrunet_ops._channel_orders.cache_clear()  # as in a fresh process: the export makes the first call
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
    assert len(program.graph_signature.parameters) == len(list(model.parameters()))  # each tensor once
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # the eager model still works


@pytest.mark.parametrize("name", MODELS)
def test_fx_symbolic_trace(name: str) -> None:
    model, x = _model(name)
    graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_jit_trace(name: str) -> None:
    model, x = _model(name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_jit_script_is_refused_with_a_sentence(name: str) -> None:
    model, _ = _model(name)
    with pytest.raises(TypeError, match="not TorchScript-scriptable.*torch.export.export or torch.jit.trace"):
        torch.jit.script(model)


@pytest.mark.parametrize("name", MODELS)
def test_functional_call(name: str) -> None:
    model, x = _model(name)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    doubled = {k: v * 2 if k.endswith("fc.weight") else v for k, v in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, state, (x,)), model(x), rtol=0, atol=0)
        changed = functional_call(model, doubled, (x,))
        assert not torch.equal(changed, model(x))  # the substituted tensors are the ones used
        assert torch.equal(model(x), functional_call(model, state, (x,)))  # and the model is untouched


@pytest.mark.parametrize("name", MODELS)
def test_vmap_over_the_batch(name: str) -> None:
    model, x = _model(name)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        out = vmap(lambda xi: functional_call(model, state, (xi[None],))[0])(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def _calibrated(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """An eval-mode model whose BatchNorm statistics come from the batch (not the init's 0/1, which
    lets a deep random net overflow float16), and the batch."""
    model = small_model(name)
    x = small_input(model, batch=4)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average: one step sets the batch's statistics
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", MODELS)
def test_half_precision_inference(name: str, dtype: torch.dtype) -> None:
    """The model cast to ``dtype`` agrees with float32 to the dtype's precision: a rounding error of
    at most a few ``eps`` per layer applied, relative to the largest logit."""
    model, x = _calibrated(name)
    layers = sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear | AnchoredConv2d) for m in model.modules())
    with torch.no_grad():
        want = model(x)
        got = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    error = (got.float() - want).abs().max() / want.abs().max()
    assert error <= 16 * torch.finfo(dtype).eps * layers


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_autocast_inference(name: str) -> None:
    """timm's ``--amp bf16`` validation path."""
    model, x = _calibrated(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all() and out.shape == (len(x), model.num_classes)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", MODELS)
def test_no_private_aten_op_on_the_forward_or_backward_path(name: str) -> None:
    """A private ``aten._*`` op has no promise of autograd, dtype or device coverage (``_add_relu_``:
    no bfloat16/float16, no CUDA kernel): none is called in train or eval mode."""
    model = small_model(name)
    x = small_input(model)
    with _Ops() as ops:
        model.train()(x).sum().backward()
        with torch.no_grad():
            model.eval()(x)
    private = sorted(n for n in ops.names if n.split("::")[-1].startswith("_"))
    assert not private


@pytest.mark.parametrize("name", MODELS)
def test_onnx_torchscript_exporter_with_a_dynamic_batch(name: str) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, x = _model(name)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    five = small_input(model, batch=5, seed=7)
    (out,) = session.run(None, {"x": five.numpy()})
    with torch.no_grad():
        want = model(five)
    assert out.shape == tuple(want.shape)  # not a batch size baked in by the trace
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- which path keeps a kernel once
# model -> whether a BatchNorm directly follows a use of its spatial shared kernel (ConvMixer: GELU between)
SHARED = {"dacnn14": True, "convmixer_256_16_shared": False, "lrunet_1x": True}


def _onnx(model: torch.nn.Module, x: torch.Tensor, path, **kwargs):  # noqa: ANN001
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                          **kwargs)
    return onnx.load(str(path)).graph


@pytest.mark.parametrize("name", sorted(SHARED))
def test_which_export_path_keeps_a_shared_kernel_once(name: str, tmp_path) -> None:
    """The README's table: ``torch.export``, ``jit.trace``, fx and the ONNX exporter without constant
    folding (``dacnn export``'s choice) store each shared kernel once; with its default constant
    folding the TorchScript ONNX exporter folds the BatchNorm after each use into that use's own
    copy of the kernel. (BatchNorm statistics of a batch here: at initialisation every use's
    BatchNorm is the same, so would be the folded copies, and the exporter stores equal ones once.)"""
    pytest.importorskip("onnx")
    from onnx import numpy_helper

    from dacnn.export.onnx_export import onnx_sharing_report

    model, x = _calibrated(name)
    unique = len(list(model.parameters()))
    assert len(torch.export.export(model, (x,)).graph_signature.parameters) == unique
    lrunet_ops._channel_orders.cache_clear()  # as in a fresh process
    assert len(list(torch.jit.trace(model, x, check_trace=False).parameters())) == unique
    assert len(list(torch.fx.symbolic_trace(model).parameters())) == unique

    _onnx(model, x, tmp_path / "plain.onnx", dynamo=False, do_constant_folding=False)
    assert onnx_sharing_report(tmp_path / "plain.onnx", model).shared_stored_once
    graph = _onnx(model, x, tmp_path / "folded.onnx", dynamo=False)
    shared = next(s for s in count_params(model).shared if s.shape[-1] > 1)  # a spatial kernel: unique shape
    copies = sum(tuple(numpy_helper.to_array(t).shape) == shared.shape for t in graph.initializer)
    assert copies == (shared.uses if SHARED[name] else 1)
