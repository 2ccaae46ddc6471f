"""Speculative decoding on llama.cpp: a sequence proposes tokens (drafts), the model checks them all in
the one decode it runs anyway, and every draft up to the first wrong one is kept (llama_sequences does
the decoding; this module proposes the drafts and decides when proposing pays).

- Two ways to propose, as llama-server has: n-gram lookup (`NgramDrafter`: the tokens that followed
  the last place the sequence's latest n tokens occurred, in its prompt or its own text; llama.cpp's
  `ngram-simple`, vLLM's and transformers' prompt lookup) and a draft model (`DraftModel`: a smaller
  GGUF with the same vocabulary, decoding greedily in a context of its own).
- Checking a draft is sampling: each of its positions is sampled with the sequence's own sampler
  chain in order, and the draft is kept while the samples equal it. For a proposer whose draft is one
  certain token (both of these: lookup is deterministic, the draft model greedy), that is the
  speculative-sampling rule (accept d with probability p(d), else draw from p without d), so the
  distribution is the model's; and the chain draws its random numbers as plain decoding would, so a
  seeded sample is the plain one, token for token, wherever the logits are the same.
- `auto` pays for itself or stops: verifying k drafts costs a decode of more tokens (measured here:
  on 2 cores a 9-token decode takes 3.4 one-token decodes of SmolLM2-135M F16), so a sequence drafts
  the length whose expected kept tokens (each kept with the chance its match length and its own record
  give, up to the first miss) most outweigh what the extra tokens cost every sequence of the step
  (`extra_cost`), and nothing when none does: a 3-token match in free text (a common phrase), a draft
  cut short by an end of generation or by the answer's last tokens. A sequence that stops probes
  again after a while, at growing intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the longest and shortest n-gram looked up: with 2, free text drafts often and is mostly rejected (measured:
# 17 of 123 kept); with 3, a summary keeps ~90% of its drafts
NGRAM_MAX, NGRAM_MIN = 4, 3
PROBE_AFTER = 16  # drafts passed up before an `auto` sequence that stopped drafting tries once more (doubling)
PROBE_AFTER_MAX = 512
MATCH_MAX = 32  # how far back a match is followed: far enough to tell copying from a common phrase
PRIOR_WEIGHT = 4  # checked tokens the match's prior counts for beside a sequence's own drafts
DRAFT_MODEL_ACCEPTANCE = 0.8  # a draft model's prior (a same-family draft keeps most): its own record soon outweighs it


class NgramDrafter:
    """Prompt lookup for one sequence: an index of where each n-gram of its tokens was last followed by
    a token, grown as the sequence grows."""

    def __init__(self) -> None:
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> the index of the token after its latest place
        self.indexed = 1
        self.matched = 0  # how many tokens the last proposal's match spans (MATCH_MAX at most)

    def propose(self, tokens: list[int], limit: int, ends: Any = ()) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier place of the longest suffix of `tokens`
        (NGRAM_MAX down to NGRAM_MIN tokens) seen before, up to the first of `ends` (end-of-generation
        tokens: nothing after one is ever kept); `matched` says how far back the two places agree."""
        while self.indexed < len(tokens):  # an n-gram counts once the token after it is known
            end = self.indexed
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self.follows[tuple(tokens[end - n:end])] = end
            self.indexed += 1
        self.matched = 0
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(tokens) > n:
                after = self.follows.get(tuple(tokens[-n:]))
                if after is not None:
                    self.matched = n
                    while (self.matched < MATCH_MAX and after - self.matched > 0
                           and tokens[after - self.matched - 1] == tokens[-self.matched - 1]):
                        self.matched += 1
                    draft = tokens[after:after + limit]
                    return draft[:next((i + 1 for i, token in enumerate(draft) if token in ends), len(draft))]
        return []


