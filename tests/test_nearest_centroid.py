"""Nearest-centroid assignment (``spidr.eval.nearest_centroid``): float32 where it is certainly right, float64
elsewhere. The truth is float64: the expansion spidr computed before (``assign_float64``) and the direct distance
Σ (x − c)², on data made to trip float32 (a large common offset, near and exact ties)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spidr.config import SpidRConfig
from spidr.eval.features import ExtractionSettings, extract_batch
from spidr.eval.kmeans import assign_units
from spidr.eval.nearest_centroid import FLOAT32_ROUNDOFF, NearestCentroid, assign_float64, ieee_float32_matmul
from spidr.models.build import build_model
from train_fixtures import EXTRACTION_MODEL, speech_like


def _layer_like(seed: int, *, offset: float, num_frames: int = 6000, dim: int = 96, num_centroids: int = 64):
    """Frames like a Transformer layer's (a low-rank signal, noise, one dimension far from the origin) and centroids
    moved to their cluster means once (as k-means leaves them: the nearest two are often close)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, 8, generator=gen)
    frames = torch.randn(num_frames, 8, generator=gen) @ basis.T * 0.3 + torch.randn(num_frames, dim, generator=gen)
    frames[:, 3] += offset
    centroids = frames[torch.randperm(num_frames, generator=gen)[:num_centroids]].clone()
    labels = assign_float64(frames, centroids)
    for k in range(num_centroids):
        if (labels == k).any():
            centroids[k] = frames[labels == k].mean(0)
    return frames, centroids


