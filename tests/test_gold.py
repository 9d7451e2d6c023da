"""The gold judge: each rule on hand-made strings with hand-computed scores, and prefer().

Default weights (GoldParams): repetition -1 per recurring trigram, complete sentence +1,
<unk> -1 each, length -0.1 per word outside [8, 40], overlap +0.5 per shared content word
(at most 4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.alignment.gold import RULES, GoldJudge, content_words, words
from pipeline.core.params import GoldParams, Params

PROMPT = "The river flows through the ancient city"


@pytest.fixture
def judge() -> GoldJudge:
    return GoldJudge.from_params(Params().gold)


def test_from_params_scores_with_those_params():
    # Every weight and window changed from the default, each visible in one rule:
    # "a b a b a b" has 6 words, bigrams ab ba ab ba ab: 3 recurrences * -2 = -6; no
    # ending: 0 (weight 5 unused); 6 words against the window [2, 4]: 2 over * -0.5 = -1;
    # shared with the prompt "alpha" (3+ letters): none. Total -7.
    params = GoldParams(repeat_ngram=2, repetition_weight=-2.0, complete_sentence_weight=5.0,
                        min_words=2, max_words=4, length_weight=-0.5, overlap_weight=3.0)
    judge = GoldJudge.from_params(params)
    assert judge.explain("alpha", "a b a b a b") == {
        "repetition": -6.0, "complete_sentence": 0.0, "unk": 0.0, "length": -1.0,
        "overlap": 0.0, "empty": 0.0,
    }
    assert judge.score("alpha", "a b a b a b") == -7.0
    # "alpha ends." : 2 words, inside [2, 4]; complete: +5; "alpha" shared: +3. Total 8.
    assert judge.score("alpha", "alpha ends.") == 8.0
    # The default judge scores the same text otherwise: 6 words, 2 short: -0.2; the
    # trigrams a b a / b a b / a b a* / b a b*: 2 recurrences: -2. Total -2.2.
    assert GoldJudge.from_params(GoldParams()).score("alpha", "a b a b a b") == (
        pytest.approx(-2.2))


def test_words_keep_unk_and_contractions_whole():
    assert words("Don't stop, <unk> 3 times!") == ["don't", "stop", "<unk>", "3", "times"]
    # Alphabetic, 3+ letters: not "is", "3", "<unk>" or "don't"
    assert content_words("The cat is <unk> 3 don't RUN") == {"the", "cat", "run"}


# ---------------------------------------------------------------------------- repetition


@pytest.mark.parametrize(
    ("completion", "recurrences"),
    [
        # Trigrams: the cat sat / cat sat on / sat on the / on the cat / the cat sat* /
        # cat sat on* / sat on the* / on the mat: 3 of the 8 are recurrences.
        ("the cat sat on the cat sat on the mat", 3),
        # a a a three times: the 2nd and 3rd are recurrences.
        ("a a a a a", 2),
        # Case and punctuation do not hide a repeat: the cat sat / cat sat the /
        # sat the cat / the cat sat*.
        ("The cat sat. the cat sat", 1),
        ("one two three four five", 0),
        ("too short", 0),  # no trigram at all
    ],
)
def test_repetition_counts_each_recurrence(judge, completion, recurrences):
    assert judge.features("", completion)["repetition"] == recurrences
    assert judge.explain("", completion)["repetition"] == -1.0 * recurrences


def test_repetition_uses_repeat_ngram():
    judge = GoldJudge(GoldParams(repeat_ngram=2, repetition_weight=-0.5))
    # Bigrams: a b / b c / c a / a b* / b c*: 2 recurrences, * -0.5
    assert judge.explain("", "a b c a b c")["repetition"] == -1.0


# --------------------------------------------------------------------- complete sentence


@pytest.mark.parametrize(
    ("completion", "complete"),
    [
        ("It rained.", True),
        ("Did it rain?", True),
        ("Really?!  \n", True),  # trailing whitespace is stripped first
        ('He said "stop."', True),  # closing quote after the period
        ("(See above.)", True),  # closing bracket
        ("It rained", False),
        ("It cost 3.5", False),
        ("The end. <unk>", False),
        ("", False),
        ("   ", False),
    ],
)
def test_complete_sentence(judge, completion, complete):
    assert judge.explain("", completion)["complete_sentence"] == (1.0 if complete else 0.0)


# ----------------------------------------------------------------------------------- unk


def test_each_unk_costs_its_weight(judge):
    assert judge.explain("", "a <unk> b <unk> c")["unk"] == -2.0
    assert judge.explain("", "no unknown words here")["unk"] == 0.0
    assert GoldJudge(GoldParams(unk_weight=-0.25)).explain("", "<unk><unk><unk>")["unk"] == -0.75


# -------------------------------------------------------------------------------- length


@pytest.mark.parametrize(
    ("word_count", "contribution"),
    [
        (0, -0.8),  # 8 short
        (5, -0.3),  # 3 short
        (8, 0.0),  # min_words
        (40, 0.0),  # max_words
        (45, -0.5),  # 5 over
    ],
)
def test_length_penalty_per_word_outside_the_range(judge, word_count, contribution):
    completion = " ".join(f"w{i}" for i in range(word_count))
    assert judge.explain("", completion)["length"] == pytest.approx(contribution)


def test_unk_counts_as_a_word_for_length(judge):
    # 7 words + <unk> = 8: inside the range
    assert judge.explain("", "one two three four five six seven <unk>")["length"] == 0.0


# ------------------------------------------------------------------------------- overlap


def test_overlap_counts_distinct_shared_content_words(judge):
    completion = "The city by the river is old and the river is wide"
    # Prompt content words: the river flows through ancient city. Completion: the city
    # river old and wide ("by", "is" are too short). Shared: the, city, river -> 3 * 0.5
    assert judge.features(PROMPT, completion)["overlap"] == 3.0
    assert judge.explain(PROMPT, completion)["overlap"] == 1.5


def test_overlap_is_capped():
    judge = GoldJudge(GoldParams(overlap_cap=2))
    # 3 shared words, capped at 2 -> 2 * 0.5
    assert judge.explain(PROMPT, "the city river")["overlap"] == 1.0
    assert GoldJudge(GoldParams(overlap_cap=0)).explain(PROMPT, PROMPT)["overlap"] == 0.0


def test_overlap_ignores_unk_and_short_words(judge):
    assert judge.features("<unk> is by 42", "<unk> is by 42")["overlap"] == 0.0


# ------------------------------------------------------------------------------ the sum


def test_a_clean_completion_scored_by_hand(judge):
    completion = "The city by the river is old and wide."
    # 9 words: length 0; no repeated trigram: 0; ends with ".": +1; no <unk>: 0;
    # shared: the, city, river: 3 * 0.5 = 1.5. Total 2.5
    assert judge.explain(PROMPT, completion) == {
        "repetition": 0.0, "complete_sentence": 1.0, "unk": 0.0, "length": 0.0, "overlap": 1.5,
        "empty": 0.0,
    }
    assert judge.score(PROMPT, completion) == 2.5


def test_a_degenerate_completion_scored_by_hand(judge):
    completion = "the river <unk> the river <unk> the river"
    # 8 words: length 0. Trigrams: (the river <unk>) (river <unk> the) (<unk> the river)
    # and each again: 3 recurrences: -3. No final punctuation: 0. Two <unk>: -2.
    # Shared: the, river: 2 * 0.5 = 1. Total -4
    assert judge.explain(PROMPT, completion) == {
        "repetition": -3.0, "complete_sentence": 0.0, "unk": -2.0, "length": 0.0, "overlap": 1.0,
        "empty": 0.0,
    }
    assert judge.score(PROMPT, completion) == -4.0


@pytest.mark.parametrize(
    ("completion", "explanation", "total"),
    [
        # No word: 8 short (-0.8) and empty (-2).
        ("", {"length": -0.8, "empty": -2.0}, -2.8),
        # 2 words: 6 short (-0.6); complete (+1); "rained" is not in the prompt.
        ("It rained.", {"complete_sentence": 1.0, "length": -0.6}, 0.4),
        # 6 words (2 short: -0.2); trigrams the-the-the x3 and the-the-<unk>: 2
        # recurrences (-2); one <unk> (-1); "the" shared with the prompt (+0.5).
        ("the the the the the <unk>",
         {"repetition": -2.0, "unk": -1.0, "length": -0.2, "overlap": 0.5}, -2.7),
        # 50 words (10 over: -1); 48 equal trigrams: 47 recurrences (-47); ends "!" (+1).
        (" ".join(["word"] * 50) + "!",
         {"repetition": -47.0, "complete_sentence": 1.0, "length": -1.0}, -47.0),
        # The prompt itself: 7 words (-0.1); no ending; 6 shared content words, capped
        # at 4 (+2).
        (PROMPT, {"length": -0.1, "overlap": 2.0}, 1.9),
    ],
)
def test_each_rule_and_the_score_by_hand(judge, completion, explanation, total):
    expected = {rule: explanation.get(rule, 0.0) for rule in RULES}  # in RULES' order
    assert judge.explain(PROMPT, completion) == pytest.approx(expected)
    assert tuple(judge.explain(PROMPT, completion)) == RULES
    assert judge.score(PROMPT, completion) == pytest.approx(total)


# -------------------------------------------------------------------------------- prefer

# "It rained." : 2 words (6 short: -0.6) + complete (+1) = 0.4
# "It rained"  : -0.6. Margin 1.0.
BETTER, WORSE = "It rained.", "It rained"


def test_prefer_is_deterministic_with_zero_noise(judge):
    assert judge.score("", BETTER) == pytest.approx(0.4)
    assert judge.score("", WORSE) == pytest.approx(-0.6)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        assert judge.prefer("", BETTER, WORSE, rng) == 0
        assert judge.prefer("", WORSE, BETTER, rng) == 1


def test_an_exact_tie_is_a_seeded_coin(judge):
    def labels(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [judge.prefer("", BETTER, BETTER, rng) for _ in range(2000)]

    assert labels(3) == labels(3)  # the same seed, the same labels
    assert 0.45 < np.mean(labels(3)) < 0.55  # a fair coin: expect 1000 +- 22 ones
    assert judge.preference_probability("", BETTER, BETTER) == 0.5


def test_prefer_draws_exactly_one_number_per_call(judge):
    # Ties and clear wins consume the generator alike, so later labels do not depend on
    # which earlier pairs tied.
    rng_tie, rng_win = np.random.default_rng(0), np.random.default_rng(0)
    judge.prefer("", BETTER, BETTER, rng_tie)
    judge.prefer("", BETTER, WORSE, rng_win)
    assert rng_tie.random() == rng_win.random()


@pytest.mark.parametrize("noise", [1.0, 0.5])
def test_noisy_preference_frequency_matches_the_sigmoid(noise):
    judge = GoldJudge(GoldParams(noise=noise))
    # Margin 1.0: P(a) = sigmoid(1 / noise): 0.7311 (noise 1), 0.8808 (noise 0.5)
    expected = 1.0 / (1.0 + math.exp(-1.0 / noise))
    assert judge.preference_probability("", BETTER, WORSE) == pytest.approx(expected)
    draws = 20_000
    rng = np.random.default_rng(42)
    prefers_better = sum(judge.prefer("", BETTER, WORSE, rng) == 0 for _ in range(draws))
    # Standard error sqrt(p (1 - p) / n) <= 0.0032; 0.015 is about 5 of them.
    assert prefers_better / draws == pytest.approx(expected, abs=0.015)
    # Swapping the order swaps the answer's meaning, not the probability.
    prefers_better = sum(judge.prefer("", WORSE, BETTER, rng) == 1 for _ in range(draws))
    assert prefers_better / draws == pytest.approx(expected, abs=0.015)


def test_noisy_preference_does_not_overflow_for_huge_margins():
    judge = GoldJudge(GoldParams(noise=1e-3))
    long_loop = " ".join(["loop"] * 2000)
    assert judge.preference_probability("", BETTER, long_loop) == 1.0
    assert judge.preference_probability("", long_loop, BETTER) == 0.0


# ------------------------------------------------------------ other scripts, code, nothing


def test_chinese_words_sentences_and_overlap_scored_by_hand(judge):
    prompt = "北京是中国的"
    completion = "首都，北京很大。"
    # Words: one per character: 首 都 北 京 很 大 = 6, two short of min_words 8: -0.2.
    # Ends with "。": +1. No repeated trigram. Content pairs of the prompt: 北京 京是 是中
    # 中国 国的; of the completion: 首都 北京 京很 很大 (the comma breaks no pair: it is not
    # a word, so 都北 is a pair too). Shared: 北京: +0.5. Total 1.3.
    assert content_words(completion) == {"首都", "都北", "北京", "京很", "很大"}
    assert judge.explain(prompt, completion) == {
        "repetition": 0.0, "complete_sentence": 1.0, "unk": 0.0, "length": -0.2,
        "overlap": 0.5, "empty": 0.0,
    }
    assert judge.score(prompt, completion) == pytest.approx(1.3)


@pytest.mark.parametrize(("completion", "complete"), [
    ("它结束了。", 1.0), ("真的吗？", 1.0), ("「終わり。」", 1.0), ("它结束了", 0.0),
])
def test_cjk_sentence_ends_count_as_complete(judge, completion, complete):
    assert judge.features("", completion)["complete_sentence"] == complete


def test_a_run_of_one_chinese_character_is_repetition(judge):
    # 的 x 10: ten one-character words, eight trigrams all the same: 7 recurrences.
    assert judge.explain("北京", "的" * 10)["repetition"] == -7.0


def test_code_ends_at_a_line_and_overlap_counts_identifiers(judge):
    prompt = "def scale(values, factor):\n"
    completion = "    scaled = [v * factor for v in values]\n"
    # Code (indented lines): the completion ends with a newline: complete. Words: scaled v
    # factor for v in values = 7: one short: -0.1. Identifiers of 3+ characters shared
    # with the prompt: factor, values: +1.0. The trigram (v, factor, for) once: no repeat.
    assert judge.explain(prompt, completion) == {
        "repetition": 0.0, "complete_sentence": 1.0, "unk": 0.0, "length": -0.1,
        "overlap": 1.0, "empty": 0.0,
    }
    # Cut mid-line, the same code has no complete ending.
    assert judge.features(prompt, "    scaled = [v * fac")["complete_sentence"] == 0.0


@pytest.mark.parametrize("nothing", ["", "   ", "。。。", "...", "\n"])
def test_saying_nothing_scores_below_an_imperfect_completion(judge, nothing):
    imperfect = "the river the river the river flows and flows"  # repeats, no ending
    assert judge.features(PROMPT, nothing)["empty"] == 1.0
    assert judge.features(PROMPT, nothing)["complete_sentence"] == 0.0
    assert judge.score(PROMPT, nothing) < judge.score(PROMPT, imperfect)
    # 8 words short of min_words (-0.8) and the empty penalty (-2.0).
    assert judge.score(PROMPT, nothing) == pytest.approx(-2.8)
