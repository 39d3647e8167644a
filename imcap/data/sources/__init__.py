"""Readers of caption datasets in the layouts they are distributed in. Each turns a source into records,
split by split, for the shard builder (imcap/data/build.py).

A record is one image (a file path, or bytes) with its captions as the source writes them, its image id
and its sample key. Readers only read captions and lists; images are opened by the builder's workers,
which also judge the captions. Records of a split come sorted by key, except where the source has an
order of its own (Hugging Face rows, shards), which is kept.

Bad input a reader can name without opening an image (a line it cannot parse, a caption of an image the
source does not list) becomes a `Problem`: reported, never fatal. A source file whose structure is wrong
(not JSON, a missing column or key) raises `SourceError`, naming the file, line or key and what was
expected.
"""

from imcap.data.sources.coco import read_coco, read_karpathy
from imcap.data.sources.flickr import FLICKR_LAYOUTS, read_flickr
from imcap.data.sources.hf import read_hf
from imcap.data.sources.records import Problem, Record, Source, SourceError
from imcap.data.sources.tables import read_table
from imcap.data.sources.webdataset import read_webdataset, webdataset_shards

__all__ = [
    "FLICKR_LAYOUTS",
    "Problem",
    "Record",
    "Source",
    "SourceError",
    "read_coco",
    "read_flickr",
    "read_hf",
    "read_karpathy",
    "read_table",
    "read_webdataset",
    "webdataset_shards",
]
