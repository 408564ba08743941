"""``python -m detr_viz analyze ...``: the ``detr-viz`` command line (:mod:`detr_viz.cli`)."""

from detr_viz.cli import entry_point

if __name__ == "__main__":  # importing it (as a test of every module does) runs nothing
    entry_point()
