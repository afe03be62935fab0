"""The device check for GPU users' shapes, one prepared script (no vLLM needed: the device machine has
torch, Triton and transformers only).

    python scripts/gpu_check.py --out runs/gpu-check            # on a GPU: llava-1.5-7b drafter shapes
    python scripts/gpu_check.py --tiny --out /tmp/gpu-check     # anywhere (CI runs it on the CPU)

1. Training: the real trainer code path (``vllm_hivis.train.trainer.train``: shard streaming, the
   time-aware recipe, bf16 autocast and batches on the model's device on CUDA, checkpoint, export)
   on synthetic features at the target's shapes (default hidden 4096, vocabulary 32000, 576 image
   rows per prompt as llava-1.5-7b). The synthetic world is learnable, so the loss must fall: tokens
   follow a fixed permutation chain x_{p+1} = perm[x_p], and the "target" feature at row p is a
   scaled LM-head row of x_{p+1} (what a real target's last-layer state does: its head predicts the
   next token). Reports samples/s, peak device memory, loss at the start and the end.
2. CUDA graph: one draft pass of the drafter, captured in a CUDA graph and replayed across K draft
   steps (features fed back in place, the step index a device counter, as in the serving drafter,
   vllm_hivis/serving/drafter.py), against the same steps run eagerly. The same capture with the
   step index kept in Python (how the drafter was written before it was made capture-safe) is run
   beside it: its replays keep the step-0 bias, so it must differ from eager where the check does not.
   The serving module itself needs vLLM, which the device machine lacks: this mirror uses its
   training twin (vllm_hivis.train.drafters.HiViSDrafter, held to the serving drafter by the parity
   test) with the serving module's buffers and counter.

Writes <out>/gpu_check.json and gpu_check.md; exits 1 if the loss did not fall or the graph differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_hivis.train.data import Manifest, image_spans, write_shard  # noqa: E402
from vllm_hivis.train.losses import Recipe  # noqa: E402
from vllm_hivis.train.trainer import TrainConfig, frozen_target_parts, train  # noqa: E402


@dataclasses.dataclass
class Shapes:
    hidden: int = 4096
    vocab: int = 32000
    heads: int = 32
    ffn: int = 11008
    image_rows: int = 576
    prompt_text: int = 40
    answer: int = 120
    records: int = 64
    steps: int = 300
    batch: int = 8
    unroll: int = 4
    k: int = 5  # draft steps replayed in the graph check
    rows: int = 64  # rows of the captured draft pass

    @classmethod
    def tiny(cls) -> Shapes:
        return cls(hidden=64, vocab=512, heads=4, ffn=128, image_rows=9, prompt_text=8, answer=24, records=24,
                   steps=200, batch=4, rows=8)


# -- 1. training ---------------------------------------------------------------------------------
def make_target(out: Path, s: Shapes, device: torch.device) -> Path:
    """A llava-shaped target directory holding only what training reads: config.json, the LM
    embedding and head (random, bf16 as served). image token = the last id."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": s.vocab - 1,
           "image_seq_length": s.image_rows,
           "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
           "text_config": {"model_type": "llama", "hidden_size": s.hidden, "vocab_size": s.vocab,
                           "num_attention_heads": s.heads, "num_key_value_heads": s.heads,
                           "intermediate_size": s.ffn, "num_hidden_layers": 32, "rms_norm_eps": 1e-5,
                           "max_position_embeddings": 4096, "rope_theta": 10000.0, "torch_dtype": "float16"}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator(device=device).manual_seed(0)
    w = lambda: (torch.randn(s.vocab, s.hidden, generator=g, device=device) * 0.02).bfloat16().cpu()  # noqa: E731
    save_file({"language_model.model.embed_tokens.weight": w(), "language_model.lm_head.weight": w()},
              str(out / "model.safetensors"))
    return out


