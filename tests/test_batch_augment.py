"""timm's RandAugment, RandomErasing and Mixup/CutMix on batches (``dacnn.data.batch_augment``).

Each RandAugment operation is checked against PIL's (what timm applies) on a few smooth images;
the draws are checked for their laws (probabilities, ranges, soft targets summing to 1), their
determinism per seed, DDP slicing and mid-epoch positioning of the loader.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from dacnn.data import Augment, DeviceLoader
from dacnn.data.batch_augment import (
    OPERATIONS,
    MixSpec,
    RandAugment,
    RandAugmentSpec,
    mix_batch,
    random_erasing,
    require_kornia,
    sample_erasing,
    soft_targets,
)
from dacnn.data.synthetic import random_split
from dacnn.errors import ConfigError

pytest.importorskip("kornia")

FILL = (125, 123, 114)  # timm's img_mean, 0..255


def smooth_images(n: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images without pixel noise (bicubic kernels differ between PIL and torch)."""
    coarse = torch.rand(n, channels, 6, 6, generator=torch.Generator().manual_seed(seed))
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (fine * 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_policy_strings_parse_as_timm_reads_them():
    assert RandAugmentSpec.parse("rand-m9-mstd0.5-inc1") == RandAugmentSpec(9.0, 2, 0.5, True)
    assert RandAugmentSpec.parse("rand-m7-n3") == RandAugmentSpec(7.0, 3, 0.0, False)
    for bad in ("rand-m9-w0", "augmix-m5", "rand-x1", "rand-n0"):
        with pytest.raises(ConfigError, match="RandAugment policy"):
            RandAugmentSpec.parse(bad)


def test_each_operation_matches_pil_as_timm_applies_it():
    """Level 0.9 (rand-m9, inc1), positive sign: within one 8-bit level of PIL for most pixels (the
    geometric ones differ more along the filled border, where PIL's bicubic does not blend)."""
    images = smooth_images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ra = RandAugment(RandAugmentSpec(increasing=True), [v / 255 for v in FILL])
    level, factor, shift = 0.9, 1 + 0.9 * 0.9, 0.45 * 0.9 * 32
    geo = {"fillcolor": FILL, "resample": Image.BICUBIC}
    pil = {
        "auto_contrast": ImageOps.autocontrast, "equalize": ImageOps.equalize, "invert": ImageOps.invert,
        "rotate": lambda im: im.rotate(30 * level, **geo),
        "posterize": lambda im: ImageOps.posterize(im, 4 - int(level * 4)),
        "solarize": lambda im: ImageOps.solarize(im, 256 - int(level * 256)),
        "solarize_add": lambda im: im.point([min(255, i + int(level * 110)) if i < 128 else i
                                             for i in range(256)] * 3),
        "color": lambda im: ImageEnhance.Color(im).enhance(factor),
        "contrast": lambda im: ImageEnhance.Contrast(im).enhance(factor),
        "brightness": lambda im: ImageEnhance.Brightness(im).enhance(factor),
        "sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(factor),
        "shear_x": lambda im: im.transform(im.size, Image.AFFINE, (1, 0.3 * level, 0, 0, 1, 0), **geo),
        "shear_y": lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0.3 * level, 1, 0), **geo),
        "translate_x": lambda im: im.transform(im.size, Image.AFFINE, (1, 0, shift, 0, 1, 0), **geo),
        "translate_y": lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, shift), **geo),
    }
    assert set(pil) == set(OPERATIONS)
    for k, name in enumerate(OPERATIONS):
        ours = ra.ops[k](x, torch.full((len(x),), level), torch.zeros(len(x), dtype=torch.bool)) * 255
        theirs = torch.stack([torch.from_numpy(np.asarray(pil[name](Image.fromarray(im))).copy())
                              for im in images]).permute(0, 3, 1, 2).float()
        diff = (ours.round() - theirs).abs()
        assert float(diff.median()) <= 1.0 and float(diff.mean()) < 2.5, name
        assert (theirs - x * 255).abs().mean() > 1.0, name  # the operation does something


