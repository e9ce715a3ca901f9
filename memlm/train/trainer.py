"""One trainer for every trained memory mode: a frozen owned `Llama`, an `Adapter`'s parameters.

AdamW over the adapter's `param_groups` (each its own learning rate and weight decay), linear
warmup then cosine decay to `min_lr_ratio * lr`, gradient accumulation (`batch` sequences per step
in micro-batches of `micro_batch`), gradient clipping, held-out evaluation, a tqdm progress bar
with tokens/s and ETA, checkpoints and exact resume. CPU in fp32; CUDA with bf16 autocast (fp32
master weights and loss).

Determinism: the adapter's init is seeded, the data order is a pure function of (seed, position)
(`WindowOrder`) and nothing else draws random numbers, so a run is a function of its config. A
checkpoint holds everything the trajectory depends on (adapter tensors, AdamW moments and step,
data position, RNG states), so training k steps, stopping and resuming for N - k more gives
bit-identical weights and losses to N steps straight (tests/train/test_trainer.py).

Layout of OUT (`Trainer.out_dir`):
    checkpoint/   adapter.safetensors, optimizer.pt (AdamW state, torch RNG), state.json
                  (step, position, tokens, config, history); replaced as a whole (see
                  `save_checkpoint`)
    adapter.safetensors, adapter.json   the trained adapter and its manifest (memlm.train.weights)
    history.jsonl                       one line per step (loss, lr, tokens/s) and per evaluation
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from memlm.model.llama import Llama
from memlm.train.adapter import Adapter, TrainBatch
from memlm.train.corpus import TokenSplit
from memlm.train.data import HiddenStateCache, TokenWindows, WindowOrder, corpus_key
from memlm.train.weights import save_adapter


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch: int = 4  # sequences per optimizer step
    micro_batch: int = 0  # sequences per forward/backward (0: all of batch); batch must be a multiple
    seq: int = 512  # tokens per sequence (each window holds seq + 1: inputs and shifted targets)
    lr: float = 1e-3  # peak learning rate (each group scales it by its lr_scale)
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at `steps`
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0: no clipping)
    seed: int = 0
    train_windows: int = 0  # train on a fixed seeded subset of this many windows (0: all of them)
    eval_every: int = 50  # steps between held-out evaluations (0: only at the end)
    eval_windows: int = 16  # held-out windows evaluated, spread evenly over the held-out split
    checkpoint_every: int = 50  # steps between checkpoints (0: only at the end)
    cache_hidden: bool = False  # train from cached states entering adapter.first_layer
    device: str = "cpu"

    # Fields that may change between a run and its resumption: they do not alter the trajectory.
    FREE_ON_RESUME = ("eval_every", "eval_windows", "checkpoint_every", "cache_hidden", "device")

    @property
    def micro(self) -> int:
        return self.micro_batch or self.batch

    @property
    def accumulation(self) -> int:
        return self.batch // self.micro

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.batch % self.micro:
            raise ValueError(f"batch={self.batch} is not a multiple of micro_batch={self.micro_batch}")
        if self.steps < 1 or self.seq < 1:
            raise ValueError(f"steps={self.steps} and seq={self.seq} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def lr_factor(step: int, config: TrainConfig) -> float:
    """The schedule at 0-based `step`: (step + 1) / warmup for the warmup steps, then cosine from
    1 down to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains `adapter` on `train`'s windows with `model` frozen; evaluates on `heldout`."""

    def __init__(self, model: Llama, adapter: Adapter, train: TokenSplit, heldout: TokenSplit, config: TrainConfig,
                 out_dir: str | Path, base_name: str, base_fingerprint: str, hidden_cache_dir: Optional[Path] = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 batch_data: Optional[Callable[[str, np.ndarray], dict[str, Any]]] = None):
        """batch_data(split, window idx) -> the mode's extra fields of a micro-batch ("train" or
        "heldout"; RETRO: the windows' neighbours), passed to `adapter.make_batch`."""
        self.model, self.adapter, self.config = model, adapter, config
        self.batch_data = batch_data
        self.out_dir = Path(out_dir)
        self.base_name, self.base_fingerprint = base_name, base_fingerprint
        self.progress, self.log = progress, log
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for, but torch sees no CUDA device")
        model.requires_grad_(False)
        model.to(self.device)
        adapter.to(self.device)
        adapter.requires_grad_(True)
        adapter.attach(model)
        groups = adapter.param_groups()
        grouped = [p for g in groups for p in g.params]
        if len({id(p) for p in grouped}) != len(list(adapter.parameters())):
            raise ValueError(f"{type(adapter).__name__}.param_groups() must name each parameter exactly once")
        self.optimizer = torch.optim.AdamW(
            [{"params": g.params, "lr": config.lr * g.lr_scale, "base_lr": config.lr * g.lr_scale,
              "weight_decay": g.weight_decay, "name": g.name} for g in groups],
            betas=config.betas, eps=config.adam_eps, foreach=False)  # foreach=False: same kernels on CPU and CUDA
        self.windows = TokenWindows(train.tokens, config.seq)
        self.heldout_windows = TokenWindows(heldout.tokens, config.seq)
        self.order = WindowOrder(len(self.windows), config.seed, config.train_windows)
        n_eval = min(config.eval_windows, len(self.heldout_windows))
        self.eval_idx = np.unique(np.linspace(0, len(self.heldout_windows) - 1, n_eval).round().astype(np.int64))
        self.step = self.position = self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self.caches: dict[str, HiddenStateCache] = {}
        # More held-out losses each evaluation: history key -> the batch split to read (a mode's
        # batch_data gives its extra data; RETRO: "eval_loss_leakage" with the document's own chunks).
        self.extra_evals: dict[str, str] = {}
        if config.cache_hidden:
            root = Path(hidden_cache_dir) if hidden_cache_dir else self.out_dir / "hidden"
            for name, w, split in (("train", self.windows, train), ("heldout", self.heldout_windows, heldout)):
                key = {"base": base_fingerprint, "tokens": corpus_key(split.tokens)}
                folder = root / f"{name}-L{adapter.first_layer}-S{config.seq}-{key['tokens'][:8]}-{base_fingerprint[7:15]}"
                self.caches[name] = HiddenStateCache(folder, model, w, adapter.first_layer, key, config.micro)
        torch.manual_seed(config.seed)

    # --- batches -------------------------------------------------------------------------------

    def _batch(self, split: str, idx: np.ndarray) -> TrainBatch:
        windows = self.windows if split == "train" else self.heldout_windows
        tokens = torch.from_numpy(windows[idx]).to(self.device)  # (B, seq + 1)
        hidden = self.caches[split].get(idx).to(self.device) if split in self.caches else None  # (B, seq, D)
        return self.adapter.make_batch(tokens, hidden, self.batch_data(split, idx) if self.batch_data else {})

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # --- one step, evaluation ------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step over `batch` sequences; returns the mean loss of its micro-batches
        (their token counts are equal, so this is the mean over all its tokens)."""
        c = self.config
        factor = lr_factor(self.step, c)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        self.adapter.train()
        losses = []
        for _ in range(c.accumulation):
            idx = self.order.take(self.position, c.micro)
            self.position += c.micro
            with self._autocast():
                loss = self.adapter.loss(self.model, self._batch("train", idx))
            (loss / c.accumulation).backward()
            losses.append(loss.detach())
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), c.grad_clip, foreach=False)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += c.batch * c.seq
        return float(torch.stack(losses).mean())

    @torch.no_grad()
    def evaluate(self, split: str = "heldout") -> float:
        """Mean next-token loss over the fixed held-out windows (in micro-batches)."""
        self.adapter.eval()
        total = 0.0
        for lo in range(0, len(self.eval_idx), self.config.micro):
            idx = self.eval_idx[lo : lo + self.config.micro]
            with self._autocast():
                total += float(self.adapter.loss(self.model, self._batch(split, idx))) * len(idx)
        return total / len(self.eval_idx)

    def _evaluation(self) -> dict[str, Any]:
        """A history entry: eval_loss and the extra evaluations at this step."""
        return {"step": self.step, "eval_loss": self.evaluate(),
                **{key: self.evaluate(split) for key, split in self.extra_evals.items()}}

    # --- checkpoints ---------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def save_checkpoint(self) -> None:
        """Write checkpoint/ as a whole: into .checkpoint.tmp, the old one renamed to
        .checkpoint.old, the new renamed into place, the old removed. A crash leaves checkpoint/
        or .checkpoint.old/ complete; `resume` takes either."""
        from safetensors.torch import save_file

        tmp, old = self.out_dir / ".checkpoint.tmp", self.out_dir / ".checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()},
                  str(tmp / "adapter.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": rng}, tmp / "optimizer.pt")
        state = {"step": self.step, "position": self.position, "tokens_seen": self.tokens_seen,
                 "config": self.config.to_dict(), "mode": self.adapter.mode, "adapter_config": self.adapter.config_dict(),
                 "base_fingerprint": self.base_fingerprint, "order": self.order.key(), "history": self.history}
        (tmp / "state.json").write_text(json.dumps(state))
        if self.checkpoint_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        """Load the checkpoint in out_dir if there is one; False if there is none. Refuses a
        checkpoint of another base model, adapter or trajectory-changing config."""
        from safetensors.torch import load_file

        folder = self.checkpoint_dir if self.checkpoint_dir.exists() else self.out_dir / ".checkpoint.old"
        if not (folder / "state.json").is_file():
            return False
        state = json.loads((folder / "state.json").read_text())
        if state["base_fingerprint"] != self.base_fingerprint:
            raise ValueError(f"checkpoint in {folder} is for base model {state['base_fingerprint'][:19]}..., "
                             f"not {self.base_fingerprint[:19]}...")
        if state["mode"] != self.adapter.mode or state["adapter_config"] != self.adapter.config_dict():
            raise ValueError(f"checkpoint in {folder} is for adapter {state['mode']} {state['adapter_config']}, "
                             f"not {self.adapter.mode} {self.adapter.config_dict()}")
        mine = self.config.to_dict()
        differ = [f"{k}={state['config'].get(k)!r} (now {v!r})" for k, v in mine.items()
                  if k not in TrainConfig.FREE_ON_RESUME and state["config"].get(k) != v]
        plain = len(self.order.sequence) == len(self.order.pool)  # checkpoints without the key had the plain order
        if ("order" in state and state["order"] != self.order.key()) or ("order" not in state and not plain):
            differ.append("the order of training windows (their repeats)")
        if differ:
            raise ValueError(f"checkpoint in {folder} was made with other settings: {', '.join(differ)}; "
                             "resume with the same settings, or start in a new --out folder")
        self.adapter.load_state_dict(load_file(str(folder / "adapter.safetensors"), device=str(self.device)))
        blob = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"]["torch"])
        if "cuda" in blob["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
        self.step, self.position, self.tokens_seen = state["step"], state["position"], state["tokens_seen"]
        self.history = state["history"]
        return True

    # --- the loop ------------------------------------------------------------------------------

    def _write_history(self) -> None:
        tmp = self.out_dir / "history.jsonl.tmp"
        tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        os.replace(tmp, self.out_dir / "history.jsonl")

    def fit(self, stop_after: Optional[int] = None) -> dict[str, Any]:
        """Train up to config.steps (or until step `stop_after`, to simulate a stop), evaluating
        and checkpointing on the way; at config.steps write the adapter and its manifest.
        Returns the training stats that go in the manifest."""
        from tqdm import tqdm

        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        if self.step == 0 and not any("eval_loss" in h for h in self.history):
            self.history.append(self._evaluation())
        bar = tqdm(total=c.steps, initial=self.step, unit="step", disable=not self.progress, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        train_seconds, run_tokens = 0.0, 0
        eval_loss = None
        while self.step < end:
            t0 = time.perf_counter()
            loss = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_seconds += dt
            run_tokens += c.batch * c.seq
            self.history.append({"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                 "tokens": self.tokens_seen, "step_seconds": round(dt, 4)})
            if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps:
                self.history.append(self._evaluation())
                eval_loss = self.history[-1]["eval_loss"]
            if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or self.step == end:
                self.save_checkpoint()
                self._write_history()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", eval=f"{eval_loss:.3f}" if eval_loss is not None else "-",
                            tok_s=f"{run_tokens / train_seconds:.0f}", refresh=False)
        bar.close()
        stats = self.stats(run_tokens / train_seconds if train_seconds else None)
        if self.step == c.steps:
            save_adapter(self.adapter, self.out_dir, self.base_name, self.base_fingerprint, stats)
        return stats

    def stats(self, tokens_per_second: Optional[float] = None) -> dict[str, Any]:
        losses = [h["loss"] for h in self.history if "loss" in h]
        evals = [h for h in self.history if "eval_loss" in h]
        return {"steps": self.step, "tokens_seen": self.tokens_seen,
                "train_loss_last10": float(np.mean(losses[-10:])) if losses else None,
                "eval_loss_initial": evals[0]["eval_loss"] if evals else None,
                "eval_loss": evals[-1]["eval_loss"] if evals else None,
                "eval_windows": int(len(self.eval_idx)), "tokens_per_second_last_run": tokens_per_second,
                "config": self.config.to_dict()}
