"""The reward model: a pretrained GPT body with a scalar head, trained on preference pairs.

Input convention. A (prompt, completion) is scored as the sequence

    <bos> prompt ids  completion ids <eos>

and the reward is the head's value at the final ``<eos>`` (the last real token), which
has attended to the whole text. The ``<eos>`` is always appended, whether or not the
completion ended there when it was sampled: the model judges a finished text. A sequence
longer than the context keeps ``<bos>``, ``<eos>`` and the last ``context - 2`` ids of
prompt + completion (the prompt's start goes first; only a completion longer than the
context loses its own start).

Batches are right-padded with ``<pad>`` (id 0). Attention is causal, so padding after
the last real token never changes its value, and rotary positions still start at 0 in
every row: a padded batch scores exactly what each sequence alone scores.

Training is Bradley-Terry: minimize -log sigmoid(r(chosen) - r(rejected)) over pairs.
:class:`TfidfPreferenceBaseline` is the same model with TF-IDF features and a linear
score, fitted by scikit-learn: what the GPT body must beat to be worth its cost.

Saved like a model checkpoint (``model.safetensors`` + ``gptpipe.json`` +
``tokenizer.json``), with ``"kind": "reward"`` in the config; never a pickle.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.alignment.gradients import finite_gradient_norm
from pipeline.alignment.preference_data import Pair
from pipeline.alignment.rl_losses import bradley_terry_loss, pairwise_accuracy
from pipeline.core.errors import GptpipeError
from pipeline.core.io import atomic_dir, sha256_file
from pipeline.core.params import RewardParams
from pipeline.data import units
from pipeline.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer
from pipeline.lm.checkpoint import write_model_files
from pipeline.lm.folder import ModelFolder
from pipeline.lm.model import GPT, GPTConfig, ScalarHead
from pipeline.lm.optim import adamw

KIND = "reward"


# --------------------------------------------------------------------------- encoding


def encode_pair_ids(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                    context: int) -> list[int]:
    """``[<bos>, *prompt_ids, *completion_ids, <eos>]``, cut from the left to ``context``.

    ``prompt_ids`` come without <bos> and ``completion_ids`` without <eos>; a leading
    <bos> or a trailing <eos> (as a sampler returns them) is dropped, not doubled.
    """
    if context < 3:
        raise ValueError(f"context {context} is too short for <bos> + a token + <eos>")
    prompt_ids = [int(i) for i in prompt_ids]  # also accepts 1-D tensors
    completion_ids = [int(i) for i in completion_ids]
    if prompt_ids[:1] == [BOS_ID]:
        prompt_ids = prompt_ids[1:]
    if completion_ids[-1:] == [EOS_ID]:
        completion_ids = completion_ids[:-1]
    body = (prompt_ids + completion_ids)[-(context - 2):]
    return [BOS_ID, *body, EOS_ID]


def pad_batch(sequences: Sequence[Sequence[int]],
              device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with <pad>: ids (B, T_max) int64 and each sequence's length (B,) int64."""
    lengths = [len(s) for s in sequences]
    if min(lengths, default=1) < 1:
        raise ValueError("a sequence to score is empty")
    width = max(lengths, default=0)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return ids.to(device), torch.tensor(lengths, dtype=torch.long, device=device)


# ------------------------------------------------------------------------------ model


