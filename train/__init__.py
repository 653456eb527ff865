"""cubcam training: CUB-200-2011 data (``cubcam.train.data``), models, LightningModules and the ``cubcam`` CLI."""

import cubcam.cams  # noqa: F401  (installs the torchvision guard before Lightning or torchvision are imported)
