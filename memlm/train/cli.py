"""`memlm train ...`: train a memory mode on the frozen base model, and build the corpus.

    memlm train proof [--steps --batch --micro-batch --seq --lr --device cpu|cuda --out DIR --resume ...]
    memlm train retro [the same, --layers --neighbours --encoder-dim --data DIR --train-windows N]
    memlm train landmark [the same, --local --block --rank --layers]
    memlm train export RUN --to DIR      # a (stopped) run's latest checkpoint as loadable weights
    memlm train corpus [--out DIR] [--sources stdlib,man,doc] [--max-docs N]

Mounted in memlm/cli.py with `app.add_typer`. Imports only typer at import time: torch, the
model and the corpus load inside the commands, so the main CLI stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from memlm.modes.retro.settings import DEFAULT_LAYERS as RETRO_LAYERS

app = typer.Typer(no_args_is_help=True, help="Train memory modes (adapters) on the frozen base model.")


def _sources(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


@app.command("proof")
def proof(
    steps: int = typer.Option(200, help="optimizer steps"),
    batch: int = typer.Option(4, help="sequences per optimizer step"),
    micro_batch: int = typer.Option(0, help="sequences per forward/backward (0: the whole batch); accumulates"),
    seq: int = typer.Option(512, help="tokens per sequence"),
    lr: float = typer.Option(1e-3, help="peak learning rate"),
    warmup: int = typer.Option(20, help="warmup steps"),
    layers: str = typer.Option("20,23,26,29", help="layers that get an adapter (comma-separated; negative from the top)"),
    bottleneck: int = typer.Option(64, help="adapter bottleneck width"),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast)"),
    out: Path = typer.Option(Path("runs/proof"), help="run folder: checkpoint/, adapter.safetensors, adapter.json, history.jsonl"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint (same settings)"),
    model: str = typer.Option("bundled", help="base model: 'bundled' or a local Hugging Face Llama folder"),
    sources: str = typer.Option("stdlib,man,doc", help="corpus sources"),
    max_docs: Optional[int] = typer.Option(None, help="at most this many documents per source"),
    train_windows: int = typer.Option(0, help="train on a fixed subset of this many windows (0: all)"),
    cache_hidden: bool = typer.Option(False, "--cache-hidden", help="cache the frozen layers' states below the adapter"),
    eval_every: int = typer.Option(50, help="steps between held-out evaluations"),
    eval_windows: int = typer.Option(16, help="held-out windows per evaluation"),
    checkpoint_every: int = typer.Option(50, help="steps between checkpoints"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the proof adapter: zero-initialised residual bottlenecks after the attention of a few
    upper layers, next-token loss on the corpus."""
    from memlm.train.adapter import BottleneckConfig

    config = BottleneckConfig(layers=tuple(int(x) for x in layers.split(",")), bottleneck=bottleneck)
    _train("proof", dict(layers=list(config.layers), bottleneck=config.bottleneck), locals())


