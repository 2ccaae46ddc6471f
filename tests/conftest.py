"""Tiny models built offline once per test run, and a helper that runs the real CLI entry point."""

from __future__ import annotations

import copy

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

GPL3 = Path("/usr/share/common-licenses/GPL-3")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep GGUF conversions of the test run out of the user's cache, but share them across tests."""
    import os

    if "LLMCLI_CACHE" not in os.environ:
        os.environ["LLMCLI_CACHE"] = str(tmp_path_factory.mktemp("llmcli-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # never the user's defaults: no config file (tests that want one write their own) and no LLMCLI_MODEL
    config_home = tmp_path_factory.mktemp("config")
    os.environ["XDG_CONFIG_HOME"] = str(config_home)
    os.environ["LLMCLI_CONFIG"] = str(config_home / "llmcli" / "config.toml")
    os.environ.pop("LLMCLI_MODEL", None)
    # The exactness tests compare with references computed on the CPU, so commands run there even on a
    # GPU machine; tests/test_gpu.py passes --device cuda itself.
    os.environ["LLMCLI_DEVICE"] = "cpu"
    yield


def gpl_text() -> str:
    return GPL3.read_text()


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the GPL-3 text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(gpl_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny(path: Path, config, tokenizer, chat_template: str | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    if chat_template:
        # a copy: the session's tokenizer is shared by the fixtures, and a template set on it would reach
        # every model saved after this one (the tiny GPT-2 has none, and tests rely on that)
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return path


def train_wordpiece_tokenizer(vocab_size: int = 600):
    """A BERT-style uncased WordPiece tokenizer trained on the GPL-3 text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(gpl_text().splitlines(), trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                                    special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def train_roberta_tokenizer(vocab_size: int = 500):
    """A RoBERTa-style byte-level BPE tokenizer with <s> ... </s> and a <mask> token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(gpl_text().splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token=AddedToken("<mask>", lstrip=True, special=True),
    )


def save_tiny_masked(path: Path, config, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig

    tokenizer = train_wordpiece_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    return save_tiny_masked(tmp_path_factory.mktemp("tiny-bert"), config, tokenizer)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    from transformers import RobertaConfig

    tokenizer = train_roberta_tokenizer()
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=0, eos_token_id=2)
    return save_tiny_masked(tmp_path_factory.mktemp("tiny-roberta"), config, tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import GPT2Config

    # Untied: with GPT-2's tied embeddings a random model's logits are dominated by the input token's
    # own embedding, so greedy output repeats the prompt's last token and hides context bugs
    # (padding, truncation, history); see test_fixtures_greedy_output_depends_on_the_whole_prompt.
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tiny_tokenizer.eos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), config, tiny_tokenizer)


def build_tiny_llama(path: Path, tokenizer, context: int) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return save_tiny(path, config, tokenizer, CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, 256)


@pytest.fixture(scope="session")
def tiny_llama_2k(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Llama with a context of 2048: room for prompts that describe tools."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-2k"), tiny_tokenizer, 2048)


@pytest.fixture(scope="session")
def bos_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that puts a BOS before every text, as Llama-family tokenizers do:
    there `add_special_tokens` changes the ids."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos-llama") / "model"
    shutil.copytree(tiny_llama, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("a").input_ids[0] == tokenizer.bos_token_id
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        """The --json output, parsed strictly: NaN or Infinity (not JSON) fails the test."""
        return [json.loads(line, parse_constant=not_json) for line in self.stdout.splitlines() if line.strip()]


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON: a value that does not apply must be null")


def run_cli(*args: str, input: str | None = None) -> CliResult:
    """Run `llmcli ARGS` through the real entry point (`llmcli.cli.main`) in this process."""
    import os

    from llmcli.cli import main

    runner = CliRunner()
    debug = os.environ.get("LLMCLI_DEBUG")
    with runner.isolation(input=input) as (stdout, stderr, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:  # --debug sets LLMCLI_DEBUG for the process; later tests' subprocesses must not inherit it
            if debug is None:
                os.environ.pop("LLMCLI_DEBUG", None)
        return CliResult(code, stdout.getvalue().decode(), stderr.getvalue().decode())


def hf_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The plain Hugging Face reference: left-padded batch, greedy, new tokens up to the first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1)
    output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id)
    return [trim_after_eos(row[inputs["input_ids"].shape[1]:].tolist(), tokenizer.eos_token_id) for row in output]


def trim_after_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama written with the gguf package: F32 weights, SmolLM2's tokenizer and chat
    template (copied from the embedded file), context 256. Embeddings are large enough that greedy
    choices are clear-cut rather than near-ties."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf", 256)


@pytest.fixture(scope="session")
def tiny_gguf_2k(tmp_path_factory) -> Path:
    """The tiny GGUF with a context of 2048: room for prompts that describe tools."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-2k") / "tiny-llama-f32-2k.gguf", 2048)


def write_tiny_gguf(path: Path, context: int, seed: int = 0) -> Path:
    import gguf
    import numpy as np

    from llmcli.models import embedded_gguf_path

    source = gguf.GGUFReader(embedded_gguf_path())
    n_vocab, n_embd, n_ff, n_head, n_head_kv, n_layer = 49152, 64, 128, 4, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(seed)
    weight = lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    head = n_embd // n_head
    for layer in range(n_layer):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{block}.attn_k.weight", weight(n_head_kv * head, n_embd))
        writer.add_tensor(f"{block}.attn_v.weight", weight(n_head_kv * head, n_embd))
        writer.add_tensor(f"{block}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bare_llama(path: Path, **kwargs):
    """llama-cpp-python's `Llama` on `path`, with the engine's extra-buffer decision for this host.
    `Llama` has no argument for it, and its default (on) dies by SIGILL where AMX is advertised but does
    not run, which would take the whole test run down: its model parameters get the decision instead."""
    from unittest import mock

    import llama_cpp.llama_cpp as binding
    from llama_cpp import Llama

    from llmcli.engines.llamacpp import host_check

    defaults = binding.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = host_check().extra_buffers
        return chosen

    with mock.patch.object(binding, "llama_model_default_params", params):
        return Llama(model_path=str(path), verbose=False, **kwargs)


def bare_llama_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int, threads: int = 2) -> list[int]:
    """The plain llama-cpp-python reference: `Llama.generate` at temperature 0, up to the first
    end-of-generation token. Flash attention on, as llama.cpp's own tools default to on the CPU
    (`-fa auto`) and the engine does."""
    from llama_cpp import llama_vocab_is_eog

    llm = bare_llama(path, n_ctx=len(prompt_ids) + max_new_tokens, n_threads=threads, n_threads_batch=threads,
                     flash_attn=True)
    new: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0):
        new.append(token)
        if llama_vocab_is_eog(llm._model.vocab, token) or len(new) == max_new_tokens:
            break
    return new


def default_sigint() -> None:
    """preexec_fn for subprocesses that tests interrupt: a shell's background job (`cmd &`) inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler; restore the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
