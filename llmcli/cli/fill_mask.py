"""`llmcli fill-mask`."""


from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import collect_inputs, launch_if_asked, load_engine, placement_from
from llmcli.cli.options import (ModelOption, DeviceOption, ScoringDtypeOption, TrustOption, PickleOption, EngineOption,
                                 ThreadsOption,
                                 DeviceMapOption, MaxMemoryOption, OffloadDirOption, NumProcessesOption,
                                 NnodesOption, NodeRankOption, MasterAddrOption, MasterPortOption)
from llmcli.errors import UsageError


@app.command("fill-mask")
def fill_mask(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts with [MASK] blanks; '-' reads stdin.",
                                                         show_default=False, metavar="TEXT")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a file: one per line, "
                                                "or JSONL with 'text'.")] = None,
    model: ModelOption = None,
    top_k: Annotated[int, typer.Option(help="Predictions per blank.")] = 5,
    targets: Annotated[Optional[list[str]], typer.Option(help="Score only these words (repeatable).",
                                                         metavar="WORD")] = None,
    mode: Annotated[str, typer.Option(help="auto (from the model type), mlm (masked LM) or causal "
                                      "(candidate rescoring with a causal LM).")] = "auto",
    max_mask_tokens: Annotated[int, typer.Option(help="Causal mode: tokens one blank may stand for "
                                                 "(words of several tokens).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Texts (or candidate sentences) per forward pass.")] = 32,
    all_positions: Annotated[bool, typer.Option(help="Also print the argmax token at every position "
                                                "(the original BERT example).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per input text.")] = False,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: ScoringDtypeOption = "float32",
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
    num_processes: NumProcessesOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    master_addr: MasterAddrOption = "127.0.0.1",
    master_port: MasterPortOption = None,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_dir: OffloadDirOption = None,
) -> None:
    """Fill [MASK] blanks. Masked LMs score as the fill-mask pipeline does; causal LMs (the default
    embedded model) rescore candidate words with the whole sentence, filling several blanks left to
    right, each conditioned on the earlier ones' best word."""
    from llmcli.data import read_texts
    from llmcli.tasks.fill_mask import FillMaskOptions, fill_mask as run_fill_mask, validate

    options = FillMaskOptions(top_k=top_k, targets=targets or [], batch_size=batch_size,
                              max_mask_tokens=max_mask_tokens, all_positions=all_positions)
    validate(options)
    kinds = {"auto": "auto", "mlm": "masked", "causal": "causal"}
    if mode not in kinds:
        raise UsageError(f"unknown --mode {mode!r}", "Use auto, mlm or causal.")
    inputs = collect_inputs(texts or [], file, read_texts, "text")
    placement = placement_from(device_map, max_memory, offload_dir, device, num_processes, nnodes)
    launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
    from llmcli.distributed import Workers
    from llmcli.errors import WrongModelKind

    workers = Workers(device)
    try:
        runner = load_engine(model, engine, command="fill-mask", kind=kinds[mode], device=device or workers.device,
                             dtype=dtype, threads=threads, trust_remote_code=trust_remote_code,
                             allow_pickle=allow_pickle, placement=placement)
    except WrongModelKind as exc:  # here the fix is the --mode option, not another command
        raise WrongModelKind(exc.message, f"Drop --mode {mode}: fill-mask picks the method from the model.") from exc
    results = run_fill_mask(runner, inputs, options, workers)
    if not workers.is_main:
        return
    for result in results:
        if json_output:
            render.json_line(render.fill_mask_record(result))
        else:
            render.fill_mask_table(result, runner.source.name)