class RewardModel(ScalarHead):
    """A GPT body with a scalar head read at each sequence's last real token.

    ``forward(ids (B, T), lengths (B,)) -> rewards (B,)``; ``values(ids)`` gives the
    head at every position (B, T). The state dict keys are ScalarHead's
    (``body.*``, ``head.*``).
    """

    def __init__(self, body: GPT, seed: int = 0) -> None:
        super().__init__(body)
        # The head from a seed of its own, not the global RNG.
        generator = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(body.config.n_embd + 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * std)
            self.head.bias.zero_()

    @property
    def config(self) -> GPTConfig:
        return self.body.config

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @classmethod
    def from_pretrained(cls, gpt_dir: str | Path | ModelFolder,
                        device: torch.device | str = "cpu", seed: int = 0) -> RewardModel:
        """The body from a pretrained model folder, a fresh head from ``seed``."""
        folder = gpt_dir if isinstance(gpt_dir, ModelFolder) else ModelFolder.open(gpt_dir)
        body = folder.load_model("cpu")
        return cls(body, seed).to(device)

    def values(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) the head's value at every position."""
        return super().forward(ids)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and (B,) lengths -> (B,) the value at position length - 1."""
        values = self.values(ids)  # (B, T)
        return values.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def score_ids(self, prompt_ids: Sequence[Sequence[int]],
                  completion_ids: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """Rewards (B,) float32 on the model's device, one per (prompt, completion) of ids.

        ``prompt_ids[i]``: the prompt's token ids WITHOUT the leading <bos>.
        ``completion_ids[i]``: the generated ids WITHOUT <eos> and without any padding
        (a trailing <eos> or a leading <bos> is tolerated and dropped, see
        :func:`encode_pair_ids`). The model adds <bos> and <eos> itself and reads the
        value at that <eos>. Eval mode while scoring; the previous mode is restored.
        """
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        context = self.config.context
        return self.score_sequences([encode_pair_ids(p, c, context)
                                     for p, c in zip(prompt_ids, completion_ids, strict=True)],
                                    batch_size)

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[Sequence[int]],
                        batch_size: int = 32) -> torch.Tensor:
        """Rewards (B,) float32 on the model's device for whole sequences, each
        ``[<bos>, ..., <eos>]`` as :func:`encode_pair_ids` builds them."""
        was_training = self.training
        self.eval()
        try:
            parts = [self(*pad_batch(sequences[i : i + batch_size], self.device))
                     for i in range(0, len(sequences), batch_size)]
        finally:
            self.train(was_training)
        if not parts:
            return torch.zeros(0, device=self.device)
        return torch.cat(parts).float()


# ------------------------------------------------------------------------ save / load


def save_reward_model(directory: str | Path, model: RewardModel, tokenizer_path: str | Path,
                      meta: dict[str, Any] | None = None) -> None:
    """Write ``directory`` (weights, gptpipe.json with ``kind: reward``, tokenizer) atomically."""
    tokenizer_path = Path(tokenizer_path)
    body = {**(meta or {}), "kind": KIND, "tokenizer_sha256": sha256_file(tokenizer_path)}
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model, model.config, body, tokenizer_path)


def load_reward_model(directory: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """The reward model saved in ``directory``, in eval mode; refuses other kinds of model.

    ``ModelFolder.open(directory).meta`` gives its config file's contents (provenance).
    """
    folder = ModelFolder.open(directory)
    if folder.meta.get("kind") != KIND:
        raise GptpipeError(f"{folder.path}: a model of kind {folder.meta.get('kind')!r}; "
                           "allowed: a reward model written by gptpipe reward")
    model = RewardModel(GPT(folder.config))
    folder.load_weights(model)
    return model.to(device).eval()


# -------------------------------------------------------------------------- training


def encode_pairs(tokenizer: TextTokenizer, pairs: Sequence[Pair],
                 context: int) -> tuple[list[list[int]], list[list[int]]]:
    """(chosen sequences, rejected sequences) as the reward model scores them."""
    prompts = tokenizer.encode_batch([p.prompt for p in pairs])
    chosen = tokenizer.encode_batch([p.chosen for p in pairs])
    rejected = tokenizer.encode_batch([p.rejected for p in pairs])
    return ([encode_pair_ids(p, c, context) for p, c in zip(prompts, chosen, strict=True)],
            [encode_pair_ids(p, r, context) for p, r in zip(prompts, rejected, strict=True)])


def train_reward_model(
    model: RewardModel, tokenizer: TextTokenizer, train_pairs: Sequence[Pair],
    params: RewardParams, device: torch.device | str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Bradley-Terry training in place; returns {"epoch_losses": [...], "steps": n}.

    AdamW (:func:`pipeline.lm.optim.adamw`) at a constant ``params.lr``, gradient norm
    clipped at ``params.grad_clip`` (0: off; a loss or gradient that is not finite stops
    it before the optimizer step), ``params.epochs`` passes over the pairs in an
    order shuffled by a generator seeded with ``params.seed``. Each step scores the chosen
    and the rejected sequences of ``params.batch_size`` pairs in one padded forward pass
    (2 * batch_size rows).
    ``on_epoch(epoch, mean_loss)`` is called after each epoch (epochs count from 1).
    """
    if not train_pairs:
        raise GptpipeError("reward: no training pairs; the reward model needs at least one")
    with torch.enable_grad():  # whatever the caller's grad mode
        return _train(model, tokenizer, train_pairs, params, device, on_epoch)