@app.command("retro")
def retro(
    steps: int = typer.Option(600, help="optimizer steps"),
    batch: int = typer.Option(8, help="sequences per optimizer step"),
    micro_batch: int = typer.Option(2, help="sequences per forward/backward (0: the whole batch); accumulates"),
    seq: int = typer.Option(512, help="tokens per sequence (a multiple of the chunk size)"),
    lr: float = typer.Option(1e-3, help="peak learning rate"),
    warmup: int = typer.Option(30, help="warmup steps"),
    layers: str = typer.Option(",".join(map(str, RETRO_LAYERS)), help="layers with chunked cross-attention "
                               "(comma-separated; their own attention reads the neighbours)"),
    neighbours: int = typer.Option(2, help="neighbours per chunk"),
    encoder_dim: int = typer.Option(128, help="width of the neighbour encoder"),
    encoder_layers: int = typer.Option(2, help="neighbour encoder layers"),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast)"),
    out: Path = typer.Option(Path("runs/retro"), help="run folder: checkpoint/, adapter.safetensors, adapter.json, history.jsonl"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint (same settings)"),
    data: Optional[Path] = typer.Option(None, help="where the corpus store and neighbour tables live "
                                        "(default: memlm's cache, retro/)"),
    model: str = typer.Option("bundled", help="base model: 'bundled' or a local Hugging Face Llama folder"),
    sources: str = typer.Option("stdlib,man,doc", help="corpus sources"),
    max_docs: Optional[int] = typer.Option(None, help="at most this many documents per source"),
    train_windows: int = typer.Option(2048, help="train on a fixed subset of this many windows (0: all; each "
                                      "needs its chunks' neighbours searched once)"),
    copy_repeat: int = typer.Option(4, help="windows whose neighbours hold >= 20% of the 4-grams their chunks go "
                                    "on to use come this many times per epoch (1: all once)"),
    copy_spans: float = typer.Option(0.0, help="fraction of chunks whose neighbour 0 gets a near-duplicate passage "
                                     "(the text just before a span of what follows) at a random offset: copy lessons "
                                     "leak-free neighbours lack; 0: none"),
    cache_hidden: bool = typer.Option(False, "--cache-hidden", help="cache the frozen layers' states below the first CCA"),
    eval_every: int = typer.Option(50, help="steps between held-out evaluations"),
    eval_windows: int = typer.Option(16, help="held-out windows per evaluation"),
    checkpoint_every: int = typer.Option(10, help="steps between checkpoints"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """RETRO-fit the base model: the neighbour encoder and the CCA gates trained, the base
    frozen; each chunk's 2 neighbours searched once in a store holding the corpus (never its own
    document, never a held-out one)."""
    from memlm.modes.retro.model import RetroConfig

    config = RetroConfig(layers=tuple(int(x) for x in layers.split(",")), neighbours=neighbours,
                         encoder_dim=encoder_dim, encoder_layers=encoder_layers)
    _train("retro", config.to_dict(), locals(), prepare=_prepare_retro)


@app.command("landmark")
def landmark(
    steps: int = typer.Option(300, help="optimizer steps"),
    batch: int = typer.Option(8, help="windows per optimizer step"),
    micro_batch: int = typer.Option(2, help="windows per forward/backward (0: the whole batch); accumulates"),
    seq: int = typer.Option(512, help="tokens per window: memory blocks, then --local tokens that read them"),
    local: int = typer.Option(64, help="the last tokens of each window, scored, reading the rest only through "
                              "the landmarks"),
    block: int = typer.Option(64, help="rows per block (the store's chunk size)"),
    rank: int = typer.Option(8, help="rank of the landmark key correction per memory layer"),
    distill: float = typer.Option(1.0, help="weight of the auxiliary loss pulling each landmark logit to its block's "
                                  "log-mass for the query (0: the LM loss alone, as in the paper)"),
    rank_distill: float = typer.Option(0.0, help="weight of the auxiliary loss ranking the blocks among themselves "
                                       "(softmax over blocks of the landmark logits against that of the blocks' "
                                       "log-masses): what top-k selection needs"),
    plant_facts: float = typer.Option(0.0, help="fraction of training windows with a planted fact (a named "
                                      "person's pass key in a memory block, asked for and answered at the start "
                                      "of the local tokens: memlm.modes.landmark.facts); held-out evaluations "
                                      "then also report eval_loss_facts (every window planted)"),
    layers: str = typer.Option("", help="memory layers (comma-separated; empty: every layer but the first)"),
    min_memory_position: int = typer.Option(4, help="the memory's first rows left out, as the service leaves out "
                                            "each build window's first rows (landmark.min_memory_position)"),
    lr: float = typer.Option(2e-3, help="peak learning rate"),
    warmup: int = typer.Option(20, help="warmup steps"),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast)"),
    out: Path = typer.Option(Path("runs/landmark"), help="run folder: checkpoint/, adapter.safetensors, adapter.json, "
                             "history.jsonl"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint (same settings)"),
    init: Optional[Path] = typer.Option(None, help="start from these trained landmark weights (an adapter folder of "
                                        "the same shapes, e.g. the shipped ones) instead of the seeded init"),
    model: str = typer.Option("bundled", help="base model: 'bundled' or a local Hugging Face Llama folder"),
    sources: str = typer.Option("stdlib,man,doc", help="corpus sources"),
    max_docs: Optional[int] = typer.Option(None, help="at most this many documents per source"),
    train_windows: int = typer.Option(0, help="train on a fixed subset of this many windows (0: all)"),
    eval_every: int = typer.Option(25, help="steps between held-out evaluations"),
    eval_windows: int = typer.Option(16, help="held-out windows per evaluation"),
    checkpoint_every: int = typer.Option(10, help="steps between checkpoints"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train landmarks (Landmark Attention's landmark token and grouped softmax) on the frozen base
    model: the landmark embedding, a low-rank key correction and a gate bias per memory layer; the
    loss is the next-token loss of each window's last tokens, which read the window's earlier blocks
    only through their landmarks."""
    from memlm.modes.landmark.adapter import LandmarkConfig

    config = LandmarkConfig(layers=tuple(int(x) for x in layers.split(",") if x.strip()), block=block, local=local,
                            rank=rank, distill=distill, min_memory_position=min_memory_position,
                            rank_distill=rank_distill)
    opts = dict(locals(), cache_hidden=False)
    _train("landmark", config.to_dict(), opts, prepare=_prepare_landmark)


def _prepare_landmark(trainer, corpus, folder: Path, opts: dict) -> None:
    """Log, once per run, the held-out loss of the local tokens without memory and with the whole
    window in context: the floor and the ceiling the landmarks' eval_loss sits between."""
    import torch

    if opts.get("plant_facts"):
        from memlm.models.loading import load_tokenizer
        from memlm.modes.landmark.facts import FactPlanter, planted_batches

        cfg = trainer.adapter.config
        planter = FactPlanter(load_tokenizer(folder), cfg.local, cfg.min_memory_position)
        trainer.batch_data = planted_batches(planter, {"train": opts["plant_facts"], "heldout_facts": 1.0}, trainer.config.seed)
        trainer.extra_evals["eval_loss_facts"] = "heldout_facts"
    if opts["resume"] and (trainer.checkpoint_dir / "state.json").is_file():
        return  # the checkpoint's history has them
    losses: dict[str, float] = {}
    for i in range(0, len(trainer.eval_idx), trainer.config.micro):
        idx = trainer.eval_idx[i : i + trainer.config.micro]
        tokens = torch.from_numpy(trainer.heldout_windows[idx]).to(trainer.device)
        for k, v in trainer.adapter.baseline_losses(trainer.model, tokens).items():
            losses[k] = losses.get(k, 0.0) + v * len(idx) / len(trainer.eval_idx)
    trainer.history.append({"step": 0, "baseline": True, **{f"eval_loss_{k}": v for k, v in losses.items()}})
    typer.echo(f"held-out loss of the local tokens: without memory {losses['local_only']:.4f}, whole window in "
               f"context {losses['full_context']:.4f}", err=True)


def _prepare_retro(trainer, corpus, folder: Path, opts: dict) -> None:
    """Search the neighbours of every window the run uses (once; kept in the data folder) and hand
    them to the trainer batch by batch."""
    from memlm.models.loading import default_cache_dir, load_tokenizer
    from memlm.modes.retro.training import batch_neighbours, copy_repeats, prepare
    from memlm.train.data import corpus_key

    root = opts["data"] or default_cache_dir() / "retro"
    tables = prepare(corpus, trainer.adapter.config, load_tokenizer(folder), root, trainer.config.seq,
                     trainer.order.pool, trainer.eval_idx, corpus_key, log=lambda m: typer.echo(m, err=True))
    repeats = copy_repeats(tables["train"], trainer.order.pool, trainer.config.seq, opts["copy_repeat"])
    if opts["copy_repeat"] > 1:
        trainer.order = trainer.order.repeated(repeats)
        typer.echo(f"{int((repeats > 1).sum())} of {len(repeats)} train windows repeated {opts['copy_repeat']}x per "
                   "epoch (neighbours holding what follows)", err=True)
    spans = {}
    if opts["copy_spans"] > 0:
        tables["heldout_spans"] = tables["heldout"]
        spans = {"train": opts["copy_spans"], "heldout_spans": 1.0}
        trainer.extra_evals["eval_loss_spans"] = "heldout_spans"  # leak-free, every chunk with a planted span
    trainer.batch_data = batch_neighbours(tables, trainer.config.seq, trainer.device, spans, trainer.config.seed)
    trainer.extra_evals["eval_loss_leakage"] = "heldout_leak"  # the document's own chunks allowed: copying


def _train(mode: str, adapter_config: dict, opts: dict, prepare=None) -> None:
    import torch

    from memlm.model.llama import load_llama
    from memlm.models.loading import resolve_model_dir
    from memlm.train.adapter import adapter_class
    from memlm.train.corpus import build_corpus
    from memlm.train.trainer import TrainConfig, Trainer
    from memlm.train.weights import folder_fingerprint

    out: Path = opts["out"]
    if (out / "checkpoint").exists() and not opts["resume"]:
        raise typer.BadParameter(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    folder = resolve_model_dir(opts["model"])
    corpus = build_corpus(folder, _sources(opts["sources"]), opts["max_docs"], log=lambda m: typer.echo(m, err=True))
    config = TrainConfig(steps=opts["steps"], batch=opts["batch"], micro_batch=opts["micro_batch"], seq=opts["seq"],
                         lr=opts["lr"], warmup_steps=opts["warmup"], seed=opts["seed"],
                         train_windows=opts["train_windows"], eval_every=opts["eval_every"],
                         eval_windows=opts["eval_windows"], checkpoint_every=opts["checkpoint_every"],
                         cache_hidden=opts["cache_hidden"], device=opts["device"])
    model = load_llama(folder, device=opts["device"])
    adapter = adapter_class(mode).from_config(model.config, adapter_config, seed=opts["seed"])
    if opts.get("init") is not None:  # fine-tune earlier weights (a resumed checkpoint overrides them)
        from memlm.train.weights import load_adapter

        start = load_adapter(opts["init"], model, folder_fingerprint(folder), attach=False)
        adapter.load_state_dict(start.state_dict(), strict=True)
        typer.echo(f"{mode}: starting from the weights in {opts['init']}", err=True)
    from memlm.train.data import default_hidden_cache_dir

    trainer = Trainer(model, adapter, corpus.train, corpus.heldout, config, out, folder.name,
                      folder_fingerprint(folder), hidden_cache_dir=default_hidden_cache_dir(),
                      progress=opts["progress"], log=lambda m: typer.echo(m, err=True))
    if prepare is not None:
        prepare(trainer, corpus, folder, opts)
    if opts["resume"] and trainer.resume():
        typer.echo(f"resumed {out} at step {trainer.step} ({trainer.tokens_seen} tokens seen)", err=True)
    n_params = sum(p.numel() for p in adapter.parameters())
    typer.echo(f"{mode}: {n_params} trainable parameters on {folder.name}, {len(trainer.windows)} train windows of "
               f"{config.seq} tokens, {config.steps} steps of {config.batch} on {config.device}", err=True)
    stats = trainer.fit()
    typer.echo(json.dumps({k: v for k, v in stats.items() if k != "config"}))


@app.command("corpus")
def corpus(
    out: Optional[Path] = typer.Option(None, help="also write every document as OUT/<source>/<name>.txt + documents.jsonl"),
    sources: str = typer.Option("stdlib,man,doc", help="corpus sources (stdlib, man, doc)"),
    max_docs: Optional[int] = typer.Option(None, help="at most this many documents per source"),
    model: str = typer.Option("bundled", help="whose tokenizer counts the tokens"),
) -> None:
    """Build (once) and describe the tokenised training corpus; with --out, export its documents
    as text files to ingest into a collection."""
    from memlm.models.loading import resolve_model_dir
    from memlm.train.corpus import build_corpus, export_documents

    c = build_corpus(resolve_model_dir(model), _sources(sources), max_docs, log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps({"cache": str(c.folder), **c.stats}, indent=1))
    if out is not None:
        n = export_documents(out, _sources(sources), max_docs)
        typer.echo(f"wrote {n} documents under {out} (index: {out / 'documents.jsonl'})", err=True)


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="a run folder of `memlm train MODE` (its checkpoint/ is read)"),
    to: Path = typer.Option(..., "--to", help="folder to write adapter.safetensors + adapter.json into"),
    model: str = typer.Option("bundled", help="the base model the run trained on"),
) -> None:
    """Write the adapter of a run's latest checkpoint as loadable weights (for a run stopped before
    its last step: the manifest's training stats say how far it got)."""
    import torch
    from safetensors.torch import load_file

    from memlm.model.llama import LlamaConfig
    from memlm.models.loading import resolve_model_dir
    from memlm.train.adapter import adapter_class
    from memlm.train.weights import folder_fingerprint, save_adapter

    state_path = run / "checkpoint" / "state.json"
    if not state_path.is_file():
        raise typer.BadParameter(f"{run} has no checkpoint/state.json")
    state = json.loads(state_path.read_text())
    folder = resolve_model_dir(model)
    if folder_fingerprint(folder) != state["base_fingerprint"]:
        raise typer.BadParameter(f"{run} was trained on another base model than {folder}")
    adapter = adapter_class(state["mode"]).from_config(LlamaConfig.from_folder(folder), state["adapter_config"])
    adapter.load_state_dict(load_file(str(run / "checkpoint" / "adapter.safetensors")))
    evals = [h for h in state["history"] if "eval_loss" in h]
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    speeds = [h for h in state["history"] if "step_seconds" in h][-20:]
    per_step = state["config"]["batch"] * state["config"]["seq"]
    training = {"steps": state["step"], "tokens_seen": state["tokens_seen"], "of_steps": state["config"]["steps"],
                "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                "eval_loss_initial": evals[0]["eval_loss"] if evals else None,
                "eval_loss": evals[-1]["eval_loss"] if evals else None,
                "eval_loss_step": evals[-1]["step"] if evals else None,
                "tokens_per_second_recent": (per_step * len(speeds) / sum(h["step_seconds"] for h in speeds)) if speeds else None,
                "config": state["config"], "exported_from": str(run)}
    with torch.no_grad():
        path = save_adapter(adapter, to, folder.name, state["base_fingerprint"], training)
    typer.echo(f"wrote {path} (step {state['step']} of {state['config']['steps']}, {state['tokens_seen']} tokens seen)")
