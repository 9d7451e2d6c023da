"""Example reward functions for RLHF: ``rlhf.reward: python:<this file>:<function>``.

A reward is a plain function ``(prompt: str, completion: str) -> float``, given the
decoded prompt and completion of each sample; RL maximizes it. It must return a finite
number, and it may use anything Python offers. Copy this file, change it, and point
``rlhf.reward_module`` at your copy: dvc.yaml tracks that file, so editing it re-runs
RL. For example, with this file:

    dvc exp run -S 'rlhf.reward=python:data/builtin/example_rewards.py:concise'

Words are counted with gptpipe's own rule, which holds in every script (a Chinese or
Thai character is a word; see pipeline/data/units.py).
"""

from pipeline.data.units import ends_sentence, words


def concise(prompt: str, completion: str) -> float:
    """Prefer a complete sentence of 8 to 20 words: +1 for ending one, minus 0.1 per
    word outside the range, -2 for saying nothing."""
    count = len(words(completion))
    if count == 0:
        return -2.0
    outside = max(0, 8 - count) + max(0, count - 20)
    return float(ends_sentence(completion)) - 0.1 * outside


def on_topic(prompt: str, completion: str) -> float:
    """The share of the completion's distinct words (lowercased) found in the prompt,
    minus the share of its words that repeat an earlier one."""
    found = [word.lower() for word in words(completion)]
    if not found:
        return -1.0
    prompt_words = {word.lower() for word in words(prompt)}
    shared = len(set(found) & prompt_words) / len(set(found))
    repeated = 1.0 - len(set(found)) / len(found)
    return shared - repeated
