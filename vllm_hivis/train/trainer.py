"""Train a drafter on a generated dataset: in this process, or data-parallel on Ray Train.

    vllm-hivis train --data DATA --target TARGET --out RUN --recipe time-aware --steps 3000
    vllm-hivis train ... --workers 2      # Ray Train TorchTrainer, DDP (gloo on CPU, NCCL on GPUs)

Device: ``--device auto`` (the default) trains on CUDA when a GPU is present (each Ray Train worker
on its own GPU), with bf16 autocast, batches moved to the model's device; else on the CPU in fp32.
Data: streamed shard by shard (stream.py): at most ``--resident-shards`` shards in memory.

The run directory holds ``checkpoint.pt`` (training state; an interrupted run resumes from it),
``log.jsonl``, ``loss.png`` and, at the end, the exported drafter in ``drafter/``: the hivis
format (hivis and text kinds), vLLM's EAGLE format (eagle kind) or the ViSpec-style bundle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..method.checkpoint import intermediate_layers
from .data import DataError, Manifest, tokenizer_fingerprint
from .drafters import build_drafter
from .examples import collate
from .losses import DraftLoss, Recipe
from .stream import ShardStream
from .target import check_target


@dataclasses.dataclass
class TrainConfig:
    data: str
    target: str
    out: str
    recipe: dict = dataclasses.field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0
    workers: int = 0  # 0: this process; n >= 1: Ray Train with n workers
    ckpt_every: int = 250
    max_records: int | None = None
    threads: int = 0  # torch threads per worker (0: leave torch's default)
    stop_after: int | None = None  # stop (resumably) after this many steps of this run (tests)
    device: str = "auto"  # auto: CUDA when present (Ray Train: the worker's GPU), else the CPU
    resident_shards: int = 4  # data shards held in memory at once (stream.py)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when a GPU is present, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here")
    return dev


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a collated batch on `device` (non-blocking from pinned memory on CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# the token embedding / LM head in the layouts VLM checkpoints use: LLaVA hub layout, transformers
# 5's LLaVA layout, Qwen2.5-VL (whose language model is the top-level `model`)
EMBED_KEYS = ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "model.embed_tokens.weight")
HEAD_KEYS = ("language_model.lm_head.weight", "lm_head.weight")


def frozen_target_parts(target_dir: str) -> tuple[torch.nn.Embedding, torch.nn.Linear, dict]:
    """The target's token embedding and LM head (shared by every drafter, never trained)."""
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    files = sorted(Path(target_dir).glob("*.safetensors"))
    found = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k in EMBED_KEYS or k in HEAD_KEYS:
                    found[k] = st.get_tensor(k).float()
    embed = next((found[k] for k in EMBED_KEYS if k in found), None)
    head_w = next((found[k] for k in HEAD_KEYS if k in found), None)
    if head_w is None and cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings")):
        head_w = embed
    if embed is None or head_w is None:
        raise DataError(f"{target_dir}: could not find the LM embedding / head weights (one of {EMBED_KEYS} and "
                        f"one of {HEAD_KEYS})")
    emb = torch.nn.Embedding.from_pretrained(embed, freeze=True)
    head = torch.nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
    head.weight = torch.nn.Parameter(head_w, requires_grad=False)
    return emb, head, cfg


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _loop(cfg_dict: dict) -> None:
    """The training loop of one worker (rank 0 of 1 in-process, or a Ray Train worker)."""
    cfg = TrainConfig(**cfg_dict)
    recipe = Recipe(**cfg.recipe)
    ray_ctx = None
    if cfg.workers:
        import ray.train

        ray_ctx = ray.train.get_context()
    rank, world = (ray_ctx.get_world_rank(), ray_ctx.get_world_size()) if ray_ctx else (0, 1)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if ray_ctx is not None:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = resolve_device(cfg.device)
    stream = ShardStream(cfg.data, Manifest.load(cfg.data), cfg.batch_size, cfg.seed, rank, world,
                         cfg.resident_shards, cfg.max_records)
    if rank == 0:
        print(f"[train] {recipe.kind} drafter on {device}; data: {len(stream.shards)} shards streamed, <= "
              f"{stream.resident} resident (~{stream.bound_bytes / 2**20:.0f} MiB)", flush=True)
    embed, lm_head, tcfg = frozen_target_parts(cfg.target)
    model = build_drafter(recipe, tcfg["text_config"])
    embed, lm_head, model = embed.to(device), lm_head.to(device), model.to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    start, ckpt = 0, out / "checkpoint.pt"
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=True, map_location=device)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
    loss_fn = DraftLoss(model, embed, lm_head, recipe)
    if ray_ctx is not None:  # DDP over the Ray Train worker group (gloo on CPU, NCCL on GPUs)
        loss_fn = ray.train.torch.prepare_model(loss_fn, parallel_strategy_kwargs={"find_unused_parameters": True})
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    bar = tqdm(range(start, stop), initial=start, total=cfg.steps, desc=f"train {recipe.kind}",
               disable=rank != 0, mininterval=5)
    t0 = time.time()
    for step in bar:
        # the batch is a pure function of the step (resumable); examples are built as drawn
        batch = to_device(collate([model.example(r) for r in stream.batch(step)]), device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        with autocast:
            loss, stats = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        loss = float(loss.detach())
        bar.set_postfix(loss=f"{loss:.3f}", acc0=f"{stats['acc0']:.2f}", refresh=False)
        if log and (step + 1) % 10 == 0:
            log.write(json.dumps({"step": step + 1, "loss": loss, **stats, "lr": opt.param_groups[0]["lr"],
                                  "elapsed_s": time.time() - t0}) + "\n")
            log.flush()
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == stop):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
        if ray_ctx is not None and (step + 1) % 50 == 0:
            import ray.train

            ray.train.report({"step": step + 1, "loss": loss})
    if rank == 0 and stop == cfg.steps:
        export(model, cfg, out)
        plot_losses(out / "log.jsonl", out / "loss.png", title=f"{recipe.kind} drafter: {cfg.recipe}")