def _direct_float64(frames: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    return ((frames.double()[:, None, :] - centroids.double()[None]) ** 2).sum(-1).argmin(1).numpy()


@pytest.mark.parametrize("offset", [0.0, 200.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_choices_are_float64_s(offset, seed):
    frames, centroids = _layer_like(seed, offset=offset)
    nearest = NearestCentroid(centroids)
    units = nearest(frames, batch_size=1000)
    np.testing.assert_array_equal(units, assign_float64(frames, centroids).numpy())
    np.testing.assert_array_equal(units, _direct_float64(frames, centroids))
    # float32 does the work: a few frames are checked in float64 (each one counted once)
    assert 0 <= nearest.num_float64 < 0.05 * len(frames)


def test_every_frame_float32_gets_wrong_is_handed_to_float64():
    """Where the float32 choice differs from float64's, it must not be trusted. The uncentred float32 expansion,
    what spidr once computed, gets ~0.3 % of these frames wrong; the centred one fewer, but still some."""
    frames, centroids = _layer_like(0, offset=1000.0, num_frames=20000)
    truth = assign_float64(frames, centroids)
    naive = ((centroids * centroids).sum(1) - 2 * frames @ centroids.T).argmin(1)
    assert (naive != truth).sum() > 10  # the data do trip float32
    # frames placed between two centroids, a hair nearer one (1e-10 to 1e-4 of their distance): float32 cannot tell
    # which for the finest hairs, and tells it right by less than its error for the others
    pairs = torch.randint(len(centroids), (4000, 2), generator=torch.Generator().manual_seed(1))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    a, b = centroids[pairs[:, 0]].double(), centroids[pairs[:, 1]].double()
    hair = (b - a) * torch.logspace(-10, -4, len(pairs), dtype=torch.float64)[:, None]
    near_ties = ((a + b) / 2 - hair).float()
    frames = torch.cat([frames, near_ties])
    truth = assign_float64(frames, centroids)
    nearest = NearestCentroid(centroids)
    with ieee_float32_matmul():
        choices, trusted = nearest._float32_choices(frames)
    wrong = choices != truth
    assert wrong.any()  # float32 alone errs here ...
    assert not (wrong & trusted).any()  # ... and never where it is trusted
    np.testing.assert_array_equal(nearest(frames), truth.numpy())


def test_exact_ties_go_to_the_first_centroid_as_in_float64():
    """Duplicate centroids and frames equidistant from two (small integers: every distance is exact)."""
    centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    frames = torch.tensor([[2.0, 0.0], [4.0, 0.0], [2.0, 2.0], [0.0, 2.0], [5.0, 1.0], [1.0, 1.0]])
    expected = [0, 1, 0, 0, 1, 0]
    np.testing.assert_array_equal(assign_float64(frames, centroids).numpy(), expected)
    np.testing.assert_array_equal(NearestCentroid(centroids)(frames), expected)


def test_what_float32_cannot_hold_is_assigned_in_float64_alone():
    """float64 frames, or centroids with more digits than float32 holds: the float32 path would round them first,
    so the choices could differ from float64's on the given values."""
    frames = torch.tensor([[0.5 + 1e-12], [0.5 - 1e-12]], dtype=torch.float64)
    centroids = torch.tensor([[0.0], [1.0]])
    nearest = NearestCentroid(centroids)
    np.testing.assert_array_equal(nearest(frames), [1, 0])
    assert nearest.num_float64 == 2
    fine = NearestCentroid(torch.tensor([[0.0], [1.0 + 1e-12]], dtype=torch.float64))
    assert not fine.float32_exact
    np.testing.assert_array_equal(fine(torch.tensor([[0.5]])), [0])
    assert fine.num_float64 == 1


def test_non_finite_frames_and_one_centroid_and_no_frames():
    centroids = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    frames = torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [2.9, 0.0]])
    for nearest in (NearestCentroid(centroids), NearestCentroid(centroids[:1])):  # (no nearest: refused)
        with pytest.raises(ValueError, match="the first: nan at frame 0, dimension 0"):
            nearest(frames)
    frames = frames[2:]
    np.testing.assert_array_equal(NearestCentroid(centroids)(frames), assign_float64(frames, centroids).numpy())
    np.testing.assert_array_equal(NearestCentroid(centroids[:1])(frames), [0])
    assert NearestCentroid(centroids)(torch.zeros(0, 2)).shape == (0,)
    with pytest.raises(ValueError, match="do not match centroids of dimension 2"):
        NearestCentroid(centroids)(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="K ≥ 1"):
        NearestCentroid(torch.zeros(0, 2))
    # integer centroids, as the float64 assignment took them (a review found them refused)
    integers = torch.tensor([[0, 0], [3, 0]])
    np.testing.assert_array_equal(NearestCentroid(integers)(frames), assign_float64(frames, integers).numpy())
    assert NearestCentroid(integers)(torch.tensor([[2.9, 0.0], [0.2, 1.0]])).tolist() == [1, 0]


def test_low_precision_settings_of_the_process_are_set_aside_and_restored():
    """bf16 autocast (bf16 extraction runs under it) and a process's float32 matmul precision ("medium": bf16
    inputs where oneDNN can) must not reach the assignment; the process's settings are back after it."""
    frames, centroids = _layer_like(2, offset=200.0)
    truth = assign_float64(frames, centroids).numpy()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (frames @ centroids.T).dtype == torch.bfloat16  # (autocast is on)
            np.testing.assert_array_equal(NearestCentroid(centroids)(frames), truth)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_bfloat16_and_float16_frames_are_assigned_as_their_float32_values():
    frames, centroids = _layer_like(3, offset=0.0, num_frames=2000)
    for dtype in (torch.bfloat16, torch.float16):
        low = frames.to(dtype)
        np.testing.assert_array_equal(NearestCentroid(centroids)(low), assign_float64(low.float(), centroids).numpy())


def test_every_backend_s_float32_precision_is_restored():
    """The legacy getter alone does not show the per-backend settings that the assignment sets aside."""
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    before = [b.fp32_precision for b in backends]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        c = torch.randn(4, 3)
        NearestCentroid(c)(torch.randn(10, 3))
        assert [b.fp32_precision for b in backends] == ["tf32", "bf16"]
    finally:
        for b, p in zip(backends, before, strict=True):
            b.fp32_precision = p


def test_num_float64_counts_the_frames_handed_to_float64():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(8, 4, generator=g)
    frames = torch.cat([torch.randn(200, 4, generator=g), c[:3], (c[0:1] + c[1:2]) / 2])  # (exact and near ties)
    nearest = NearestCentroid(c)
    with ieee_float32_matmul():
        _, trusted = nearest._float32_choices(frames)
    nearest(frames, batch_size=64)
    assert nearest.num_float64 == int((~trusted).sum()) > 0


def test_float64_s_choice_is_followed_where_float64_itself_is_inexact():
    """A large offset with a small spread: the float64 expansion's own error exceeds the gap of near ties (it picks
    the farther centroid for many), while shifted float32 is accurate; the units must still be float64's."""
    g = torch.Generator().manual_seed(0)
    dim, float64_wrong = 768, 0
    for _ in range(40):
        base = 1e5 + 0.01 * torch.randn(dim, generator=g)
        a = (base + 0.01 * torch.randn(dim, generator=g)).float()
        x = (base + 0.01 * torch.randn(dim, generator=g)).float()
        b = 2 * x - a  # exact: x is equidistant from a and b ...
        i = int(torch.randint(dim, (1,), generator=g))
        away = float("inf") if b[i] >= x[i] else float("-inf")  # (a sign of 0 made a NaN centroid: now refused)
        b[i] = torch.nextafter(b[i], torch.tensor(away))  # ... until b moves away
        c = torch.stack([b, a])
        truth = int(assign_float64(x[None], c)[0])
        float64_wrong += truth != 1
        assert NearestCentroid(c)(x[None])[0] == truth
    assert float64_wrong > 5  # (the data do trip float64)


def test_prepared_tensors_are_kept_per_device():
    nearest = NearestCentroid(torch.randn(3, 2))
    assert nearest._prepared(torch.device("meta"))[0].device.type == "meta"
    assert nearest._prepared(torch.device("cpu"))[0].device.type == "cpu"


def test_overflowing_and_underflowing_distances_are_not_trusted():
    """Values near 1e19 (float32 and bf16 hold them) overflow the float32 distances to -inf or NaN, and values near
    1e-21 make them subnormal, where rounding is absolute: both chose another centroid than float64 did."""
    x = torch.tensor([[1.8e19, 0.0]])
    near, far = torch.tensor([0.9e19, 0.0]), 1.8e19 * torch.tensor([0.53, math.sqrt(1 - 0.53**2)])
    centroids = torch.stack([near, far, -(near + far)])
    np.testing.assert_array_equal(NearestCentroid(centroids)(x), assign_float64(x, centroids).numpy())
    gen = torch.Generator().manual_seed(0)
    centroids, frames = torch.randn(50, 4, generator=gen) * 1e-21, torch.randn(20000, 4, generator=gen) * 1e-21
    np.testing.assert_array_equal(NearestCentroid(centroids)(frames), assign_float64(frames, centroids).numpy())


def test_extraction_assigns_on_the_model_s_device_what_assign_units_gives_on_its_features():
    """extract_batch's k-means units (computed where the model runs, padding left out) equal assign_units on the
    layer's features of the same batch, in float32 and bf16; a layer asked only for its units is not returned."""
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    waves = [torch.from_numpy(speech_like(n, np.random.default_rng(n))) for n in (6000, 9000, 4000)]
    features = extract_batch(model, waves, ExtractionSettings(layers=(2, 3)))
    centroids = {layer: torch.from_numpy(np.concatenate([f[f"layer_{layer:02d}"] for f in features])[::5][:12])
                 for layer in (2, 3)}  # frames of the batch: centroids among the features
    kmeans = {layer: NearestCentroid(c) for layer, c in centroids.items()}
    for dtype in ("float32", "bfloat16"):
        results = extract_batch(model, waves, ExtractionSettings(layers=(2,), dtype=dtype), kmeans=kmeans)
        features = extract_batch(model, waves, ExtractionSettings(layers=(2, 3), dtype=dtype))
        for result, feature in zip(results, features, strict=True):
            assert sorted(result) == ["kmeans_02", "kmeans_03", "layer_02"]
            np.testing.assert_array_equal(result["layer_02"], feature["layer_02"])
            for layer in (2, 3):
                units = result[f"kmeans_{layer:02d}"]
                np.testing.assert_array_equal(units, assign_units(feature[f"layer_{layer:02d}"], centroids[layer]))
                assert len(set(units.tolist())) > 1  # (not a constant)
    with pytest.raises(ValueError, match=r"layers \[\] and k-means units of \[9\]: .*\(\[9\] are not\)"):
        extract_batch(model, waves, ExtractionSettings(layers=()), kmeans={9: kmeans[2]})


def test_a_group_norm_model_assigns_k_means_units_to_every_length_group():
    """A front end that normalises over time runs each length group as its own batch: every group gets its units."""
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**{**EXTRACTION_MODEL, "extractor_mode": "group_norm"})).eval()
    waves = [torch.from_numpy(speech_like(n, np.random.default_rng(n))) for n in (6000, 9000, 4000)]
    features = extract_batch(model, waves, ExtractionSettings(layers=(2,)))
    centroids = torch.from_numpy(np.concatenate([f["layer_02"] for f in features])[::4][:10].copy())
    results = extract_batch(model, waves, ExtractionSettings(layers=()), kmeans={2: NearestCentroid(centroids)})
    for result, feature in zip(results, features, strict=True):
        np.testing.assert_array_equal(result["kmeans_02"], assign_units(feature["layer_02"], centroids))


