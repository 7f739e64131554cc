"""Messages that name the problem and never advise the unsafe option (issue 13, item 5)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch

from dacnn import checkpoint as ckpt
from dacnn.cli import main
from dacnn.data.webdataset import ShardRef, decode_shard
from dacnn.errors import CheckpointError, ConfigError, DataError
from dacnn.train.config import load_yaml

UNSAFE_ADVICE = ("weights_only set to False", "Re-running", "weights_only=False")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_an_untrusted_released_file_is_called_untrusted_without_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "evil.t7"
    torch.save({"net": _Evil()}, path)
    assert main(["import-weights", "lrunet", str(path), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is not a trusted PyTorch checkpoint" in err and str(path) in err
    assert not any(text in err for text in UNSAFE_ADVICE), err


def test_an_untrusted_state_file_is_called_untrusted_without_unsafe_advice(tmp_path):
    path = tmp_path / "evil.state.pt"
    torch.save({"format": "dacnn.train_state/1", "x": _Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_state(path)
    assert "not a trusted dacnn training state" in str(info.value)
    assert not any(text in str(info.value) for text in UNSAFE_ADVICE)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_state_file_says_so(tmp_path, damage):
    buf = io.BytesIO()
    torch.save({"format": "dacnn.train_state/1", "epoch": torch.zeros(1000)}, buf)
    data = buf.getvalue()
    path = tmp_path / "e.state.pt"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(CheckpointError) as info:
        ckpt.load_state(path)
    text = str(info.value)
    assert str(path) in text and "damaged, truncated or not a PyTorch checkpoint" in text
    for cryptic in ("Errno", "codec", "miniz", "UnpicklingError", "zip archive"):
        assert cryptic not in text


def test_random_bytes_in_a_pointer_or_a_config_are_named_not_decoded(tmp_path):
    (tmp_path / "last.json").write_bytes(b"\x80\xff\xfe" + os.urandom(64))
    with pytest.raises(CheckpointError, match="last.json is not a readable checkpoint pointer"):
        ckpt.read_pointer(tmp_path, "last")
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\x80\xff\xfe" + os.urandom(64))
    with pytest.raises(ConfigError, match=r"c\.yaml: not a text \(UTF-8\) file"):
        load_yaml(config)


def test_an_undecodable_image_names_the_shard_and_the_sample_key(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in (("cat_0042.png", b"not a png at all"), ("cat_0042.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path = tmp_path / "toy-train-000000.tar"
    path.write_bytes(buf.getvalue())
    with pytest.raises(DataError) as info:
        decode_shard(ShardRef(path), num_classes=10)
    text = str(info.value)
    assert str(path) in text and "sample 'cat_0042'" in text
    assert "BytesIO" not in text and "0x" not in text
