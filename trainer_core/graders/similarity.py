"""``text_similarity`` metrics, each from its library (rapidfuzz, sacrebleu, NLTK, rouge-score), in [0, 1].

- ``fuzzy_match``: ``rapidfuzz.fuzz.ratio / 100`` (normalised Indel similarity of the two strings).
- ``bleu``: sacrebleu's ``sentence_bleu(input, [reference]).score / 100`` (its default smoothing).
- ``gleu``: NLTK's ``sentence_gleu`` over whitespace tokens (Google-BLEU, 1- to 4-grams).
- ``meteor``: NLTK's ``meteor_score`` over whitespace tokens (needs the WordNet corpus).
- ``rouge_1`` … ``rouge_5``, ``rouge_l``: rouge-score's F-measure (its tokenizer, no stemming).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

SimilarityFn = Callable[[str, str], float]


def _fuzzy(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(text, reference) / 100.0


def _bleu(text: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(text, [reference]).score / 100.0


def _gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([reference.split()], text.split()))


def _meteor(text: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([reference.split()], text.split()))


@functools.cache
def _rouge_scorer(kind: str):  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def _rouge(kind: str) -> SimilarityFn:
    def score(text: str, reference: str) -> float:
        return float(_rouge_scorer(kind).score(reference, text)[kind].fmeasure)

    return score


METRICS: dict[str, SimilarityFn] = {
    "fuzzy_match": _fuzzy, "bleu": _bleu, "gleu": _gleu, "meteor": _meteor,
    **{f"rouge_{n}": _rouge(f"rouge{n.upper() if n == 'l' else n}") for n in ("1", "2", "3", "4", "5", "l")},
}


def similarity(metric: str, text: str, reference: str) -> float:
    """Returns ``metric`` between ``text`` and ``reference`` (module docstring), in [0, 1]."""
    return METRICS[metric](text, reference)
