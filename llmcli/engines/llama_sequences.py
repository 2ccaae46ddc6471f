"""Many sequences at once on llama.cpp: one llama_decode per step over every live sequence, each with
its own sequence id, positions, KV cells and sampler chain (so its own seed), as llama-server's slots
and vLLM's engine step do. The step API (`add`, `step`, `cancel`) is what `generate` drives.

- Prompts are prefilled in chunks inside the same batches as the decoding tokens (llama-server's
  order: every decoding sequence's one token first, then prompt tokens up to the batch size), so a
  long prompt never stalls the others for more than one step.
- Samples of one prompt share its prefill: the first decodes the prompt, the others get its KV cells
  (llama_memory_seq_cp, which only tags the cells: one unified KV cache) and sample from its logits.
- A finished or cancelled sequence leaves the cache (llama_memory_seq_rm) the step it ends.

Batched decoding runs matrix-matrix kernels where one sequence runs matrix-vector ones, so logits can
differ in the last bits: README "Many sequences at once" has the measured agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmcli.errors import DataError, ModelLoadError

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class Live:
    """One sequence in the set."""

    seq_id: int
    prompt: list[int]
    chain: Any  # its sampler chain (freed with the set)
    max_new_tokens: int
    pending: list[int] = field(default_factory=list)  # tokens still to decode (a prompt's rest, or the last sample)
    position: int = 0  # the position of pending[0]
    new: list[int] = field(default_factory=list)
    leader: "Live | None" = None  # the sequence whose prefill this one shares
    output: int | None = None  # where this step's batch holds its logits
    done: bool = False


class SequenceSet:
    """Live sequences on one llama.cpp context of `n_ctx` cells shared by up to `n_seq` sequences."""

    def __init__(self, engine: Any, n_ctx: int, n_seq: int, batch_size: int) -> None:
        lib = engine.lib
        self.lib, self.engine, self.batch_size = lib, engine, batch_size
        params = lib.llama_context_default_params()
        params.n_ctx = -(-n_ctx // 256) * 256
        params.n_batch = params.n_ubatch = batch_size
        params.n_seq_max = n_seq
        params.kv_unified = True  # one pool of cells: samples of a prompt share its cells
        params.n_threads = params.n_threads_batch = engine.threads
        params.no_perf = True
        self.context = lib.llama_init_from_model(engine.model, params)
        if not self.context:
            raise ModelLoadError(f"llama.cpp could not allocate a context of {params.n_ctx} tokens for {n_seq} "
                                 "sequences", "Use a smaller --batch-size or fewer new tokens.")
        self.memory = lib.llama_get_memory(self.context)
        self.batch = lib.llama_batch_init(batch_size, 0, 1)
        self.free_ids = list(range(n_seq))
        self.live: list[Live] = []
        self.chains: list[Any] = []

    def close(self) -> None:
        for chain in self.chains:
            self.lib.llama_sampler_free(chain)
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.context)

    def add(self, prompt: list[int], chain: Any, max_new_tokens: int, share_prefill_of: Live | None = None) -> Live:
        """A new sequence; with `share_prefill_of`, another sample of that sequence's prompt."""
        sequence = Live(self.free_ids.pop(0), prompt, chain, max_new_tokens)
        self.chains.append(chain)
        sequence.leader = share_prefill_of
        if share_prefill_of is None:
            sequence.pending = list(prompt)
        self.live.append(sequence)
        return sequence

    def cancel(self, sequence: Live) -> None:
        """Out of the set and of the cache now; its cells are free for the next step."""
        if sequence.done:
            return
        sequence.done = True
        self.live.remove(sequence)
        self.lib.llama_memory_seq_rm(self.memory, sequence.seq_id, -1, -1)
        self.free_ids.append(sequence.seq_id)

    def step(self, eos: Any) -> list[tuple[Live, int]]:
        """One llama_decode over every live sequence's next tokens; returns the tokens sampled (in the
        order the sequences were added). A sequence ends at EOS or its max_new_tokens."""
        lib, batch = self.lib, self.batch
        decoding = [s for s in self.live if s.new and s.pending]
        prefilling = [s for s in self.live if not s.new and s.pending]
        count = 0
        for sequence in decoding + prefilling:
            room = self.batch_size - count
            if room <= 0:
                break
            chunk = sequence.pending[:room]
            for i, token in enumerate(chunk):
                batch.token[count] = token
                batch.pos[count] = sequence.position + i
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = sequence.seq_id
                batch.logits[count] = False
                count += 1
            sequence.pending = sequence.pending[len(chunk):]
            sequence.position += len(chunk)
            sequence.output = None
            if not sequence.pending:  # its last token: the logits it samples from
                batch.logits[count - 1] = True
                sequence.output = count - 1
        if count == 0:
            return []
        batch.n_tokens = count
        code = lib.llama_decode(self.context, batch)
        if code != 0:
            raise DataError(f"llama.cpp could not decode the batch (llama_decode returned {code})",
                            "Use a smaller --batch-size or fewer new tokens.")
        sampled: list[tuple[Live, int]] = []
        for sequence in self.live:
            leader = sequence.leader
            if leader is not None and not sequence.new and not leader.new and leader.output is not None:
                # the leader's prompt is in the cache now: share its cells and sample from its logits
                lib.llama_memory_seq_cp(self.memory, leader.seq_id, sequence.seq_id, -1, -1)
                sequence.position, sequence.output = len(sequence.prompt), leader.output
        for sequence in self.live:
            if sequence.output is not None:
                sampled.append((sequence, lib.llama_sampler_sample(sequence.chain, self.context, sequence.output)))
        for sequence, token in sampled:
            sequence.output = None
            sequence.new.append(token)
            if token in eos or len(sequence.new) >= sequence.max_new_tokens:
                self.cancel(sequence)
            else:
                sequence.pending = [token]
        return sampled
