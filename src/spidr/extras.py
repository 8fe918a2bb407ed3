"""Optional dependencies: imported on first use, with the ``pip install`` line that provides them when missing.

``spidr`` itself needs torch, numpy, scipy, soundfile, soxr, tqdm and safetensors. Everything else lives in an
extra (pyproject ``[project.optional-dependencies]``): scikit-learn, matplotlib, editdistance and praatio (TextGrid
alignments) (``eval``), submitit (``slurm``), wandb (``wandb``), transformers (``hf``).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def import_extra(module: str, *, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or ``MissingExtraError`` saying ``purpose`` needs ``spidr[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".", maxsplit=1)[0]
        raise MissingExtraError(
            f"{purpose} needs {package} ({error}): pip install 'spidr[{extra}]'"
        ) from error


def figure(*, figsize: tuple[float, float], purpose: str, **subplots: object) -> tuple[object, object]:
    """A matplotlib ``(Figure, axes)`` drawn on its own Agg canvas, leaving the global backend (a notebook's, say)
    untouched; ``subplots`` go to ``Figure.subplots``."""
    figure_module = import_extra("matplotlib.figure", extra="eval", purpose=purpose)
    agg = import_extra("matplotlib.backends.backend_agg", extra="eval", purpose=purpose)
    fig = figure_module.Figure(figsize=figsize)
    agg.FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)
