"""P22: speculative decoding on llama.cpp (n-gram lookup, `--speculative auto`) against plain decoding,
on the embedded model's default F16 weights: input-grounded tasks (a license pasted in the prompt,
summarised, quoted, rewritten, answered as JSON for a schema), free generation, and the same tasks
through `llmcli serve` at 1 and 8 clients. `run.py` calls `speculation_figures`; by hand, the same
chat tasks against any OpenAI-compatible server (llama-server with and without `--spec-type`):

    python benchmarks/speculation.py http://127.0.0.1:8080 --clients 1 --tokens 256

Decode tok/s is (generated tokens - 1) / (time after the first token): the prompt's prefill is the
same work both ways, and llama.cpp reports its decoding ("eval") rate the same way.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "version": {"type": "string"}, "date": {"type": "string"}, "url": {"type": "string"},
    "sections": {"type": "array", "items": {"type": "string"}, "maxItems": 9}},
    "required": ["name", "version", "date", "url", "sections"]}
STORY = "Write a long, detailed story about a robot who learns to paint."


def grounded_tasks() -> dict[str, tuple[str, dict | None]]:
    """Name -> (user message, JSON schema or None): work whose answer repeats its input."""
    apache = (LICENSES / "Apache-2.0").read_text()
    gpl = (LICENSES / "GPL-3").read_text()
    paragraph = gpl[gpl.index("  The licenses for most software"):][:900]
    return {
        "summarise a license": ("Summarise this license text:\n\n" + apache[:2500], None),
        "quote from a license": (gpl[:3000] + "\n\nQuote the first two paragraphs of the Preamble.", None),
        "rewrite a paragraph": ("Rewrite this paragraph, changing 'software' to 'programs' and nothing else:\n\n"
                                + paragraph, None),
        "JSON for a schema": ("Give this license's name, version, date, URL and section titles as JSON.\n\n"
                              + apache[:3500], SCHEMA),
    }


def decode_rate(generation) -> float:
    return (generation.generated_tokens - 1) / (generation.seconds - generation.time_to_first_token)


def in_process(engine, message: str, schema: dict | None, mode: str, new_tokens: int):
    from llmcli.constraints import Constraint
    from llmcli.data import Prompt
    from llmcli.tasks.generate import GenerateOptions, generate

    constraint = Constraint("schema", json.dumps(schema)) if schema else None
    options = GenerateOptions(max_new_tokens=new_tokens, speculative=mode, constraint=constraint, chat=True)
    [result] = generate(engine, [Prompt(text=message)], options)
    return result


def paired(engine, message: str, schema: dict | None, new_tokens: int, repeats: int) -> dict:
    """Median decode rates of auto and off, runs alternating after a warm-up of each; the last runs'
    token ids and draft counts."""
    import statistics

    rates: dict[str, list[float]] = {"auto": [], "off": []}
    last = {}
    for round_ in range(repeats + 1):
        for mode in ("auto", "off"):
            result = in_process(engine, message, schema, mode, new_tokens)
            if round_:
                rates[mode].append(decode_rate(result))
            last[mode] = result
    return {"auto": statistics.median(rates["auto"]), "off": statistics.median(rates["off"]),
            "same": last["auto"].token_ids == last["off"].token_ids, "tokens": last["auto"].generated_tokens,
            "drafted": last["auto"].drafted, "accepted": last["auto"].accepted,
            "first_difference": next((i for i, (a, b) in enumerate(zip(last["auto"].token_ids, last["off"].token_ids))
                                      if a != b), None)}


def chat_load(client, model: str, clients: int, new_tokens: int, rounds: int) -> tuple[float, int, list[str]]:
    """`clients` threads, each sending every grounded task `rounds` times (greedy, non-streamed): wall
    seconds, completion tokens in all, and the texts of client 0 (in order)."""
    tasks = list(grounded_tasks().values())
    tokens, texts, lock = [0], [], threading.Lock()

    def user(number: int) -> None:
        for _ in range(rounds):
            for message, schema in tasks:
                extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}} \
                    if schema else {}
                answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}],
                                                        max_tokens=new_tokens, temperature=0, **extra)
                with lock:
                    tokens[0] += answer.usage.completion_tokens
                    if number == 0:
                        texts.append(answer.choices[0].message.content)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, tokens[0], texts


def main() -> None:
    parser = argparse.ArgumentParser(description="The grounded tasks against an OpenAI-compatible server.")
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from openai import OpenAI

    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=900)
    model = client.models.list().data[0].id
    chat_load(client, model, 1, 8, 1)  # warm-up
    seconds, tokens, texts = chat_load(client, model, args.clients, args.tokens, args.rounds)
    print(json.dumps({"clients": args.clients, "tok_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
                      "texts": texts}, indent=1))


if __name__ == "__main__":
    main()
