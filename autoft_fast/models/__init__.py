"""CTR models for AutoFT: base models (DNN, DeepFM, DCN-v2) and the nine transfer strategies.

Example::

    >>> from autoft_fast.models import build_base_model, build_transfer_model, STRATEGIES
    >>> pre = build_base_model(fmap, {"name": "deepfm"})        # train it on the source ...
    >>> models = {s: build_transfer_model(s, pre, fmap, {"name": "deepfm"}, {}) for s in STRATEGIES}
"""

from .base import DCNv2, DNN, BaseCTRModel, DeepFM, build_base_model
from .config import AutoFTConfig, ModelConfig, tau_at
from .policy import PolicyNetwork
from .transfer import FIELD_GATED, LAYER_GATED, STRATEGIES, TransferModel, build_transfer_model

__all__ = ["AutoFTConfig", "BaseCTRModel", "DCNv2", "DNN", "DeepFM", "FIELD_GATED", "LAYER_GATED",
           "ModelConfig", "PolicyNetwork", "STRATEGIES", "TransferModel", "build_base_model",
           "build_transfer_model", "tau_at"]
