"""Detection ops: Precise RoI Pooling (C++/CUDA extension + PyTorch reference) and its FPN pooler."""
from .poolers import MultiScalePrRoIPool
from .prroi_pool import PrRoIPool2d, prroi_pool
from .prroi_pool_reference import prroi_pool_reference

__all__ = ["MultiScalePrRoIPool", "PrRoIPool2d", "prroi_pool", "prroi_pool_reference"]
