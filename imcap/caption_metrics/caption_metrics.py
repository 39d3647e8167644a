"""Caption metrics as an `evaluate` module: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D by the coco-caption
reference code (pycocoevalcap) after PTB tokenisation, as the papers report them.

    import evaluate, imcap.metrics
    metric = evaluate.load(imcap.metrics.METRIC_MODULE)   # a local path: works offline
    metric.compute(predictions=["a dog runs"], references=[["a dog is running", "a brown dog runs"]])
"""

import datasets
import evaluate

from imcap.metrics import caption_scores

_DESCRIPTION = """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of predicted captions against reference captions,
computed by pycocoevalcap exactly as COCOEvalCap does (PTB tokenisation; METEOR and the tokeniser
need Java, and METEOR is None without it)."""
_KWARGS = """
Args:
    predictions: one caption (str) per image.
    references: the reference captions (list of str) of each image.
Returns:
    bleu1, bleu2, bleu3, bleu4, meteor, rouge_l, cider: float (meteor None without Java).
"""
_CITATION = """@article{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation Server},
author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and others}, journal={arXiv:1504.00325}, year={2015}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        return caption_scores(dict(enumerate(predictions)), dict(enumerate(references)))
