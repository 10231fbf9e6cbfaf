"""Transforms of docs/protocol.md 2.2 / 2.3 on small hand-made arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmark.protocol import PASCAL_CONTEXT
from benchmark.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    add_ignore_regions,
    build_transforms,
    cast_uint8,
    hflip,
    resize,
    scale_rotate,
)


def _sample(h: int = 12, w: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(h, w, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[:5] = 0.0  # an invalid (ignored) band
    parts = np.zeros((h, w), np.uint8)
    parts[4:8, 5:9] = rng.integers(1, 7, (4, 4))
    return {
        "image": rng.uniform(0, 255, (h, w, 3)),
        "semseg": rng.integers(0, 21, (h, w)).astype(np.uint8),
        "human_parts": parts,
        "sal": rng.integers(0, 2, (h, w)).astype(np.uint8),
        "normals": n,
    }


def test_cast_uint8_wrap_and_clamp():
    x = np.array([-300.2, -3.7, -1.0, -0.9, 0.0, 12.9, 254.99, 255.0, 255.7, 256.0, 257.2, 600.0])
    wrap = cast_uint8(x, "wrap")
    clamp = cast_uint8(x, "clamp")
    # C truncation toward zero, then modulo 256 (what astype(uint8) does on x86-64)
    assert wrap.tolist() == [int(np.trunc(v)) % 256 for v in x]
    assert wrap[1] == 253 and wrap[5] == 12 and wrap[10] == 1
    assert clamp.tolist() == [0, 0, 0, 0, 0, 12, 254, 255, 255, 255, 255, 255]
    in_range = (x > -1) & (x < 256)
    assert (wrap[in_range] == clamp[in_range]).all()
    with pytest.raises(ValueError, match="uint8_cast"):
        cast_uint8(x, "round")
    with pytest.raises(ValueError, match="uint8_cast"):
        build_transforms(PASCAL_CONTEXT, train=False, uint8_cast="round", image_size=8)


def test_hflip_mirrors_and_negates_normal_x():
    s = _sample()
    f = hflip(s, PASCAL_CONTEXT)
    for key in s:
        assert f[key].shape == s[key].shape
    assert np.array_equal(f["semseg"], s["semseg"][:, ::-1])
    assert np.array_equal(f["normals"][..., 0], -s["normals"][:, ::-1, 0])
    assert np.array_equal(f["normals"][..., 1:], s["normals"][:, ::-1, 1:])
    assert np.array_equal(f["image"], s["image"][:, ::-1])


def test_scale_rotate_identity_and_border():
    s = _sample()
    same = scale_rotate(s, PASCAL_CONTEXT, 0.0, 1.0)
    for key in ("semseg", "human_parts", "sal"):
        assert np.array_equal(same[key], s[key])
    # Shrinking leaves a constant-0 border: background for the label maps, a zero (ignored) normal.
    small = scale_rotate(s, PASCAL_CONTEXT, 0.0, 0.5)
    for key in ("semseg", "sal", "human_parts"):
        assert (small[key][0] == 0).all() and (small[key][:, 0] == 0).all()
    assert (small["normals"][0] == 0).all()
    ignored = add_ignore_regions(resize(small, PASCAL_CONTEXT, 8), PASCAL_CONTEXT)
    assert (ignored["normals"][0] == 255).all()
    assert (ignored["semseg"][0] == 0).all()


def test_scale_rotate_rotates_normal_vectors_in_plane():
    n = np.zeros((9, 9, 3))
    n[...] = (1.0, 0.0, 0.0)
    out = scale_rotate({"normals": n}, PASCAL_CONTEXT, 90.0, 1.0)["normals"]
    # (x, y) -> (x cos a + y sin a, y cos a - x sin a) with a = 90 degrees: (1, 0) -> (0, -1)
    np.testing.assert_allclose(out[4, 4], [0.0, -1.0, 0.0], atol=1e-12)


def test_resize_renormalises_and_marks_ignore():
    s = _sample()
    r = add_ignore_regions(resize(s, PASCAL_CONTEXT, 10), PASCAL_CONTEXT)
    assert r["normals"].shape == (10, 10, 3) and r["semseg"].shape == (10, 10)
    n = r["normals"]
    ignored = (n == 255).all(-1)
    assert ignored.any() and (~ignored).any()
    np.testing.assert_allclose(np.linalg.norm(n[~ignored], axis=-1), 1.0, atol=1e-12)
    # nearest keeps label values
    assert set(np.unique(r["semseg"])) <= set(np.unique(s["semseg"]))


def test_all_zero_parts_become_ignore():
    s = _sample()
    s["human_parts"][:] = 0
    out = add_ignore_regions(s, PASCAL_CONTEXT)
    assert (out["human_parts"] == 255).all()
    s2 = _sample()
    assert add_ignore_regions(s2, PASCAL_CONTEXT)["human_parts"].max() <= 6


def test_val_transform_tensors_and_normalisation():
    s = _sample()
    t = build_transforms(PASCAL_CONTEXT, train=False, label_dtype=torch.float64, image_size=8)
    out = t(s)
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 8, 8)
    for key, c in (("semseg", 1), ("human_parts", 1), ("sal", 1), ("normals", 3)):
        assert out[key].shape == (c, 8, 8) and out[key].dtype == torch.float64
    img = cast_uint8(resize({"image": s["image"]}, PASCAL_CONTEXT, 8)["image"], "clamp").astype(np.float32) / 255
    expected = (torch.from_numpy(img.transpose(2, 0, 1)) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    torch.testing.assert_close(out["image"], expected, rtol=0, atol=1e-6)
    # deterministic: epoch and index do not matter for val
    again = t(s, epoch=3, index=7)
    for key in out:
        assert torch.equal(out[key], again[key])


def test_train_transform_seeded_per_sample():
    s = _sample(20, 28)
    t = build_transforms(PASCAL_CONTEXT, train=True, seed=5, image_size=16)
    a = t(s, epoch=0, index=3)
    b = t(s, epoch=0, index=3)
    c = t(s, epoch=1, index=3)
    d = build_transforms(PASCAL_CONTEXT, train=True, seed=6, image_size=16)(s, epoch=0, index=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], c["image"])
    assert not torch.equal(a["image"], d["image"])
    flips, angles, scales = zip(*(t.draw(e, i) for e in range(20) for i in range(20)), strict=True)
    assert 0.3 < np.mean(flips) < 0.7
    assert -20 <= min(angles) < -15 and 15 < max(angles) <= 20
    assert 0.75 <= min(scales) < 0.8 and 1.2 < max(scales) <= 1.25
    assert a["image"].shape == (3, 16, 16) and a["normals"].shape == (3, 16, 16)
    valid = (a["normals"] != 255).all(0)
    torch.testing.assert_close(a["normals"][:, valid].norm(dim=0), torch.ones(int(valid.sum())), atol=1e-5, rtol=0)
    assert set(a["semseg"].unique().tolist()) <= set(range(21))


# --------------------------------------------------------------------------- the protocol's augmentation is read


def _draws(protocol, n=20):
    t = build_transforms(protocol, train=True, seed=5, image_size=16)
    return [t.draw(e, i) for e in range(n) for i in range(n)]


def test_flip_prob_is_read_from_the_protocol():
    never = dataclasses.replace(PASCAL_CONTEXT, flip_prob=0.0)
    always = dataclasses.replace(PASCAL_CONTEXT, flip_prob=1.0)
    assert not any(d.flip for d in _draws(never)) and all(d.flip for d in _draws(always))
    s = _sample(20, 28)
    a = build_transforms(never, train=True, seed=5, image_size=16)(s, epoch=0, index=3)
    b = build_transforms(always, train=True, seed=5, image_size=16)(s, epoch=0, index=3)
    assert not torch.equal(a["image"], b["image"])


def test_rotation_and_scale_ranges_are_read_from_the_protocol():
    p = dataclasses.replace(PASCAL_CONTEXT, rotation=(30.0, 40.0), scale=(1.5, 2.0))
    angles, scales = [d.angle for d in _draws(p)], [d.scale for d in _draws(p)]
    assert 30 <= min(angles) < 31 and 39 < max(angles) <= 40
    assert 1.5 <= min(scales) < 1.55 and 1.95 < max(scales) <= 2.0
    base = _draws(PASCAL_CONTEXT)
    # the same uniforms, mapped into the other ranges: the flips do not move
    assert [d.flip for d in _draws(p)] == [d.flip for d in base]
    none = dataclasses.replace(PASCAL_CONTEXT, rotation=(0.0, 0.0))
    assert {d.angle for d in _draws(none)} == {0.0}


def test_scale_choices_override_the_range_with_equal_odds():
    p = dataclasses.replace(PASCAL_CONTEXT, scale_choices=(0.5, 3.0))
    scales = [d.scale for d in _draws(p, 30)]
    assert set(scales) == {0.5, 3.0}
    assert abs(scales.count(0.5) - 450) < 4.4 * (900 * 0.25) ** 0.5  # binomial(900, 1/2): 4.4 sigma
    s = _sample(20, 28)
    t = build_transforms(p, train=True, seed=5, image_size=16)
    zoomed = [i for i in range(20) if t.draw(0, i).scale == 0.5]
    out = t(s, epoch=0, index=zoomed[0])
    assert (out["semseg"][0, 0] == 0).all()  # zoomed out by 2: the constant-0 border reaches the resized edge
    with pytest.raises(ValueError, match="scale_choices"):
        build_transforms(dataclasses.replace(PASCAL_CONTEXT, scale_choices=()), train=True)


def test_mean_and_std_are_read_from_the_protocol():
    s = _sample()
    p = dataclasses.replace(PASCAL_CONTEXT, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = build_transforms(p, train=False, image_size=8)(s)
    img = cast_uint8(resize({"image": s["image"]}, PASCAL_CONTEXT, 8)["image"], "clamp")
    assert torch.equal(out["image"], torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255))


def test_image_size_defaults_to_the_protocols():
    p = dataclasses.replace(PASCAL_CONTEXT, image_size=12)
    assert build_transforms(p, train=False)(_sample())["semseg"].shape == (1, 12, 12)
    assert build_transforms(p, train=False, image_size=10)(_sample())["semseg"].shape == (1, 10, 10)
    with pytest.raises(TypeError, match="protocol"):
        build_transforms(8, train=False)


def test_entries_are_the_protocols_tasks():
    with pytest.raises(KeyError, match="depth"):
        build_transforms(PASCAL_CONTEXT, train=False, image_size=8)({**_sample(), "depth": np.ones((12, 16))})


@settings(max_examples=60, deadline=None)
@given(
    flip_prob=st.floats(0.0, 1.0),
    rotation=st.tuples(st.floats(-180, 180), st.floats(0, 90)).map(lambda t: (t[0], t[0] + t[1])),
    scale=st.tuples(st.floats(0.1, 3.0), st.floats(0.0, 2.0)).map(lambda t: (t[0], t[0] + t[1])),
    choices=st.none() | st.lists(st.floats(0.1, 4.0), min_size=1, max_size=5).map(tuple),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 1000),
    index=st.integers(0, 10**6),
)
def test_draws_stay_in_the_protocols_ranges(flip_prob, rotation, scale, choices, seed, epoch, index):
    p = dataclasses.replace(PASCAL_CONTEXT, flip_prob=flip_prob, rotation=rotation, scale=scale, scale_choices=choices)
    t = build_transforms(p, train=True, seed=seed, image_size=8)
    d = t.draw(epoch, index)
    assert d == build_transforms(p, train=True, seed=seed, image_size=8).draw(epoch, index)  # (seed, epoch, index)
    assert rotation[0] <= d.angle <= rotation[1]
    assert d.scale in choices if choices is not None else scale[0] <= d.scale <= scale[1]
    assert d.flip is (flip_prob == 1.0 or (flip_prob > 0 and d.flip))
    # the flip does not depend on the ranges: the same uniform decides it
    assert (
        d.flip
        == build_transforms(dataclasses.replace(PASCAL_CONTEXT, flip_prob=flip_prob), True, seed)
        .draw(epoch, index)
        .flip
    )
