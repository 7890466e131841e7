"""Training losses, one module per paper; all take ``SegOutput`` and the integer label.

Every loss is ``loss(output: SegOutput, target: LongTensor (N, D, H, W), **state) -> (total, parts)``
where ``parts`` is a dict of named scalar tensors for logging.
"""
from .difficulty_aware import AlternatingLoss, build_difficulty_aware_loss  # noqa: F401
from .mda_unet import build_mda_unet_loss  # noqa: F401
from .dam_al import build_dam_al_loss  # noqa: F401
from .cga_unet import build_cga_unet_loss  # noqa: F401
from .rsanet import build_rsanet_loss  # noqa: F401
