"""DeviceLoader and batched augmentation: shapes, order, determinism, and each augmentation's geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dacnn.data import DATASETS, Augment, DatasetSplit, DeviceLoader
from dacnn.data.augment import AugmentParams, gather_pixels, spatial_index
from dacnn.data.synthetic import random_split
from dacnn.errors import ConfigError, DataError


def id_split(n: int = 100, shape=(32, 32, 3), num_classes: int = 10, name: str = "cifar10") -> DatasetSplit:
    """Random images (all pixels >= 1) whose first two pixels encode the sample index."""
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, size=(n, *shape), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) // 256 + 1
    images[:, 0, 1, 0] = np.arange(n) % 256
    labels = np.arange(n) % num_classes
    return DatasetSplit(name, "train", images, labels, [str(i) for i in range(num_classes)])


def batch_ids(x: torch.Tensor) -> list[int]:
    pixels = torch.round(x * 255).long()
    return ((pixels[:, 0, 0, 0] - 1) * 256 + pixels[:, 0, 0, 1]).tolist()


def collect(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_shapes_lengths_and_drop_last():
    split = random_split(n=100)
    loader = DeviceLoader(split, batch_size=32, drop_last=True)
    assert len(loader) == 3
    sizes = [(x.shape, x.dtype, y.shape, y.dtype) for x, y in loader]
    assert sizes == [((32, 3, 32, 32), torch.float32, (32,), torch.int64)] * 3
    loader = DeviceLoader(split, batch_size=32, drop_last=False)
    assert len(loader) == 4
    assert [x.shape[0] for x, _ in loader] == [32, 32, 32, 4]
    assert loader.output_shape == (3, 32, 32) and loader.num_classes == 10


def test_unaugmented_batches_are_the_images_in_order():
    split = id_split()
    x, y = collect(DeviceLoader(split, batch_size=16, normalize=False))
    expected = torch.from_numpy(split.images).permute(0, 3, 1, 2)
    assert torch.allclose(x, expected.float() / 255, rtol=0, atol=1e-7)
    assert torch.equal(torch.round(x * 255).to(torch.uint8), expected)
    assert torch.equal(y, torch.from_numpy(split.labels))


def test_normalisation_uses_the_dataset_mean_and_std():
    split = id_split()
    x, _ = collect(DeviceLoader(split, batch_size=50))
    info = DATASETS["cifar10"]
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)


def test_unknown_dataset_is_normalised_with_its_own_statistics():
    split = random_split("toy", n=400)
    x, _ = collect(DeviceLoader(split, batch_size=100))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_shuffle_is_a_seeded_permutation_per_epoch():
    split = id_split(n=90)

    def order(seed: int, epoch: int | None = None, loader: DeviceLoader | None = None) -> list[int]:
        loader = loader or DeviceLoader(split, batch_size=30, shuffle=True, seed=seed)
        if epoch is not None:
            loader.set_epoch(epoch)
        return [i for x, _ in loader for i in batch_ids(x * 1.0)]

    unnorm = DeviceLoader(split, batch_size=30, shuffle=True, seed=0, normalize=False)
    first = order(0, loader=unnorm)
    assert sorted(first) == list(range(90)) and first != list(range(90))
    second = order(0, loader=unnorm)  # no set_epoch: the next pass is epoch 1
    assert sorted(second) == list(range(90)) and second != first
    unnorm.set_epoch(0)
    assert order(0, loader=unnorm) == first
    other = DeviceLoader(split, batch_size=30, shuffle=True, seed=1, normalize=False)
    assert order(1, loader=other) != first


def test_augmented_epochs_are_reproducible_and_differ_between_epochs():
    split = random_split(n=64)
    make = lambda: DeviceLoader(split, batch_size=16, shuffle=True, seed=3,  # noqa: E731
                                augment=Augment(4, True, 10.0, 8))
    a, b = make(), make()
    xa, ya = collect(a)
    xb, yb = collect(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xa1, _ = collect(a)
    assert not torch.equal(xa, xa1)
    b.set_epoch(0)
    assert torch.equal(collect(b)[0], xa)


def naive_crop_flip(images: torch.Tensor, params: AugmentParams, pad: int, size: int) -> torch.Tensor:
    out = []
    for i in range(images.shape[0]):
        padded = F.pad(images[i], (pad, pad, pad, pad))
        top, left = int(params.top[i]), int(params.left[i])
        crop = padded[:, top: top + size, left: left + size]
        if params.flip is not None and params.flip[i]:
            crop = crop.flip(2)
        out.append(crop)
    return torch.stack(out)


def test_crop_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    padded = F.pad(images, (4, 4, 4, 4))
    params = AugmentParams(torch.randint(0, 9, (40,), generator=g), torch.randint(0, 9, (40,), generator=g),
                           torch.rand(40, generator=g) < 0.5, None, None)
    flat, valid = spatial_index(params, (32, 32), 40, torch.device("cpu"))
    assert valid is None
    out = gather_pixels(padded, flat, valid, (32, 32))
    assert torch.equal(out, naive_crop_flip(images, params, 4, 32))


def _grid_sample_rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1).float()
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("flip", [False, True])
def test_rotation_matches_affine_grid_sample(flip):
    g = torch.Generator().manual_seed(1)
    n = 32
    images = torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    angles = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(10)
    flips = torch.rand(n, generator=g) < 0.5 if flip else None
    zeros = torch.zeros(n, dtype=torch.long)
    params = AugmentParams(zeros, zeros, flips, angles, None)
    flat, valid = spatial_index(params, (32, 32), 32, torch.device("cpu"))
    out = gather_pixels(images, flat, valid, (32, 32)).float()
    reference = _grid_sample_rotate(images, angles)
    if flip:
        reference = torch.where(flips.view(-1, 1, 1, 1), reference.flip(3), reference)
    agree = (out == reference).float().mean().item()
    assert agree > 0.99  # only rounding ties at exact half-pixels may differ
    assert ((out == 0) == (reference == 0)).float().mean().item() > 0.99  # same corners filled with 0


def test_positive_quarter_turn_is_counter_clockwise_and_zero_angle_is_identity():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    zeros = torch.zeros(4, dtype=torch.long)
    cases = ((0.0, images), (math.pi / 2, torch.rot90(images, 1, dims=(2, 3))),
             (-math.pi / 2, torch.rot90(images, -1, dims=(2, 3))))
    for angle, expected in cases:
        params = AugmentParams(zeros, zeros, None, torch.full((4,), angle, dtype=torch.float64), None)
        out = gather_pixels(images, *spatial_index(params, (8, 8), 8, torch.device("cpu")), (8, 8))
        assert torch.equal(out, expected), angle


def test_crop_output_is_a_shifted_copy_with_zero_fill():
    split = id_split(n=50)
    x, _ = collect(DeviceLoader(split, batch_size=25, normalize=False, augment=Augment(4, False)))
    pixels = torch.round(x * 255).to(torch.uint8)
    originals = torch.from_numpy(split.images).permute(0, 3, 1, 2)
    padded = F.pad(originals, (4, 4, 4, 4))
    for out, src in zip(pixels, padded, strict=True):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.equal(src[:, dy: dy + 32, dx: dx + 32], out)]
        assert len(matches) == 1


def test_cutout_zeroes_one_clipped_square():
    split = id_split(n=64)
    x, _ = collect(DeviceLoader(split, batch_size=32, normalize=False, augment=Augment(0, False, 0.0, 8)))
    originals = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255
    for out, src in zip(x, originals, strict=True):  # equal up to the 1/255 rounding
        zero = (out == 0).all(dim=0)
        rows, cols = torch.nonzero(zero, as_tuple=True)
        assert 16 <= zero.sum() <= 64
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert height * width == int(zero.sum()) and height <= 8 and width <= 8
        assert torch.allclose(out[:, ~zero], src[:, ~zero], rtol=0, atol=1e-7)


def test_fashion_mnist_is_one_channel_and_pads_to_32():
    split = id_split(n=20, shape=(28, 28, 1), name="fashion_mnist")
    x, _ = collect(DeviceLoader(split, batch_size=10, normalize=False, pad_to=32))
    assert x.shape == (20, 1, 32, 32)
    originals = torch.from_numpy(split.images).permute(0, 3, 1, 2)
    assert torch.equal(torch.round(x[:, :, 2:30, 2:30] * 255).to(torch.uint8), originals)
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, :, 30:].abs().sum() == 0
    normalised, _ = collect(DeviceLoader(split, batch_size=10, pad_to=32))
    info = DATASETS["fashion_mnist"]
    assert torch.allclose(normalised[:, :, 0, 0], torch.tensor(-info.mean[0] / info.std[0]))


def test_lrunet_crop_of_28x28_to_32_places_the_image_within_4_pixels():
    """torchvision RandomCrop(32, padding=4) on 28x28: the image lands at offset 0..4 (SPEC 2.2)."""
    split = id_split(n=30, shape=(28, 28, 1), name="fashion_mnist")
    loader = DeviceLoader(split, batch_size=30, normalize=False, pad_to=32, augment=Augment(4, False))
    x, _ = collect(loader)
    assert x.shape == (30, 1, 32, 32)
    offsets = set()
    for out, img in zip(torch.round(x * 255).to(torch.uint8), split.images, strict=True):
        mask = out[0] > 0
        rows, cols = torch.nonzero(mask, as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        offsets.add((top, left))
        assert torch.equal(out[0, top: top + 28, left: left + 28], torch.from_numpy(img[:, :, 0]))
    assert all(0 <= t <= 4 and 0 <= s <= 4 for t, s in offsets) and len(offsets) > 5


def test_bad_loader_settings_raise_config_errors():
    split = random_split(n=8, shape=(28, 28, 1))
    with pytest.raises(ConfigError, match="pad_to"):
        DeviceLoader(split, pad_to=16)
    with pytest.raises(ConfigError, match="crop_padding"):
        DeviceLoader(split, pad_to=40, augment=Augment(2, False))
    with pytest.raises(ConfigError):
        Augment(crop_padding=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        DeviceLoader(split, batch_size=0)
    with pytest.raises(ConfigError, match="mean/std"):
        DeviceLoader(split, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_train_val_split_is_stratified_disjoint_and_seeded():
    split = id_split(n=1000, num_classes=10)
    split.labels[:300] = 0  # unbalanced: class 0 holds 370 samples
    train, val = split.train_val_split(val_size=100, seed=0)
    assert (len(train), len(val)) == (900, 100) and (train.split, val.split) == ("train", "val")
    ids = lambda s: set(((s.images[:, 0, 0, 0].astype(int) - 1) * 256 + s.images[:, 0, 1, 0]).tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and len(ids(train) | ids(val)) == 1000
    assert val.class_counts()[0] == 37 and val.class_counts()[1:].tolist() == [7] * 9
    again, val_again = split.train_val_split(val_size=100, seed=0)
    assert np.array_equal(val_again.images, val.images)
    assert not np.array_equal(split.train_val_split(val_size=100, seed=1)[1].images, val.images)
    assert len(split.train_val_split(val_size=0.1)[1]) == 100
    with pytest.raises(DataError, match="val_size"):
        split.train_val_split(val_size=1000)


def test_subset_is_the_first_n_of_a_seeded_permutation():
    split = id_split(n=200)
    sub = split.subset(50, seed=4)
    perm = np.random.default_rng(4).permutation(200)[:50]
    assert np.array_equal(sub.images, split.images[perm]) and np.array_equal(sub.labels, split.labels[perm])
    assert not np.array_equal(split.subset(50, seed=5).images, sub.images)
    with pytest.raises(DataError, match="subset size"):
        split.subset(0)


def test_batches_do_not_depend_on_the_thread_setting_and_threads_are_restored():
    split = random_split(n=48)
    before = torch.get_num_threads()
    settings = dict(batch_size=16, shuffle=True, augment=Augment.lrunet())
    one = collect(DeviceLoader(split, cpu_threads=1, **settings))
    assert torch.get_num_threads() == before
    default = collect(DeviceLoader(split, cpu_threads=None, **settings))
    assert torch.equal(one[0], default[0]) and torch.equal(one[1], default[1])


def test_flip_without_crop_pads_small_images_centred():
    """Flip-only augmentation (DACNN recipe) on 28x28 images padded to 32: centred, no crop needed."""
    split = id_split(8, shape=(28, 28, 1), name="fashion_mnist")
    plain = DeviceLoader(split, batch_size=8, normalize=False, pad_to=32)
    flipped = DeviceLoader(split, batch_size=8, normalize=False, pad_to=32,
                           augment=Augment(crop_padding=0, flip=True))
    (x0, _), (x1, _) = next(iter(plain)), next(iter(flipped))
    assert x0.shape == x1.shape == (8, 1, 32, 32)
    assert torch.all(x1[..., :2, :] == 0) and torch.all(x1[..., :, :2] == 0)
    for a, b in zip(x0, x1):  # each image is either itself or its mirror, never shifted
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


def test_translate_crops_reflect_padded_images():
    """Every translated image is a window of the reflect-padded image (airbench's batch_crop)."""
    split = id_split(n=16)
    loader = DeviceLoader(split, batch_size=16, shuffle=False, augment=Augment(translate=2), normalize=False)
    x = torch.round(next(iter(loader))[0] * 255)
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float()
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(16):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], x[i])]
        assert hits, f"image {i} is not a window of its reflect-padded copy"
        shifts.add(hits[0])
    assert len(shifts) > 1