def test_the_benchmark_prints_equal_units_and_the_float64_share(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "kmeans_assign.py"
    spec = importlib.util.spec_from_file_location("kmeans_assign_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--frames", "3000", "--dim", "64", "--centroids", "40", "--rounds", "2"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| NearestCentroid"))
    assert row.endswith("| equal |")
    assert float(row.split("|")[4].strip().removesuffix(" %")) < 5


def test_centroids_float32_cannot_hold_send_every_frame_to_float64() -> None:
    """The class docstring: centroids that float32 cannot hold exactly are assigned in float64 alone (every frame
    counted in num_float64), even frames far from any tie."""
    centroids = torch.tensor([[0.0, 0.0], [1.0 + 1e-12, 0.0], [0.0, 3.0]], dtype=torch.float64)
    nearest = NearestCentroid(centroids)
    frames = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.2, 2.8]])
    np.testing.assert_array_equal(nearest(frames), [0, 1, 2])
    assert nearest.num_float64 == 3


def test_the_trust_bound_covers_the_worst_case_error_of_the_dot_products() -> None:
    """The module docstring's analysis: a float32 dot product x·c is off by at most γ_D‖x‖‖c‖ (γ_D = D·u/(1 − D·u)),
    so each distance by 2γ_D‖x‖C (C the largest shifted centroid norm, whichever centroid a frame is nearest) and
    a gap by twice that. The bound that decides trust must never be below it, or an adversarial summation could
    flip a trusted choice. Centroid norms differ widely here (one far centroid), as k-means leaves outliers."""
    gen = torch.Generator().manual_seed(0)
    dim = 96
    centroids = torch.randn(16, dim, generator=gen)
    centroids[0] *= 40.0
    nearest = NearestCentroid(centroids)
    x = torch.randn(200, dim, generator=gen) * 3.0 - nearest.shift
    shifted_norms = nearest.shifted.double().norm(dim=1)
    u = FLOAT32_ROUNDOFF
    gamma = dim * u / (1 - dim * u)
    worst = 2 * 2 * gamma * x.double().norm(dim=1) * shifted_norms.max()
    assert (nearest._error_bound(x) >= worst).all()


