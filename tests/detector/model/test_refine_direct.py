"""inference.refine.impl=direct against the autograd reference: same detections in every inference
mode (T = 0 and T = 5, both IoU losses), same refined boxes, IoU and steps for boxes at the image
borders and on several FPN levels, and the head's direct input gradient against autograd."""
import pytest
import torch

from ioulab.detector import config as C
from ioulab.detector.model import build_model, configure_inference
from ioulab.detector.model.iou_head import BCE, SMOOTH_L1, IoUHead, select_class
from ioulab.detector.model.postprocess import IoUNMSPost, RefinePost
from ioulab.detector.model.refine import refine_boxes
from ioulab.detector.model.refine_direct import refine_boxes_direct
from tests.detector.model.test_refine import WH, analytic_iou

TINY = ["model.min_size=96", "model.max_size=96", "model.backbone.tiny_widths=[8,16,16,16]",
        "model.backbone.fpn_channels=16", "model.roi_heads.representation_size=32",
        "model.roi_heads.batch_size_per_image=32", "model.iou_head.representation_size=32",
        "model.iou_head.roi_generator.per_img=40", "model.iou_head.roi_generator.table_cap=500",
        "inference.score_thresh=0.0"]


def _model(loss: str = "smooth_l1"):
    torch.manual_seed(0)
    cfg = C.load_config("cpu_tiny_iounet", TINY + [f"model.iou_head.loss={loss}"])
    model = build_model(cfg.model, 3, cfg.inference).eval()
    # an IoU head whose prediction moves with the box (the default init's output is ~0.001 · x)
    torch.nn.init.normal_(model.roi_heads.iou_predictor.head.out.weight, std=0.3)
    return cfg, model


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss", ["smooth_l1", "bce"])
@pytest.mark.parametrize("steps", [0, 5])
def test_every_mode_gives_the_reference_detections(batch, loss, steps):
    cfg, model = _model(loss)
    images, _ = batch
    for mode in ["baseline", "iou_regular_nms", "iou_nms", "refine"]:
        out = {}
        for impl in ["autograd", "direct"]:
            inf = C.apply_overrides(C.clone(cfg), [f"inference.mode={mode}", f"inference.refine.steps={steps}",
                                                   "inference.refine.lam=2.0", "inference.refine.omega1=0.0",
                                                   f"inference.refine.impl={impl}"]).inference
            configure_inference(model, inf)
            with torch.no_grad():
                out[impl] = model(images)
        for ref, fast in zip(out["autograd"], out["direct"]):
            assert torch.equal(ref["labels"], fast["labels"]), mode
            assert _close(ref["boxes"], fast["boxes"]) and _close(ref["scores"], fast["scores"]), mode
    assert all(p.grad is None for p in model.parameters())


def _kept(size: int):
    """Two images of size × size px: boxes at every border, a whole-image box, tiny boxes in the
    corners and boxes large enough for the coarser FPN levels."""
    s = float(size)
    per_image = [
        [[0, 0, 40, 30], [s - 50, s - 20, s, s], [0, 10, s, s - 10], [0, 0, s, s], [s - 3, 0, s, 3],
         [30, 40, 200, 250], [100, 100, 130, 180]],
        [[0, 5, 25, s], [10, 0, 300, 120], [s - 1, s - 1, s, s], [60, 60, 70, 75]],
    ]
    kept = []
    for i, boxes in enumerate(per_image):
        b = torch.tensor(boxes, dtype=torch.float32)
        labels = torch.arange(len(b)) % 3 + 1
        kept.append((b, torch.rand(len(b)), labels, torch.rand(len(b))))
    return kept


@pytest.mark.parametrize("loss", ["smooth_l1", "bce"])
@pytest.mark.parametrize("steps,lam,omega1", [(0, 0.5, 0.001), (5, 0.5, 0.001), (5, 3.0, 0.0), (5, 40.0, 0.0)])
def test_border_boxes_on_several_levels_refine_like_the_reference(loss, steps, lam, omega1):
    _, model = _model(loss)
    size = 320  # large enough for boxes on P2, P3 and P4
    torch.manual_seed(1)
    with torch.no_grad():
        features = model.backbone(torch.rand(2, 3, size, size))
    shapes = [(size, size), (size, size)]
    kept = _kept(size)
    heads = model.roi_heads
    results = {}
    for impl in ["autograd", "direct"]:
        post = RefinePost(IoUNMSPost("iou", 0.5), lam, steps, omega1, -0.01, impl)
        trace = []
        with torch.no_grad():
            boxes, iou = post.refine(heads, kept, features, shapes, trace)
        results[impl] = boxes, iou, [(index.tolist(), need) for _, index, need in trace]
    (rb, ri, rt), (fb, fi, ft) = results["autograd"], results["direct"]
    assert rt == ft  # the same boxes were active at every step
    assert _close(rb, fb) and _close(ri, fi)
    assert bool((fb >= 0).all() and (fb <= size).all())
    levels = heads.iou_predictor.pooler.map_levels([torch.cat([k[0] for k in kept])])
    assert len(levels.unique()) >= 3


