"""Speculative decoding on llama.cpp: drafts (n-gram lookup, a draft model) checked in one decode give
the output plain decoding gives, greedy and seeded, alone and in a batch, under a constraint and with
stop strings; sampling follows the model's distribution; rejected drafts leave no cells; `auto` stops
drafting where it does not pay; the counts reach --stats, --json, usage and /metrics."""

from __future__ import annotations

import json

import pytest

from conftest import GPL3, run_cli, write_tiny_gguf

APACHE = GPL3.with_name("Apache-2.0")

pytest.importorskip("llama_cpp")

PROMPTS = ["This License", "The GNU General Public License is a free, copyleft license for software",
           "Hi", "You may convey verbatim copies of the Program's source code as you receive it, in any medium",
           "Everyone is permitted to copy and distribute"]


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory):
    """The tiny GGUF's shape and vocabulary with other random weights: a draft model whose drafts the
    tiny model mostly rejects."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-other") / "tiny-other-f32.gguf", 256, seed=1)


def load(path):
    from llmcli.engines import choose_engine

    return choose_engine(str(path), "llama.cpp")


def generate_rows(engine, prompts, **options):
    """Rows of engine.generate and each row's (drafted, accepted)."""
    from llmcli.tasks.generate import GenerateOptions

    rows = engine.generate(prompts, GenerateOptions(**options), on_tokens=lambda tokens: None,
                           should_stop=lambda: False)
    return rows, list(engine.drafts_checked)


def test_greedy_with_lookup_equals_plain_decoding_alone_and_in_a_batch(tiny_gguf):
    engine = load(tiny_gguf)
    prompts = [engine.encode(text) for text in PROMPTS]
    plain, _ = generate_rows(engine, prompts, max_new_tokens=200, speculative="off")
    together, checked = generate_rows(engine, prompts, max_new_tokens=200, speculative="on")
    assert together == plain
    assert sum(drafted for drafted, _ in checked) > 0 and sum(accepted for _, accepted in checked) > 0
    for prompt, expected in zip(prompts, plain):
        [alone], _ = generate_rows(engine, [prompt], max_new_tokens=200, speculative="on")
        assert alone == expected


def test_greedy_with_a_draft_model_equals_plain_decoding(tiny_gguf, other_gguf):
    """The model as its own draft: every draft kept; another model's drafts: (almost) all rejected. The
    output is the plain one either way, in a batch and alone."""
    engine = load(tiny_gguf)
    prompts = [engine.encode(text) for text in PROMPTS]
    plain, _ = generate_rows(engine, prompts, max_new_tokens=60)
    engine.attach_draft(load(tiny_gguf))
    same, checked = generate_rows(engine, prompts, max_new_tokens=60, speculative="on")
    assert same == plain
    assert all(drafted > 0 and accepted == drafted for drafted, accepted in checked), checked
    engine.attach_draft(load(other_gguf))
    other, checked = generate_rows(engine, prompts, max_new_tokens=60, speculative="on")
    assert other == plain
    assert sum(d for d, _ in checked) > 100 and sum(a for _, a in checked) < sum(d for d, _ in checked) / 4
    [alone], _ = generate_rows(engine, prompts[3:4], max_new_tokens=60, speculative="on")
    assert alone == plain[3]


def test_a_seeded_sample_is_the_plain_one(tiny_gguf):
    """The sampler chain draws one random number per token wherever its logits come from, so a seeded
    sample checked against drafts is the same sample as without them. (Checking k drafts runs other
    kernel shapes, which move logits in their last bits: a draw next to a boundary can then change, seen
    once at token 31 of 40, so the samples are kept short, as the batching tests keep theirs.)"""
    engine = load(tiny_gguf)
    engine.attach_draft(load(tiny_gguf))
    prompt = engine.encode(PROMPTS[1])
    options = {"max_new_tokens": 16, "temperature": 1.3, "num_return_sequences": 3}
    engine.set_seed(9)
    plain, _ = generate_rows(engine, [prompt], **options)
    engine.set_seed(9)
    drafted, checked = generate_rows(engine, [prompt], **options, speculative="on")
    assert drafted == plain and len({tuple(row) for row in plain}) == 3
    assert all(d > 0 and 0 < a < d for d, a in checked), checked  # samples leave the greedy drafts