def test_float64_frames_are_assigned_in_float64_alone():
    """mut N02 (float64 frames sent down the float32 path). The class docstring: frames in float64 are assigned in
    float64 alone. Rounding them to float32 moves a frame far from the origin by up to half a float32 ulp per
    dimension, far more than the trust bound (computed for frames that are float32 already) allows for: near the
    bisector of two centroids at an offset of 1000, about a third of the float32 choices were trusted and wrong.
    Truth: assign_float64 on the given values."""
    import torch

    from spidr.eval.nearest_centroid import NearestCentroid, assign_float64

    g = torch.Generator().manual_seed(0)
    centroids = (1000 + torch.randn(2, 8, generator=g, dtype=torch.float64)).float()
    c = centroids.double()
    direction = (c[1] - c[0]) / (c[1] - c[0]).norm()
    across = torch.randn(300, 8, generator=g, dtype=torch.float64) * 0.5
    across -= (across @ direction)[:, None] * direction
    side = torch.logspace(-9, -4, 300, dtype=torch.float64)[:, None] * torch.tensor([-1.0, 1.0]).repeat(150)[:, None]
    frames = (c[0] + c[1]) / 2 + across + side * direction
    nearest = NearestCentroid(centroids)
    np.testing.assert_array_equal(nearest(frames), assign_float64(frames, centroids).numpy())
    assert nearest.num_float64 == len(frames)
    far = torch.stack([c[0], c[1]]) + 0.01  # far from any tie: still float64's path
    np.testing.assert_array_equal(nearest(far), [0, 1])
    assert nearest.num_float64 == len(frames) + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_frames_and_centroids_are_refused_naming_the_first(dtype):
    """A NaN frame got unit 0 (argmin over NaN distances), and NaN centroids gave every frame unit 0, without a word
    from the API (the units command refused such features before they got here). Both the float32 path (the NaN
    frame is among the distrusted ones) and the float64 path name the frame."""
    centroids = torch.eye(4, dtype=dtype)
    frames = torch.ones(5, 4, dtype=dtype)
    frames[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^'f\.npy': features contain non-finite values \(the first: nan at frame "
                                         r"3, dimension 2\): no centroid is nearest to them$"):
        assign_units(frames, centroids, name="f.npy")
    frames[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"the first: inf at frame 3, dimension 2"):
        NearestCentroid(centroids)(frames)
    with pytest.raises(ValueError, match=r"centroids hold non-finite values \(the first: nan in centroid 1, "
                                         r"dimension 0\)"):
        assign_units(torch.ones(2, 4), torch.tensor([[0.0] * 4, [float("nan"), 0, 0, 0]]))
    frames[3, 2] = 0.5  # all finite again: assigned as float64 would
    np.testing.assert_array_equal(assign_units(frames, centroids), assign_float64(frames, centroids).numpy())


# NearestCentroid makes float64's choice for any frames and centroids, near or far from the origin, tiny or
# huge, in every float dtype, frames equal to centroids included; and that choice is a nearest centroid by the
# directly computed distances.
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                   HealthCheck.filter_too_much])
@given(num_centroids=st.integers(1, 6), dim=st.integers(1, 5), num_frames=st.integers(0, 12), data=st.data(),
       scale=st.sampled_from([1e-40, 1e-20, 1e-3, 1.0, 1e3, 1e8, 1e17, 1e30]),
       offset=st.sampled_from([0.0, 1.0, 200.0, 1e6, -3e4]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       on_centroids=st.booleans())
def test_the_choice_is_float64_s_and_a_nearest_centroid(  # noqa: PLR0917
        num_centroids, dim, num_frames, data, scale, offset, dtype, on_centroids) -> None:
    elements = st.floats(-4, 4, width=32)
    centroids = data.draw(hnp.arrays(np.float64, (num_centroids, dim), elements=elements)) * scale + offset
    frames = data.draw(hnp.arrays(np.float64, (num_frames, dim), elements=elements)) * scale + offset
    if on_centroids:
        count = min(num_frames, num_centroids)
        frames[:count] = centroids[:count]
    centroids32 = torch.tensor(centroids, dtype=torch.float32)
    frames_t = torch.tensor(frames).to(dtype)
    assume(bool(torch.isfinite(centroids32).all()))
    assume(bool(torch.isfinite(frames_t).all()))
    units = NearestCentroid(centroids32)(frames_t)
    np.testing.assert_array_equal(units, assign_float64(frames_t, centroids32).numpy())
    if num_frames:
        x, c = frames_t.double().numpy(), centroids32.double().numpy()
        distances = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        chosen = distances[np.arange(num_frames), units]
        assert np.all(chosen <= distances.min(1) * (1 + 1e-9) + 1e-300)