def test_rand_augment_draws_are_seeded_and_apply_on_8_bit_levels():
    ra = RandAugment(RandAugmentSpec.parse("rand-m9-mstd0.5-inc1"), (0.5, 0.5, 0.5))
    x = torch.from_numpy(smooth_images(n=64)).permute(0, 3, 1, 2).float() / 255
    draws = ra.sample(64, torch.Generator().manual_seed(1))
    assert draws.op.shape == (2, 64) and 0 <= int(draws.op.min()) and int(draws.op.max()) < len(OPERATIONS)
    level = draws.level  # N(9, 0.5) / 10, clipped to [0, 1]
    assert abs(float(level.mean()) - 0.9) < 0.02 and 0.03 < float(level.std()) < 0.07
    assert float(level.max()) <= 1.0
    assert 0.3 < float(draws.apply.float().mean()) < 0.7  # timm applies each chosen op with p 0.5
    out = ra(x, draws)
    assert out.shape == x.shape and torch.equal(out, (out * 255).round() / 255)
    untouched = ~draws.apply.any(0)
    assert torch.equal(out[untouched], x[untouched]) and not torch.equal(out[~untouched], x[~untouched])
    again = ra(x, ra.sample(64, torch.Generator().manual_seed(1)))
    other = ra(x, ra.sample(64, torch.Generator().manual_seed(2)))
    assert torch.equal(out, again) and not torch.equal(out, other)
    one = RandAugment(RandAugmentSpec.parse("rand-m9-n1-mstd0.5-inc1"), (0.5, 0.5, 0.5))
    d = one.sample(64, torch.Generator().manual_seed(4))  # the batch applies each image's own operation
    batched = one(x, d)
    for i in range(0, 64, 5):
        alone = one.ops[int(d.op[0, i])](x[i:i + 1], d.level[0, i:i + 1], d.negate[0, i:i + 1])
        expected = (alone * 255).round() / 255 if d.apply[0, i] else x[i:i + 1]
        torch.testing.assert_close(batched[i:i + 1], expected, atol=1 / 255 + 1e-6, rtol=0)
    grey = RandAugment(RandAugmentSpec.parse("rand-m9-mstd0.5-inc1"), (0.3,))  # one channel works too
    g = torch.from_numpy(smooth_images(n=16, channels=1)).permute(0, 3, 1, 2).float() / 255
    assert grey(g, grey.sample(16, torch.Generator().manual_seed(0))).shape == g.shape


def test_random_erasing_fills_one_box_of_noise_per_chosen_image():
    x = torch.zeros(200, 3, 32, 32)
    draws = sample_erasing(1.0, tuple(x.shape), torch.Generator().manual_seed(0))
    out = random_erasing(x, draws)
    erased = out != 0
    assert draws.erase.all()  # at p 1 the first of ten attempts nearly always fits
    area = erased[:, 0].flatten(1).sum(1).float() / (32 * 32)
    assert float(area.min()) >= 0.015 and float(area.max()) <= 0.36  # U(0.02, 1/3) of the image, rounded
    for i in range(5):  # a box: its rows and columns span exactly its height and width
        rows, cols = erased[i, 0].any(1).nonzero(), erased[i, 0].any(0).nonzero()
        assert int(rows.numel()) == int(draws.height[i]) and int(cols.numel()) == int(draws.width[i])
        assert int(rows.min()) == int(draws.top[i]) and int(cols.min()) == int(draws.left[i])
    assert torch.equal(random_erasing(x, sample_erasing(0.0, tuple(x.shape), torch.Generator())), x)
    quarter = sample_erasing(0.25, (2000, 1, 8, 8), torch.Generator().manual_seed(0)).erase.float().mean()
    assert 0.2 < float(quarter) < 0.3


