"""Write the legacy-name fixtures: state_dict keys (in order, with shapes) and small weight files as an
older dacnn saved them, so the tests can prove today's code still loads them.

Run it with the *old* package on the path, e.g. for commit bdb7502 (the last before the renames):
    git worktree add /tmp/old bdb7502
    PYTHONPATH=/tmp/old/src python tests/data/legacy/make_legacy.py tests/data/legacy
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import dacnn
from dacnn import checkpoint as ckpt
from dacnn import create_model, list_models
from dacnn.models.convmixer import ConvMixer

FAMILIES = ("dacnn", "convmixer", "lrunet")  # the families whose names changed
SMALL = {  # file stem -> (registered model or family class, kwargs): weight files small enough to commit
    "dacnn": ("dacnn", {"depth": 5, "width": 8}),
    "dacnn18": ("dacnn18", {"width": 8}),
    "dacnn18_mix": ("dacnn18_mix", {"width": 4}),
    "convmixer_shared": ("ConvMixer", {"width": 16, "depth": 3, "kernel_size": 3, "shared": True}),
    "lrunet_1x": ("lrunet_1x", {"layer_reuse": 2, "num_classes": 4}),
}


def main(out: Path) -> None:
    root = Path(dacnn.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    keys = {}
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name)
        if model.info.family in FAMILIES:
            keys[name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    (out / "state_keys.json").write_text(json.dumps({"commit": commit, "models": keys}, indent=0) + "\n")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    outputs = {"input": x}
    for stem, (name, kwargs) in SMALL.items():
        model = (ConvMixer(**kwargs) if name == "ConvMixer" else create_model(name, **kwargs)).eval()
        for m in model.modules():  # non-trivial BN statistics, so a misplaced BN would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ckpt.save_weights(model, out / f"{stem}.safetensors",
                          {"model": name, "model_kwargs": kwargs, "commit": commit})
        with torch.no_grad():
            outputs[stem] = model(x)
    torch.save(outputs, out / "outputs.pt")
    print(f"wrote {len(keys)} key lists and {len(SMALL)} weight files from commit {commit}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
