"""KeyedSampler (model/sampling.py): torchvision's sampler draw for draw without keys; with keys,
an image's sample depends on its key alone, not on the images sampled before it."""
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from ioulab.detector.model.sampling import KeyedSampler, keyed


def _matched(seed: int, n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 3, (n,), generator=g)  # -1 ignore, 0 negative, 1-2 positive


def test_without_keys_it_is_torchvisions_sampler():
    images = [_matched(i) for i in range(3)]
    torch.manual_seed(5)
    expected = BalancedPositiveNegativeSampler(64, 0.25)(images)
    torch.manual_seed(5)
    got = KeyedSampler(64, 0.25)(images)
    for a, b in zip(expected, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_keyed_sample_depends_on_the_key_only():
    sampler = KeyedSampler(64, 0.25)
    a, b, c = _matched(0), _matched(1), _matched(2)
    with keyed([sampler], [11, 12, 13]):
        together = sampler([a, b, c])
    with keyed([sampler], [13]):
        alone = sampler([c])  # image c on another worker, first of its batch
    assert torch.equal(together[0][2], alone[0][0]) and torch.equal(together[1][2], alone[1][0])
    pos, neg = together[0][2].bool(), together[1][2].bool()
    assert int(pos.sum()) == 16 and int(neg.sum()) == 48  # the rule: 64 per image, a quarter positive
    assert bool((c[pos] >= 1).all()) and bool((c[neg] == 0).all())
    with keyed([sampler], [99]):
        other = sampler([c])
    assert not torch.equal(other[0][0], alone[0][0])  # another key, another sample
    assert sampler.keys is None  # the keys hold for one block only
