"""AttnSeg training: datasets, configs, the training loop, export to model packages, evaluation.

    python -m training.train --config training/configs/hippocampus_unet.yaml --threads 1
    python -m training.export --run runs/hippocampus_unet --output Resources/Models/hippocampus_unet
    python -m training.evaluate --model Resources/Models/hippocampus_unet --split validation --output runs/eval

Modules: ``config`` (YAML configs), ``data`` (dataset layouts, split, loading into the model frame),
``patches`` (class-balanced, augmented patches), ``objectives`` (the loss of each architecture from
``losses``), ``schedules`` (optimisers, learning-rate schedules), ``engine`` (the Trainer), ``card``
(model cards), ``plots``, and the ``train`` / ``export`` / ``evaluate`` commands.
The engine (``AttnSegLib``) never imports this package.
"""
