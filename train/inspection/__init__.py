"""Inspecting trained checkpoints: ``cubcam explain`` (what a checkpoint looks at) and ``cubcam evaluate`` (how well
its maps localize the birds, and how faithful they are), with what both need: loading checkpoints
(``checkpoint``), one set of options and one start-up (``session``), reference sets of embeddings (``reference``)
and plots (``plots``). Every map is the one explanation step of ``cubcam.cams.protocol.explain``.
"""
