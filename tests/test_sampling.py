"""OpenAI's sampling adjustments on both engines: presence and frequency penalties (over the generated
tokens only) and logit bias, checked step by step against plain forward passes."""

from __future__ import annotations

import pytest

from conftest import run_cli

# A prompt that repeats itself: a penalty that wrongly counted the prompt's tokens would change the output
PROMPT = "the the the License License"


@pytest.fixture(params=["llama.cpp", "hf"])
def tiny(request):
    """(engine, model): the tiny F32 GGUF on llama.cpp, the tiny Llama directory on hf."""
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        return "llama.cpp", str(request.getfixturevalue("tiny_gguf"))
    return "hf", str(request.getfixturevalue("tiny_llama"))


def greedy(tiny, *args: str, prompt: str = PROMPT) -> list[int]:
    return generated(tiny, *args, prompt=prompt)["token_ids"]


def generated(tiny, *args: str, prompt: str = PROMPT) -> dict:
    engine, model = tiny
    result = run_cli("generate", prompt, "-m", model, "--engine", engine, "--no-chat", "-n", "24", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return result.json_lines()[0]


def test_penalties_and_bias_take_the_token_openai_defines_at_every_step(tiny):
    """At each step the token taken maximises logit + bias - frequency × count - presence × (count > 0),
    the counts over the tokens generated before it (the prompt not counted), against the model's own
    log-probabilities of a plain forward pass."""
    from llmcli.engines import Window, choose_engine

    first = generated(tiny)
    # the prompt ends with what the model says next, so it holds the tokens the model wants: a penalty
    # that counted the prompt would push them down from the first step
    text = PROMPT + first["text"]
    plain = greedy(tiny, prompt=text)
    banned = plain[0]
    favoured = greedy(tiny, "--logit-bias", f"{banned}=-100", prompt=text)[2]  # taken once the first is banned
    assert favoured != banned
    presence, frequency = 0.8, 0.6
    output = greedy(tiny, "--presence-penalty", str(presence), "--frequency-penalty", str(frequency),
                    "--logit-bias", f"{banned}=-100", "--logit-bias", f"{favoured}=2.5", prompt=text)
    assert output != plain and banned not in output
    engine = choose_engine(tiny[1], tiny[0])
    prompt = engine.encode(text)
    vocabulary = engine.constraints.n_vocab
    _, tops = engine.token_logprobs(Window(prompt + output, len(output)), top=vocabulary)
    bias = {banned: -100.0, favoured: 2.5}
    counts: dict[int, int] = {}
    for step, (token, top) in enumerate(zip(output, tops)):
        adjusted = {t: logprob + bias.get(t, 0.0) - frequency * counts.get(t, 0) - presence * (t in counts)
                    for t, logprob in top}
        best = max(adjusted, key=adjusted.get)
        # a plain forward pass rounds in another batch shape than decoding: a near-tie may go either way
        assert token == best or adjusted[best] - adjusted[token] < 1e-4, (step, token, best)
        counts[token] = counts.get(token, 0) + 1


def test_the_penalties_do_not_count_the_prompt(tiny):
    """A token the prompt holds four times, biased to be the likeliest first token by a margin of 1:
    taken first, as OpenAI's penalties count only generated tokens (counting the prompt would take
    2 × 4 + 2 = 10 from it)."""
    from llmcli.engines import Window, choose_engine

    engine = choose_engine(tiny[1], tiny[0])
    prompt = "the the the the the License"
    ids = engine.encode(prompt)
    repeated = max(set(ids), key=ids.count)
    assert ids.count(repeated) >= 4
    _, [first] = engine.token_logprobs(Window(ids + [0], 1), top=engine.constraints.n_vocab)
    logprobs = dict(first)
    bias = max(logprobs.values()) - logprobs[repeated] + 1
    output = greedy(tiny, "--presence-penalty", "2", "--frequency-penalty", "2", "--logit-bias",
                    f"{repeated}={bias}", prompt=prompt)
    assert output[0] == repeated, (output, repeated)


@pytest.mark.parametrize("option", ["--presence-penalty", "--frequency-penalty"])
def test_each_penalty_alone_changes_repetitive_output(tiny, option):
    """Greedy output of a tiny model repeats itself (EOS banned, so it runs all 24 tokens); either
    penalty alone breaks the repeats."""
    from llmcli.engines import choose_engine

    no_eos = [f"--logit-bias={choose_engine(tiny[1], tiny[0]).eos_id}=-100"]
    plain = greedy(tiny, *no_eos)
    penalised = greedy(tiny, *no_eos, option, "2")
    assert len(set(plain)) < len(plain) and penalised != plain
    assert len(set(penalised)) > len(set(plain))


@pytest.mark.parametrize("args, fragment", [
    (["--presence-penalty", "2.5"], "--presence-penalty must be in [-2, 2], got 2.5"),
    (["--frequency-penalty", "-3"], "--frequency-penalty must be in [-2, 2], got -3.0"),
    (["--logit-bias", "12=150"], "--logit-bias 12=150.0: a bias must be in [-100, 100]"),
    (["--logit-bias", "twelve=1"], "bad --logit-bias 'twelve=1'"),
    (["--logit-bias", "12"], "bad --logit-bias '12'"),
    (["--logit-bias", "99999999=1"], "--logit-bias names token 99999999, outside this model's vocabulary"),
])
def test_bad_sampling_adjustments_are_one_line_errors(tiny_gpt2, args, fragment):
    result = run_cli("generate", "hi", "-m", tiny_gpt2, "-n", "2", *args)
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
