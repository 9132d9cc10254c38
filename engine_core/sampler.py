"""Turn a step's logits into tokens, one row per sequence that reached the end of its tokens.

Rows that are plain greedy (no penalties, no logit bias, no logprobs) are decided by one
vectorized argmax; the others go through the full pipeline row by row: logit bias, penalties,
min_tokens suppression, temperature, min-p, top-k, top-p (vLLM V1's order), then one uniform
draw from the sequence's own generator (seeded requests reproduce whatever else is in the
batch). Logprobs are those of the raw model distribution, as vLLM reports them.

The rows of constrained requests are masked first, in place: the tokens a row's grammar does not
allow get -inf (see `engine_core.structured_output`). As in vLLM, their logprobs are taken after
that mask: a token the grammar forces has logprob 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_core.request import Sequence
from engine_core.structured_output import apply_grammar_masks
from ipc.messages import SamplingParams, TokenLogprobs


@dataclass
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None  # when the request asked for them
    logprob: float | None  # the chosen token's raw logprob, when it was computed


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(row_logprobs: np.ndarray, token_id: int, num_top: int) -> TokenLogprobs:
    chosen = float(row_logprobs[token_id])
    rank = int(np.count_nonzero(row_logprobs > chosen)) + 1
    if num_top > 0:
        top = np.argpartition(row_logprobs, -num_top)[-num_top:]
        top = top[np.argsort(-row_logprobs[top], kind="stable")]
        top_ids = top.tolist()
        top_values = row_logprobs[top].tolist()
    else:
        top_ids, top_values = [], []
    return TokenLogprobs(token_id, chosen, rank, top_ids, top_values)


def add_logit_bias(row: np.ndarray, bias: dict[int, float]) -> None:
    """In place: each token id's bias added to its logit."""
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    row[ids] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))


def _is_plain_greedy(p: SamplingParams, needs_logprob: bool) -> bool:
    return (
        p.is_greedy
        and p.logprobs is None
        and not needs_logprob
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.repetition_penalty == 1.0
        and p.min_tokens == 0
        and not p.logit_bias
    )


class Sampler:
    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)  # for requests without a seed

    def sample(self, logits: np.ndarray, seqs: list[Sequence], needs_logprob: list[bool]) -> list[SampledToken]:
        apply_grammar_masks(logits, seqs)
        results: list[SampledToken | None] = [None] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if _is_plain_greedy(s.params, needs_logprob[i])]
        if plain:
            for i, token in zip(plain, np.argmax(logits[plain], axis=-1).tolist()):
                results[i] = SampledToken(token, None, None)
        for i, seq in enumerate(seqs):
            if results[i] is None:
                results[i] = self._sample_row(logits[i], seq)
        return results

    def _sample_row(self, raw: np.ndarray, seq: Sequence) -> SampledToken:
        p = seq.params
        row = self.process_logits(raw, seq)
        if p.is_greedy:
            token = int(np.argmax(row))
        else:
            token = self._draw(row, p, seq.generator or self.rng)
        raw_logprobs = log_softmax(raw)
        logprobs = None
        if p.logprobs is not None:
            logprobs = token_logprobs(raw_logprobs, token, p.logprobs)
        return SampledToken(token, logprobs, float(raw_logprobs[token]))

    @staticmethod
    def process_logits(raw: np.ndarray, seq: Sequence) -> np.ndarray:
        """Logit bias, penalties and min_tokens suppression, as vLLM applies them."""
        p = seq.params
        row = raw.astype(np.float32, copy=True)
        output = seq.output_token_ids
        if p.logit_bias:
            add_logit_bias(row, p.logit_bias)
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.token_ids, dtype=np.int64))
            values = row[seen]
            # at least 1e-4: a smaller penalty (the API allows any above 0) would divide the
            # float32 logits to inf, and the softmax of inf is NaN
            penalty = max(p.repetition_penalty, 1e-4)
            row[seen] = np.where(values > 0, values / penalty, values * penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and output:
            ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if len(output) < p.min_tokens:
            suppressed = list(p.stop_token_ids) + list(seq.request.stopping_eos_token_ids)
            if suppressed:
                row[suppressed] = -np.inf
        return row

    @staticmethod
    def _draw(row: np.ndarray, p: SamplingParams, generator: np.random.Generator) -> int:
        values = row / p.temperature
        probs = np.exp(values - values.max())  # unnormalized: the most likely token has 1
        if p.min_p > 0.0:  # as vLLM V1: over the whole distribution, before top-k and top-p
            probs = np.where(probs >= p.min_p, probs, 0.0)
        candidates = None  # None: the whole vocabulary
        if 0 < p.top_k < values.shape[0]:
            candidates = np.argpartition(values, -p.top_k)[-p.top_k :]
            probs = probs[candidates]
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            probs = probs[order]
            candidates = order if candidates is None else candidates[order]
            mass = np.cumsum(probs)
            # the smallest prefix whose mass reaches top_p (the token crossing it is kept)
            probs = probs[: int(np.searchsorted(mass, p.top_p * mass[-1])) + 1]
            candidates = candidates[: len(probs)]
        if candidates is not None:
            # the draw walks the kept tokens in id order, not in the order their values put them:
            # two near-equal values may swap between two computations that differ in the last
            # bits (another batch shape, a cached prefix, another BLAS kernel), and a seeded draw
            # would then land on the other token half the time. In id order it flips only when
            # it falls within that last-bit difference of a boundary.
            weights = np.zeros(values.shape[0], dtype=probs.dtype)
            weights[candidates] = probs
            probs, candidates = weights, None
        cumulative = np.cumsum(probs)
        choice = int(np.searchsorted(cumulative, generator.random() * cumulative[-1], side="right"))
        return min(choice, len(probs) - 1)
