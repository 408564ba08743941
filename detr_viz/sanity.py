"""Is a map about the model? The cascading randomisation check (Adebayo et al., NeurIPS 2018).

    check = sanity_check(model, analysis, query, RELEVANCE)
    check.steps       # ("class and box heads", "decoder layer 6", ..., "encoder layer 1")
    check.spearman    # (13,) rank correlation of each step's map with the original map
    check.ssim        # (13,) structural similarity, likewise
    check.insensitive # True: the map hardly changed with every weight re-drawn

The transformer's weights are re-initialised cumulatively from the top: the class and box heads
(with the decoder's final norm), then decoder layers 6 to 1 (layer 1 with the object queries),
then encoder layers 6 to 1, and the map of the same query, for the same class, is recomputed
after each step. Everything happens on a copy that shares only the backbone (never the caller's
model), seeded; the backbone features of the analysis are reused (the transformer re-runs from
``analysis.inputs``), so the backbone is never re-run nor re-initialised.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.stats import rankdata
from torch import nn

from detr_viz import explain
from detr_viz.analysis import Analysis
from detr_viz.capture import capture
from detr_viz.errors import ArgumentError
from detr_viz.methods import Explainer, get_method, redraw_unavailable
from detr_viz.model import DETR
from detr_viz.replay import replay_outputs

INSENSITIVE = 0.8  # rank correlation still at or above this after the last step: a heuristic
WINDOW = 7  # SSIM window (cells), uniform, as scikit-image's default; smaller on small grids
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SanityCheck:
    """The randomisation cascade of one map. ``maps``: (1 + steps, h, w), the original first;
    ``spearman`` and ``ssim``: (steps,), each step's map against the original."""

    method: str
    query: int
    label: int
    steps: tuple[str, ...]
    maps: np.ndarray
    spearman: np.ndarray
    ssim: np.ndarray

    @property
    def insensitive(self) -> bool:
        """The fully re-initialised map still ranks cells as the original did."""
        return bool(self.spearman[-1] >= INSENSITIVE)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' cells (ties get average ranks); 1.0 for two
    constant maps, 0.0 when only one is constant (no ranking to agree with)."""
    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float(np.mean((ra - ra.mean()) * (rb - rb.mean())) / (sa * sb))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004) of two (h, w) maps, each first scaled to
    [0, 1] by its own min and max (data range 1), over uniform ``WINDOW`` x ``WINDOW`` windows
    (the grid's size where smaller), sample (co)variances, K1 = 0.01, K2 = 0.03."""
    a, b = _unit(a), _unit(b)
    size = min(WINDOW, *a.shape)
    wa, wb = sliding_window_view(a, (size, size)), sliding_window_view(b, (size, size))
    n = size * size
    ma, mb = wa.mean((-1, -2)), wb.mean((-1, -2))
    va = wa.var((-1, -2)) * n / (n - 1) if n > 1 else np.zeros_like(ma)
    vb = wb.var((-1, -2)) * n / (n - 1) if n > 1 else np.zeros_like(mb)
    cov = ((wa * wb).mean((-1, -2)) - ma * mb) * n / max(n - 1, 1)
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(s.mean())


