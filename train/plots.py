"""Deprecated: moved to ``cubcam.train.inspection.plots`` (the inspection tools' own package)."""

from cubcam.train._moved import moved

__getattr__ = moved(__name__, "cubcam.train.inspection.plots")
