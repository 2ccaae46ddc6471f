"""Many sequences at once on llama.cpp: batched greedy equals one sequence at a time, a seeded sample
does not depend on its neighbours, samples share their prompt's prefill, and each step is one decode."""

from __future__ import annotations

import pytest

from conftest import run_cli

pytest.importorskip("llama_cpp")

PROMPTS = ["This License", "The GNU General Public License is a free, copyleft license for software",
           "Hi", "You may convey verbatim copies of the Program's source code as you receive it, in any medium",
           "Everyone is permitted to copy and distribute"]


def generate_json(*args) -> list[dict]:
    result = run_cli("generate", *args, "--engine", "llama.cpp", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_batched_greedy_equals_one_sequence_at_a_time(tiny_gguf, prompt_file):
    together = generate_json("-f", prompt_file, "-m", tiny_gguf, "--no-chat", "-n", "24")  # default: one batch
    alone = generate_json("-f", prompt_file, "-m", tiny_gguf, "--no-chat", "-n", "24", "--batch-size", "1")
    assert [r["prompt"] for r in together] == PROMPTS
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]
    assert [(r["text"], r["finish_reason"], r["prompt_tokens"]) for r in together] == \
        [(r["text"], r["finish_reason"], r["prompt_tokens"]) for r in alone]
    assert len({tuple(r["token_ids"]) for r in together}) == len(PROMPTS)  # real, different continuations


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(tiny_gguf, prompt_file):
    """Sample k of prompt p gets seed + p * n + k wherever it runs: in a batch of every prompt's samples
    (sharing its prompt's prefill) or alone in a command of its own."""
    base = ("-m", tiny_gguf, "--no-chat", "-n", "16", "-t", "1.3")
    together = generate_json("-f", prompt_file, *base, "--seed", "5", "--num-return-sequences", "3")
    assert [(r["prompt"], r["index"]) for r in together] == [(p, k) for p in PROMPTS for k in range(3)]
    for p, prompt in enumerate(PROMPTS):
        for k in range(3):
            [alone] = generate_json(prompt, *base, "--seed", str(5 + p * 3 + k))
            assert together[p * 3 + k]["token_ids"] == alone["token_ids"], (p, k)
    assert len({tuple(r["token_ids"]) for r in together[:3]}) == 3


def test_samples_share_the_prefill_and_each_step_is_one_decode(tiny_gguf, monkeypatch):
    """Counted at llama_decode: the two prompts are decoded once each (not once per sample), every later
    step decodes each live sequence's last token in one call, and finished sequences leave."""
    from llmcli.engines import choose_engine
    from llmcli.tasks.generate import GenerateOptions

    engine = choose_engine(str(tiny_gguf), "llama.cpp")
    calls: list[int] = []
    real = engine.lib.llama_decode
    monkeypatch.setattr(engine.lib, "llama_decode", lambda context, batch: calls.append(batch.n_tokens) or real(context, batch))
    prompts = [engine.encode(PROMPTS[1]), engine.encode(PROMPTS[3])]
    engine.set_seed(11)
    steps: list[list[int]] = []
    rows = engine.generate(prompts, GenerateOptions(max_new_tokens=12, temperature=1.3, num_return_sequences=3),
                           on_tokens=steps.append, should_stop=lambda: False)
    assert len(rows) == 6 and all(0 < len(row) <= 12 for row in rows)
    assert calls[0] == len(prompts[0]) + len(prompts[1])  # one prefill for the six samples
    assert sum(calls) == calls[0] + sum(len(row) - 1 for row in rows)
    assert len(calls) == max(len(row) for row in rows) == len(steps)
    assert [len(step) for step in steps] == [sum(len(row) > i for row in rows) for i in range(len(steps))]


def test_each_row_of_a_batch_ends_at_its_stop_string(tiny_gguf):
    """Rows decoded together stop one by one, each at the token that completes a stop string in its
    own text, rather than all going on to the longest row's end (eval --tasks' generate_until)."""
    from llmcli.engines import choose_engine
    from llmcli.tasks.generate import GenerateOptions

    engine = choose_engine(str(tiny_gguf), "llama.cpp")
    prompts = [engine.encode(text) for text in PROMPTS]
    greedy = GenerateOptions(max_new_tokens=40, temperature=0.0, chat=False)
    alone = [engine.generate([prompt], greedy, on_tokens=lambda tokens: None, should_stop=lambda: False)[0]
             for prompt in prompts]
    stops = [engine.decode(row[3:5]) for row in alone[:3]]  # three rows' own text, a few tokens in
    ends = [next(n for n in range(1, len(row) + 1) if any(s in engine.decode(row[:n]) for s in stops))
            if any(s in engine.decode(row) for s in stops) else len(row) for row in alone]
    assert min(ends) < 8 and sum(ends) < sum(map(len, alone)) / 2
    rows = engine.generate(prompts, GenerateOptions(max_new_tokens=40, temperature=0.0, chat=False, stop=stops),
                           on_tokens=lambda tokens: None, should_stop=lambda: False)
    assert rows == [row[:end] for row, end in zip(alone, ends)]


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_decoding_ones(tiny_gguf, monkeypatch):
    """A batch never holds more than llama.cpp's batch size of tokens: a prompt longer than that is split
    over steps, and the others keep decoding meanwhile."""
    from llmcli.engines import choose_engine
    from llmcli.tasks.generate import GenerateOptions

    engine = choose_engine(str(tiny_gguf), "llama.cpp")
    monkeypatch.setattr("llmcli.engines.llamacpp.BATCH", 32)
    calls: list[int] = []
    real = engine.lib.llama_decode
    monkeypatch.setattr(engine.lib, "llama_decode", lambda context, batch: calls.append(batch.n_tokens) or real(context, batch))
    short, long = engine.encode("Hi"), engine.encode(" ".join(PROMPTS) * 2)[:100]
    options = GenerateOptions(max_new_tokens=8)
    rows = engine.generate([short, long], options, on_tokens=lambda ids: None, should_stop=lambda: False)
    assert max(calls) <= 32 and sum(calls) == len(short) + len(long) + sum(len(row) - 1 for row in rows)
    assert rows == [engine.generate([prompt], options, lambda ids: None, lambda: False)[0] for prompt in (short, long)]


