"""The gold judge: a transparent rule set that stands in for human labelers.

RLHF needs preferences between completions. Here they come from :class:`GoldJudge`,
whose score is a weighted sum of five features of a completion (weights from the
``gold`` section of params.yaml, :class:`~pipeline.core.params.GoldParams`):

- repetition: the number of recurring word n-grams (n = ``repeat_ngram``; an n-gram seen
  k times counts k - 1), the commonest failure of a small model (loops);
- complete sentence: 1 when the completion, stripped, ends with . ! or ? (optionally
  followed by closing quotes or brackets), else 0: it stopped at a sensible place;
- unknown words: the number of ``<unk>`` in the completion (word and char vocabularies);
- length: words short of ``min_words`` or beyond ``max_words`` (0 inside the range);
- overlap with the prompt: distinct content words (alphabetic, 3+ letters, lowercased)
  that appear in both, capped at ``overlap_cap``: a crude sign of staying on topic.

Why this is a reasonable stand-in. Each rule names something a human rater of short
continuations also dislikes or likes (loops, trailing off mid-sentence, gibberish,
rambling or one-word answers, drifting off topic), yet the judge is deterministic,
instant, free and fully explainable: :meth:`GoldJudge.explain` gives each rule's share of
the score, so every preference label can be audited, and the reward model's and the
policy's progress can be measured against the same ground truth that produced the data.
The optional Bradley-Terry ``noise`` makes the labels as inconsistent as human ones are,
which is the noise model the reward model's loss assumes.

Its limits. It sees surface form only: not truth, grammar, coherence or helpfulness. A
policy optimized hard against it (or against a reward model trained on it) will find
its blind spots: copying prompt words (function words such as "the" or "and" count as
content words too), ending every output with a period, or staying exactly inside the
length window. That is the reward hacking RLHF's KL penalty exists to limit, and here it
is visible, because the rules are known. Words are matched by a simple regular
expression, which suits English and other space-separated languages only.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from pipeline.core.params import GoldParams

UNK_TOKEN = "<unk>"

# A word: "<unk>" as one token (so it counts toward length and repetition but is never a
# content word), or a run of letters/digits with inner apostrophes ("don't" is one word).
_WORD = re.compile(r"<unk>|\w+(?:'\w+)*")
# The end of a complete sentence, after stripping whitespace: terminal punctuation, then
# any closing quotes or brackets (a sentence can end inside a quotation or parenthesis).
_COMPLETE_END = re.compile(r"[.!?][\"'”’»)\]}]*\Z")
_MIN_CONTENT_LETTERS = 3

# The rules, in the order explain() reports them.
RULES: tuple[str, ...] = ("repetition", "complete_sentence", "unk", "length", "overlap")


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` as the judge counts them."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """Distinct alphabetic words of 3+ letters, lowercased."""
    return {w for w in words(text) if w.isalpha() and len(w) >= _MIN_CONTENT_LETTERS}


def repeated_ngrams(tokens: list[str], n: int) -> int:
    """How many of the word n-grams are recurrences: an n-gram seen k times counts k - 1."""
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return sum(count - 1 for count in Counter(ngrams).values())


def ends_complete_sentence(text: str) -> bool:
    return _COMPLETE_END.search(text.strip()) is not None


def _sigmoid(x: float) -> float:
    # Two branches, so exp() never overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class GoldJudge:
    """Scores completions by the rules in the module docstring; labels preferences."""

    def __init__(self, params: GoldParams) -> None:
        self.params = params

    @classmethod
    def from_params(cls, params: GoldParams) -> GoldJudge:
        return cls(params)

    def features(self, prompt: str, completion: str) -> dict[str, float]:
        """Each rule's raw feature value (before weighting), keyed as :data:`RULES`."""
        p = self.params
        completion_words = words(completion)
        word_count = len(completion_words)
        outside_range = max(0, p.min_words - word_count) + max(0, word_count - p.max_words)
        shared = content_words(prompt) & content_words(completion)
        return {
            "repetition": float(repeated_ngrams(completion_words, p.repeat_ngram)),
            "complete_sentence": float(ends_complete_sentence(completion)),
            "unk": float(completion.count(UNK_TOKEN)),
            "length": float(outside_range),
            "overlap": float(min(len(shared), p.overlap_cap)),
        }

    def explain(self, prompt: str, completion: str) -> dict[str, float]:
        """Each rule's contribution (weight * feature); they sum to :meth:`score`."""
        p = self.params
        weights = {
            "repetition": p.repetition_weight,
            "complete_sentence": p.complete_sentence_weight,
            "unk": p.unk_weight,
            "length": p.length_weight,
            "overlap": p.overlap_weight,
        }
        features = self.features(prompt, completion)
        return {rule: weights[rule] * features[rule] for rule in RULES}

    def score(self, prompt: str, completion: str) -> float:
        """The weighted sum of the features: higher is better."""
        return sum(self.explain(prompt, completion).values())

    def preference_probability(self, prompt: str, completion_a: str, completion_b: str) -> float:
        """P(a is preferred): sigmoid((s_a - s_b) / noise), or 1 / 0 / 0.5 when noise is 0."""
        margin = self.score(prompt, completion_a) - self.score(prompt, completion_b)
        if self.params.noise > 0:
            return _sigmoid(margin / self.params.noise)
        return 0.5 if margin == 0 else float(margin > 0)

    def prefer(
        self, prompt: str, completion_a: str, completion_b: str, rng: np.random.Generator
    ) -> int:
        """0 if ``completion_a`` is preferred, 1 if ``completion_b``.

        noise 0: the higher score wins, an exact tie is a fair coin from ``rng``.
        noise > 0: a wins with probability sigmoid((s_a - s_b) / noise), the
        Bradley-Terry model of a noisy labeler. Every call draws exactly one number from
        ``rng``, tie or not, so the labels of later pairs do not depend on which earlier
        pairs happened to tie.
        """
        draw = rng.random()
        return 0 if draw < self.preference_probability(prompt, completion_a, completion_b) else 1
