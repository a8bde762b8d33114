"""Paired bootstrap over images (and seeds) for the difference of two variants' COCO metrics.

Method (Efron's percentile bootstrap, as the PASCAL VOC organisers used it to tell detectors
apart, Everingham et al., IJCV 2015): the validation images are a sample of the images the
detector will meet. Draw B resamples of the images with replacement (a resample = a weight per
image: how often it was drawn); in each, recompute every metric of both variants *on the same
resample* (paired: an image that is hard for one variant is usually hard for the other, which
cancels out of the difference) and take Δ = B − A. The 2.5 and 97.5 percentiles of the B
values of Δ are the 95 % interval. With several seeds per variant (two-level bootstrap), each
resample also draws the seeds of each variant with replacement and averages the metric over
them, so the interval covers training noise too.

Assumptions: images are independent draws from the same population (so do not bootstrap video
frames one by one); seeds are independent runs; both variants were evaluated on exactly the same
images and ground truth (checked). The interval is about these images' population, not COCO's.

Glossary: B resamples, I images, S seeds of one variant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ioulab.detector.engine.cocoeval import METRIC_KEYS, Accumulator, Matches
from ioulab.detector.errors import UserError

Z95 = 1.959963984540054


class BootstrapError(UserError):
    """The variants cannot be compared image by image (different images or ground truth)."""


@dataclass
class Interval:
    """Δ = variant B − variant A of one metric (percent points) and its bootstrap interval."""

    delta: float
    low: float
    high: float
    samples: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    image_variance: float = float("nan")   # variance of Δ over image resamples, seeds fixed

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2



def resample_weights(num_images: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[B, I] counts: how often each image is drawn in each of ``resamples`` resamples."""
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples)


def _seed_list(x) -> list:
    """One run's record (a :class:`Matches` or the like) or a list/tuple of them -> a list."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_same_images(runs: list[Matches]) -> None:
    first = runs[0]
    for m in runs[1:]:
        if m.image_ids != first.image_ids or (m.gt_digest and first.gt_digest and m.gt_digest != first.gt_digest):
            raise BootstrapError("the runs were not evaluated on the same images and ground truth: "
                                 "a paired comparison needs the same validation set")
        if m.category_ids != first.category_ids:
            raise BootstrapError("the runs were evaluated with different category lists")


def _metric_table(accs: list, weights: np.ndarray, metrics, chunk: int) -> dict[str, np.ndarray]:
    """{metric: [S, B]} for every seed's matches under every weight vector."""
    out = {m: np.zeros((len(accs), len(weights))) for m in metrics}
    for s, acc in enumerate(accs):
        for lo in range(0, len(weights), chunk):
            values = acc(weights[lo:lo + chunk])
            for m in metrics:
                out[m][s, lo:lo + chunk] = values[m]
    return out


@dataclass
class VariantSamples:
    """One variant's metrics on the full image set and under each image resample."""

    point: dict[str, float]            # mean over its seeds, all images once
    boot: dict[str, np.ndarray]        # [B] mean over the seeds drawn for each resample
    images_only: dict[str, np.ndarray]  # [B] mean over all its seeds (image noise only)


def variant_samples(runs, weights: np.ndarray, metrics, rng: np.random.Generator,
                    chunk: int = 16, accumulator=Accumulator) -> VariantSamples:
    """``runs``: one :class:`Matches` or a list (one per seed); ``weights`` [B, I] image counts;
    ``rng`` draws the seeds of each resample (two-level bootstrap). ``accumulator(run, metrics)``
    gives the callable weights [B, I] -> {metric: [B]} of one run (another kind of per-image
    record than :class:`Matches` brings its own, e.g. the error analysis')."""
    runs = _seed_list(runs)
    check_same_images(runs)
    metrics = tuple(metrics)
    accs = [accumulator(m, metrics) for m in runs]
    ones = np.ones((1, weights.shape[1]), dtype=np.int64)
    point, boot = _metric_table(accs, ones, metrics, chunk), _metric_table(accs, weights, metrics, chunk)
    picks = _seed_draws(len(runs), len(weights), rng)
    cols = np.arange(len(weights))
    return VariantSamples({m: float(point[m].mean()) for m in metrics},
                          {m: _seed_mean(boot[m], picks, cols) for m in metrics},
                          {m: boot[m].mean(axis=0) for m in metrics})


