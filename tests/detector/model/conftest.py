import pytest
import torch


@pytest.fixture
def batch():
    """Two 96 px images with hand-placed boxes: (images, targets)."""
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [55.0, 20.0, 90.0, 80.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([2])}]
    return images, targets
