"""Scoring images with the attribute classifier, object by object: a two-object prompt gives two scored
objects. See :func:`score_predictions` for the exact rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from unclip.data.shapes import VOCAB
from unclip.eval.attributes.net import CELL_OF, CELLS, EMPTY, AttributeNet, encode_targets

# ---------------------------------------------------------------------------------- predictions


@dataclass
class CellPredictions:
    """Per-cell classes, row-major cells: ``shape`` (B, 9) with 0 = empty else 1 + index in
    ``VOCAB.shapes``; ``color`` (B, 9) index in ``VOCAB.colors``; ``size`` (B, 9) index in ``VOCAB.sizes``
    (colour and size mean nothing in an empty cell)."""

    shape: torch.Tensor
    color: torch.Tensor
    size: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def subset(self, rows: Sequence[int]) -> "CellPredictions":
        """The predictions of images ``rows`` only, in that order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return CellPredictions(self.shape[index], self.color[index], self.size[index])

    def objects(self, i: int) -> list[dict]:
        """Image ``i`` as KEY.json-style objects, one per non-empty cell."""
        return [{"shape": VOCAB.shapes[int(self.shape[i, c]) - 1], "color": VOCAB.colors[int(self.color[i, c])],
                 "size": VOCAB.sizes[int(self.size[i, c])], "position": VOCAB.positions[c]}
                for c in range(CELLS) if int(self.shape[i, c]) != EMPTY]

    @classmethod
    def from_objects(cls, objects_list: Sequence[Sequence[dict]]) -> "CellPredictions":
        """The predictions a perfect classifier would make for these (fully specified) objects."""
        targets = encode_targets(objects_list)
        return cls(targets["shape"], targets["color"].clamp(min=0), targets["size"].clamp(min=0))


@torch.no_grad()
def predict(classifier: AttributeNet, images: torch.Tensor, batch_size: int = 256) -> CellPredictions:
    """images (B, 3, H, W) in [-1, 1], any H = W -> the argmax class of every head in every cell."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    out = {"shape": [], "color": [], "size": []}
    try:
        for start in range(0, len(images), batch_size):
            logits = classifier(images[start:start + batch_size].to(device))
            for k in out:
                out[k].append(logits[k].argmax(-1).cpu())
    finally:
        classifier.train(was_training)
    if not len(images):
        return CellPredictions(*(torch.zeros(0, CELLS, dtype=torch.long) for _ in range(3)))
    return CellPredictions(**{k: torch.cat(v) for k, v in out.items()})


# -------------------------------------------------------------------------------------- scoring


ACCURACY_KEYS = ("attr_acc", "attr_shape", "attr_color", "attr_size", "attr_position", "attr_prompt")

def _cell_has(pred: CellPredictions, i: int, cell: int, obj: dict) -> tuple[bool, bool, bool]:
    """(shape, colour, size) of the object match cell ``cell`` of image ``i``; an empty cell matches nothing."""
    shape = int(pred.shape[i, cell])
    if shape == EMPTY:
        return False, False, False
    return (VOCAB.shapes[shape - 1] == obj["shape"], VOCAB.colors[int(pred.color[i, cell])] == obj["color"],
            VOCAB.sizes[int(pred.size[i, cell])] == obj.get("size"))


def _resolve_cell(pred: CellPredictions, i: int, obj: dict, taken: set[int]) -> int | None:
    """The cell an object is scored in: its named position; without one, the first free cell holding
    its shape and colour, else the first free non-empty cell holding either, else none."""
    if obj.get("position") is not None:
        return CELL_OF[obj["position"]]
    free = [c for c in range(CELLS) if c not in taken]
    for wanted in (2, 1):
        for cell in free:
            shape_ok, color_ok, _ = _cell_has(pred, i, cell, obj)
            if shape_ok + color_ok >= wanted:
                return cell
    return None


def score_predictions(pred: CellPredictions, objects_list: Sequence[Sequence[dict]]) -> dict[str, float]:
    """Attribute accuracies of per-cell predictions against the objects each image should show.

    ``objects_list[i]``: image i's objects as dicts with ``shape`` and ``color`` and optionally ``size``
    and ``position`` (KEY.json ``objects``, :func:`named_objects`, :func:`objects_from_caption`); a
    missing or None size / position means the prompt did not ask for one.

    The rule, object by object (a two-object prompt gives two scored objects):

    * the object's cell is its named position; without a position it is the first cell holding its
      shape and colour (else one holding either, else none), never a cell already used by another
      object of the same image, so "a red circle" is right wherever the red circle is drawn;
    * ``attr_acc``: that cell holds the object's shape **and** colour (size is not required);
    * ``attr_shape`` / ``attr_color``: that cell holds its shape / its colour;
    * ``attr_size``: that cell holds an object of its size (objects whose size is named only);
    * ``attr_position``: the named cell holds some object (objects whose position is named only);
    * ``attr_prompt``: every object of the image is right (``attr_acc`` per image).

    Positioned objects claim their cells first. Objects drawn but not asked for are not penalised.
    Accuracies are means over scored objects (``nan`` when
    there are none); ``n_objects`` counts them.
    """
    if len(pred) != len(objects_list):
        raise ValueError(f"{len(pred)} predictions for {len(objects_list)} object lists")
    hits = {k: [] for k in ACCURACY_KEYS}
    for i, objects in enumerate(objects_list):
        order = sorted(range(len(objects)), key=lambda j: objects[j].get("position") is None)  # positioned first
        taken = {CELL_OF[o["position"]] for o in objects if o.get("position") is not None}
        all_right = True
        for j in order:
            obj = objects[j]
            cell = _resolve_cell(pred, i, obj, taken)
            shape_ok, color_ok, size_ok = _cell_has(pred, i, cell, obj) if cell is not None else (False, False, False)
            if obj.get("position") is None and cell is not None:
                taken.add(cell)
            hits["attr_acc"].append(shape_ok and color_ok)
            hits["attr_shape"].append(shape_ok)
            hits["attr_color"].append(color_ok)
            if obj.get("size") is not None:
                hits["attr_size"].append(size_ok)
            if obj.get("position") is not None:
                hits["attr_position"].append(int(pred.shape[i, cell]) != EMPTY)
            all_right &= shape_ok and color_ok
        if objects:
            hits["attr_prompt"].append(all_right)
    out = {k: (sum(v) / len(v) if v else math.nan) for k, v in hits.items()}
    out["n_objects"] = len(hits["attr_acc"])
    return out


def attribute_accuracy(classifier: AttributeNet, images: torch.Tensor, objects_list: Sequence[Sequence[dict]],
                       batch_size: int = 256) -> dict[str, float]:
    """Classifies ``images`` (B, 3, H, W) in [-1, 1] and scores them against ``objects_list`` with
    :func:`score_predictions`; ``attr_acc`` is what validation logs as ``val/attr_acc``."""
    return score_predictions(predict(classifier, images, batch_size), objects_list)
