"""PAD's second stage: DPO on the value head over cached hidden states (backbone frozen).

The PersRM policy is ``pi_R(a | s, p) ~ exp(E_a . (W h + b))`` and the reference is the base
model. With ``reference="conditioned"`` (PAD's released code) the reference sees the same
preference-conditioned context (``W = I, b = 0``), so an untrained head has zero reward; with
``reference="unconditioned"`` it is the base model WITHOUT the preference, so an untrained
head's reward is the preference's pointwise mutual information with the response (decoding
with it is Linear Alignment) and training refines that. Either way the implicit reward of a
response is ``sum_t log pi_R(y_t) - log pi_ref(y_t)``.

By default the log-probs are taken over the base model's top-k candidates at each position
plus the actual token (the set PAD's decoding re-ranks, so training matches use); ``vocab=
"full"`` uses the whole vocabulary. The head can be ``full`` (``W = I + D``), ``lowrank``
(``W = I + U V^T``) or ``diagonal`` (``W = diag(1 + s)``); all export to the ``d x d`` W of
:class:`padlm.core.persrm.ValueHead`. Optional terms: an NLL term on the chosen response (keeps the
head a good language model, e.g. it must still end answers), an L2 pull toward identity, and
a per-dimension balance of the loss (``dimension_balance``): without it a dataset whose human
pairs outnumber each teacher axis thirty to one trains a head mostly on the human pairs.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from padlm.errors import PadlmError
from padlm.training.cache import SequenceStates
from padlm.training.configs import HeadTrainingConfig


class HeadParam(nn.Module):
    """A value head parametrised as a small change from the identity."""

    def __init__(self, hidden_size: int, form: str = "lowrank", rank: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        self.form = form
        d = hidden_size
        generator = torch.Generator().manual_seed(seed)
        self.bias = nn.Parameter(torch.zeros(d))
        if form == "full":
            self.delta = nn.Parameter(torch.zeros(d, d))
        elif form == "lowrank":
            # U random, V zero: W starts at I exactly and gradients reach V at once
            self.u = nn.Parameter(torch.randn(d, rank, generator=generator) / math.sqrt(d))
            self.v = nn.Parameter(torch.zeros(d, rank))
        elif form == "diagonal":
            self.scale = nn.Parameter(torch.zeros(d))
        else:
            raise PadlmError(f"unknown head form {form!r}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.form == "full":
            return hidden + hidden @ self.delta.T + self.bias
        if self.form == "lowrank":
            return hidden + (hidden @ self.v) @ self.u.T + self.bias
        return hidden * (1 + self.scale) + self.bias

    def weight(self) -> torch.Tensor:
        """The equivalent ``d x d`` matrix ``W`` (``W h + b``)."""
        d = self.bias.shape[0]
        eye = torch.eye(d, device=self.bias.device)
        if self.form == "full":
            return eye + self.delta
        if self.form == "lowrank":
            return eye + self.u @ self.v.T
        return torch.diag(1 + self.scale)

    def distance_from_identity(self) -> torch.Tensor:
        """``||W - I||_F^2 + ||b||^2`` (computed without materialising W where possible)."""
        if self.form == "full":
            delta = self.delta.pow(2).sum()
        elif self.form == "lowrank":
            delta = ((self.u.T @ self.u) * (self.v.T @ self.v)).sum()
        else:
            delta = self.scale.pow(2).sum()
        return delta + self.bias.pow(2).sum()


@dataclass
class Batch:
    """Many sequences' tokens flattened, with the sequence each token belongs to."""

    hidden: torch.Tensor  # [N, d] float32
    targets: torch.Tensor  # [N]
    candidates: torch.Tensor  # [N, k]
    segment: torch.Tensor  # [N] sequence index
    count: int  # number of sequences
    reference_k: torch.Tensor | None = None  # [N, k + 1] preference-free base logits
    reference_logp: torch.Tensor | None = None  # [N]


def collate(sequences: Sequence[SequenceStates], device: torch.device | str = "cpu") -> Batch:
    """One batch of cached (CPU) states, moved to the device the head trains on."""
    has_reference = all(s.reference_k is not None for s in sequences)
    return _to(Batch(
        hidden=torch.cat([s.hidden for s in sequences]).float(),
        targets=torch.cat([s.targets for s in sequences]),
        candidates=torch.cat([s.candidates for s in sequences]),
        segment=torch.cat([torch.full((len(s.targets),), i, dtype=torch.long)
                           for i, s in enumerate(sequences)]),
        count=len(sequences),
        reference_k=torch.cat([s.reference_k for s in sequences]) if has_reference else None,
        reference_logp=(torch.cat([s.reference_logp for s in sequences]) if has_reference
                        else None),
    ), torch.device(device))


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    move = {name: value.to(device) for name, value in vars(batch).items()
            if isinstance(value, torch.Tensor)}
    return Batch(**{**vars(batch), **move})


