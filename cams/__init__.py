"""cubcam's explanation engine: GradCAM and EmbeddingCAM on any PyTorch model (PyTorch only)."""

from cams import _torchvision_guard  # noqa: F401  (must run before anything imports torchvision)
