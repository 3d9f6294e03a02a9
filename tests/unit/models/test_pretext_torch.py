"""The Bézier intensity remap on the volume's device (``curve_lookup``) against np.interp.

The curves are still drawn from the numpy generator; only the lookup moved to torch. The
references here are np.interp and the former per-volume numpy path, written out in full.
"""

import numpy as np
import pytest
import torch

from medtx.models import pretext
from medtx.models.pretext import (
    bezier_curve,
    bezier_intensity,
    curve_lookup,
    plane_positives,
)
from medtx.models.slice_transformer import PLANES

TOL = 1e-5  # what the remap must meet (it does better: np.interp rounded once)
BUCKETS = 1 << pretext._BUCKET_BITS  # the CPU table's buckets: their edges are delicate


class Draws:
    """Stands in for a Generator: ``random(k)`` hands out the given control points."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self, size=None):
        out = [self.values.pop(0) for _ in range(size or 1)]
        return np.array(out) if size else out[0]


def random_curves(rng, count):
    """Bézier curves, half of them flipped, one in three with control points at 0 or 1.

    Degenerate control points give curves steep (or flat) at an end or with a cusp, so
    that many curve points crowd into a few buckets of the CPU table.
    """
    curves = []
    for i in range(count):
        if i % 3 == 2:
            p1, p2 = rng.choice([0.0, 1.0, rng.random()], 2), rng.choice([0.0, 1.0], 2)
            xs, ys = bezier_curve(Draws(*p1, *p2))
        else:
            xs, ys = bezier_curve(rng)
        curves.append((xs, ys[::-1] if i % 2 else ys))
    return curves


def hand_curves():
    """Curves np.interp treats specially: repeated xs (steps, plateaus), points on
    bucket edges, curves that start after 0 or end before 1, one and two points."""
    edge = 12345 / BUCKETS
    return [
        ([0.0, 0.0, 0.2, 0.2, 0.2, 0.5, 1.0, 1.0], [0.3, 0.9, 0.1, 0.6, 0.4, 0.4, 0.0, 1.0]),
        ([0.0, edge, edge, edge + 1 / BUCKETS, 1.0], [0.0, 0.2, 0.8, 0.3, 1.0]),
        ([0.25, 0.5, 0.5, 0.75], [0.9, 0.1, 0.7, 0.2]),
        ([0.0, 1e-9, 2e-9, 1.0 - 1e-9, 1.0], [0.0, 0.5, 0.6, 0.7, 1.0]),
        ([0.5], [0.25]),
        ([0.0, 1.0], [1.0, 0.0]),
    ]


def probe_volume(curves, shape=(40, 50, 40), seed=0):
    """Random intensities, plus 0, 1, every curve point as float32 and its float32
    neighbours, and bucket edges with their neighbours below."""
    rng = np.random.default_rng(seed)
    vol = rng.random(shape, dtype=np.float32)
    points = np.concatenate([np.asarray(xs, dtype=np.float32) for xs, _ in curves])
    edges = (rng.integers(0, BUCKETS + 1, 500) / BUCKETS).astype(np.float32)
    special = np.concatenate(
        [
            [0.0, 1.0, np.float32(2**-30), np.nextafter(np.float32(1), np.float32(0))],
            points,
            np.nextafter(points, np.float32(0)),
            np.nextafter(points, np.float32(1)),
            edges,
            np.nextafter(edges, np.float32(0)),
        ]
    ).astype(np.float32)
    special = special[(special >= 0) & (special <= 1)][: vol.size]
    vol.reshape(-1)[rng.permutation(vol.size)[: special.size]] = special
    return vol


def lookup_all(volume, curves, lookup):
    """Every curve applied to one volume through ``curve_lookup``'s (P, B, ...) layout."""
    n = max(len(xs) for xs, _ in curves)
    xs = np.array([[np.pad(xs, (0, n - len(xs)), mode="edge")] for xs, _ in curves], float)
    ys = np.array([[np.pad(ys, (0, n - len(ys)), mode="edge")] for _, ys in curves], float)
    return lookup(torch.from_numpy(volume)[None], xs, ys)[:, 0]


def search_path(volumes, xs, ys):
    """The device path (a binary search per voxel), run here on the CPU."""
    flat = volumes.reshape(volumes.shape[0], -1)
    segments = torch.from_numpy(pretext._segments(xs, ys))
    per_volume = [pretext._search_lookup(v, segments[:, b]) for b, v in enumerate(flat)]
    out = torch.stack(per_volume, 1)
    return out.to(volumes.dtype).reshape(xs.shape[0], *volumes.shape)


def assert_matches_interp(out, volume, curves, tol=TOL):
    for got, (xs, ys) in zip(out, curves):
        ref = np.interp(volume, xs, ys)
        assert got.shape == volume.shape
        np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=tol)


