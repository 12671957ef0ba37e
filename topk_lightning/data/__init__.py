"""Data: QA over long documents (SQuAD files, the built-in ``needle`` set) and text classification.

Batches for QA follow docs/CONTRACTS.md ("QA batches").
"""

from topk_lightning.data.base import BaseDataModule, FeatureDataset, PaddingCollator
from topk_lightning.data.classification import ClassificationDataModule
from topk_lightning.data.files import read_file, read_records
from topk_lightning.data.needle import generate_needle_squad, needle_file
from topk_lightning.data.qa_features import answer_token_span, prepare_qa_features
from topk_lightning.data.question_answering import QADataModule
from topk_lightning.data.sampling import EpochShuffleSampler, LengthGroupedSampler, ResumableDataLoader
from topk_lightning.data.squad import InvalidExampleError, join_paragraphs, load_qa_examples

__all__ = [
    "BaseDataModule",
    "ClassificationDataModule",
    "EpochShuffleSampler",
    "FeatureDataset",
    "InvalidExampleError",
    "LengthGroupedSampler",
    "PaddingCollator",
    "QADataModule",
    "ResumableDataLoader",
    "answer_token_span",
    "generate_needle_squad",
    "join_paragraphs",
    "load_qa_examples",
    "needle_file",
    "prepare_qa_features",
    "read_file",
    "read_records",
]
