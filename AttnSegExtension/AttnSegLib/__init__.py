"""AttnSeg engine: attention-based 3D segmentation with the network's soft outputs kept.

Layers (imports point downward only):
  slicer_logic, mrml (MRML) -> segmentation_task -> outputs/corrected_case -> inference/maps/review
  -> package/card -> preprocess/image/metrics -> models; errors at the bottom, imported by all.
Nothing here imports Qt; only ``slicer_logic`` and ``mrml`` import ``slicer``.
"""

__version__ = "0.1.0"
