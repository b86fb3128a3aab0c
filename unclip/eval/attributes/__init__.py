"""The shapes attribute classifier: what is drawn in each of the 3x3 position cells (``net``), what a
caption names (``captions``), how images are scored against it (``scoring``), and its training
(``training``)."""

from unclip.eval.attributes.captions import named_objects, objects_from_caption
from unclip.eval.attributes.net import AttributeNet, ClassifierConfig, load_classifier, save_classifier
from unclip.eval.attributes.scoring import ACCURACY_KEYS, CellPredictions, attribute_accuracy, predict, score_predictions

__all__ = ["ACCURACY_KEYS", "AttributeNet", "CellPredictions", "ClassifierConfig", "attribute_accuracy", "load_classifier",
           "named_objects", "objects_from_caption", "predict", "save_classifier", "score_predictions"]