def test_samples_follow_the_model_distribution_under_forced_drafts(tiny_gguf, monkeypatch):
    """2048 seeded samples of three tokens (temperature 3, top-k 3: a vocabulary of three), the second
    token drafted as the likeliest one after the first: the first token's frequencies are the model's
    probabilities, and so are the third's after each (first, second) pair, whether the draft was kept
    (the third comes from the draft's row) or rejected (from the next step)."""
    import numpy as np

    from llmcli.engines import llama_sequences
    from llmcli.engines.llama_sequences import SequenceSet
    from llmcli.engines.llamacpp import log_softmax
    from llmcli.tasks.generate import GenerateOptions

    engine = load(tiny_gguf)
    prompt = engine.encode(PROMPTS[0])
    options = GenerateOptions(max_new_tokens=3, temperature=3.0, top_k=3)

    def distribution(tokens):
        engine.use_context(len(tokens) + 1)
        engine.feed(tokens, 0)
        logits = engine.logits_row(engine.context, -1).astype(np.float64) / 3.0
        top = np.argsort(-logits)[:3]
        return [int(t) for t in top], np.exp(log_softmax(logits[top]))

    def agrees(samples, tokens, probabilities):
        counts = np.array([samples.count(t) for t in tokens])
        expected = probabilities * len(samples)
        assert counts.sum() == len(samples), (tokens, counts)
        assert np.all(np.abs(counts - expected) <= 4 * np.sqrt(expected * (1 - probabilities)) + 2), (counts, expected)

    first, p_first = distribution(prompt)
    likeliest = {token: distribution(prompt + [token])[0][0] for token in first}

    class Forced:  # the drafter: the likeliest token after the first one
        matched = 0

        def propose(self, tokens, limit, ends=()):
            return [likeliest[tokens[-1]]][:limit] if len(tokens) == len(prompt) + 1 else []

    monkeypatch.setattr(llama_sequences, "NgramDrafter", Forced)
    samples, drafted = [], 0
    for begin in range(0, 2048, 256):
        sequences = SequenceSet(engine, 256 * (len(prompt) + 3), 256, 512)
        try:
            lives = [sequences.add(prompt, engine.sampler(options, prompt, seed=begin + n), 3, speculative="on",
                                   draft_max=4) for n in range(256)]
            for _ in range(3):
                sequences.step(engine.eos_ids)
            samples += [live.new for live in lives]
            drafted += sum(live.speculation.drafted for live in lives)
        finally:
            sequences.close()
    assert all(len(sample) == 3 for sample in samples) and drafted == len(samples)
    agrees([sample[0] for sample in samples], first, p_first)
    paths = set()
    for a in first:
        for b in set(sample[1] for sample in samples if sample[0] == a):
            third = [sample[2] for sample in samples if sample[:2] == [a, b]]
            if len(third) >= 120:
                agrees(third, *distribution(prompt + [a, b]))
                paths.add(b == likeliest[a])
    assert paths == {True, False}  # a kept draft and a rejected one were both checked


def test_rejected_drafts_leave_no_cells_and_a_cancelled_sequence_none(tiny_gguf, other_gguf):
    """After each step a speculating sequence's cells end at its position (drafts past the first
    mismatch removed), in the draft model's context too once cancelled; a cancelled sequence has none."""
    from llmcli.engines.llama_sequences import SequenceSet
    from llmcli.tasks.generate import GenerateOptions

    engine = load(tiny_gguf)
    engine.attach_draft(load(other_gguf))
    options = GenerateOptions(max_new_tokens=30)
    prompt = engine.encode(PROMPTS[3])
    sequences = SequenceSet(engine, 512, 2, 64)
    try:
        live = sequences.add(prompt, engine.sampler(options, prompt), 30, speculative="on", draft_max=6)
        memory = sequences.memory
        for _ in range(5):
            sequences.step(engine.eos_ids)
            assert engine.lib.llama_memory_seq_pos_max(memory, live.seq_id) == live.position - 1
        assert live.speculation.drafted > live.speculation.accepted
        sequences.cancel(live)
        assert engine.lib.llama_memory_seq_pos_max(memory, live.seq_id) == -1
        draft_memory = sequences.draft_model.memory
        assert engine.lib.llama_memory_seq_pos_max(draft_memory, live.seq_id) == -1
    finally:
        sequences.close()


