"""A child process that runs the installed llama.cpp build once on a tiny quantized model, so that a
build this CPU cannot run (an instruction it lacks, AMX tiles a hypervisor advertises but does not
run) kills this process and not the user's command. Run by llama_host.check; prints one JSON line.

Usage: python -m llmcli.engines.llama_probe {1|0}   (1: with llama.cpp's extra buffer types)
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

# Every matrix side a multiple of 256, so the AMX and repacking kernels accept every weight
# (AMX wants rows in multiples of 32 and Q4_K-family blocks of 256).
N_VOCAB, N_EMBD, N_FF, N_HEAD = 256, 256, 512, 4


def write_tiny_model(path: Path) -> None:
    """A one-layer Llama in F32 with a 256-token SentencePiece vocabulary (random weights)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(1)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, N_VOCAB))])
    writer.add_token_scores([0.0] * N_VOCAB)
    writer.add_token_types([2, 3, 3, *([1] * (N_VOCAB - 3))])  # unknown, control, control, normal...
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    weight = lambda rows, cols: (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)  # noqa: E731
    writer.add_tensor("token_embd.weight", weight(N_VOCAB, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(N_VOCAB, N_EMBD))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", weight(N_EMBD, N_EMBD))
    writer.add_tensor("blk.0.ffn_gate.weight", weight(N_FF, N_EMBD))
    writer.add_tensor("blk.0.ffn_up.weight", weight(N_FF, N_EMBD))
    writer.add_tensor("blk.0.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def decode_quantized(lib, folder: Path, ftype: int, extra_buffers: bool) -> None:
    """Quantize the tiny model and decode a 16-token batch (matrix-matrix kernels) and then one token
    (matrix-vector kernels) with it: the paths every command takes."""
    source, target = folder / "f32.gguf", folder / f"q{ftype}.gguf"
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    if lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"quantizing the probe model to type {ftype} failed")
    model_params = lib.llama_model_default_params()
    model_params.use_extra_bufts = extra_buffers
    model = lib.llama_model_load_from_file(str(target).encode(), model_params)
    context_params = lib.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = 64
    context_params.n_threads = context_params.n_threads_batch = 2  # the multi-threaded kernels too
    context = lib.llama_init_from_model(model, context_params)
    if not model or not context:
        raise SystemExit("the probe model did not load")
    batch = lib.llama_batch_init(64, 0, 1)
    for count, start in ((16, 0), (1, 16)):
        batch.n_tokens = count
        for i in range(count):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = 3 + (7 * i) % (N_VOCAB - 3), start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == count - 1
        if lib.llama_decode(context, batch) != 0:
            raise SystemExit("llama_decode failed on the probe model")
    lib.llama_batch_free(batch)
    lib.llama_free(context)
    lib.llama_model_free(model)


def main() -> None:
    extra_buffers = sys.argv[1:] == ["1"]
    import llama_cpp as lib

    silent = lib.llama_log_callback(lambda level, text, user_data: None)  # must outlive every call
    lib.llama_log_set(silent, ctypes.c_void_p(0))
    lib.llama_backend_init()
    with tempfile.TemporaryDirectory(prefix="llmcli-probe-") as folder:
        write_tiny_model(Path(folder) / "f32.gguf")
        # Q4_0, Q4_1 and Q8_0 are the types llama.cpp's AMX and repacking buffers take
        for ftype in (lib.LLAMA_FTYPE_MOSTLY_Q4_0, lib.LLAMA_FTYPE_MOSTLY_Q4_1, lib.LLAMA_FTYPE_MOSTLY_Q8_0):
            decode_quantized(lib, Path(folder), ftype, extra_buffers)
    print(json.dumps({"system_info": lib.llama_print_system_info().decode().strip()}))


if __name__ == "__main__":
    main()