def _train(model, tokenizer, train_pairs, params, device, on_epoch) -> dict[str, Any]:
    model.to(device).train()
    chosen, rejected = encode_pairs(tokenizer, train_pairs, model.config.context)
    # torch's default betas and its per-tensor kernel (not the fused one): the settings the
    # reward stage's recorded results were measured with (the fused kernel rounds apart).
    optimizer = adamw(model, lr=params.lr, weight_decay=params.weight_decay,
                      betas=(0.9, 0.999), device=torch.device(device), fused=False)
    order_generator = torch.Generator().manual_seed(params.seed)
    epoch_losses: list[float] = []
    steps = 0
    for epoch in range(1, params.epochs + 1):
        order = torch.randperm(len(train_pairs), generator=order_generator).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), params.batch_size):
            picked = order[start : start + params.batch_size]
            ids, lengths = pad_batch([chosen[i] for i in picked] + [rejected[i] for i in picked],
                                     device)  # (2b, T), (2b,)
            rewards = model(ids, lengths)  # (2b,)
            loss = bradley_terry_loss(rewards[: len(picked)], rewards[len(picked) :])
            if not torch.isfinite(loss):
                raise GptpipeError(
                    f"reward: the loss is {loss.item()} at epoch {epoch}, step {steps + 1}; "
                    "lower reward.lr or set reward.grad_clip > 0"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            finite_gradient_norm(model, params.grad_clip, f"reward: the loss's gradient at "
                                 f"epoch {epoch}, step {steps + 1}", "reward.lr")
            optimizer.step()
            steps += 1
            total += loss.item() * len(picked)
            count += len(picked)
        epoch_losses.append(total / count)
        if on_epoch is not None:
            on_epoch(epoch, epoch_losses[-1])
    model.eval()
    return {"epoch_losses": epoch_losses, "steps": steps}


def evaluate_reward_model(model: RewardModel, tokenizer: TextTokenizer,
                          pairs: Sequence[Pair], batch_size: int = 32) -> dict[str, float]:
    """accuracy: how often r(chosen) > r(rejected); mean_margin: mean r(chosen) - r(rejected)."""
    return pair_rewards(model, tokenizer, pairs, batch_size).summary()


@dataclass(frozen=True)
class PairRewards:
    """The reward model's scores of each pair's two completions ((N,) float32 each)."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def summary(self) -> dict[str, float]:
        """accuracy (a tie counts half) and mean_margin; both 0 without a pair."""
        if not len(self.chosen):
            return {"accuracy": 0.0, "mean_margin": 0.0}
        return {
            "accuracy": float(pairwise_accuracy(self.chosen, self.rejected)),
            "mean_margin": float((self.chosen - self.rejected).mean()),
        }

    def outcomes(self) -> np.ndarray:
        """(N,) float64 per pair: 1 when chosen scores above rejected, 0.5 on a tie, 0."""
        chosen, rejected = self.chosen.double().numpy(), self.rejected.double().numpy()
        return np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))


def pair_rewards(model: RewardModel, tokenizer: TextTokenizer, pairs: Sequence[Pair],
                 batch_size: int = 32) -> PairRewards:
    """Both completions of every pair scored by ``model`` (on the CPU)."""
    if not pairs:
        return PairRewards(torch.zeros(0), torch.zeros(0))
    chosen, rejected = encode_pairs(tokenizer, pairs, model.config.context)
    return PairRewards(model.score_sequences(chosen, batch_size).cpu(),
                       model.score_sequences(rejected, batch_size).cpu())


# -------------------------------------------------------------------------- baseline


def baseline_terms(text: str) -> list[str]:
    """The terms the TF-IDF baseline counts in ``text``: its words as
    :mod:`pipeline.data.units` finds them in any script, lowercased, and in scripts
    written without spaces each pair of adjacent characters too.

    A run of letters is a word where words are written with spaces; one character is
    where they are not (Chinese, Japanese, Thai, ...), and the pairs add what a
    one-character unit misses: a Chinese word is mostly two characters. (scikit-learn's
    default pattern, runs of two or more word characters, takes a whole Chinese clause
    for one word, so no clause of a held-out pair is ever seen in training.)
    """
    terms: list[str] = []
    previous: re.Match[str] | None = None  # the last word, when of an unspaced script
    for match in units.iter_words(text):
        word = match.group().lower()
        terms.append(word)
        if not units.is_unspaced(word):
            previous = None
            continue
        if previous is not None and previous.end() == match.start():
            terms.append(previous.group().lower() + word)
        previous = match
    return terms


class TfidfPreferenceBaseline:
    """TF-IDF of ``prompt + " " + completion`` and a linear score w . x, fitted as
    Bradley-Terry by logistic regression on feature differences. Terms are
    :func:`baseline_terms`, the same in every script.

    Each pair gives x(chosen) - x(rejected) with label 1 and its mirror with label 0, and
    there is no intercept, so the fitted model is antisymmetric: swapping a pair flips its
    margin's sign exactly. ``margins`` are w . (x(chosen) - x(rejected)) in logits, the
    same unit as the GPT reward model's margins. Deterministic for the same pairs.
    """

    def __init__(self, max_features: int = 20000, c: float = 1.0, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vectorizer = TfidfVectorizer(analyzer=baseline_terms, max_features=max_features,
                                          sublinear_tf=True)
        self.classifier = LogisticRegression(C=c, fit_intercept=False, max_iter=1000,
                                             random_state=seed)

    @staticmethod
    def _text(prompt: str, completion: str) -> str:
        return f"{prompt} {completion}"

    def _differences(self, pairs: Sequence[Pair]):
        """(N, F) sparse x(chosen) - x(rejected)."""
        chosen = self.vectorizer.transform([self._text(p.prompt, p.chosen) for p in pairs])
        rejected = self.vectorizer.transform([self._text(p.prompt, p.rejected) for p in pairs])
        return chosen - rejected

    def fit(self, pairs: Sequence[Pair]) -> TfidfPreferenceBaseline:
        from scipy.sparse import vstack

        if not pairs:
            raise GptpipeError("reward baseline: no training pairs; it needs at least one")
        texts = [self._text(p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)]
        try:
            self.vectorizer.fit(texts)
        except ValueError as err:  # e.g. "empty vocabulary" when no text has a word
            raise GptpipeError(f"reward baseline: TF-IDF could not be fitted ({err})") from None
        differences = self._differences(pairs)
        features = vstack([differences, -differences])
        labels = np.concatenate([np.ones(len(pairs)), np.zeros(len(pairs))])
        self.classifier.fit(features, labels)
        return self

    def margins(self, pairs: Sequence[Pair]) -> np.ndarray:
        """(N,) w . (x(chosen) - x(rejected)); > 0 means the baseline agrees with the pair."""
        if not pairs:
            return np.zeros(0)
        return self.classifier.decision_function(self._differences(pairs))

    def accuracy(self, pairs: Sequence[Pair]) -> float:
        """The share of pairs with a positive margin (a zero margin counts as the metric
        of ``pipeline.alignment.rl_losses.pairwise_accuracy`` counts a tie)."""
        margins = torch.as_tensor(self.margins(pairs), dtype=torch.float32)
        return float(pairwise_accuracy(margins, torch.zeros_like(margins)))