def cli_json(*args) -> list[dict]:
    result = run_cli("generate", *args, "--engine", "llama.cpp", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


@pytest.mark.parametrize("extra", [("--choice", "Apache License", "--choice", "GNU General Public License"),
                                   ("--stop", "Program",)])
def test_a_constraint_and_stop_strings_give_the_same_text(tiny_gguf, extra):
    """The model as its own draft keeps every draft, so drafts cross the stop string and the
    constraint's forced tokens: the text is the plain one."""
    args = ("-m", tiny_gguf, "--no-chat", "-n", "40", *extra)
    text = "You may convey verbatim copies of the Program's source code as you receive it, in any medium"
    [plain] = cli_json(text, *args, "--speculative", "off")
    [drafted] = cli_json(text, *args, "--draft-model", tiny_gguf, "--speculative", "on")
    assert {k: v for k, v in drafted.items() if k not in ("seconds", "drafted", "accepted")} == \
        {k: v for k, v in plain.items() if k != "seconds"}
    assert drafted["drafted"] > 0 and "drafted" not in plain


def test_the_embedded_model_quoting_its_prompt_keeps_most_drafts_and_reports_them():
    """A real model summarising a license pasted in the prompt quotes it: with n-gram lookup (auto) the
    greedy text is the plain one, most drafts are kept, and --stats and --json report the counts."""
    prompt = "Summarise this license text:\n\n" + APACHE.read_text()[:2500]
    [plain] = cli_json(prompt, "-n", "96", "--speculative", "off")
    [drafted] = cli_json(prompt, "-n", "96", "--speculative", "auto")
    assert drafted["token_ids"] == plain["token_ids"]
    assert drafted["accepted"] >= 20 and drafted["accepted"] > 0.6 * drafted["drafted"], drafted
    result = run_cli("generate", prompt, "-n", "16", "--speculative", "on", "--stats")
    assert result.exit_code == 0, result.stderr
    assert "drafted tokens" in result.stderr and "accepted tokens" in result.stderr


def test_auto_stops_drafting_where_it_does_not_pay_and_probes_again():
    """A sequence whose drafts (after a long match) are rejected stops drafting, probes after 16 plain
    steps, then after 32; one whose drafts are kept goes on."""
    from llmcli.engines.llama_speculation import PROBE_AFTER, Speculation, extra_cost

    assert 2 < extra_cost(1, 8) < 3 and extra_cost(8, 8) > extra_cost(1, 8)  # 8 drafts cost more in a batch
    losing = Speculation("auto", 8, drafter=None)
    sizes = []
    for _ in range(80):
        size = losing.draft_length(1, 8, matched=8)
        sizes.append(size)
        if size:
            losing.checked(size, 0)
    first_rest = sizes.index(0)
    assert 1 <= first_rest <= 3
    probes = [i for i, size in enumerate(sizes) if size and i > first_rest]
    assert probes == [first_rest + PROBE_AFTER, first_rest + 3 * PROBE_AFTER + 1]  # then twice the rest
    winning = Speculation("auto", 8, drafter=None)
    for _ in range(60):
        size = winning.draft_length(1, 8, matched=8)
        assert size >= 4
        winning.checked(size, size)
    assert Speculation("on", 8, drafter=None).draft_length(64, 8) == 8  # "on" always drafts
    # a draft model as big as the target costs a target decode per drafted token: auto does not draft
    assert Speculation("auto", 8, drafter=None, draft_cost=1.0).draft_length(1, 8) == 0
    assert Speculation("auto", 8, drafter=None, draft_cost=0.05).draft_length(1, 8) > 0


def test_auto_never_drafts_what_cannot_pay():
    """The decision, not a timing. A 3-token match in a fresh sequence (a common phrase: "The capital of
    France" against the prompt's "capital of France? Answer in one sentence.") is not drafted, while a
    long match is; the same match with one token left to the answer's end is not; a draft stops at an
    end of generation (nothing after it is ever kept). Then the demo: the embedded model answers in 8
    tokens, drafting nothing in auto, where `on` drafts (and loses) a 7-token draft."""
    from llmcli.engines.llama_speculation import NgramDrafter, Speculation

    def fresh():
        return Speculation("auto", 12, NgramDrafter())

    assert fresh().draft_length(1, 12, matched=3) == 0
    assert fresh().draft_length(1, 12, matched=8) > 0 and fresh().draft_length(1, 12, matched=32) > 0
    assert fresh().draft_length(1, 1, matched=8) == 0
    drafter = NgramDrafter()
    assert drafter.propose([1, 2, 3, 4, 5, 99, 7, 8, 1, 2, 3], 12, ends={99}) == [4, 5, 99]
    assert drafter.matched == 3
    drafter = NgramDrafter()
    assert drafter.propose([9, 6, 1, 2, 3, 4, 5, 0, 9, 6, 1, 2, 3], 12) == [4, 5, 0, 9, 6, 1, 2, 3]
    assert drafter.matched == 5  # the 4-gram's match reaches back over the 9 before it
    question = "What is the capital of France? Answer in one sentence."
    [auto] = cli_json(question, "-n", "48")
    [always] = cli_json(question, "-n", "48", "--speculative", "on")
    assert auto["token_ids"] == always["token_ids"] and len(auto["token_ids"]) < 16
    assert always["drafted"] > 0 and always["accepted"] == 0 and auto["drafted"] == 0


def test_chat_turns_speculate_and_reuse_the_conversation(tiny_gguf_2k, monkeypatch):
    """Chat's next turn with speculation reuses the earlier turns' cells and answers as without it."""
    from llmcli.tasks.chat import ChatSession
    from llmcli.tasks.generate import GenerateOptions

    replies = {}
    for mode in ("off", "on"):
        engine = load(tiny_gguf_2k)
        engine.attach_draft(load(tiny_gguf_2k))
        session = ChatSession(engine, GenerateOptions(max_new_tokens=12, chat=True, speculative=mode))
        session.handle("Hello there", on_text=lambda text: None)
        if mode == "on":
            before = engine.turns.decoded
        session.handle("Tell me more", on_text=lambda text: None)
        replies[mode] = [m["content"] for m in session.history]
    assert replies["on"] == replies["off"]
    prompt = engine.encode_chat(session.history[:-1])
    assert engine.turns.decoded - before < len(prompt) / 2 + 2 * 12  # the first turn was not decoded again


@pytest.mark.parametrize("args, fragment", [
    (["--speculative", "sometimes"], "unknown --speculative 'sometimes'"),
    (["--draft-max", "0"], "--draft-max must be in 1..64"),
    (["--prompt-lookup", "4", "--speculative", "off"], "--speculative off turns proposing off"),
    (["--engine", "llama.cpp", "--draft-model", "some-hub/model"], "--draft-model runs on the hf engine only"),
])
def test_bad_speculation_options_are_one_line_errors(tiny_gguf, args, fragment):
    result = run_cli("generate", "hi", "-m", tiny_gguf, *args)
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("Error: ") and fragment in result.stderr.splitlines()[0], result.stderr


def test_serve_counts_drafts_in_usage_and_metrics(tiny_gguf):
    """A request answered with drafts (the model as its own draft) says how many were kept in OpenAI's
    completion_tokens_details, /metrics adds them up, and the text is the one --speculative off gives."""
    import urllib.request

    from test_serve import serving
    from test_serve_llama import metrics

    body = {"prompt": PROMPTS[3], "max_tokens": 40, "temperature": 0}

    def complete(server):
        request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    with serving("-m", tiny_gguf, "--draft-model", tiny_gguf, "--speculative", "on") as server:
        answer = complete(server)
        counted = metrics(server)
    with serving("-m", tiny_gguf, "--speculative", "off") as server:
        plain = complete(server)
    details = answer["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 20 and details["rejected_prediction_tokens"] == 0
    assert counted["llmcli:spec_decode_num_accepted_tokens_total"] == details["accepted_prediction_tokens"]
    assert counted["llmcli:spec_decode_num_draft_tokens_total"] == details["accepted_prediction_tokens"]
    assert answer["choices"][0]["text"] == plain["choices"][0]["text"]
    assert "completion_tokens_details" not in plain["usage"]
