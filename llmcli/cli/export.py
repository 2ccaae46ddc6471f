"""`llmcli export`."""


from typing import Annotated

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.options import completes
from llmcli.tasks.export import TYPES


@app.command()
def export(
    model: Annotated[str | None, typer.Argument(help="A save_pretrained or `llmcli finetune` directory (a LoRA adapter "
                                                "is merged into its base), or anything --model takes.",
                                                metavar="[MODEL]", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="The .gguf file to write.", show_default=False)] = "",
    adapter: Annotated[str | None, typer.Option("--adapter", help="Write this LoRA adapter directory (`finetune --lora`'s "
                                                "output) as llama.cpp's LoRA adapter GGUF, unmerged, instead of a "
                                                "model (f32, f16 or bf16).", show_default=False)] = None,
    type_name: Annotated[str, typer.Option("--type", autocompletion=completes(*TYPES), help="f32, f16, bf16, or a llama.cpp quantization: q8_0, "
                                           "q6_k, q5_k_m, q4_k_m, q4_0, ... (made by llama.cpp's quantizer).")] = "f16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --output if it exists.")] = False,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Quantize a model whose weights are "
                                                   "already quantized (a second rounding: more loss).")] = False,
) -> None:
    """Write a Llama-family or GPT-2 model as one GGUF file, for the llama.cpp engine, ollama or LM Studio."""
    from llmcli.errors import UsageError
    from llmcli.tasks.export import check_request, export as run_export

    if (model is None) == (adapter is None):
        raise UsageError("export takes a MODEL or an --adapter DIR" + (", not both" if model else ""),
                         "e.g. llmcli export MODEL -o model.gguf, or llmcli export --adapter DIR -o adapter.gguf.")
    if not output:
        raise UsageError("export needs --output", "Name the .gguf file to write: -o model.gguf.")
    if adapter is not None:
        return export_lora(adapter, output, type_name, overwrite)
    check_request(output, type_name, overwrite, model, allow_requantize)  # before the slow load
    # one bar: open-ended while the model loads (and merges), then counting the tensors written
    with render.progress("Exporting") as (start, advance):
        def on_progress(done: int, total: int) -> None:
            if done == 1:
                start(total)
            advance(1)

        result = run_export(model, output, type_name, overwrite, on_progress=on_progress, on_notice=render.notice,
                            allow_requantize=allow_requantize)
    merged = " (the LoRA adapter merged into its base)" if result.merged_adapter else ""
    render.notice(f"Wrote {result.path}: {result.architecture}, {result.type.upper()}, {result.tensors} tensors, "
                  f"{render.human_size(result.size_mb * 2**20)}, in {result.seconds:.1f} s{merged}.")


def export_lora(adapter: str, output: str, type_name: str, overwrite: bool) -> None:
    from llmcli.tasks.export_adapter import export_adapter

    with render.progress("Exporting") as (start, advance):
        def on_progress(done: int, total: int) -> None:
            if done == 1:
                start(total)
            advance(1)

        result = export_adapter(adapter, output, type_name, overwrite, on_progress=on_progress)
    render.notice(f"Wrote {result.path}: a LoRA adapter (rank {result.rank}, alpha {result.alpha:g}) of a "
                  f"{result.architecture} model, {result.type.upper()}, {result.tensors} tensors, "
                  f"{render.human_size(result.size_mb * 2**20)}, in {result.seconds:.1f} s.")
