"""Messages that name the problem and never advise the unsafe option, across commands and readers.

The training-state messages of :mod:`dacnn.checkpoint` are in ``test_checkpoint.py``.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch

from _helpers import UNSAFE_ADVICE, Evil
from dacnn import checkpoint as ckpt
from dacnn.cli import main
from dacnn.data.webdataset import ShardRef, decode_shard
from dacnn.errors import CheckpointError, ConfigError, DataError
from dacnn.train.config import load_yaml


def test_an_untrusted_released_file_is_called_untrusted_without_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "evil.t7"
    torch.save({"net": Evil()}, path)
    assert main(["import-weights", "lrunet", str(path), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is not a trusted PyTorch checkpoint" in err and str(path) in err
    assert not any(text in err for text in UNSAFE_ADVICE), err


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