class DraftModel:
    """A smaller model with the target's vocabulary, drafting greedily for many sequences at once. Its
    context keeps each sequence's tokens (by the target's sequence id): a new step decodes only what
    was accepted since, as llama.cpp's common_speculative reuses its draft context."""

    def __init__(self, engine: Any, target: Any, n_ctx: int, n_seq: int, batch_size: int) -> None:
        from llmcli.engines.llama_sequences import unified_context

        self.engine, self.lib, self.batch_size = engine, engine.lib, batch_size
        lib = self.lib
        self.context = unified_context(engine, n_ctx, n_seq, batch_size)
        self.memory = lib.llama_get_memory(self.context)
        self.batch = lib.llama_batch_init(batch_size, 0, 1)
        self.held: dict[int, list[int]] = {}  # seq id -> the tokens its cells hold
        # a drafted token's cost in target decodes, by parameter count: a draft as big as the target never
        # pays (measured: SmolLM2's Q4_1 file drafting for its F16 weights, 97% kept, 0.66x)
        self.relative_cost = lib.llama_model_n_params(engine.model) / lib.llama_model_n_params(target.model)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.context)

    def empty(self) -> None:
        self.held.clear()
        self.lib.llama_memory_clear(self.memory, False)

    def forget(self, seq_id: int) -> None:
        self.held.pop(seq_id, None)
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def propose(self, wanted: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (seq id, tokens so far, limit): up to `limit` greedy tokens after `tokens`."""
        from llmcli.engines.llama_sequences import common_prefix

        drafts: list[list[int]] = [[] for _ in wanted]
        feeds: list[tuple[int, list[int], int]] = []  # (which, tokens to decode, their first position)
        for which, (seq_id, tokens, limit) in enumerate(wanted):
            keep = min(common_prefix(self.held.get(seq_id, []), tokens), len(tokens) - 1)  # one left: its logits
            self.lib.llama_memory_seq_rm(self.memory, seq_id, keep, -1)
            self.held[seq_id] = list(tokens[:keep])
            feeds.append((which, list(tokens[keep:]), keep))
        while feeds:
            greedy = self.decode(wanted, feeds)
            feeds = []
            for which, token in greedy:
                seq_id, _, limit = wanted[which]
                drafts[which].append(token)
                if len(drafts[which]) < limit and token not in self.engine.eos_ids:
                    feeds.append((which, [token], len(self.held[seq_id])))
        return drafts

    def decode(self, wanted: list[tuple[int, list[int], int]],
               feeds: list[tuple[int, list[int], int]]) -> list[tuple[int, int]]:
        """Decodes each feed's tokens (in chunks of the batch size); returns (which, the greedy next token)
        for each, read from the batch that decoded its last token (llama.cpp keeps one batch's logits)."""
        import numpy as np

        from llmcli.errors import DataError

        lib, batch = self.lib, self.batch
        greedy: list[tuple[int, int]] = []
        pending = [(which, tokens, start) for which, tokens, start in feeds if tokens]
        while pending:
            count, rows, rest = 0, [], []
            for which, tokens, start in pending:
                seq_id = wanted[which][0]
                chunk = tokens[:self.batch_size - count]
                for i, token in enumerate(chunk):
                    batch.token[count] = token
                    batch.pos[count] = start + i
                    batch.n_seq_id[count] = 1
                    batch.seq_id[count][0] = seq_id
                    batch.logits[count] = False
                    count += 1
                self.held[seq_id].extend(chunk)
                if len(chunk) < len(tokens):
                    rest.append((which, tokens[len(chunk):], start + len(chunk)))
                else:
                    batch.logits[count - 1] = True
                    rows.append((which, count - 1))
            batch.n_tokens = count
            if lib.llama_decode(self.context, batch) != 0:
                raise DataError("llama.cpp could not decode the draft model's batch",
                                "Use fewer new tokens or a smaller --parallel.")
            greedy += [(which, int(np.argmax(self.engine.logits_row(self.context, row)))) for which, row in rows]
            pending = rest
        return greedy


def step_time(tokens: int) -> float:
    """The time of one decode of `tokens` tokens, in decodes of one token: one token runs matrix-vector
    kernels, more run matrix-matrix ones that grow by about a fifth of a step per token (measured on
    SmolLM2-135M F16 on 2 cores: 13.1 ms for 1 token, 44.9 ms for 9, 67.6 ms for 17)."""
    return 1.0 if tokens <= 1 else 1.47 + 0.217 * tokens


def extra_cost(base: int, drafted: int) -> float:
    """What adding `drafted` tokens to a decode of `base` tokens costs, in tokens of output that the
    `base` sequences of the step lose. A fixed model rather than timings measured as it runs, so that
    whether a sequence drafts, and so its output, is the same on every run."""
    return base * (step_time(base + drafted) / step_time(base) - 1)


def expected_kept(acceptance: float, size: int) -> float:
    """Drafts kept of `size`, each kept with probability `acceptance` while the ones before it were
    (a draft is kept up to its first miss): acceptance + acceptance**2 + ... + acceptance**size."""
    return sum(acceptance ** i for i in range(1, size + 1))


def match_acceptance(matched: int) -> float:
    """The share of drafted tokens kept after an n-gram match spanning `matched` tokens, before the
    sequence has drafts of its own to go by. Measured (the embedded model, greedy, drafting always, 11
    tasks: 4 quoting a license, a story, 6 short questions): after a 3-token match, 61 drafts kept for
    28 misses over all tasks and about one kept per miss on the story and the questions (a common
    phrase, "capital of France", followed by the prompt's next words); after 6 or more, 72 kept for 1
    miss (the answer copies its input)."""
    return max(0.0, 1 - 1.35 / matched) if matched else DRAFT_MODEL_ACCEPTANCE


@dataclass
class Speculation:
    """One sequence's drafting: its mode, proposer, counts, and (in `auto`) whether it pays."""

    mode: str  # "auto" | "on"
    draft_max: int
    drafter: Any  # NgramDrafter, or the set's DraftModel
    draft_cost: float = 0.0  # a drafted token's cost in target decodes (a draft model's relative size)
    drafted: int = 0  # tokens proposed and checked
    accepted: int = 0  # of those, kept
    misses: int = 0  # drafts not kept whole (auto's estimate: kept / (kept + misses) per token)
    resting: int = 0  # drafts still to pass up before the next probe (auto)
    probe_after: int = PROBE_AFTER

    def acceptance(self, matched: int) -> float:
        """The chance that a drafted token is kept: the sequence's own record, with the match's prior
        counted as PRIOR_WEIGHT checked tokens."""
        prior = match_acceptance(matched)
        return (self.accepted + PRIOR_WEIGHT * prior) / (self.accepted + self.misses + PRIOR_WEIGHT)

    def draft_length(self, base: int, size: int, matched: int = 0) -> int:
        """How many of `size` proposed tokens to draft beside `base` others this step (0: none). "on":
        all. auto: the length whose expected kept tokens most outweigh its cost, if any does; a draft
        shorter than its cost (an answer about to end, a match cut at an end of generation) never pays."""
        if self.mode == "on":
            return size
        cost = lambda k: extra_cost(base, k) + base * k * self.draft_cost  # noqa: E731
        if cost(size) >= size:  # not even a draft kept whole would pay: no probing either
            return 0
        acceptance = self.acceptance(matched)
        gains = [(expected_kept(acceptance, k) - cost(k), k) for k in range(1, size + 1)]
        gain, best = max(gains)
        if gain > 0:  # pays now (a long match pays whatever the rest says)
            return best
        if self.resting > 0:
            self.resting -= 1
            return size if self.resting == 0 else 0  # the probe: one whole draft, whose result counts
        self.resting = self.probe_after  # rest, then probe once; each probe that fails rests twice as long
        self.probe_after = min(2 * self.probe_after, PROBE_AFTER_MAX)
        return 0

    def checked(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if accepted < drafted:
            self.misses += 1
        if accepted >= drafted / 2:
            self.probe_after = PROBE_AFTER
