"""Many sequences at once on llama.cpp: one llama_decode per step over every live sequence, each with
its own sequence id, positions, KV cells and sampler chain (so its own seed), as llama-server's slots
and vLLM's engine step do. The step API (`add`, `step`, `cancel`) is what `generate` drives.

- Prompts are prefilled in chunks inside the same batches as the decoding tokens (llama-server's
  order: every decoding sequence's one token first, then prompt tokens up to the batch size), so a
  long prompt never stalls the others for more than one step.
- Samples of one prompt share its prefill: the first decodes the prompt, the others get its KV cells
  (llama_memory_seq_cp, which only tags the cells: one unified KV cache) and sample from its logits.
- A finished or cancelled sequence leaves the live set the step it ends. Without a prefix cache
  (`keep_idle=0`, what `generate` uses) its cells are freed then (llama_memory_seq_rm); with one (the
  server), its cells stay as an idle entry, up to `keep_idle` of them, least recently used evicted.
- Prefix reuse: a new sequence whose prompt starts with tokens some sequence's cells hold (an idle
  entry, or a live sequence's decoded part) gets those cells by llama_memory_seq_cp and decodes only
  the rest, as llama-server's prompt cache does: a chat client resending its conversation, a shared
  system prompt.
- Where a sequence's cells lie changes its logits in the last bits: llama.cpp's CPU flash attention
  (0.3.36) sums a one-token decode over the cells in one range per thread once the cache's used span
  (n_kv) reaches 512 cells, a prompt of 64 tokens or more in tiles of 64 cells, and otherwise in cell
  order (so cells out of position order, filling holes, sum differently). A sequence that must repeat
  (`afresh`: a seeded sample) and starts with nothing else live gets an emptied cache first, so its
  cells lie as on a fresh context: from cell 0, in order.

- Speculation (llama_speculation): a decoding sequence may carry drafted tokens after its last sample;
  the step decodes them with logits at each, samples them in order with the sequence's own chain,
  keeps the drafts up to the first sample that differs, and removes the cells of the rest.

Batched decoding runs matrix-matrix kernels where one sequence runs matrix-vector ones, so logits can
differ in the last bits: docs/llama-batching.md has the measured agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.engines.llama_speculation import DraftModel, NgramDrafter, Speculation
from llmcli.errors import DataError, ModelLoadError

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass(eq=False)  # compared and hashed by identity: a key of the server's table of live sequences
class Live:
    """One sequence in the set."""

    seq_id: int
    prompt: list[int]
    chain: Any  # its sampler chain (freed when the sequence ends)
    max_new_tokens: int
    pending: list[int] = field(default_factory=list)  # tokens still to decode (a prompt's rest, or the last sample)
    position: int = 0  # the position of pending[0]
    new: list[int] = field(default_factory=list)
    leader: "Live | None" = None  # the sequence whose prefill this one shares
    output: int | None = None  # where this step's batch holds its logits
    done: bool = False
    reused: int = 0  # prompt tokens whose cells came from the prefix cache (not decoded)
    matcher: Any = None  # its structured-output constraint (llmcli.constraints.Matcher), if any
    speculation: Any = None  # its drafting (llama_speculation.Speculation), if it speculates
    draft: list[int] = field(default_factory=list)  # this step's drafted tokens, after pending[0]
    adapter: str | None = None  # the engine's LoRA adapter it runs with (None: the base model)

    def cached_tokens(self) -> list[int]:
        """The tokens its cells hold, in order (a sampled token is decoded the step after)."""
        return (self.prompt + self.new)[:self.position]


def common_prefix(a: list[int], b: list[int]) -> int:
    size = min(len(a), len(b))
    n = 0
    while n < size and a[n] == b[n]:
        n += 1
    return n


def unified_context(engine: Any, n_ctx: int, n_seq: int, batch_size: int) -> Any:
    """A llama.cpp context of `n_ctx` cells in one pool (kv_unified: samples of a prompt share its
    cells) for up to `n_seq` sequences, decoding batches of up to `batch_size` tokens."""
    lib = engine.lib
    params = lib.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = batch_size
    params.n_seq_max = n_seq
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = engine.threads
    params.no_perf = True
    context = lib.llama_init_from_model(engine.model, params)
    if not context:
        raise ModelLoadError(f"llama.cpp could not allocate a context of {n_ctx} tokens for {n_seq} sequences "
                             f"({Path(engine.path).name})", "Use a smaller --batch-size or fewer new tokens.")
    return context


class SequenceSet:
    """Live sequences on one llama.cpp context of `n_ctx` cells shared by up to `n_seq` sequences."""

    def __init__(self, engine: Any, n_ctx: int, n_seq: int, batch_size: int, keep_idle: int = 0) -> None:
        lib = engine.lib
        self.lib, self.engine, self.batch_size = lib, engine, batch_size
        self.n_ctx, self.n_seq = -(-n_ctx // 256) * 256, n_seq + keep_idle
        self.context = unified_context(engine, self.n_ctx, self.n_seq, batch_size)
        self.memory = lib.llama_get_memory(self.context)
        self.batch = lib.llama_batch_init(batch_size, 0, 1)
        self.free_ids = list(range(n_seq + keep_idle))
        self.live: list[Live] = []
        self.keep_idle = keep_idle
        self.idle: dict[int, list[int]] = {}  # seq id -> the tokens its cells hold; oldest first
        self.idle_adapters: dict[int, str | None] = {}  # seq id -> the adapter its idle cells were computed with
        self.turn = 0  # steps so far: sequences of different adapters take turns (one adapter per llama_decode)
        self.decoded = 0  # tokens decoded so far (prompt and sampled), for tests and metrics
        self.draft_model: DraftModel | None = None  # made when a sequence first drafts with engine.draft

    def close(self) -> None:
        for sequence in self.live:
            self.lib.llama_sampler_free(sequence.chain)
        if self.draft_model is not None:
            self.draft_model.close()
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.context)

    def add(self, prompt: list[int], chain: Any, max_new_tokens: int, share_prefill_of: Live | None = None,
            reuse_prefix: bool = False, matcher: Any = None, speculative: str = "off",
            draft_max: int = 0, afresh: bool = False, adapter: str | None = "engine") -> Live:
        """A new sequence. With `share_prefill_of` (still prefilling), another sample of that sequence's
        prompt, sharing its prefill; with `reuse_prefix`, the longest prefix of the prompt any
        sequence's cells hold is copied, not decoded. `speculative` "auto" or "on" drafts up to
        `draft_max` tokens a step: with the engine's draft model if it has one, else n-gram lookup.
        With `afresh` and no sequence live, the cache is emptied first (its idle entries dropped), so
        that the sequence decodes as on a fresh context. `adapter`: the engine's LoRA adapter it runs with
        (None: the base model; by default the engine's own)."""
        adapter = self.engine.adapter if adapter == "engine" else adapter
        if afresh and not self.live:
            self.empty_cache()
        if share_prefill_of is not None and (share_prefill_of.new or share_prefill_of.done):
            share_prefill_of, reuse_prefix = None, True  # its prompt is decoded already: copy its cells
        source, shared = self.longest_prefix(prompt, adapter) if reuse_prefix else (None, 0)
        if not self.free_ids:
            self.evict_idle(keep=source)
        sequence = Live(self.free_ids.pop(0), prompt, chain, max_new_tokens, matcher=matcher, adapter=adapter)
        if speculative != "off" and draft_max > 0:
            drafter = self.drafting_model() if getattr(self.engine, "draft", None) is not None else NgramDrafter()
            sequence.speculation = Speculation(speculative, draft_max, drafter,
                                               getattr(drafter, "relative_cost", 0.0))
        sequence.leader = share_prefill_of
        if share_prefill_of is None:
            if shared:
                self.lib.llama_memory_seq_cp(self.memory, source, sequence.seq_id, 0, shared)
                if source in self.idle:  # used again: now the most recent
                    self.idle[source] = self.idle.pop(source)
            sequence.pending, sequence.position, sequence.reused = list(prompt[shared:]), shared, shared
        self.live.append(sequence)
        return sequence

    def drafting_model(self) -> DraftModel:
        if self.draft_model is None:
            self.draft_model = DraftModel(self.engine.draft, self.engine, self.n_ctx, self.n_seq, self.batch_size)
        return self.draft_model

    def longest_prefix(self, prompt: list[int], adapter: str | None = None) -> tuple[int | None, int]:
        """The sequence id whose cells hold the longest prefix of `prompt` computed with `adapter`, and its
        length; at least the prompt's last token is left to decode, for the logits of the first sample."""
        best, size = None, 0
        holders = [(seq_id, tokens) for seq_id, tokens in self.idle.items() if self.idle_adapters[seq_id] == adapter]
        holders += [(s.seq_id, s.cached_tokens()) for s in self.live if s.leader is None and s.adapter == adapter]
        for seq_id, tokens in holders:
            shared = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if shared > size:
                best, size = seq_id, shared
        return best, size

    def empty_cache(self) -> None:
        """With nothing live: every idle entry dropped, and the cache's cells and search head reset
        (llama_memory_clear; seq_rm leaves the head where the last free cell was), as in a new context."""
        self.idle.clear()
        self.lib.llama_memory_clear(self.memory, False)
        self.free_ids = list(range(self.n_seq))
        if self.draft_model is not None:  # its greedy drafts set the verify steps' shapes
            self.draft_model.empty()

    def evict_idle(self, keep: int | None = None) -> bool:
        """Frees the least recently used idle entry (not `keep`); False when there is none."""
        for seq_id in self.idle:
            if seq_id != keep:
                del self.idle[seq_id]
                self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                self.free_ids.append(seq_id)
                return True
        return False

    def cancel(self, sequence: Live) -> None:
        """Out of the set now: its cells are freed for the next step, or kept as an idle prefix entry."""
        if sequence.done:
            return
        sequence.done = True
        self.live.remove(sequence)
        self.lib.llama_sampler_free(sequence.chain)  # a server's sequences come and go: free each as it ends
        if self.draft_model is not None:
            self.draft_model.forget(sequence.seq_id)
        for follower in self.live:  # samples still waiting for this one's prefill copy what it has
            if follower.leader is sequence:
                follower.leader = None
                kept = min(sequence.position, len(follower.prompt) - 1)  # one token left: its logits to sample
                self.lib.llama_memory_seq_cp(self.memory, sequence.seq_id, follower.seq_id, 0, kept)
                follower.pending, follower.position = follower.prompt[kept:], kept
        if self.keep_idle and sequence.position:
            self.idle[sequence.seq_id] = sequence.cached_tokens()
            self.idle_adapters[sequence.seq_id] = sequence.adapter
            while len(self.idle) > self.keep_idle:
                self.evict_idle()
        else:
            self.lib.llama_memory_seq_rm(self.memory, sequence.seq_id, -1, -1)
            self.free_ids.append(sequence.seq_id)

    def step(self, eos: Any) -> list[tuple[Live, list[int]]]:
        """One llama_decode over every live sequence's next tokens (and drafts); returns the tokens each
        sequence got (in the order the sequences were added): one, or with drafts kept, more. A
        sequence ends at EOS or its max_new_tokens."""
        lib, batch = self.lib, self.batch
        adapter = self.adapter_to_step()
        decoding = [s for s in self.live if s.new and s.pending and s.adapter == adapter]
        prefilling = [s for s in self.live if not s.new and s.pending and s.adapter == adapter]
        self.propose(decoding)
        count = 0
        for sequence in decoding + prefilling:
            room = self.batch_size - count
            if room <= 0:
                sequence.draft = []
                continue
            sequence.draft = sequence.draft[:room - 1]
            chunk = sequence.pending[:room] + sequence.draft
            for i, token in enumerate(chunk):
                batch.token[count] = token
                batch.pos[count] = sequence.position + i
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = sequence.seq_id
                batch.logits[count] = False
                count += 1
            sequence.pending = sequence.pending[len(chunk) - len(sequence.draft):]
            sequence.position += len(chunk)
            sequence.output = None
            if not sequence.pending:  # its last token (and each draft): the logits it samples from
                sequence.output = count - 1 - len(sequence.draft)
                for row in range(sequence.output, count):
                    batch.logits[row] = True
        if count == 0:
            return []
        batch.n_tokens = count
        self.engine.apply_adapter(self.context, adapter)
        code = lib.llama_decode(self.context, batch)
        while code == 1 and self.evict_idle():  # no room in the cache: idle prefixes make way
            code = lib.llama_decode(self.context, batch)
        self.decoded += count
        if code != 0:
            raise DataError(f"llama.cpp could not decode the batch (llama_decode returned {code})",
                            "Use a smaller --batch-size or fewer new tokens.")
        for sequence in self.live:
            leader = sequence.leader
            if leader is not None and not sequence.new and not leader.new and leader.output is not None:
                # the leader's prompt is in the cache now: share its cells and sample from its logits
                lib.llama_memory_seq_cp(self.memory, leader.seq_id, sequence.seq_id, -1, -1)
                sequence.position, sequence.output = len(sequence.prompt), leader.output
                sequence.leader = None
        sampled = [(sequence, self.sample(sequence, eos)) for sequence in list(self.live) if sequence.output is not None]
        for sequence, tokens in sampled:
            sequence.output = None
            if tokens[-1] in eos or len(sequence.new) >= sequence.max_new_tokens:
                self.cancel(sequence)
            else:
                sequence.pending = [tokens[-1]]
        return sampled

    def adapter_to_step(self) -> str | None:
        """The adapter whose sequences this step decodes: llama.cpp runs one set of adapters per decode, so
        sequences of different adapters take turns, one step each, as llama-server's slots do."""
        adapters = list(dict.fromkeys(s.adapter for s in self.live if s.pending))
        if len(adapters) <= 1:
            return adapters[0] if adapters else self.engine.adapter
        self.turn += 1
        return adapters[self.turn % len(adapters)]

    def sample(self, sequence: Live, eos: Any) -> list[int]:
        """The sequence's tokens from this step's logits: one, then one more for each draft its samples
        equal. Samples sharing a row (a prompt's samples) start from the same state: the same mask.
        The cells of drafts not kept are removed."""
        lib, draft = self.lib, sequence.draft
        tokens: list[int] = []
        kept = 0  # drafts equal to the samples
        for i in range(len(draft) + 1):
            row = sequence.output + i
            if sequence.matcher:
                sequence.matcher.mask(self.engine.logits_row(self.context, row))
            token = lib.llama_sampler_sample(sequence.chain, self.context, row)
            tokens.append(token)
            sequence.new.append(token)
            if sequence.matcher:
                end = sequence.matcher.accept(token, eos, self.engine.eos_id,
                                              sequence.max_new_tokens - len(sequence.new))
                if end is not None:
                    token = end
                    tokens.append(end)
                    sequence.new.append(end)
            if i < len(draft) and token == draft[i]:
                kept += 1
            else:
                break
            if token in eos or len(sequence.new) >= sequence.max_new_tokens:
                break
        if draft:
            sequence.position -= len(draft) - kept  # the cells after the last kept draft go
            lib.llama_memory_seq_rm(self.memory, sequence.seq_id, sequence.position, -1)
            sequence.speculation.checked(len(draft), kept)
            sequence.draft = []
        return tokens

    def propose(self, decoding: list[Live]) -> None:
        """Drafts for the decoding sequences that speculate and, in auto, find that it pays this step."""
        wanted: list[tuple[Live, int]] = []
        base = len(decoding)
        for sequence in decoding:
            speculation = sequence.speculation
            limit = min(speculation.draft_max if speculation else 0,
                        sequence.max_new_tokens - len(sequence.new) - 1)
            if limit <= 0:
                continue
            if isinstance(speculation.drafter, NgramDrafter):
                draft = speculation.drafter.propose(sequence.prompt + sequence.new, limit, self.engine.eos_ids)
                size = speculation.draft_length(base, len(draft), speculation.drafter.matched) if draft else 0
                sequence.draft = draft[:size]
                base += size
            else:
                size = speculation.draft_length(base, limit)
                if size:
                    wanted.append((sequence, size))
                    base += size
        if wanted:
            drafts = self.draft_model.propose([(s.seq_id, s.prompt + s.new, limit) for s, limit in wanted])
            for (sequence, _), draft in zip(wanted, drafts):
                sequence.draft = draft
