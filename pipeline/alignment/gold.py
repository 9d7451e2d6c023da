"""The gold judge: a transparent rule set that stands in for human labelers.

RLHF needs preferences between completions. Here they come from :class:`GoldJudge`,
whose score is a weighted sum of six features of a completion (weights from the ``gold``
section of params.yaml, :class:`~pipeline.core.params.GoldParams`). Words are counted by
:mod:`pipeline.data.units`, the same in every script: a run of letters or digits where
words are written with spaces, one character where they are not (Chinese, Japanese kana,
Thai, ...), an identifier or a number in code.

- repetition: the number of recurring word n-grams (n = ``repeat_ngram``; an n-gram seen
  k times counts k - 1), the commonest failure of a small model (loops), and what a run
  of one repeated token or character scores badly on;
- complete ending: 1 when the completion stopped at a sensible place, else 0. In prose:
  it ends, stripped, with terminal punctuation of any script (. ! ? 。 ！ ？ । ؟ ...),
  optionally followed by closing quotes or brackets. In code: it ends at the end of a
  line or statement (a newline, or ; } ) ] :);
- unknown words: the number of ``<unk>`` in the completion (word and char vocabularies);
- length: words short of ``min_words`` or beyond ``max_words`` (0 inside the range);
- overlap with the prompt: distinct content words found in both, capped at
  ``overlap_cap``, a crude sign of staying on topic. Content words are words of three or
  more letters in spaced scripts (identifiers of three or more characters in code), and
  pairs of adjacent characters in unspaced scripts (a Chinese word is mostly two);
- empty: 1 when the completion holds no word at all (nothing, or only punctuation), so
  that saying nothing never beats saying something imperfect.

Prose or code is read from the text itself (:func:`pipeline.data.units.looks_like_code`
on prompt + completion): no param says which. On code the judge thus rewards completions
that stop at the end of a line or statement, reuse the prompt's identifiers, do not loop,
and keep to the length window in tokens (identifiers and numbers).

Why this is a reasonable stand-in. Each rule names something a human rater of short
continuations also dislikes or likes (loops, trailing off mid-sentence, gibberish,
rambling or one-word answers, drifting off topic, saying nothing), yet the judge is
deterministic, instant, free and fully explainable: :meth:`GoldJudge.explain` gives each
rule's share of the score, so every preference label can be audited, and the reward
model's and the policy's progress can be measured against the same ground truth that
produced the data. The optional Bradley-Terry ``noise`` makes the labels as inconsistent
as human ones are, which is the noise model the reward model's loss assumes.

Its limits. It sees surface form only: not truth, grammar, coherence or helpfulness. A
policy optimized hard against it (or against a reward model trained on it) will find
its blind spots: copying prompt words (function words such as "the" or "and" count as
content words too), ending every output with a period, or staying exactly inside the
length window. That is the reward hacking RLHF's KL penalty exists to limit, and here it
is visible, because the rules are known.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from pipeline.core.params import GoldParams
from pipeline.data import units

UNK_TOKEN = "<unk>"
_MIN_CONTENT_LETTERS = 3

# The rules, in the order explain() reports them.
RULES: tuple[str, ...] = ("repetition", "complete_sentence", "unk", "length", "overlap",
                          "empty")


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` as the judge counts them (``<unk>`` is one)."""
    return [word.lower() for word in units.words(text)]


def content_words(text: str, code: bool = False) -> set[str]:
    """What the overlap rule matches (see the module docstring): words of 3+ letters (in
    code, identifiers of 3+ characters), and adjacent character pairs in unspaced
    scripts. Lowercased."""
    found: set[str] = set()
    previous = ""
    for word in words(text):
        if units.is_unspaced(word):
            if previous:
                found.add(previous + word)
            previous = word
            continue
        previous = ""
        if len(word) < _MIN_CONTENT_LETTERS or word == UNK_TOKEN:
            continue
        if word.isalpha() or (code and word.isidentifier()):
            found.add(word)
    return found


def repeated_ngrams(tokens: list[str], n: int) -> int:
    """How many of the word n-grams are recurrences: an n-gram seen k times counts k - 1."""
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return sum(count - 1 for count in Counter(ngrams).values())


def ends_complete_sentence(text: str) -> bool:
    """Prose's complete ending: terminal punctuation of any script (closers allowed)."""
    return units.ends_sentence(text)


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
        code = units.looks_like_code(prompt + completion)
        completion_words = words(completion)
        word_count = len(completion_words)
        outside_range = max(0, p.min_words - word_count) + max(0, word_count - p.max_words)
        shared = content_words(prompt, code) & content_words(completion, code)
        ending = units.ends_line_of_code(completion) if code else ends_complete_sentence(
            completion)
        return {
            "repetition": float(repeated_ngrams(completion_words, p.repeat_ngram)),
            "complete_sentence": float(ending and word_count > 0),
            "unk": float(completion.count(UNK_TOKEN)),
            "length": float(outside_range),
            "overlap": float(min(len(shared), p.overlap_cap)),
            "empty": float(word_count == 0),
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
            "empty": p.empty_weight,
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
