"""`dacnn export` / `dacnn inspect` from a run directory, and clean errors (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest

import dacnn
from _helpers import make_run
from dacnn.cli import main
from dacnn.compact_format import load_exported
from dacnn.export import inspect_file


def test_export_run_int8_with_accuracy(tmp_path, monkeypatch, capsys):
    run, data = make_run(tmp_path, monkeypatch)
    assert (
        main(["export", str(run), "--dtype", "int8", "--evaluate", "--data-dir", str(data), "--limit", "30"])
        == 0
    )
    out = capsys.readouterr().out
    path = run / "export" / "model-int8.safetensors"
    assert f"wrote {path}" in out
    assert "shared tensors, each stored once: kernels.anchor.weight used 12x" in out
    assert "test accuracy (fashion_mnist, 30 images): source" in out and "points)" in out
    model, header = load_exported(path)
    assert header.meta["dataset"] == "fashion_mnist" and header.meta["pad_to"] == 32
    assert header.model_kwargs == {"num_classes": 10, "in_chans": 1, "width": 4}
    assert dacnn.count_params(model).shared[0].uses == 12


def test_export_weights_file_fp16_then_inspect(tmp_path, monkeypatch, capsys):
    run, _ = make_run(tmp_path, monkeypatch)
    weights = next((run / "checkpoints").glob("e*.safetensors"))
    out = tmp_path / "m.safetensors"
    assert main(["export", str(weights), "--dtype", "fp16", "-o", str(out)]) == 0
    assert "size ratio" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dacnn compact export (fp16)" in text and "kernels.anchor.weight used 12x" in text
    assert main(["inspect", str(weights)]) == 0  # the training checkpoint itself, via its sidecar
    assert "kernels.anchor.weight used 12x" in capsys.readouterr().out


def test_export_onnx_from_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    run, _ = make_run(tmp_path, monkeypatch)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "max |onnxruntime - PyTorch|" in out and "BatchNormalization nodes" in out
    report = inspect_file(run / "export" / "model-fp32.onnx")
    anchor = "kernels.anchor.weight"
    assert [(r.name, r.uses) for r in report.rows if r.name == anchor] == [(anchor, 12)]
    assert report.rows[0].shape  # initializers listed with shapes


def test_clean_errors(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["export", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "dacnn export: error:" in err and "missing" in err and "Traceback" not in err
    assert main(["inspect", str(tmp_path / "nothing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    assert main(["inspect", str(junk)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown format
        main(["export", str(junk), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", str(junk), "--format", "onnx", "--dtype", "int8"]) == 2
    assert "float32" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_eval_reads_every_export(tmp_path, monkeypatch, capsys, dtype):
    """`dacnn eval` accepts what `dacnn export` writes, and agrees with export's own evaluation."""
    run, data = make_run(tmp_path, monkeypatch)
    out = tmp_path / f"m-{dtype}.safetensors"
    assert main(["export", str(run), "--dtype", dtype, "-o", str(out), "--evaluate",
                 "--data-dir", str(data)]) == 0
    exported_acc = capsys.readouterr().out.split(f"safetensors {dtype} ")[1].split("%")[0]
    assert main(["eval", "--checkpoint", str(out), "--data-dir", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "fashion_mnist" and result["weights"] == str(out)
    assert f"{result['accuracy']:.2f}" == exported_acc


def test_eval_pretrained_needs_the_flag_and_a_known_name(capsys):
    assert main(["eval", "--model", "lrunet_1x.fashion_mnist_n10"]) == 2
    assert "add --pretrained" in capsys.readouterr().err
    assert main(["eval", "--model", "lrunet_1x.mnist_n3", "--pretrained"]) == 2
    assert "lrunet_1x.fashion_mnist_n10" in capsys.readouterr().err


def test_inspect_reads_a_run_directory(tmp_path, monkeypatch, capsys):
    run, _ = make_run(tmp_path, monkeypatch)
    assert main(["inspect", str(run)]) == 0
    assert "kernels.anchor.weight used 12x" in capsys.readouterr().out