def test_alternate_flip_flips_each_image_in_every_other_epoch():
    split = id_split(n=64, shape=(8, 8, 3))
    loader = DeviceLoader(split, batch_size=64, shuffle=False, normalize=False,
                          augment=Augment(flip=True, alternate_flip=True))
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).float()
    flipped = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        x = torch.round(next(iter(loader))[0] * 255)
        flips = torch.tensor([torch.equal(x[i], images[i].flip(-1)) for i in range(64)])
        assert all(torch.equal(x[i], images[i]) or flips[i] for i in range(64))
        flipped.append(flips)
    assert torch.equal(flipped[0], ~flipped[1]) and torch.equal(flipped[0], flipped[2])
    assert 16 < int(flipped[0].sum()) < 48


def test_plain_images_are_the_centred_unaugmented_images():
    split = id_split(n=8)
    plain = DeviceLoader(split, batch_size=8, shuffle=False, normalize=False)
    augmented = DeviceLoader(split, batch_size=8, shuffle=True, normalize=False,
                             augment=Augment(translate=2, flip=True))
    assert torch.equal(augmented.plain_images(8), next(iter(plain))[0])


def test_set_epoch_with_a_start_batch_yields_the_rest_of_the_pass():
    split = id_split(n=64)
    loader = DeviceLoader(split, batch_size=8, shuffle=True, seed=3, normalize=False,
                          augment=Augment(translate=2, flip=True, cutout=4))
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_batch=5)
    rest = list(loader)
    assert len(rest) == len(whole) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[5:], rest))
    assert len(list(loader)) == len(whole)  # the next pass is whole again
    with pytest.raises(ConfigError, match="start_batch"):
        loader.set_epoch(0, start_batch=9)


def test_each_rank_gathers_its_part_of_the_global_batch():
    split = random_split(n=64, shape=(28, 28, 1), seed=1)
    aug = Augment(crop_padding=2, flip=True, rotate_degrees=10.0, cutout=4)
    kw = {"batch_size": 16, "shuffle": True, "drop_last": True, "seed": 5, "augment": aug, "pad_to": 32}
    full = list(DeviceLoader(split, **kw))
    for rank in range(3):
        shard = list(DeviceLoader(split, rank=rank, world=3, **kw))
        assert len(shard) == len(full)
        for (xs, ys), (xf, yf) in zip(shard, full, strict=True):
            assert torch.equal(ys, yf[rank::3])
            assert torch.equal(xs, xf[rank::3])
