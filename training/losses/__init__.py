"""Training losses, one module per paper; all take ``SegOutput`` and the integer label.

Every loss is ``loss(output: SegOutput, target: LongTensor (N, D, H, W), **state) -> (total, parts)``
where ``parts`` is a dict of named scalar tensors for logging.
"""
