"""Lightning modules: the top-k encoder base class and the task modules built on it."""

from topk_lightning.modules.base import TopKTransformerModule, default_backbone, linear_warmup_decay, parameter_groups
from topk_lightning.modules.classification import SequenceClassificationModule
from topk_lightning.modules.metrics import normalize_answer, squad_v1_metrics, squad_v2_metrics
from topk_lightning.modules.qa import ExtractiveQAModule, write_predictions
from topk_lightning.modules.qa_decoding import FeatureResult, aggregate_predictions, feature_candidates

__all__ = [
    "TopKTransformerModule",
    "ExtractiveQAModule",
    "SequenceClassificationModule",
    "default_backbone",
    "linear_warmup_decay",
    "parameter_groups",
    "FeatureResult",
    "feature_candidates",
    "aggregate_predictions",
    "normalize_answer",
    "squad_v1_metrics",
    "squad_v2_metrics",
    "write_predictions",
]