def compare(a: VariantSamples, b: VariantSamples, level: float = 0.95) -> dict[str, Interval]:
    """Δ = b − a with the percentile interval, for the metrics both have (same resamples!)."""
    tail = 100 * (1 - level) / 2
    out = {}
    for m in a.point.keys() & b.point.keys():
        samples = b.boot[m] - a.boot[m]
        low, high = np.nanpercentile(samples, [tail, 100 - tail])   # NaN: a resample where the metric is undefined
        image_var = float(np.var(b.images_only[m] - a.images_only[m], ddof=1)) if len(samples) > 1 else float("nan")
        out[m] = Interval(b.point[m] - a.point[m], float(low), float(high), samples, image_var)
    return out


def paired_bootstrap(a, b, metrics=METRIC_KEYS, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, paired: bool = True, chunk: int = 16) -> dict[str, Interval]:
    """Δ = b − a for each metric with its percentile interval at ``level``.

    ``a`` and ``b``: the :class:`Matches` of one run, or a list of them (one per seed). With
    ``paired=False`` the two variants get independent image resamples (the unpaired bootstrap,
    for comparison only). The same ``seed`` gives the same intervals."""
    runs_a, runs_b = _seed_list(a), _seed_list(b)
    check_same_images(runs_a + runs_b)
    rng = np.random.default_rng(seed)
    num_images = len(runs_a[0].image_ids)
    w_a = resample_weights(num_images, resamples, rng)
    w_b = w_a if paired else resample_weights(num_images, resamples, rng)
    sa = variant_samples(runs_a, w_a, metrics, rng, chunk)
    sb = variant_samples(runs_b, w_b, metrics, rng, chunk)
    return {m: v for m, v in sorted(compare(sa, sb, level).items(), key=lambda kv: list(metrics).index(kv[0]))}


def _seed_draws(num_seeds: int, resamples: int, rng: np.random.Generator) -> np.ndarray | None:
    """[B, S] seed indices drawn with replacement (None for a single seed: nothing to draw)."""
    return None if num_seeds == 1 else rng.integers(0, num_seeds, (resamples, num_seeds))


def _seed_mean(values: np.ndarray, picks: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
    """values [S, B], picks [B, S] -> [B] mean over the drawn seeds of each resample."""
    if picks is None:
        return values[0]
    return values[picks, cols[:, None]].mean(axis=1)


# --------------------------------------------------------------------------------------------
# How small a difference can this design resolve?
# --------------------------------------------------------------------------------------------
def resolvable_delta(seed_variance: float, image_variance: float, seeds: int, z: float = Z95) -> float:
    """The smallest |Δ| whose 95 % interval excludes 0 with ``seeds`` seeds per variant:
    ``z * sqrt(2 * seed_variance / seeds + image_variance)``. ``seed_variance``: variance of one
    run's metric across seeds; ``image_variance``: variance of the paired Δ over image resamples."""
    return z * float(np.sqrt(2 * seed_variance / seeds + image_variance))


def seeds_needed(delta: float, seed_variance: float, image_variance: float, z: float = Z95,
                 limit: int = 1000) -> int | None:
    """Seeds per variant for |``delta``| to be resolved; None when more seeds cannot do it (the
    image term alone is too wide: more validation images are needed) or it takes over ``limit``."""
    room = (delta / z) ** 2 - image_variance
    if room <= 0:
        return None
    if seed_variance <= 0:
        return 1
    n = int(np.ceil(2 * seed_variance / room))
    return max(n, 1) if n <= limit else None