# ---------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lookup", [curve_lookup, search_path], ids=["table", "search"])
def test_lookup_matches_np_interp_on_random_curves(seed, lookup):
    rng = np.random.default_rng(100 + seed)
    curves = random_curves(rng, 12)
    volume = probe_volume(curves, seed=seed)  # 80 000 voxels: more than one CPU chunk
    assert_matches_interp(lookup_all(volume, curves, lookup), volume, curves)


@pytest.mark.parametrize("lookup", [curve_lookup, search_path], ids=["table", "search"])
def test_lookup_matches_np_interp_on_repeated_and_partial_xs(lookup):
    # padding the short curves with their last point is itself a repeated x
    curves = [(np.array(xs), np.array(ys)) for xs, ys in hand_curves()]
    volume = probe_volume(curves, shape=(30, 20, 10), seed=7)
    assert_matches_interp(lookup_all(volume, curves, lookup), volume, curves)


def assert_rounds_np_interp_once(got, volume, curves):
    """got is np.interp's float64 value rounded once to float32: bit for bit but for a
    rare tie that float64 round-off tips (none expected in these voxels)."""
    for out, (xs, ys) in zip(got, curves):
        exact = np.interp(volume, xs, ys)
        ref = exact.astype(np.float32)
        differ = out.numpy() != ref
        assert differ.mean() <= 1e-4, f"{differ.sum()} voxels differ from np.interp"
        np.testing.assert_array_max_ulp(out.numpy(), ref, maxulp=1)


def test_lookup_is_np_interp_rounded_once():
    """Not just within the tolerance: the CPU table gives np.interp's own numbers, so CPU
    runs repeat the numbers they gave when np.interp did the remap."""
    rng = np.random.default_rng(5)
    curves = random_curves(rng, 8) + [(np.array(xs), np.array(ys)) for xs, ys in hand_curves()]
    volume = probe_volume(curves, seed=5)
    assert_rounds_np_interp_once(lookup_all(volume, curves, curve_lookup), volume, curves)
    wide = volume.astype(np.float64)
    assert_matches_interp(lookup_all(wide, curves, curve_lookup), wide, curves, tol=1e-12)


def test_a_float16_cached_volume_takes_np_interp_of_each_code(monkeypatch):
    """A volume read from the float16 cache at full size (every voxel a float16 value,
    here with curve points, subnormals, 0, 1 and values past both ends) is remapped
    through a table of np.interp over the 65,536 float16 codes: bit for bit
    np.interp(...).astype(float32), without the bucket table."""
    rng = np.random.default_rng(21)
    curves = random_curves(rng, 6) + [(np.array(xs), np.array(ys)) for xs, ys in hand_curves()]
    volume = probe_volume(curves, seed=21).astype(np.float16)
    volume.reshape(-1)[:6] = [0.0, 1.0, 6e-8, -0.25, 1.5, np.float16(2**-14)]
    volume = volume.astype(np.float32)

    def no_buckets(*_):
        raise AssertionError("a float16-valued volume went through the bucket table")

    monkeypatch.setattr(pretext, "_table_lookup", no_buckets)
    got = lookup_all(volume, curves, curve_lookup)
    for out, (xs, ys) in zip(got, curves):
        np.testing.assert_array_equal(out.numpy(), np.interp(volume, xs, ys).astype(np.float32))


def test_a_volume_off_the_float16_grid_takes_the_bucket_table(monkeypatch):
    volume = np.full((4, 5, 6), np.float32(0.1), dtype=np.float32)  # 0.1 is not a float16
    called = []
    real = pretext._table_lookup
    monkeypatch.setattr(pretext, "_table_lookup", lambda *a: called.append(1) or real(*a))
    curves = random_curves(np.random.default_rng(3), 2)
    assert_matches_interp(lookup_all(volume, curves, curve_lookup), volume, curves)
    assert called


def test_cpu_lookup_in_many_chunks(monkeypatch):
    monkeypatch.setattr(pretext, "_CHUNK", 777)
    rng = np.random.default_rng(11)
    curves = random_curves(rng, 6)
    volume = probe_volume(curves, shape=(20, 30, 17), seed=11)
    assert_matches_interp(lookup_all(volume, curves, curve_lookup), volume, curves)


@pytest.mark.parametrize("lookup", [curve_lookup, search_path], ids=["table", "search"])
def test_lookup_follows_np_interp_outside_unit_interval(lookup):
    """No range check in the lookup: np.interp's ends, and NaN stays NaN."""
    curves = random_curves(np.random.default_rng(2), 4) + [
        (np.array(xs), np.array(ys)) for xs, ys in hand_curves()[:3]
    ]
    values = [-np.inf, -3.0, -1e-6, -1e-30, 1.0 + 1e-6, 1.0 + 2 / BUCKETS, 7.0, np.inf, np.nan]
    volume = np.concatenate([np.array(values), np.linspace(0, 1, 91)]).astype(np.float32)
    out = lookup_all(volume, curves, lookup)
    for got, (xs, ys) in zip(out, curves):
        np.testing.assert_allclose(got.numpy(), np.interp(volume, xs, ys), rtol=0, atol=TOL)


