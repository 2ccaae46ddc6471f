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
# The answer scorer's trees: llama.cpp's attention visits every cell of the context for every token (the
# mask only skips the arithmetic), so cells cost time: measured per token on F16 SmolLM2-135M, 2 cores,
# 1.5 ms with 256 cells in use, 1.7 ms with 512, 2.1 ms with 1024. A larger tree lets more questions
# share an opening they have in common, so a tree holds three paths like its first, from TREE_CELLS[0]
# to TREE_CELLS[1] cells (or one path longer than that).
TREE_CELLS = (256, 4096)


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

    def open(self, cells: int, n_seq: int, seq_ids: int = 1) -> tuple[Any, Any]:
        """A context of `cells` cells for `n_seq` sequences, and a batch whose tokens may each be in
        `seq_ids` of them."""
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
        engine.apply_adapter(context, engine.adapter)
        return context, lib.llama_batch_init(BATCH, 0, seq_ids)

    def decode(self, context: Any, batch: Any, entries: list[tuple[int, int, int | list[int], bool]]) -> None:
        """One llama_decode of (token, position, seq_id or seq_ids, wants logits) entries."""
        batch.n_tokens = len(entries)
        for i, (token, position, seq_ids, logits) in enumerate(entries):
            seq_ids = [seq_ids] if isinstance(seq_ids, int) else seq_ids
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, len(seq_ids), logits
            for k, seq_id in enumerate(seq_ids):
                batch.seq_id[i][k] = seq_id
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
    """`score_answers(pairs)`: for each (context, answer) pair, the answer's summed log-probability after
    the context and whether each of its tokens was the likeliest (lm-eval's loglikelihood).

    The pairs are decoded as prefix trees (`PrefixTree`, sized by `tree_cells`): a token that
    several pairs share (a question's context, before each of its answers; few-shot examples or
    instructions that open many questions; the first words of two answers) is decoded once, into one
    cell that belongs to all of their sequences, as llama.cpp's batched example shares its prompt. A
    pair's last token is only a target and is not decoded, as HFLM feeds (context + answer)[:-1].
    Logits are read only where a score needs them."""

    def score_answers(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        if any(not context or not answer for context, answer in pairs):
            raise ValueError("a pair needs a context and an answer of at least one token")
        if not pairs:
            return []
        # sorted, so that pairs sharing a beginning are neighbours, and each path's shared part is the
        # part it shares with the path before it
        order = sorted(range(len(pairs)), key=lambda n: pairs[n][0] + pairs[n][1][:-1])
        paths = [len(context) + len(answer) - 1 for context, answer in pairs]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        context, batch = self.open(max(map(tree_cells, paths)), SEQUENCES, SEQUENCES)
        try:
            tree = PrefixTree(tree_cells(paths[order[0]]))
            for number in order:
                if not tree.admits(*pairs[number]):
                    self.score_tree(context, batch, tree, results)
                    tree = PrefixTree(tree_cells(paths[number]))
                tree.add(number, *pairs[number])
            self.score_tree(context, batch, tree, results)
        finally:
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(context)
        return results

    def score_tree(self, context: Any, batch: Any, tree: "PrefixTree", results: list[tuple[float, bool]]) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(context), True)
        scores: dict[int, list[tuple[float, bool]]] = {number: [] for number in tree.pairs}
        nodes = list(range(len(tree.tokens)))
        for begin in range(0, len(nodes), BATCH):
            chunk = nodes[begin:begin + BATCH]
            self.decode(context, batch, [(tree.tokens[n], tree.positions[n], tree.sequences[n], n in tree.readers)
                                         for n in chunk])
            for i, node in enumerate(chunk):
                if node in tree.readers:
                    row = self.row(context, i)
                    for number, token in tree.readers[node]:
                        scores[number].append(scored(row, token))
        for number, own in scores.items():  # a pair's rows come in its tokens' order: a node's parent decodes first
            results[number] = (sum_in_order(value for value, _ in own), all(best for _, best in own))


class PrefixTree:
    """The tokens that some (context, answer) pairs need decoded, each once: node n is a token at a
    position, in the llama.cpp sequences of every path through it (a path: a context and all of its
    answer but the last token; pairs with the same path share its sequence). Paths are added sorted, so
    a path shares with the tree exactly what it shares with the path before it, and every node comes
    after its parent: decoding the nodes in order keeps each sequence's positions consecutive."""

    def __init__(self, cells: int) -> None:
        self.cells = cells  # the most nodes it takes (its first pair goes in whatever its size)
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.sequences: list[list[int]] = []
        self.readers: dict[int, list[tuple[int, int]]] = {}  # node: (pair, the answer token its row scores)
        self.pairs: list[int] = []
        self.paths = 0
        self.path: list[int] = []  # the last path added, and its nodes
        self.nodes: list[int] = []

    def admits(self, context: list[int], answer: list[int]) -> bool:
        """Whether the pair fits beside those already in: at most `cells` nodes and SEQUENCES paths."""
        path = context + answer[:-1]
        if not self.pairs or path == self.path:
            return True
        return (len(self.tokens) + len(path) - common_prefix(self.path, path) <= self.cells
                and self.paths < SEQUENCES)

    def add(self, number: int, context: list[int], answer: list[int]) -> None:
        path = context + answer[:-1]
        if not self.pairs or path != self.path:
            shared = common_prefix(self.path, path)
            sequence, self.paths = self.paths, self.paths + 1
            for node in self.nodes[:shared]:
                self.sequences[node].append(sequence)
            self.nodes = self.nodes[:shared]
            for position in range(shared, len(path)):
                self.nodes.append(len(self.tokens))
                self.tokens.append(path[position])
                self.positions.append(position)
                self.sequences.append([sequence])
            self.path = path
        # the answer's k-th token is scored on the row of the path's token before it
        for k, token in enumerate(answer):
            self.readers.setdefault(self.nodes[len(context) - 1 + k], []).append((number, token))
        self.pairs.append(number)


def tree_cells(path: int) -> int:
    """The most cells of a prefix tree whose first path has `path` tokens (see TREE_CELLS)."""
    low, high = TREE_CELLS
    return max(low, min(3 * path, high), path)


def scored(logprobs: Any, token: int) -> tuple[float, bool]:
    """A token's log-probability in a row, and whether it was the likeliest (lm-eval's greedy test)."""
    return float(logprobs[token]), int(logprobs.argmax()) == token


def sum_in_order(values: Any) -> float:
    """Left to right from 0.0, as a sum of a sequence's token log-probabilities is taken elsewhere."""
    total = 0.0
    for value in values:
        total += value
    return total
