"""AttnSeg engine: attention-based 3D segmentation with the network's soft outputs kept.

Layers (imports point downward only):
  slicer_logic (MRML) -> inference/maps/review/package/preprocess/image/metrics -> models
Nothing here imports Qt; only ``slicer_logic`` imports ``slicer``.
"""

__version__ = "0.1.0"
