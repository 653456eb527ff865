import cams  # noqa: F401  (installs the torchvision guard before the peer libraries import torchvision)
