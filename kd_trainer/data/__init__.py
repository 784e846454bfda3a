"""Person-retrieval datasets as ``datasets.DatasetDict``, IRRA's transforms, CLIP tokenisation.

    dsd = load_pedes("CUHK-PEDES", "./data")            # raw rows, see formats.py
    print(summarize(dsd))                                # identities / images / captions, findings
    dsd = with_retrieval_transforms(dsd, image_size=(384, 128), augment=True)
    loader = DataLoader(dsd["train"], batch_size=64, collate_fn=collate_retrieval)

The synthetic data set generators live in :mod:`kd_trainer.synthetic`.
"""

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.data.formats import (
    DATASETS,
    DUPLICATE_POLICIES,
    DatasetFormat,
    DatasetFormatError,
    LoadReport,
    PedesSplits,
    canonical_dataset_name,
    last_skipped,
    load_pedes,
    open_image,
    summarize,
    unwrap_worker_error,
)
from kd_trainer.data.pipeline import RetrievalTransform, with_retrieval_transforms
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DUPLICATE_POLICIES",
    "DatasetFormat",
    "DatasetFormatError",
    "LoadReport",
    "PedesSplits",
    "RetrievalTransform",
    "build_image_transform",
    "canonical_dataset_name",
    "collate_retrieval",
    "last_skipped",
    "load_pedes",
    "open_image",
    "summarize",
    "tokenize",
    "unwrap_worker_error",
    "with_retrieval_transforms",
]