def test_lookup_keeps_shape_and_dtype():
    rng = np.random.default_rng(3)
    xs, ys = bezier_curve(rng)
    curves = (xs[None, None].repeat(2, 1), ys[None, None].repeat(2, 1))
    half = torch.rand(2, 1, 4, 5, 6).half()
    out = curve_lookup(half, *curves)
    assert out.shape == (1, *half.shape) and out.dtype == torch.float16
    ref = np.interp(half.float().numpy(), xs, ys)
    np.testing.assert_allclose(out[0].float().numpy(), ref, atol=1e-3)
    ints = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert curve_lookup(ints, *curves).dtype == torch.float32
    assert curve_lookup(torch.zeros(2, 0), *curves).shape == (1, 2, 0)
    with pytest.raises(ValueError, match=r"\(P, B=2, n >= 1\)"):
        curve_lookup(half, xs[None, None], ys[None, None])


# ---------------------------------------------------------------------------- the batch


def old_plane_positives(volumes, rng):
    """The former path: per plane, per volume, a curve then a flip draw, then np.interp
    on the host (the Bézier written out as it was)."""
    planes = []
    for _ in PLANES:
        remapped = []
        for v in volumes:
            values = v.numpy()
            p1, p2 = rng.random(2), rng.random(2)
            t = np.linspace(0.0, 1.0, 1000)[:, None]
            pts = 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3
            xs, ys = np.maximum.accumulate(pts[:, 0]), np.maximum.accumulate(pts[:, 1])
            if rng.random() < 0.5:
                ys = ys[::-1]
            remapped.append(torch.from_numpy(np.interp(values, xs, ys).astype(np.float32)))
        planes.append(torch.stack(remapped))
    return tuple(planes)


def brain_like(batch, shape=(24, 30, 20), seed=0):
    """Volumes in [0, 1] with an exactly-0 background and exact 1s, like scaled scans."""
    g = torch.Generator().manual_seed(seed)
    vols = torch.rand(batch, 1, *shape, generator=g)
    vols[..., :3, :, :] = 0.0
    vols[..., -2:, :, :] = 1.0
    return vols


@pytest.mark.parametrize("seed", range(5))
def test_plane_positives_match_old_numpy_path_and_random_stream(seed):
    vols = brain_like(3, seed=seed)
    new_rng, old_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    new, old = plane_positives(vols, new_rng), old_plane_positives(vols, old_rng)
    assert len(new) == len(PLANES) == len(old)
    for a, b in zip(new, old):
        assert a.shape == vols.shape and a.dtype == vols.dtype and a.device == vols.device
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        assert (a != b).float().mean() <= 1e-4  # and in fact the same numbers
    assert new_rng.random() == old_rng.random()  # the generator is left where it was
    assert new_rng.bit_generator.state == old_rng.bit_generator.state


def test_plane_positives_differ_per_plane_and_volume():
    vols = brain_like(2, seed=1)
    vols[1] = vols[0]
    sag, cor, _ = plane_positives(vols, np.random.default_rng(0))
    assert not torch.allclose(sag, cor) and not torch.allclose(sag[0], sag[1])


def test_bezier_intensity_tensor_path_matches_numpy_path():
    vol = brain_like(1, seed=4)[0]
    got = bezier_intensity(vol, np.random.default_rng(9))
    ref = bezier_intensity(vol.numpy(), np.random.default_rng(9))
    assert isinstance(got, torch.Tensor) and got.dtype == vol.dtype
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------- range check


@pytest.mark.parametrize("bad", [1.5, -0.01])
def test_range_check_raises_for_batches_and_volumes(bad):
    vols = brain_like(2)
    vols[1, 0, 5, 5, 5] = bad
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match=r"needs intensities in \[0, 1\]"):
        plane_positives(vols, rng)
    assert rng.bit_generator.state == state  # checked before any curve is drawn
    with pytest.raises(ValueError, match=r"needs intensities in \[0, 1\]"):
        bezier_intensity(vols[1], rng)
    with pytest.raises(ValueError, match=r"needs intensities in \[0, 1\]"):
        bezier_intensity(vols[1].numpy(), rng)


def test_range_check_allows_round_off():
    vols = brain_like(2)
    vols[0, 0, 0, 0, 0], vols[1, 0, 0, 0, 0] = -1e-7, 1 + 1e-7
    out = plane_positives(vols, np.random.default_rng(0))
    assert all(torch.isfinite(p).all() for p in out)


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lookup_stays_on_device_and_matches_cpu():
    vols = brain_like(3, seed=2)
    cpu = plane_positives(vols, np.random.default_rng(3))
    gpu = plane_positives(vols.cuda(), np.random.default_rng(3))
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda" and a.dtype == torch.float32
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=TOL)
    curves = random_curves(np.random.default_rng(4), 6)
    volume = probe_volume(curves, seed=4)
    out = lookup_all(volume, curves, lambda v, xs, ys: curve_lookup(v.cuda(), xs, ys).cpu())
    assert_matches_interp(out, volume, curves)
