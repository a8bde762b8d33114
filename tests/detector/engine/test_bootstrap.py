"""Paired bootstrap over images (and seeds): what its intervals must and must not say."""
import numpy as np
import pytest

from ioulab.detector.engine import bootstrap
from ioulab.detector.engine import cocoeval
from ioulab.platform.bench.eval import synthetic_eval_set

METRICS = ("AP", "AP50", "AP75")


@pytest.fixture(scope="module")
def bench_set():
    gt, det_a, det_b = synthetic_eval_set(120, 8, 40, seed=7)
    return gt, det_a, det_b, cocoeval.match(gt, [dict(d) for d in det_a]), cocoeval.match(gt, [dict(d) for d in det_b])


def _ground_truth_on_half(gt, dets):
    """Detections where every image of the first half is replaced by its ground truth (score 1)."""
    ids = sorted(img["id"] for img in gt["images"])
    half = set(ids[: len(ids) // 2])
    out = [d for d in dets if d["image_id"] not in half]
    out += [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if a["image_id"] in half]
    return out


@pytest.mark.timeout(60)
def test_identical_detections_give_an_interval_around_zero(bench_set):
    _, _, _, m_a, _ = bench_set
    res = bootstrap.paired_bootstrap(m_a, m_a, METRICS, resamples=200, seed=0)
    for key in METRICS:
        assert res[key].delta == 0.0 and res[key].low <= 0.0 <= res[key].high
        assert not res[key].excludes_zero


@pytest.mark.timeout(60)
def test_clearly_better_variant_excludes_zero(bench_set):
    gt, det_a, _, m_a, _ = bench_set
    better = cocoeval.match(gt, _ground_truth_on_half(gt, det_a))
    res = bootstrap.paired_bootstrap(m_a, better, METRICS, resamples=200, seed=0)
    for key in METRICS:
        assert res[key].delta > 0 and res[key].low > 0 and res[key].excludes_zero, key


@pytest.mark.timeout(60)
def test_point_estimate_is_the_metric_difference(bench_set):
    gt, det_a, det_b, m_a, m_b = bench_set
    res = bootstrap.paired_bootstrap(m_a, m_b, METRICS, resamples=50, seed=0)
    a, b = cocoeval.evaluate(gt, [dict(d) for d in det_a]), cocoeval.evaluate(gt, [dict(d) for d in det_b])
    for key in METRICS:
        assert res[key].delta == pytest.approx(b[key] - a[key], abs=1e-9)
        assert res[key].low <= res[key].high


@pytest.mark.timeout(60)
def test_same_seed_same_interval_other_seed_differs(bench_set):
    _, _, _, m_a, m_b = bench_set
    r1 = bootstrap.paired_bootstrap(m_a, m_b, ("AP",), resamples=100, seed=3)["AP"]
    r2 = bootstrap.paired_bootstrap(m_a, m_b, ("AP",), resamples=100, seed=3)["AP"]
    r3 = bootstrap.paired_bootstrap(m_a, m_b, ("AP",), resamples=100, seed=4)["AP"]
    assert (r1.low, r1.high) == (r2.low, r2.high)
    np.testing.assert_array_equal(r1.samples, r2.samples)
    assert (r1.low, r1.high) != (r3.low, r3.high)


@pytest.mark.timeout(60)
def test_paired_interval_is_narrower_than_unpaired_on_correlated_variants(bench_set):
    _, _, _, m_a, m_b = bench_set
    paired = bootstrap.paired_bootstrap(m_a, m_b, ("AP",), resamples=300, seed=0)["AP"]
    unpaired = bootstrap.paired_bootstrap(m_a, m_b, ("AP",), resamples=300, seed=0, paired=False)["AP"]
    assert paired.delta == unpaired.delta
    assert paired.half_width < 0.5 * unpaired.half_width


@pytest.mark.timeout(90)
def test_two_level_bootstrap_widens_with_seed_noise(bench_set):
    """Seeds of one variant that disagree widen the interval beyond the image-only one."""
    gt, det_a, det_b, m_a, m_b = bench_set
    rng = np.random.default_rng(0)
    seeds_b = [m_b]
    for s in range(2):  # other "seeds": scores reshuffled on a random third of the images
        ids = set(rng.choice([img["id"] for img in gt["images"]], len(gt["images"]) // 3, replace=False))
        dets = [{**d, "score": float(rng.uniform())} if d["image_id"] in ids else dict(d) for d in det_b]
        seeds_b.append(cocoeval.match(gt, dets))
    one = bootstrap.paired_bootstrap(m_a, m_b, ("AP",), resamples=200, seed=0)["AP"]
    multi = bootstrap.paired_bootstrap([m_a, m_a, m_a], seeds_b, ("AP",), resamples=200, seed=0)["AP"]
    assert multi.half_width > one.half_width


def test_different_images_are_refused(bench_set):
    gt, det_a, _, m_a, _ = bench_set
    other = dict(gt, images=gt["images"][:-1],
                 annotations=[a for a in gt["annotations"] if a["image_id"] != gt["images"][-1]["id"]])
    m_other = cocoeval.match(other, [d for d in det_a if d["image_id"] != gt["images"][-1]["id"]])
    with pytest.raises(bootstrap.BootstrapError, match="same images"):
        bootstrap.paired_bootstrap(m_a, m_other, ("AP",), resamples=10)


def test_resolution_and_seeds_needed():
    # no seed noise: the image term decides alone
    assert bootstrap.resolvable_delta(0.0, 1.0, seeds=3) == pytest.approx(bootstrap.Z95)
    assert bootstrap.seeds_needed(1.0, 0.0, 1.0) is None            # image noise alone is wider than Δ
    n = bootstrap.seeds_needed(2.0, seed_variance=1.0, image_variance=0.1)
    assert n is not None and bootstrap.resolvable_delta(1.0, 0.1, n) <= 2.0 < bootstrap.resolvable_delta(1.0, 0.1, n - 1)
