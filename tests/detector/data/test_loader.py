import pytest
import torch

from ioulab.detector.data.coco import CocoDetection
from ioulab.detector.data.loader import InfiniteLoader
from ioulab.detector.data.synth import split_paths


def _flat(batches):
    return [(t["image_id"], tuple(t["boxes"].flatten().tolist())) for _, ts in batches for t in ts]


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_from_is_the_tail_of_an_uninterrupted_stream(synth_root, workers):
    ds = CocoDetection(*split_paths(synth_root, "train"), train=True, flip_prob=0.5)
    loader = InfiniteLoader(ds, batch_size=5, num_workers=workers, seed=3)
    stream = loader.iter_from(0)
    full = [next(stream) for _ in range(6)]  # 30 items: crosses two epochs of 12 images
    tail = loader.iter_from(4)
    resumed = [next(tail) for _ in range(2)]
    assert _flat(full[4:]) == _flat(resumed)
    ids = [t["image_id"] for _, ts in full[:2] for t in ts][:12]
    assert len(set(ids[:10])) == 10  # an epoch is a permutation
    plain = {ds.ids[i]: tuple(ds[(i, False)][1]["boxes"].flatten().tolist()) for i in range(len(ds))}
    same = [boxes == plain[image_id] for image_id, boxes in _flat(full)]
    assert 0 < sum(same) < len(same)  # some items flipped, some not (flip_prob 0.5)


def test_flips_come_from_the_seed(synth_root):
    ds = CocoDetection(*split_paths(synth_root, "train"), train=True, flip_prob=0.5)
    a = _flat([next(InfiniteLoader(ds, 4, 0, seed=1).iter_from(0)) for _ in range(1)])
    torch.manual_seed(123)  # the global RNG plays no part
    b = _flat([next(InfiniteLoader(ds, 4, 0, seed=1).iter_from(0)) for _ in range(1)])
    c = _flat([next(InfiniteLoader(ds, 4, 0, seed=2).iter_from(0)) for _ in range(1)])
    assert a == b and a != c
