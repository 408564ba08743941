"""``python -m detr_viz analyze ...``: the ``detr-viz`` command line (:mod:`detr_viz.cli`)."""

from detr_viz.cli import entry_point

entry_point()