@pytest.mark.parametrize("loss", [SMOOTH_L1, BCE])
def test_head_input_gradient_is_autograds(loss):
    torch.manual_seed(0)
    head = IoUHead(4, 3, 16, num_classes=5)
    torch.nn.init.normal_(head.out.weight, std=0.3)
    pooled = torch.randn(6, 4, 3, 3, requires_grad=True)
    labels = torch.tensor([1, 5, 2, 2, 3, 4])
    iou = loss.decode(select_class(head(pooled), labels))
    (expected,) = torch.autograd.grad(iou.sum(), pooled)
    with torch.no_grad():
        h1, h2, raw = head.activations(pooled)
        iou = loss.decode(select_class(raw, labels))
        got = head.input_grad(h1, h2, labels - 1, loss.slope(iou)).view_as(pooled)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_configs_stored_before_refine_impl_keep_autograd():
    old = C.to_dict(C.load_config("cpu_tiny_iounet"))
    del old["inference"]["refine"]["impl"]
    assert C.from_dict(old).inference.refine.impl == "autograd"
    assert C.load_config("cpu_tiny_iounet").inference.refine.impl == "direct"
    stored = C.load_config("cpu_tiny_iounet", ["inference.refine.impl=autograd"])
    assert C.from_dict(C.to_dict(stored)) == stored
    with pytest.raises(C.ConfigError, match="inference.refine.impl='fast' is not one of direct, autograd"):
        C.load_config("cpu_tiny_iounet", ["inference.refine.impl=fast"])


def test_autocast_bfloat16_refines_like_the_reference():
    """Under CPU autocast (half-type FPN maps and head) the two implementations agree too."""
    _, model = _model()
    size = 320
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(torch.rand(2, 3, size, size))
        assert features["0"].dtype == torch.bfloat16
        out = {impl: RefinePost(IoUNMSPost("iou", 0.5), 3.0, 5, 0.0, -0.01, impl).refine(
            model.roi_heads, _kept(size), features, [(size, size)] * 2) for impl in ["autograd", "direct"]}
    (rb, ri), (fb, fi) = out["autograd"], out["direct"]
    assert fb.dtype == ri.dtype == torch.float32
    assert torch.allclose(rb, fb, atol=1e-3) and torch.allclose(ri, fi, atol=1e-4)


@pytest.mark.parametrize("lam,steps,omega1,omega2", [(0.5, 5, 0.0, -1.0), (0.5, 0, 0.001, -0.01), (0.5, 3, 0.02, -1.0),
                                                     (50.0, 5, 0.0, 0.0), (30.0, 5, 0.0, -10.0), (0.5, 5, 10.0, -1.0)])
def test_direct_loop_takes_the_reference_steps(lam, steps, omega1, omega2):
    """The loop alone, on the analytic IoU of test_refine: same boxes, IoU and active sets."""
    start = torch.tensor([[46.0, 22.0, 95.0, 90.0], [13.0, 8.0, 33.0, 22.0], [0.0, 150.0, 20.0, 200.0]],
                         dtype=torch.float64)
    wh = torch.cat([WH, WH[:1]])
    seen = {"reference": [], "direct": []}

    def reference(b, index):
        seen["reference"].append(index.tolist())
        return analytic_iou(b, index % 2)

    def evaluate(b, index, need_grad, size):
        assert torch.equal(size, b[:, 2:] - b[:, :2])
        seen["direct"].append(index.tolist())
        b = b.detach().requires_grad_(need_grad)
        with torch.enable_grad():
            iou = analytic_iou(b, index % 2)
            grad = torch.autograd.grad(iou.sum(), b)[0] if need_grad else None
        return iou.detach(), grad

    ref = refine_boxes(start, reference, wh, lam, steps, omega1, omega2)
    fast = refine_boxes_direct(start, evaluate, wh, lam, steps, omega1, omega2)
    assert seen["reference"] == seen["direct"]
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
    empty = refine_boxes_direct(torch.zeros((0, 4)), evaluate, torch.zeros((0, 2)), 0.5, 5)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_grouped_iou_prediction_is_the_predictors():
    """IoU-NMS's prediction (boxes grouped by level, no gather of pooled features) gives the
    numbers of IoUPredictor.forward, in candidate order, on several levels and images."""
    from ioulab.detector.model.postprocess import _predict_ious

    _, model = _model("bce")
    size = 320
    torch.manual_seed(1)
    with torch.no_grad():
        features = model.backbone(torch.rand(2, 3, size, size))
        kept = _kept(size)
        got = _predict_ious(model.roi_heads, [k[:3] for k in kept], features, [(size, size)] * 2)
        expected = model.roi_heads.iou_predictor(features, [k[0] for k in kept], torch.cat([k[2] for k in kept]),
                                                 [(size, size)] * 2)
    assert torch.allclose(torch.cat(got), expected, rtol=1e-6, atol=1e-7)


def test_level_assignment_is_torchvisions():
    """LevelPool.levels gives LevelMapper's levels, at the FPN eq. 1 boundaries too."""
    from ioulab.detector.ops.poolers import LevelPool

    _, model = _model()
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 320, 320))
    pool = LevelPool(model.roi_heads.iou_predictor.pooler, features, [(320, 320)])
    torch.manual_seed(2)
    xy = torch.rand(4000, 2) * 300
    side = torch.cat([torch.rand(3000) * 600, torch.tensor([56.0, 112.0, 224.0, 448.0]).repeat_interleave(250)])
    side = side * (1 + (torch.rand(4000) - 0.5) * 1e-6 * (torch.arange(4000) >= 3000))  # right at the boundaries
    aspect = torch.where(torch.arange(4000) >= 3000, 1.0, torch.rand(4000) + 0.5)
    boxes = torch.cat([xy, xy + torch.stack([side, side * aspect], 1)], 1)
    assert torch.equal(pool.levels(boxes[:, 2:] - boxes[:, :2]) - pool.mapper.k_min, pool.mapper([boxes]))
