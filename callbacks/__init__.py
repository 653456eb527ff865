"""cubcam's Lightning callbacks. They speak the CAM protocol (``cubcam.cams.protocol``), use ``cubcam.cams`` for the
maps and figures, and never import ``cubcam.train``.

    from cubcam.callbacks import CAMPanel
    trainer = pl.Trainer(callbacks=[CAMPanel(num_images=16)], logger=WandbLogger(project="cubcam"))
"""

import cubcam.cams  # noqa: F401  (installs the torchvision guard before Lightning imports torchvision)
from cubcam.callbacks.cam_panel import CAMPanel, CAMPanelWarning

__all__ = ["CAMPanel", "CAMPanelWarning"]
