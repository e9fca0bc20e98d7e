"""The ``model:`` and ``autoft:`` sections, as the models read them; declared (once) in
:mod:`autoft_fast.config.sections`.

Example::

    >>> from autoft_fast.models.config import ModelConfig
    >>> ModelConfig.from_dict({"name": "deepfm"}).embedding_dim
    16
"""
from ..config.sections import ARCH_KEYS, AutoFTConfig, ModelConfig, tau_at

__all__ = ["ARCH_KEYS", "AutoFTConfig", "ModelConfig", "tau_at"]
