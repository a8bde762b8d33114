import pytest
import torch

from ioulab.detector.data.coco import CocoDetection
from ioulab.detector.data.loader import InfiniteLoader, build_eval_loader, collate, epoch_plan

BATCH = 3  # with 7 images, batches straddle epoch boundaries


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _summary(batches):
    """Per batch: image ids, boxes and image checksums (a flip changes both)."""
    return [([t["image_id"] for t in targets], [t["boxes"].tolist() for t in targets],
             [img.sum(dim=(0, 1)).tolist() for img in images]) for images, targets in batches]


def test_collate_returns_lists():
    batch = [(torch.zeros(3, 2, 2), {"image_id": 1}), (torch.ones(3, 4, 5), {"image_id": 2})]
    images, targets = collate(batch)
    assert isinstance(images, list) and isinstance(targets, list)
    assert images[1].shape == (3, 4, 5) and [t["image_id"] for t in targets] == [1, 2]


def test_epoch_plan_is_a_seeded_permutation():
    order, flips = epoch_plan(seed=3, epoch=2, num_items=50, flip_prob=0.5)
    assert sorted(order.tolist()) == list(range(50))
    again = epoch_plan(seed=3, epoch=2, num_items=50, flip_prob=0.5)
    assert torch.equal(order, again[0]) and torch.equal(flips, again[1])
    assert 5 < int(flips.sum()) < 45
    assert not torch.equal(order, epoch_plan(3, 3, 50, 0.5)[0])
    assert not torch.equal(order, epoch_plan(4, 2, 50, 0.5)[0])
    assert not epoch_plan(3, 2, 50, 0.0)[1].any()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iter_from_equals_tail_of_uninterrupted_run(stream_dataset, num_workers):
    ds = CocoDetection(*stream_dataset, train=True, flip_prob=0.5)
    loader = InfiniteLoader(ds, batch_size=BATCH, num_workers=num_workers, seed=11)
    full = _summary(_take(loader.iter_from(0), 8))
    resumed = _summary(_take(loader.iter_from(3), 5))
    assert resumed == full[3:]
    # Each epoch visits every image once: the first 7 items are a permutation.
    stream = [i for ids, _, _ in full for i in ids]
    assert sorted(stream[:7]) == list(range(101, 108))
    assert sorted(stream[7:14]) == list(range(101, 108))
    # Flips happen and change boxes: box x1 of image 101+i is i unflipped, 24-(i+5) flipped.
    flipped = [box[0][0] != img_id - 101 for ids, boxes, _ in full for img_id, box in zip(ids, boxes)]
    assert any(flipped) and not all(flipped)


def test_worker_count_and_global_rng_do_not_change_the_stream(stream_dataset):
    ds = CocoDetection(*stream_dataset, train=True)
    torch.manual_seed(0)
    in_process = _summary(_take(InfiniteLoader(ds, BATCH, 0, seed=5).iter_from(2), 4))
    torch.manual_seed(123)  # the global RNG plays no part either
    workers = _summary(_take(InfiniteLoader(ds, BATCH, 2, seed=5).iter_from(2), 4))
    assert in_process == workers
    other_seed = _summary(_take(InfiniteLoader(ds, BATCH, 0, seed=6).iter_from(2), 4))
    assert other_seed != in_process


def test_eval_dataset_is_never_flipped_by_the_infinite_loader(stream_dataset):
    ds = CocoDetection(*stream_dataset, train=False, flip_prob=1.0)
    for images, targets in _take(iter(InfiniteLoader(ds, BATCH, 0, seed=0)), 5):
        for t in targets:
            assert t["boxes"][0, 0].item() == t["image_id"] - 101


def test_eval_loader_sequential_unflipped_nothing_dropped(stream_dataset):
    ds = CocoDetection(*stream_dataset, train=False)
    loader = build_eval_loader(ds, batch_size=BATCH, num_workers=0)
    batches = list(loader)
    assert len(loader) == 3 and [len(b[0]) for b in batches] == [3, 3, 1]
    assert [t["image_id"] for _, ts in batches for t in ts] == list(range(101, 108))
    assert all(t["boxes"][0, 0].item() == t["image_id"] - 101 for _, ts in batches for t in ts)


def test_eval_loader_rejects_a_flipping_dataset(stream_dataset):
    with pytest.raises(ValueError, match="train=False"):
        build_eval_loader(CocoDetection(*stream_dataset, train=True), 2, 0)


def test_infinite_loader_validates_arguments(stream_dataset):
    ds = CocoDetection(*stream_dataset, train=True)
    with pytest.raises(ValueError):
        InfiniteLoader(ds, batch_size=0, num_workers=0, seed=0)
    with pytest.raises(ValueError):
        InfiniteLoader(ds, batch_size=2, num_workers=0, seed=0).iter_from(-1)