def make_dataset(out: Path, target: Path, s: Shapes, device: torch.device) -> Path:
    """Synthetic records in the real shard format (module doc: a learnable permutation chain)."""
    out.mkdir(parents=True, exist_ok=True)
    _, head, _ = frozen_target_parts(str(target))
    head_w = head.weight.to(device)  # [V, H]
    g = torch.Generator(device=device).manual_seed(1)
    V_text = s.vocab - 1  # the last id is the image token
    perm = torch.randperm(V_text, generator=g, device=device)
    man = Manifest(target=str(target), tokenizer=None, hidden_size=s.hidden, vocab_size=s.vocab,
                   image_token_id=s.vocab - 1, source={"kind": "synthetic-gpu-check"}, responses=[{"mode": "greedy"}])
    per_shard = max(1, s.records // 4)
    for shard in range(0, s.records, per_shard):
        recs = []
        for i in range(shard, min(s.records, shard + per_shard)):
            n_text = s.prompt_text + s.answer
            chain = torch.empty(n_text, dtype=torch.long, device=device)
            chain[0] = torch.randint(V_text, (1,), generator=g, device=device)
            for t in range(1, n_text):
                chain[t] = perm[chain[t - 1]]
            img = torch.full((s.image_rows,), s.vocab - 1, dtype=torch.long, device=device)
            ids = torch.cat([chain[:1], img, chain[1:]])  # [BOS-ish, image, text...]
            L = len(ids)
            nxt = torch.cat([ids[1:], ids[-1:]])
            # scaled so that the head's logit of the next token is ~8 above the rest (a confident target)
            hidden = head_w[nxt] * (8.0 / (0.02**2 * s.hidden)) + 0.01 * torch.randn(L, s.hidden, generator=g,
                                                                                      device=device)
            prompt_len = 1 + s.image_rows + s.prompt_text - 1
            recs.append({"id": f"{i}", "kind": "synthetic", "mode": "greedy", "input_ids": ids.cpu(),
                         "prompt_len": prompt_len, "spans": image_spans(ids.tolist(), s.vocab - 1),
                         "hidden": hidden.bfloat16().cpu(),
                         "image_embeds": torch.randn(s.image_rows, s.hidden, generator=g, device=device)
                         .bfloat16().cpu()})
        f = f"shard-{shard // per_shard:05d}.safetensors"
        man.shards.append({"file": f, "samples": len(recs), "bytes": write_shard(out / f, recs)})
    man.save(out)
    return out


def check_training(out: Path, s: Shapes, device: torch.device) -> dict:
    t0 = time.time()
    target = make_target(out / "target", s, device)
    data = make_dataset(out / "data", target, s, device)
    t_data = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    recipe = dataclasses.asdict(Recipe.named("time-aware", unroll=s.unroll))
    cfg = TrainConfig(data=str(data), target=str(target), out=str(out / "run"), recipe=recipe, steps=s.steps,
                      batch_size=s.batch, lr=1e-3, warmup=min(50, s.steps // 5), ckpt_every=s.steps,
                      device=device.type)
    t1 = time.time()
    train(cfg)
    wall = time.time() - t1
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    # The recipe's total loss adds a term per unrolled step as drafts start to reach it, so it can
    # grow while the drafter learns: step 0's distillation loss (ce0) and top-1 agreement (acc0)
    # with the target are the comparable figures.
    avg = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    first, last = avg("ce0", log[:1]), avg("ce0", log[-3:])
    return {"device": str(device), "data_build_s": round(t_data, 1), "train_wall_s": round(wall, 1),
            "steps": s.steps, "batch": s.batch, "samples_per_s": round(s.steps * s.batch / wall, 2),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "ce0_first": round(first, 4), "ce0_last": round(last, 4), "acc0_first": round(log[0]["acc0"], 3),
            "acc0_last": round(avg("acc0", log[-3:]), 3), "loss_first": round(log[0]["loss"], 4),
            "loss_last": round(log[-1]["loss"], 4),
            "loss_fell": last < 0.7 * first and avg("acc0", log[-3:]) > max(0.5, log[0]["acc0"]),
            "exported": (out / "run" / "drafter" / "config.json").is_file()}


# -- 2. CUDA graph -------------------------------------------------------------------------------
class DraftPass(torch.nn.Module):
    """The serving drafter's compiled region (serving/drafter.py HiViSDrafterModel.forward) as the
    training twin computes it (HiViSDrafter.forward: f_in = f + b_k, fc, one layer), with the
    serving module's device step counter advanced in place."""

    def __init__(self, twin, embed: torch.nn.Embedding, python_counter: bool = False):
        super().__init__()
        self.twin, self.embed, self.python_counter = twin, embed, python_counter
        device = next(twin.parameters()).device
        self.register_buffer("draft_step", torch.zeros(1, dtype=torch.long, device=device))
        self.py_step = 0  # the capture-unsafe variant's counter (frozen into a captured graph)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # ids: [T]; positions: [T]; hidden: [T, H] -> [T, H]
        step = self.py_step if self.python_counter else self.draft_step
        out = self.twin(self.embed(ids)[None], hidden[None], positions[None], steps=step)[0]
        if self.python_counter:
            self.py_step += 1
        else:
            self.draft_step.add_(1)
        return out

    def begin(self) -> None:
        self.draft_step.zero_()
        self.py_step = 0


def _steps_eager(m: DraftPass, ids, pos, f0, k: int) -> list[torch.Tensor]:
    m.begin()
    outs, f = [], f0
    for _ in range(k):
        f = m(ids, pos, f).clone()
        outs.append(f)
    return outs


def _steps_graph(m: DraftPass, ids, pos, f0, k: int) -> list[torch.Tensor]:
    static_f = f0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture stream, as torch requires
        for _ in range(2):
            m.begin()
            m(ids, pos, static_f)
    torch.cuda.current_stream().wait_stream(s)
    m.begin()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m(ids, pos, static_f)
    m.begin()
    static_f.copy_(f0)
    outs = []
    for _ in range(k):
        graph.replay()
        outs.append(static_out.clone())
        static_f.copy_(static_out)  # fed back in place: the graph's input address stays
    return outs


def check_graph(s: Shapes, device: torch.device, dtype: torch.dtype) -> dict:
    from vllm_hivis.method.checkpoint import DrafterSpec
    from vllm_hivis.train.drafters import HiViSDrafter

    tcfg = {"hidden_size": s.hidden, "vocab_size": s.vocab, "num_attention_heads": s.heads,
            "num_key_value_heads": s.heads, "intermediate_size": s.ffn, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "rope_theta": 10000.0}
    torch.manual_seed(0)
    twin = HiViSDrafter.for_target(tcfg, DrafterSpec(hidden_size=s.hidden, vocab_size=s.vocab,
                                                    step_bias_steps=s.k - 1))
    with torch.no_grad():
        twin.step_bias.normal_(0, 0.5)  # distinct biases per step, so a frozen step index shows
    twin = twin.to(device, dtype).eval()
    embed = torch.nn.Embedding(s.vocab, s.hidden).to(device, dtype)
    ids = torch.randint(s.vocab, (s.rows,), device=device)
    pos = torch.arange(s.rows, device=device)
    f0 = torch.randn(s.rows, s.hidden, device=device, dtype=dtype)
    res = {"dtype": str(dtype).removeprefix("torch."), "rows": s.rows, "draft_steps": s.k}
    with torch.inference_mode():
        want = _steps_eager(DraftPass(twin, embed), ids, pos, f0, s.k)
        if device.type != "cuda":
            res["skipped"] = "no CUDA device"
            return res
        diff = lambda got: [float((g.float() - w.float()).abs().max()) for g, w in zip(got, want)]  # noqa: E731
        res["device_counter_max_abs_diff"] = diff(_steps_graph(DraftPass(twin, embed), ids, pos, f0, s.k))
        res["python_counter_max_abs_diff"] = diff(_steps_graph(DraftPass(twin, embed, True), ids, pos, f0, s.k))
    scale = max(float(w.float().abs().max()) for w in want)
    tol = 2e-2 * scale if dtype in (torch.bfloat16, torch.float16) else 1e-4 * scale
    res["tolerance"] = tol
    res["graph_equals_eager"] = max(res["device_counter_max_abs_diff"]) <= tol
    # the frozen-step variant must differ from eager from step 1 on (step 0 has no bias in either)
    res["frozen_step_caught"] = max(res["python_counter_max_abs_diff"][1:]) > tol
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, CI)")
    ap.add_argument("--steps", type=int, help="training steps (default: 300, tiny 200)")
    ap.add_argument("--skip-train", action="store_true")
    a = ap.parse_args(argv)
    s = Shapes.tiny() if a.tiny else Shapes()
    if a.steps:
        s.steps = a.steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"machine": platform.node(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "shapes": dataclasses.asdict(s), "command": " ".join(sys.argv)}
    t0 = time.time()
    res["graph"] = check_graph(s, device, dtype)
    print("[gpu-check] graph:", json.dumps(res["graph"]), flush=True)
    if not a.skip_train:
        res["training"] = check_training(out, s, device)
        print("[gpu-check] training:", json.dumps(res["training"]), flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    rows = [f"| {k} | {v} |" for sec in ("training", "graph") for k, v in res.get(sec, {}).items()]
    (out / "gpu_check.md").write_text(f"# GPU check ({res['gpu'] or 'CPU'}, torch {res['torch']})\n\n"
                                      f"`{res['command']}`\n\n| quantity | value |\n|---|---|\n" + "\n".join(rows)
                                      + "\n")
    ok = res.get("training", {}).get("loss_fell", True) and res["graph"].get("graph_equals_eager", True)
    ok = ok and res["graph"].get("frozen_step_caught", True)
    print(f"[gpu-check] {'OK' if ok else 'FAILED'} in {res['wall_s']} s -> {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
