import torch
from torchvision.ops import box_iou

from ioulab.detector.model.refine import refine_boxes

HIDDEN = torch.tensor([[40.0, 30.0, 90.0, 100.0], [10.0, 10.0, 30.0, 25.0]], dtype=torch.float64)


def analytic_iou(boxes, index):
    """The exact IoU of each box with its own hidden target (differentiable)."""
    hidden = HIDDEN[index]
    x1 = torch.maximum(boxes[:, 0], hidden[:, 0]); y1 = torch.maximum(boxes[:, 1], hidden[:, 1])
    x2 = torch.minimum(boxes[:, 2], hidden[:, 2]); y2 = torch.minimum(boxes[:, 3], hidden[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area(boxes) + area(hidden) - inter)


ALL = torch.arange(2)


WH = torch.tensor([[200.0, 200.0], [200.0, 200.0]], dtype=torch.float64)


def test_refinement_improves_every_box_within_5_steps():
    start = torch.tensor([[46.0, 22.0, 95.0, 90.0], [13.0, 8.0, 33.0, 22.0]], dtype=torch.float64)
    before = analytic_iou(start, ALL)
    refined, iou = refine_boxes(start, analytic_iou, WH, lam=0.5, steps=5, omega1=0.0, omega2=-1.0)
    assert bool((iou > before + 0.02).all()), (before, iou)
    assert torch.allclose(iou, box_iou(refined, HIDDEN).diagonal())


def test_exact_update_rule_for_one_step():
    start = torch.tensor([[46.0, 22.0, 95.0, 90.0], [13.0, 8.0, 33.0, 22.0]], dtype=torch.float64)
    b = start.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(analytic_iou(b, ALL).sum(), b)
    wh = (start[:, 2:] - start[:, :2]).repeat(1, 2)
    expected = start + 0.7 * g * wh
    refined, iou = refine_boxes(start, analytic_iou, WH, lam=0.7, steps=1, omega1=0.0, omega2=-1.0)
    assert torch.allclose(refined, expected) and torch.allclose(iou, analytic_iou(expected, ALL))


def test_stop_rules():
    start = torch.tensor([[46.0, 22.0, 95.0, 90.0], [13.0, 8.0, 33.0, 22.0]], dtype=torch.float64)
    # Ω1: a huge threshold stops every box after its first step (which it keeps).
    one, _ = refine_boxes(start, analytic_iou, WH, lam=0.5, steps=1, omega1=0.0, omega2=-1.0)
    stopped, _ = refine_boxes(start, analytic_iou, WH, lam=0.5, steps=5, omega1=10.0, omega2=-1.0)
    assert torch.allclose(stopped, one)
    # Ω2: a too-large step lowers the IoU; with Ω2 = 0 the box stops right after that step.
    calls = []

    def counting(b, index):
        calls.append(1)
        return analytic_iou(b, index)

    refine_boxes(start, counting, WH, lam=50.0, steps=5, omega1=0.0, omega2=0.0)
    two_steps = len(calls)
    calls.clear()
    refine_boxes(start, counting, WH, lam=50.0, steps=5, omega1=0.0, omega2=-10.0)
    assert two_steps < len(calls)


def test_zero_steps_and_validity():
    start = torch.tensor([[46.0, 22.0, 95.0, 90.0], [13.0, 8.0, 33.0, 22.0]], dtype=torch.float64)
    same, iou = refine_boxes(start, analytic_iou, WH, lam=0.5, steps=0)
    assert torch.equal(same, start) and torch.allclose(iou, analytic_iou(start, ALL))
    small = torch.tensor([[40.0, 40.0, 80.0, 80.0], [0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    out, _ = refine_boxes(small, analytic_iou, torch.tensor([[60.0, 60.0], [60.0, 60.0]], dtype=torch.float64),
                          lam=30.0, steps=5, omega1=0.0, omega2=-10.0)
    assert bool((out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all())
    assert bool((out >= 0).all() and (out <= 60).all())
    empty, e_iou = refine_boxes(torch.zeros((0, 4)), analytic_iou, torch.zeros((0, 2)), 0.5, 5)
    assert empty.shape == (0, 4) and e_iou.shape == (0,)


def test_only_active_boxes_are_evaluated_and_the_last_step_needs_no_gradient():
    start = torch.tensor([[46.0, 22.0, 95.0, 90.0], [13.0, 8.0, 33.0, 22.0]], dtype=torch.float64)
    seen = []

    def recording(b, index):
        seen.append((index.tolist(), b.requires_grad))
        return analytic_iou(b, index)

    # Ω1 = 0.02 stops box 0 after its first step (IoU +0.012) while box 1 keeps improving (+0.03).
    refined, iou = refine_boxes(start, recording, WH, lam=0.5, steps=3, omega1=0.02, omega2=-1.0)
    assert [index for index, _ in seen] == [[0, 1], [0, 1], [1], [1]], seen
    assert [needs for _, needs in seen] == [True, True, True, False]
    # the stopped box kept the value of its last accepted step, consistent with its IoU
    assert torch.allclose(iou, analytic_iou(refined, ALL))
