"""A chat load against any OpenAI-compatible server: `clients` concurrent streaming clients sending
`requests` greedy chat requests ("Write a long story about ...") of `tokens` tokens. It is P14's load
in `run.py`, and by hand the comparison with llama-server on the same file and threads:

    python benchmarks/serve_load.py http://127.0.0.1:8080 --clients 8 --requests 16 --tokens 64

Prints aggregate generated tok/s, time to first token p50/p99 and request latency p50 as JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

TOPICS = ["a robot who learns to paint", "a lighthouse keeper", "the first city on Mars", "a lost dog",
          "a chess tournament", "a baker in Paris", "a storm at sea", "an old library", "a mountain village",
          "a time traveller", "a jazz musician", "a desert caravan", "a school for wizards", "a deep-sea station",
          "a garden in winter", "a train across Siberia"]


def stream_chat(client, model: str, messages: list[dict], max_tokens: int) -> tuple[str, float, float, int]:
    """One streamed greedy chat request: its text, time to the first content piece, total time, and
    the generated tokens (the usage chunk's count; else one per content chunk, as llama-server sends)."""
    began = time.perf_counter()
    first, pieces, tokens = None, [], 0
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(pieces), (first or time.perf_counter()) - began, time.perf_counter() - began, tokens or len(pieces)


def chat_load(client, model: str | list[str], clients: int, requests: int,
              tokens: int) -> tuple[float, dict[int, tuple]]:
    """Wall seconds and each request's stream_chat result, by request number. A list of models: request n
    names model n modulo its length (a base and its adapters in turn)."""
    names = [model] if isinstance(model, str) else model
    results: dict[int, tuple] = {}
    numbers = iter(range(requests))
    lock = threading.Lock()

    def user() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            prompt = f"Write a long story about {TOPICS[number % len(TOPICS)]}."
            results[number] = stream_chat(client, names[number % len(names)], [{"role": "user", "content": prompt}],
                                          tokens)

    threads = [threading.Thread(target=user) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def summary(seconds: float, results: dict[int, tuple]) -> dict[str, float]:
    ttft = [r[1] for r in results.values()]
    return {"tok_per_s": round(sum(r[3] for r in results.values()) / seconds, 1),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "latency_p50_s": round(percentile([r[2] for r in results.values()], 0.5), 3),
            "requests": len(results), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--texts", help="write each request's text here (JSON), to compare two servers")
    args = parser.parse_args()
    from openai import OpenAI

    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    stream_chat(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm-up
    seconds, results = chat_load(client, model, args.clients, args.requests, args.tokens)
    print(json.dumps({"clients": args.clients, **summary(seconds, results)}))
    if args.texts:
        with open(args.texts, "w") as out:
            json.dump({n: results[n][0] for n in sorted(results)}, out, indent=1)


if __name__ == "__main__":
    main()