def _unit(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    span = z.max() - z.min()
    return (z - z.min()) / span if span > 0 else np.zeros_like(z)


def cascade(model: DETR) -> list[tuple[str, list[nn.Module]]]:
    """The re-initialisation steps, top first: (name, modules re-initialised at that step)."""
    t = model.transformer
    decoder, encoder = list(t.decoder.layers), list(t.encoder.layers)
    steps = [("class and box heads", [model.class_embed, model.bbox_embed, t.decoder.norm])]
    for i in reversed(range(len(decoder))):
        extra = [model.query_embed] if i == 0 else []
        steps.append((f"decoder layer {i + 1}", [decoder[i], *extra]))
    steps += [(f"encoder layer {i + 1}", [encoder[i]]) for i in reversed(range(len(encoder)))]
    return steps


def reinitialise(modules: list[nn.Module], generator: torch.Generator) -> None:
    """Draw fresh weights as at construction: every submodule's ``reset_parameters`` (linear
    layers, norms, attention, embeddings), then Xavier-uniform for matrices, as DETR's
    transformer initialises itself. In place, from ``generator``."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        for module in modules:
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            for p in module.parameters():
                if p.dim() > 1 and not isinstance(module, nn.Embedding):
                    nn.init.xavier_uniform_(p)


def transformer_copy(model: DETR) -> DETR:
    """A deep copy of ``model`` that shares (never copies) the backbone and input projection."""
    shared = {id(model.backbone): model.backbone, id(model.input_proj): model.input_proj}
    return copy.deepcopy(model, shared)


def rerun(model: DETR, analysis: Analysis) -> Analysis:
    """``analysis`` with predictions and attention of ``model``'s transformer re-run on its
    captured inputs (the same backbone features)."""
    with torch.inference_mode(), capture(model, features=False) as cap:
        logits, boxes = replay_outputs(model, analysis.inputs)
    frozen = [np.ascontiguousarray(x.float().numpy()) for x in
              (logits[0].softmax(-1)[:, :-1], boxes[0])]
    for x in frozen:
        x.flags.writeable = False
    encoder, decoder = range(cap.num_layers), range(cap.decoder_depth)
    return dataclasses.replace(
        analysis, probabilities=frozen[0], boxes=frozen[1],
        encoder=tuple(cap.encoder_layer(i) for i in encoder),
        decoder=tuple(cap.decoder_layer(i) for i in decoder),
        decoder_self=tuple(cap.decoder_self_layer(i) for i in decoder))


def method_map(method: str, model: DETR, analysis: Analysis, query: int, label: int,
               layer: int = -1, head: int | None = None) -> np.ndarray:
    """(h, w) decoder map of ``query`` by ``method`` (relevance for class ``label``)."""
    chosen = get_method(method)
    chosen.check(analysis)
    if chosen.explains_class:  # the class asked for, not the predicted one
        return explain.relevance(model, analysis, [query], [label])[0]
    return chosen.decoder(Explainer(model, analysis), [query], layer, head)[0]


def cascaded_maps(model: DETR, analysis: Analysis, query: int, method: str, label: int,
                  seed: int, layer: int, head: int | None) -> Iterator[tuple[str, np.ndarray]]:
    """Each step's name and map, one at a time, on a fresh copy of ``model``."""
    work = transformer_copy(model)
    generator = torch.Generator().manual_seed(seed)
    for name, modules in cascade(work):
        reinitialise(modules, generator)
        yield name, method_map(method, work, rerun(work, analysis), query, label, layer, head)


def sanity_check(model: DETR, analysis: Analysis, query: int, method: str, *,
                 label: int | None = None, seed: int = 0, layer: int = -1,
                 head: int | None = None, progress: Progress | None = None) -> SanityCheck:
    """The cascading randomisation check of ``query``'s ``method`` map (module docstring).

    ``label``: the class relevance explains (default: the query's prediction in ``analysis``);
    ``layer``/``head``: raw attention's choice; ``progress(done, total)`` after each step.
    ``model`` must be the analysed one; it is never changed.
    """
    (query,) = analysis.checked_queries([query])
    why = redraw_unavailable(analysis, "The sanity check re-draws the transformer's weights")
    if why is not None:
        raise ArgumentError(why)
    label = int(analysis.probabilities[query].argmax()) if label is None else int(label)
    original = method_map(method, model, analysis, query, label, layer, head)
    total = len(cascade(model))
    names, maps = [], [original]
    for done, (name, m) in enumerate(cascaded_maps(model, analysis, query, method, label, seed,
                                                   layer, head), start=1):
        names.append(name)
        maps.append(m)
        if progress is not None:
            progress(done, total)
    stack = np.stack(maps)
    return SanityCheck(method, query, label, tuple(names), stack,
                       np.array([spearman(original, m) for m in maps[1:]]),
                       np.array([ssim(original, m) for m in maps[1:]]))
