"""The policy under RL: the GPT with a value head, its frozen reference, its optimizer.

- :class:`PolicyWithValue`: the policy GPT plus a linear value head (PPO's critic).
- :func:`completion_logits`: the logits that predict a batch of completions, one pass.
- :func:`frozen_copy`: the KL reference, a copy of the starting policy without gradients.
- :func:`make_optimizer` and :func:`kl_controller`: AdamW for the policy and its head, and
  the (fixed or adaptive) KL coefficient.

Shapes: B batch, T0 prompt tokens, N completion positions, V vocabulary, C width.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.alignment.rl_losses import AdaptiveKLController, FixedKLController
from pipeline.core.params import RlhfParams
from pipeline.lm.model import GPT
from pipeline.lm.optim import adamw

# The value head's own learning rate. rlhf.lr (1e-5 by default) is a fine-tuning rate for
# a pretrained body; a freshly initialized linear head needs far larger steps to fit the
# returns within a 60-update run (at 1e-5 it barely leaves 0).
VALUE_HEAD_LR = 1e-3

# The adaptive KL controller's horizon, in rollout steps (n_steps = 1 per rollout): a 20%
# KL error moves the coefficient by at most 2% per step, about TRL's default rate
# (horizon 10,000 episodes at 256 episodes per batch: 2.6%).
KL_HORIZON_STEPS = 10



class PolicyWithValue(nn.Module):
    """The policy GPT and a linear value head on its final hidden states.

    Why a head on the policy's own hidden states (TRL's default) and not a separate value
    model initialized from the reward model (InstructGPT): one forward pass gives both the
    logits and the values, where a second 4 x 256 body would add about half again to
    every update's compute on CPU, where the default run has about 5 minutes.

    The head reads the hidden states *detached*: the value loss trains the head alone and
    never the body, so only the policy gradient moves the language model. A value loss
    through a shared body drags the features the policy samples from, in units (reward
    model logits) unrelated to the policy loss's, and that drift shows up as KL the
    penalty then has to fight. The price: the critic is a linear probe of the policy's
    features, which suffices to learn a per-prompt baseline for completions of 40 tokens.

    The head starts at zero (values 0, so early advantages are plain reward-to-go, like
    REINFORCE) and trains at :data:`VALUE_HEAD_LR` (see :func:`make_optimizer`).
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> logits (B, T - start, V) and values (B, T - start).

        ``start`` skips the first positions' outputs (a rollout needs only those from the
        prompt's last token on); they are still run, as context.
        """
        hidden = self.gpt.hidden_states(idx)[:, start:]  # (B, T', C)
        logits = self.gpt.lm_head(hidden)  # (B, T', V)
        values = self.value_head(hidden.detach()).squeeze(-1)  # (B, T')
        return logits, values


def completion_logits(gpt: GPT, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Logits (B, N, V) that predict each of the (B, N) completion tokens after the
    (B, T0) prompts: one forward pass over prompt + completion minus its last token."""
    tokens = torch.cat((prompts, completions), dim=1)[:, :-1]  # (B, T0 + N - 1)
    hidden = gpt.hidden_states(tokens)[:, prompts.shape[1] - 1 :]  # (B, N, C)
    return gpt.lm_head(hidden)


def frozen_copy(gpt: GPT) -> GPT:
    """A copy of ``gpt`` with no gradients, in eval mode: the KL reference."""
    reference = copy.deepcopy(gpt).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def make_optimizer(policy: PolicyWithValue, rlhf: RlhfParams,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW on the GPT (weight decay on matrices only, as in pretraining) at rlhf.lr,
    and on the value head at :data:`VALUE_HEAD_LR` without decay.

    Betas (0.9, 0.95), those of pretraining. The value head's group is always there; it
    simply gets no gradient under REINFORCE and DPO.
    """
    head = {"params": list(policy.value_head.parameters()), "weight_decay": 0.0,
            "lr": VALUE_HEAD_LR}
    return adamw(policy.gpt, lr=rlhf.lr, weight_decay=rlhf.weight_decay, betas=(0.9, 0.95),
                 device=device, extra_groups=[head])


def kl_controller(rlhf: RlhfParams) -> AdaptiveKLController | FixedKLController:
    if rlhf.adaptive_kl:
        return AdaptiveKLController(rlhf.kl_coef, rlhf.target_kl, KL_HORIZON_STEPS)
    return FixedKLController(rlhf.kl_coef)