@pytest.mark.parametrize("spec", [MixSpec(mixup=0.5, label_smoothing=0.1), MixSpec(cutmix=0.5),
                                  MixSpec(mixup=0.5, cutmix=0.5, label_smoothing=0.1)])
def test_mixed_targets_sum_to_one_and_weigh_the_images_as_mixed(spec):
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10  # image 0 (class 0) meets image 15 (class 5)
    smooth = soft_targets(y, 10, spec.label_smoothing)
    kinds = set()
    for seed in range(12):
        mixed, targets = mix_batch(x, y, spec, np.random.default_rng(seed))
        assert mixed.shape == x.shape and targets.shape == (16, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(16))
        lam = float((targets[0, 0] - smooth[15, 0]) / (smooth[0, 0] - smooth[15, 0]))
        torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
        if torch.allclose(mixed, torch.lerp(x.flip(0), x, lam), atol=1e-6):
            kinds.add("mixup")
            continue
        own, mirror = (mixed == x).all(1), (mixed == x.flip(0)).all(1)  # CutMix: a box of the mirror
        assert bool((own | mirror).all()) and abs(float(own.float().mean()) - lam) < 1e-6
        kinds.add("cutmix")
    assert ("mixup" in kinds) == bool(spec.mixup) and ("cutmix" in kinds) == bool(spec.cutmix)
    assert mix_batch(x, y, spec, np.random.default_rng(0))[0].equal(
        mix_batch(x, y, spec, np.random.default_rng(0))[0])


def test_soft_target_loss_is_timm_soft_target_cross_entropy():
    from dacnn.train.engine import StepRunner
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    runner = StepRunner(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                        label_smoothing=0.3)  # not applied again to targets that hold it already
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    targets = 0.7 * soft_targets(y, 5, 0.1) + 0.3 * soft_targets(y.flip(0), 5, 0.1)
    loss, correct = runner.forward_backward(x, targets)
    expected = (-targets * model(x).log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected.detach())
    assert int(correct) == int((model(x).argmax(1) == y).sum())


def recipe_loader(split, **kw) -> DeviceLoader:
    augment = Augment(crop_padding=4, flip=True, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    return DeviceLoader(split, batch_size=16, shuffle=True, drop_last=True, seed=3, augment=augment, **kw)


def test_loader_batches_are_a_function_of_seed_epoch_and_batch():
    split = random_split(n=64)
    mix = MixSpec(mixup=0.5, cutmix=0.5, num_classes=10, label_smoothing=0.1)
    whole = list(recipe_loader(split, mix=mix))
    assert all(y.shape == (16, 10) and y.dtype == torch.float32 for _, y in whole)
    again = recipe_loader(split, mix=mix)
    again.set_epoch(0, start_batch=2)  # a resumed run: positioned mid-epoch
    tail = list(again)
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(whole[2:], tail, strict=True))
    second = list(recipe_loader(split, mix=mix))  # the next pass is another epoch
    assert torch.equal(second[0][0], whole[0][0])
    loader = recipe_loader(split, mix=mix)
    list(loader)
    assert not torch.equal(next(iter(loader))[0], whole[0][0])


def test_ranks_get_their_part_of_the_global_batch_draws():
    split = random_split(n=64)
    full = list(recipe_loader(split))
    parts = [list(recipe_loader(split, rank=r, world=2)) for r in (0, 1)]
    for b, (x, y) in enumerate(full):
        assert torch.equal(x[0::2], parts[0][b][0]) and torch.equal(x[1::2], parts[1][b][0])
        assert torch.equal(y[1::2], parts[1][b][1])


def test_missing_kornia_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)
    with pytest.raises(ConfigError, match=r"dacnn\[aug\]"):
        require_kornia("rand_augment")
    with pytest.raises(ConfigError, match=r"dacnn\[aug\]"):
        RandAugment(RandAugmentSpec(), (0.5,))