def export(model, cfg: TrainConfig, out: Path) -> Path:
    """Write the trained drafter to ``<run>/drafter`` in its kind's serving format (drafters.py)."""
    prov = {"command": "vllm-hivis train", "config": dataclasses.asdict(cfg), "data_manifest": cfg.data,
            "commit": _git_commit(), "torch": torch.__version__}
    return model.export(out / "drafter", provenance=prov, target=str(cfg.target))


def plot_losses(log_path: Path, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["loss"] for r in rows])
    ax[0].set_title("loss")
    ax[0].set_xlabel("step")
    for k in range(8):
        if f"acc{k}" in rows[0]:
            ax[1].plot(steps, [r[f"acc{k}"] for r in rows], label=f"step {k}")
    ax[1].set_title("draft accuracy on reached rows")
    ax[1].legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def preflight(cfg: TrainConfig) -> None:
    """Every input problem a run can have, caught before any work starts (DataError / ValueError)."""
    Recipe(**cfg.recipe).checked()
    resolve_device(cfg.device)
    for name in ("steps", "batch_size", "ckpt_every", "resident_shards"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    man = Manifest.load(cfg.data)
    if man.num_samples == 0:
        raise DataError(f"dataset {cfg.data} is empty (its manifest lists no samples); generate data first")
    tcfg = check_target(cfg.target)["text_config"]
    if man.tokenizer != tokenizer_fingerprint(cfg.target):
        raise DataError(f"dataset {cfg.data} was generated with another tokenizer than target {cfg.target}; "
                        "regenerate the data with this target")
    if (tcfg["vocab_size"], tcfg["hidden_size"]) != (man.vocab_size, man.hidden_size):
        raise DataError(f"dataset {cfg.data} is for hidden/vocab {man.hidden_size}/{man.vocab_size}, target "
                        f"{cfg.target} has {tcfg['hidden_size']}/{tcfg['vocab_size']}")
    layers = Recipe(**cfg.recipe).feature_layers or []
    n = tcfg["num_hidden_layers"]
    if any(i > n for i in layers):
        raise ValueError(f"feature layers {layers} go beyond the target's {n} decoder layers (valid: 1..{n}, "
                         f"where {n} is the final normed state)")
    need = intermediate_layers(layers, n)
    missing = [i for i in need if i not in man.feature_layers]
    if missing:
        raise DataError(f"dataset {cfg.data} did not record target layers {missing} (it has "
                        f"{man.feature_layers or 'only the final layer'}); regenerate it with "
                        f"`vllm-hivis generate-data --feature-layers {','.join(map(str, need))}`")


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the run directory."""
    preflight(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    d = dataclasses.asdict(cfg)
    if cfg.workers == 0:
        _loop(d)
        return out
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, cfg.workers), include_dashboard=False, log_to_driver=False)
    cuda = resolve_device(cfg.device).type == "cuda"
    trainer = TorchTrainer(
        _loop, train_loop_config=d,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cuda, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=RunConfig(storage_path=str(out.resolve() / "ray"), name="train"))
    trainer.fit()
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="vllm-hivis train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", required=True, help="run directory (an existing run is resumed)")
    ap.add_argument("--kind", default="hivis", choices=["hivis", "text", "eagle", "vispec"])
    ap.add_argument("--recipe", default="time-aware",
                    help="single-step | self-feedback | data-selection | seq-embed | step-bias | time-aware")
    ap.add_argument("--unroll", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="Ray Train workers (0: in this process)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    ap.add_argument("--resident-shards", type=int, default=4, help="data shards held in memory at once")
    ap.add_argument("--feature-layers", default="",
                    help="hivis only: comma list of target layers to fuse (e.g. 1,2,4 of a 4-layer target; the last "
                         "index is the final normed state); default: the last layer alone")
    args = ap.parse_args(argv)
    try:
        recipe = Recipe.named(args.recipe, kind=args.kind, unroll=args.unroll)
        if args.feature_layers:
            try:
                layers = [int(x) for x in args.feature_layers.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--feature-layers takes comma-separated layer indices, got "
                                 f"{args.feature_layers!r}") from None
            recipe = dataclasses.replace(recipe, feature_layers=layers).checked()
        cfg = TrainConfig(data=args.data, target=args.target, out=args.out, recipe=dataclasses.asdict(recipe),
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          workers=args.workers, threads=args.threads, device=args.device,
                          resident_shards=args.resident_shards)
        preflight(cfg)  # bad input fails here, before any work (ValueError covers DataError)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        out = train(cfg)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{out}: drafter in {out / 'drafter'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
