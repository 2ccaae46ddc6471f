"""Scoring many short sequences that share a beginning on llama.cpp (fill-mask's candidate sentences, a
multiple-choice question's answers after its context):
the shared tokens are decoded once, into sequence 0, and each group of sequences gets a copy of those
cells (llama_memory_seq_cp only tags cells in one unified KV cache) and decodes only its own rest, all
of the group's rests in one batch. Every number is llama.cpp's own log-softmax of its logits, as
`LlamaCppEngine.token_logprobs` computes it; only the batch shapes differ from one sequence at a time.
"""

from __future__ import annotations

from typing import Any

from llmcli.engines.llama_sequences import common_prefix
from llmcli.engines.llamacpp import log_softmax
from llmcli.errors import DataError, ModelLoadError

GROUP = 64  # sequences decoded together after the shared part; 236 candidate sentences take 4 groups
BATCH = 512  # tokens per llama_decode


class SharedPrefixScorer:
    """`score(sequences)`: for each, the summed log-probability of its tokens after the first (each
    given all before it) and, with `rows`, the log-probabilities of the token that would follow it.
    `score_from(sequences, starts)`: the summed log-probability of each sequence's tokens from its start
    on, and whether each of them was the likeliest (lm-eval's loglikelihood and is_greedy)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.lib = engine, engine.lib
        self.decoded = 0  # tokens decoded so far (tests: the shared part counts once)

    def score(self, sequences: list[list[int]], rows: bool = False) -> list[tuple[float, Any]]:
        return [(total, last) for total, _, last in self.scores(sequences, [1] * len(sequences), rows)]

    def score_from(self, sequences: list[list[int]], starts: list[int]) -> list[tuple[float, bool]]:
        if any(not 1 <= start < len(sequence) for sequence, start in zip(sequences, starts)):
            raise ValueError("each sequence needs a token before its first scored one, and one to score")
        return [(total, greedy) for total, greedy, _ in self.scores(sequences, starts, False)]

    def scores(self, sequences: list[list[int]], starts: list[int], rows: bool) -> list[tuple[float, bool, Any]]:
        if not sequences:
            return []
        if any(not s for s in sequences):
            raise ValueError("an empty sequence has nothing to score")
        # at least one token of each is its own, so that its last row is its own decode's
        shared = min(min(common_prefix(sequences[0], s) for s in sequences), min(len(s) for s in sequences) - 1)
        longest_group = max(sum(len(s) - shared for s in sequences[i:i + GROUP])
                            for i in range(0, len(sequences), GROUP))
        context, batch = self.open(shared + longest_group, min(GROUP, len(sequences)) + 1)
        lib = self.lib
        try:
            memory = lib.llama_get_memory(context)
            prefix_scores, prefix_last = self.decode_shared(context, batch, sequences[0][:shared])
            results: list[tuple[float, bool, Any]] = []
            for begin in range(0, len(sequences), GROUP):
                group = sequences[begin:begin + GROUP]
                for seq_id in range(1, len(group) + 1):
                    lib.llama_memory_seq_cp(memory, 0, seq_id, 0, shared)
                results.extend(self.decode_rests(context, batch, group, starts[begin:begin + GROUP], shared,
                                                 prefix_scores, prefix_last, rows))
                for seq_id in range(1, len(group) + 1):
                    lib.llama_memory_seq_rm(memory, seq_id, -1, -1)
            return results
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(context)

    def open(self, cells: int, n_seq: int) -> tuple[Any, Any]:
        lib, engine = self.lib, self.engine
        params = lib.llama_context_default_params()
        params.n_ctx = -(-cells // 256) * 256
        params.n_batch = params.n_ubatch = BATCH
        params.n_seq_max = n_seq
        params.kv_unified = True  # copies of the shared cells are tags on the same cells
        params.n_threads = params.n_threads_batch = engine.threads
        params.no_perf = True
        context = lib.llama_init_from_model(engine.model, params)
        if not context:
            raise ModelLoadError(f"llama.cpp could not allocate a context of {params.n_ctx} tokens",
                                 "Use a shorter text or a smaller --top-k.")
        return context, lib.llama_batch_init(BATCH, 0, 1)

    def decode(self, context: Any, batch: Any, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq_id, wants logits) entries."""
        batch.n_tokens = len(entries)
        for i, (token, position, seq_id, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = seq_id
        code = self.lib.llama_decode(context, batch)
        self.decoded += len(entries)
        if code != 0:
            raise DataError(f"llama.cpp could not decode the batch (llama_decode returned {code})",
                            "Use a shorter text or a smaller --batch-size.")

    def row(self, context: Any, index: int) -> Any:
        return log_softmax(self.engine.logits_row(context, index))

    def decode_shared(self, context: Any, batch: Any, tokens: list[int]) -> tuple[list[tuple[float, bool]], Any]:
        """Each shared token's (log-probability, was the likeliest) from the second on, and the row that
        predicts the next token."""
        scores, last = [], None
        for begin in range(0, len(tokens), BATCH):
            chunk = tokens[begin:begin + BATCH]
            self.decode(context, batch, [(token, begin + i, 0, True) for i, token in enumerate(chunk)])
            for i in range(len(chunk)):
                last = self.row(context, i)
                if begin + i + 1 < len(tokens):
                    scores.append(scored(last, tokens[begin + i + 1]))
        return scores, last

    def decode_rests(self, context: Any, batch: Any, group: list[list[int]], starts: list[int], shared: int,
                     prefix_scores: list[tuple[float, bool]], prefix_last: Any,
                     rows: bool) -> list[tuple[float, bool, Any]]:
        # a sequence's last token needs logits only for the row that would follow it
        entries = [(sequence[p], p, seq_id + 1, rows or p + 1 < len(sequence)) for seq_id, sequence in enumerate(group)
                   for p in range(shared, len(sequence))]
        totals, greedy = [], []
        for sequence, start in zip(group, starts):  # the shared tokens' part, in the same order of additions
            own = prefix_scores[start - 1:] + ([scored(prefix_last, sequence[shared])] if prefix_last is not None and
                                               shared >= start else [])
            totals.append(sum_in_order(value for value, _ in own))
            greedy.append(all(best for _, best in own))
        lasts: list[Any] = [None] * len(group)
        for begin in range(0, len(entries), BATCH):
            chunk = entries[begin:begin + BATCH]
            self.decode(context, batch, chunk)
            for i, (_, position, seq_id, logits) in enumerate(chunk):
                if not logits:
                    continue
                sequence = group[seq_id - 1]
                logprobs = self.row(context, i)
                if position + 1 == len(sequence):
                    lasts[seq_id - 1] = logprobs
                elif position + 1 >= starts[seq_id - 1]:
                    value, best = scored(logprobs, sequence[position + 1])
                    totals[seq_id - 1] += value
                    greedy[seq_id - 1] = greedy[seq_id - 1] and best
        return list(zip(totals, greedy, lasts))


def scored(logprobs: Any, token: int) -> tuple[float, bool]:
    """A token's log-probability in a row, and whether it was the likeliest (lm-eval's greedy test)."""
    return float(logprobs[token]), int(logprobs.argmax()) == token


def sum_in_order(values: Any) -> float:
    total = 0.0
    for value in values:
        total += value
    return total
