"""Scoring many short sequences that share a beginning on llama.cpp (fill-mask's candidate sentences,
lm-eval's answers after their question):
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
SEQUENCES = 256  # llama.cpp's most sequences in one context (LLAMA_MAX_SEQ)
CELLS = 4096  # KV cells of the answer scorer's context: its questions' contexts and answers at once


class SharedPrefixScorer:
    """`score(sequences)`: for each, the summed log-probability of its tokens after the first (each
    given all before it) and, with `rows`, the log-probabilities of the token that would follow it."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.lib = engine, engine.lib
        self.decoded = 0  # tokens decoded so far (tests: the shared part counts once)

    def score(self, sequences: list[list[int]], rows: bool = False) -> list[tuple[float, Any]]:
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
            prefix_total, prefix_last = self.decode_shared(context, batch, sequences[0][:shared])
            results: list[tuple[float, Any]] = []
            for begin in range(0, len(sequences), GROUP):
                group = sequences[begin:begin + GROUP]
                for seq_id in range(1, len(group) + 1):
                    lib.llama_memory_seq_cp(memory, 0, seq_id, 0, shared)
                results.extend(self.decode_rests(context, batch, group, shared, prefix_total, prefix_last, rows))
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

    def decode_shared(self, context: Any, batch: Any, tokens: list[int]) -> tuple[float, Any]:
        """The shared tokens' own summed log-probability, and the row that predicts the next token."""
        total, last = 0.0, None
        for begin in range(0, len(tokens), BATCH):
            chunk = tokens[begin:begin + BATCH]
            self.decode(context, batch, [(token, begin + i, 0, True) for i, token in enumerate(chunk)])
            for i in range(len(chunk)):
                last = self.row(context, i)
                if begin + i + 1 < len(tokens):
                    total += float(last[tokens[begin + i + 1]])
        return total, last

    def decode_rests(self, context: Any, batch: Any, group: list[list[int]], shared: int, prefix_total: float,
                     prefix_last: Any, rows: bool) -> list[tuple[float, Any]]:
        # a sequence's last token needs logits only for the row that would follow it
        entries = [(sequence[p], p, seq_id + 1, rows or p + 1 < len(sequence)) for seq_id, sequence in enumerate(group)
                   for p in range(shared, len(sequence))]
        totals = [prefix_total + (float(prefix_last[s[shared]]) if prefix_last is not None else 0.0) for s in group]
        lasts: list[Any] = [None] * len(group)
        for begin in range(0, len(entries), BATCH):
            chunk = entries[begin:begin + BATCH]
            self.decode(context, batch, chunk)
            for i, (_, position, seq_id, logits) in enumerate(chunk):
                if not logits:
                    continue
                sequence = group[seq_id - 1]
                last = position + 1 == len(sequence)
                logprobs = self.row(context, i)
                if last:
                    lasts[seq_id - 1] = logprobs
                else:
                    totals[seq_id - 1] += float(logprobs[sequence[position + 1]])
        return list(zip(totals, lasts))


class AnswerScorer(SharedPrefixScorer):
    """`score(questions)`: for each (context, answers) pair, each answer's summed log-probability after
    the context and whether each of its tokens was the likeliest (lm-eval's loglikelihood). Many
    questions go into one context at once: their contexts are decoded together, each its own sequence
    (one batch of up to 512 tokens, rather than a dozen tokens a decode), then every answer with a
    copy of its context's cells, all answers together. Logits are read only where a score needs them."""

    def score_questions(self, questions: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        if any(not context or any(not answer for answer in answers) for context, answers in questions):
            raise ValueError("a question needs a context and answers of at least one token")
        results: list[list[tuple[float, bool]]] = []
        context, batch = self.open(CELLS, SEQUENCES)
        try:
            for chunk in self.chunks(questions):
                results.extend(self.score_chunk(context, batch, chunk))
        finally:
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(context)
        return results

    @staticmethod
    def chunks(questions: list[tuple[list[int], list[list[int]]]]):
        """Runs of questions whose sequences (a context and its answers each) and cells fit one context."""
        chunk, sequences, cells = [], 0, 0
        for context, answers in questions:
            need_sequences, need_cells = 1 + len(answers), len(context) + sum(map(len, answers))
            if need_sequences > SEQUENCES or need_cells > CELLS:
                raise DataError(f"a question with {len(answers)} answers and {need_cells} tokens is too large to "
                                "score at once", "Use shorter questions or --engine hf.")
            if chunk and (sequences + need_sequences > SEQUENCES or cells + need_cells > CELLS):
                yield chunk
                chunk, sequences, cells = [], 0, 0
            chunk.append((context, answers))
            sequences, cells = sequences + need_sequences, cells + need_cells
        if chunk:
            yield chunk

    def score_chunk(self, context: Any, batch: Any, chunk: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        lib = self.lib
        memory = lib.llama_get_memory(context)
        lib.llama_memory_clear(memory, True)
        # the contexts, question q as sequence q: only its last token's row (the first answer token's) is read
        entries = [(token, p, q, p + 1 == len(ids)) for q, (ids, _) in enumerate(chunk) for p, token in enumerate(ids)]
        first_rows: dict[int, Any] = {}
        self.decode_reading(context, batch, entries, lambda entry, row: first_rows.__setitem__(entry[2], row))
        # the answers, each a sequence of its own holding a copy of its context's cells
        owners, entries = [], []
        for q, (ids, answers) in enumerate(chunk):
            for answer in answers:
                sequence = len(chunk) + len(owners)
                lib.llama_memory_seq_cp(memory, q, sequence, 0, len(ids))
                entries += [(token, len(ids) + k, sequence, k + 1 < len(answer)) for k, token in enumerate(answer)]
                owners.append((q, answer))
        scores = [[scored(first_rows[q], answer[0])] for q, answer in owners]

        def read(entry: tuple[int, int, int, bool], row: Any) -> None:
            _, position, sequence, _ = entry
            q, answer = owners[sequence - len(chunk)]
            scores[sequence - len(chunk)].append(scored(row, answer[position - len(chunk[q][0]) + 1]))

        self.decode_reading(context, batch, entries, read)
        results, at = [], 0
        for _, answers in chunk:
            results.append([(sum_in_order(value for value, _ in own), all(best for _, best in own))
                            for own in scores[at:at + len(answers)]])
            at += len(answers)
        return results

    def decode_reading(self, context: Any, batch: Any, entries: list[tuple[int, int, int, bool]],
                       read: Any) -> None:
        """Decode the entries 512 at a time; `read(entry, log-probability row)` for each that wants one,
        in order, before the next decode replaces the logits."""
        for begin in range(0, len(entries), BATCH):
            chunk = entries[begin:begin + BATCH]
            self.decode(context, batch, chunk)
            for i, entry in enumerate(chunk):
                if entry[3]:
                    read(entry, self.row(context, i))


def scored(logprobs: Any, token: int) -> tuple[float, bool]:
    """A token's log-probability in a row, and whether it was the likeliest (lm-eval's greedy test)."""
    return float(logprobs[token]), int(logprobs.argmax()) == token


def sum_in_order(values: Any) -> float:
    """Left to right from 0.0, as a sum of a sequence's token log-probabilities is taken elsewhere."""
    total = 0.0
    for value in values:
        total += value
    return total