def restricted_log_probs(logits_k: torch.Tensor, candidates: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """log-softmax over ``candidates + [target]`` evaluated at the target.

    ``logits_k`` is ``[N, k + 1]`` for the candidate ids followed by the target; a target
    that is already among the candidates is counted once (its extra column is masked).
    """
    duplicate = (candidates == targets[:, None]).any(dim=1)
    mask = torch.ones_like(logits_k, dtype=torch.bool)
    mask[:, -1] = ~duplicate
    logp = logits_k.masked_fill(~mask, float("-inf")).log_softmax(-1)
    # the target's log-prob: its candidate column when duplicated, else the last column
    at_candidate = (candidates == targets[:, None]).float().argmax(dim=1)
    column = torch.where(duplicate, at_candidate, torch.full_like(at_candidate, logits_k.shape[1]
                                                                  - 1))
    return logp.gather(1, column[:, None])[:, 0]


def token_log_probs(head: Callable[[torch.Tensor], torch.Tensor] | None, batch: Batch,
                    lm_head: torch.Tensor, vocab: str) -> torch.Tensor:
    """``log pi(y_t)`` per token, for the head (or the base model when ``head`` is None)."""
    transformed = batch.hidden if head is None else head(batch.hidden)
    if vocab == "full":
        return (transformed @ lm_head.T).log_softmax(-1).gather(1, batch.targets[:, None])[:, 0]
    ids = torch.cat([batch.candidates, batch.targets[:, None]], dim=1)
    logits = torch.einsum("nkd,nd->nk", lm_head[ids], transformed)
    return restricted_log_probs(logits, batch.candidates, batch.targets)


def reference_log_probs(batch: Batch, lm_head: torch.Tensor, vocab: str,
                        reference: str) -> torch.Tensor:
    """``log pi_ref(y_t)`` per token: the conditioned base from the cached hidden states, or
    the preference-free base from its cached logits."""
    if reference == "conditioned":
        return token_log_probs(None, batch, lm_head, vocab)
    if batch.reference_k is None or batch.reference_logp is None:
        raise PadlmError("an unconditioned reference needs the preference-free cache "
                         "(ReferenceCache.attach)")
    if vocab == "full":
        return batch.reference_logp
    return restricted_log_probs(batch.reference_k, batch.candidates, batch.targets)


def sequence_sums(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    return torch.zeros(batch.count, dtype=values.dtype, device=values.device).index_add(
        0, batch.segment, values)


def dpo_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
             beta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """DPO: ``-log sigmoid(beta * (r_chosen - r_rejected))`` with ``r = log pi - log pi_ref``
    summed over the response; ``weights`` (per pair) scale each pair's term in the mean."""
    losses = -nn.functional.logsigmoid(beta * (reward_chosen - reward_rejected))
    return losses.mean() if weights is None else (weights * losses).mean()


def dimension_weights(dimensions: Sequence[str], balance: float) -> torch.Tensor:
    """Per-pair weights ``n_d ** -balance`` (``n_d``: the pairs of that pair's dimension),
    scaled to mean 1 so the loss keeps its scale: 0 weighs every pair alike, 1 gives every
    dimension the same total pull, values between interpolate (the temperature of
    multilingual data sampling)."""
    counts = Counter(dimensions)
    raw = torch.tensor([counts[d] ** -balance for d in dimensions], dtype=torch.float64)
    return (raw * len(raw) / raw.sum()).float()


def pair_rewards(head, pairs: Sequence[tuple[SequenceStates, SequenceStates]],
                 lm_head: torch.Tensor, vocab: str, reference: str = "conditioned",
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Implicit rewards of chosen and rejected, and the chosen's mean token log-prob
    (``head=None``: the untrained head, ``W = I``)."""
    batch = collate([seq for pair in pairs for seq in pair], lm_head.device)
    policy = token_log_probs(head, batch, lm_head, vocab)
    with torch.no_grad():
        reference_logp = reference_log_probs(batch, lm_head, vocab, reference)
    rewards = sequence_sums(policy - reference_logp, batch)
    policy_sums = sequence_sums(policy, batch)
    lengths = sequence_sums(torch.ones_like(policy), batch)
    return rewards[0::2], rewards[1::2], (policy_sums[0::2] / lengths[0::2])


@torch.no_grad()
def reward_margins(head, pairs, lm_head: torch.Tensor, vocab: str,
                   reference: str = "conditioned", chunk: int = 64) -> torch.Tensor:
    """Implicit reward of chosen minus rejected, per pair (unrounded, for pooling)."""
    return torch.cat([chosen - rejected for chosen, rejected, _ in (
        pair_rewards(head, pairs[start:start + chunk], lm_head, vocab, reference)
        for start in range(0, len(pairs), chunk))])


def evaluate(head, pairs, dimensions: Sequence[str], lm_head: torch.Tensor, vocab: str,
             reference: str = "conditioned", chunk: int = 64) -> dict:
    """Pairwise accuracy (implicit reward of chosen > rejected; ties count half) per
    dimension, overall and averaged over dimensions, plus the mean reward margin."""
    if not pairs:
        return {}
    return accuracy_report(reward_margins(head, pairs, lm_head, vocab, reference, chunk),
                           dimensions)


@torch.no_grad()
def end_of_turn_report(head, pairs, lm_head: torch.Tensor, vocab: str, end_token: int,
                       ) -> dict:
    """Mean log-prob the head gives end-of-turn where a response really ends (every chosen
    and rejected sequence whose last target is ``end_token``): pairwise accuracy cannot see a
    head that has stopped ending answers, since both responses of a pair end once each. Only
    those final positions are scored."""
    finals = [SequenceStates(seq.hidden[-1:], seq.targets[-1:], seq.candidates[-1:],
                             seq.base_logp[-1:])
              for pair in pairs for seq in pair if int(seq.targets[-1]) == end_token]
    if not finals:
        return {"mean_logp": None, "sequences": 0}
    logp = token_log_probs(head, collate(finals, lm_head.device), lm_head, vocab)
    return {"mean_logp": round(float(logp.mean()), 4), "sequences": len(finals)}


def accuracy_report(margins: torch.Tensor, dimensions: Sequence[str]) -> dict:
    margins = margins.cpu()
    wins = (margins > 0).float() + 0.5 * (margins == 0).float()
    per_dim = {}
    for dim in sorted(set(dimensions)):
        index = torch.tensor([i for i, d in enumerate(dimensions) if d == dim])
        per_dim[dim] = {"accuracy": round(float(wins[index].mean()), 4), "pairs": len(index)}
    return {
        "accuracy": round(float(wins.mean()), 4),
        "accuracy_mean_over_dimensions": round(
            sum(v["accuracy"] for v in per_dim.values()) / len(per_dim), 4),
        "margin": round(float(margins.mean()), 4),
        "per_dimension": per_dim,
    }


def baseline_report(pairs, dimensions: Sequence[str]) -> dict:
    """The untrained baseline: rank chosen over rejected by the frozen preference-conditioned
    base model's mean token log-prob (full vocabulary)."""
    return accuracy_report(baseline_margins(pairs), dimensions)


def baseline_margins(pairs) -> torch.Tensor:
    """Chosen minus rejected mean token log-prob under the frozen conditioned base."""
    return torch.tensor([float(c.base_logp.mean() - r.base_logp.mean()) for c, r in pairs])


def train_head(
    pairs: Sequence[tuple[SequenceStates, SequenceStates]],
    lm_head: torch.Tensor,
    config: HeadTrainingConfig,
    validation: Sequence[tuple[SequenceStates, SequenceStates]] = (),
    validation_dimensions: Sequence[str] = (),
    state: dict | None = None,
    on_epoch: Callable[[dict, HeadParam, torch.optim.Optimizer], None] | None = None,
    dimensions: Sequence[str] = (),
) -> tuple[HeadParam, list[dict]]:
    """Train a head; ``state`` (from a checkpoint) resumes after its last finished epoch.
    ``dimensions`` (one per training pair) are needed for a ``dimension_balance`` above 0."""
    if not pairs:
        raise PadlmError("no training pairs")
    weights = None
    if config.dimension_balance:
        if len(dimensions) != len(pairs):
            raise PadlmError("a dimension balance needs each training pair's dimension")
        weights = dimension_weights(dimensions, config.dimension_balance).to(lm_head.device)
    torch.manual_seed(config.seed)
    lm_head = lm_head.detach().float()  # the head trains on the device of the lm_head
    head = HeadParam(lm_head.shape[1], config.form, config.rank, config.seed).to(lm_head.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    history: list[dict] = []
    first_epoch = 0
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        first_epoch = len(history)
    for epoch in range(first_epoch, config.epochs):
        began = time.perf_counter()
        order = list(range(len(pairs)))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        losses = []
        for start in range(0, len(order), config.batch_pairs):
            indexes = order[start:start + config.batch_pairs]
            chunk = [pairs[i] for i in indexes]
            chosen, rejected, chosen_logp = pair_rewards(head, chunk, lm_head, config.vocab,
                                                         config.reference)
            batch_weights = None if weights is None else weights[indexes]
            loss = dpo_loss(chosen, rejected, config.beta, batch_weights)
            if config.nll_weight:
                nll = -chosen_logp if batch_weights is None else -batch_weights * chosen_logp
                loss = loss + config.nll_weight * nll.mean()
            if config.identity_l2:
                loss = loss + config.identity_l2 * head.distance_from_identity()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch + 1, "loss": round(sum(losses) / len(losses), 5),
                  "seconds": round(time.perf_counter() - began, 2)}
        if validation:
            record["validation"] = evaluate(head, validation, validation_dimensions, lm_head,
                                            config.vocab, config.reference)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record, head, optimizer)
    return head, history


def head_config_dict(config: HeadTrainingConfig) -> dict:
    return asdict(config)