def test_a_sample_whose_leader_is_cancelled_mid_prefill_goes_on_alone(tiny_gguf):
    """Two samples of one prompt, prefilled in chunks of 8: the first is cancelled (its client left)
    before the prompt is in; the second copies the cells decoded so far, decodes the rest itself, and
    ends with the greedy answer the prompt gets alone."""
    from llmcli.engines import choose_engine
    from llmcli.engines.llama_sequences import SequenceSet
    from llmcli.tasks.generate import GenerateOptions

    engine = choose_engine(str(tiny_gguf), "llama.cpp")
    options = GenerateOptions(max_new_tokens=10)
    prompt = engine.encode(PROMPTS[3])
    assert len(prompt) > 16
    [alone] = engine.generate([prompt], options, on_tokens=lambda tokens: None, should_stop=lambda: False)
    sequences = SequenceSet(engine, 512, 2, 8)
    try:
        leader = sequences.add(prompt, engine.sampler(options, prompt), 10)
        follower = sequences.add(prompt, engine.sampler(options, prompt), 10, share_prefill_of=leader)
        sequences.step(engine.eos_ids)
        assert 0 < leader.position < len(prompt) and not follower.new
        sequences.cancel(leader)
        for _ in range(50):
            if not sequences.live:
                break
            sequences.step(engine.eos_ids)
        assert follower.new == alone
    finally:
        sequences.close()


def lone_decode_rows(engine, prompt: list[int], idle: list[list[int]], afresh: bool):
    """The logits rows a lone greedy sequence samples from (16 tokens) in a server-sized set whose cache
    first holds `idle` prompts as idle entries; and the idle entries left when it starts."""
    import numpy as np

    from llmcli.engines.llama_sequences import SequenceSet
    from llmcli.tasks.generate import GenerateOptions

    options = GenerateOptions(max_new_tokens=16, temperature=0.0)
    sequences = SequenceSet(engine, 4096, 8, 512, keep_idle=8)
    rows = []
    sample = sequences.sample

    def recording(sequence, eos):
        rows.append(np.array(engine.logits_row(sequences.context, sequence.output)))
        return sample(sequence, eos)

    try:
        for tokens in idle:
            entry = sequences.add(tokens, engine.sampler(options, tokens), 1)
            while not entry.done:
                sequences.step(engine.eos_ids)
        sequences.sample = recording
        live = sequences.add(prompt, engine.sampler(options, prompt), 16, afresh=afresh)
        idle_left = len(sequences.idle)
        while not live.done:
            sequences.step(engine.eos_ids)
        return rows, idle_left
    finally:
        sequences.close()


def test_a_lone_sequence_afresh_decodes_as_on_a_fresh_cache():
    """The embedded model on 2 threads. Idle entries holding cells 0-219 put a chat's cells across cell
    256, where llama.cpp 0.3.36's attention sums a one-token decode in one cell range per thread once 512
    cells are in use: its logits differ from a fresh cache's (what made seeded server requests differ).
    With `afresh` (what the server asks for a seeded request on an idle server) the cache is emptied
    first, and every row it samples from is bit-identical to a fresh cache's."""
    from llmcli.engines import choose_engine

    engine = choose_engine(None, "llama.cpp", threads=2)
    filler = engine.encode("the cat sat on the mat " * 40, add_special=False)
    idle = [filler[:120], filler[60:160]]  # 220 cells: the second shares no cells with the first
    prompt = engine.encode_chat([{"role": "user", "content": "Tell me a short tale about a fox and a crow."}])
    fresh, _ = lone_decode_rows(engine, prompt, [], afresh=False)
    across, _ = lone_decode_rows(engine, prompt, idle, afresh=False)
    repeated, idle_left = lone_decode_rows(engine, prompt, idle, afresh=True)
    assert any((a != b).any() for a, b in zip(fresh, across)), "the layout no longer changes the logits"
    assert idle_left == 0 and len(repeated) == len(fresh) == 16
    assert all((a == b).all() for a, b in zip(fresh, repeated))
