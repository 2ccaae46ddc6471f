"""Does memory come back when `llmcli serve` unloads a model? For each engine, a server offering the
embedded SmolLM2-135M (a --models file, so nothing is loaded at start) is driven through load ->
one request -> unload, three times, and the server process's resident set (VmRSS) is read after each
step. The first load also pays for imports (torch, llama.cpp) that stay; what matters is that RSS after
an unload falls back to the level before the load, and does not climb from cycle to cycle.

    python benchmarks/router_memory.py [llama.cpp] [hf]     # default both engines; JSON on stdout

The hf engine converts the GGUF to safetensors once (cached), as `llmcli generate --engine hf` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def measure(engine: str, port: int, cycles: int = 3) -> dict:
    from llmcli.models import embedded_gguf_path  # its path only; nothing is loaded here

    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "models.toml"
        table.write_text(f'[[model]]\nname = "smol"\nmodel = "{embedded_gguf_path()}"\nengine = "{engine}"\n')
        server = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", "--models", str(table), "--port",
                                   str(port), "--keep-alive", "-1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            steps = {"started": rss_mb(server.pid)}
            for cycle in range(1, cycles + 1):
                post(url + "/models/load", {"model": "smol"})
                post(url + "/v1/completions", {"model": "smol", "prompt": "Once upon a time", "max_tokens": 64,
                                               "temperature": 0})
                steps[f"loaded {cycle}"] = rss_mb(server.pid)
                post(url + "/models/unload", {"model": "smol"})
                time.sleep(0.5)
                steps[f"unloaded {cycle}"] = rss_mb(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return {name: round(value) for name, value in steps.items()}


def main() -> None:
    from llmcli.distributed import free_port

    engines = sys.argv[1:] or ["llama.cpp", "hf"]
    results = {engine: measure(engine, free_port()) for engine in engines}
    results["host"] = f"{os.cpu_count()} CPUs, {sys.platform}"
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
