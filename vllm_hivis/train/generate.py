"""Generate drafter training data from a target VLM: vLLM answers, transformers hidden states.

    vllm-hivis generate-data --target DIR --out DATA --tinyworld train:0:4096 --responses greedy,sample:1.0
    vllm-hivis generate-data --target DIR --out DATA --jsonl prompts.jsonl

The prompt list is cut into shards of ``--shard-size`` prompts; each shard is one unit of work
for a ``TargetWorker`` (one vLLM engine + one transformers copy of the target per device). With
``--workers N`` the shards run as a Ray Data pipeline over N actors (GPU: one actor per GPU);
existing shard files are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import DataError, Manifest, image_spans, read_shard, tokenizer_fingerprint, write_shard
from .prompts import PromptItem, jsonl_source, num_prompts, prompt_source, tinyworld_source
from .target import HFTarget, check_target

# Disk estimate per record: prompt (image rows included) + answer rows, each stored twice at most
# (hidden state, image embedding), fp16.
EST_PROMPT_ROWS = 600


def parse_responses(spec: str) -> list[dict]:
    """'greedy,sample:1.0x2' -> [{mode: greedy}, {mode: sample, temperature: 1.0, n: 2}]."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if part == "greedy":
            out.append({"mode": "greedy", "temperature": 0.0, "n": 1})
        elif part.startswith("sample"):
            t, _, n = part.partition(":")[2].partition("x")
            out.append({"mode": "sample", "temperature": float(t or 1.0), "n": int(n or 1)})
        else:
            raise DataError(f"unknown response mode {part!r}; expected 'greedy' or 'sample[:T[xN]]'")
    if not out:
        raise DataError("no response modes given (e.g. --responses greedy,sample:1.0)")
    return out


class TargetWorker:
    """One target on one device: vLLM for the answers, transformers for the hidden states."""

    def __init__(self, target_dir: str, responses: list[dict], max_tokens: int = 160, seed: int = 0):
        from vllm import LLM

        check_target(target_dir)
        self.responses, self.max_tokens, self.seed = responses, max_tokens, seed
        cuda = torch.cuda.is_available()
        self.llm = LLM(model=target_dir, dtype="auto" if cuda else "float32", max_model_len=1024,
                       enforce_eager=not cuda, seed=seed, limit_mm_per_prompt={"image": 4},
                       gpu_memory_utilization=0.9 if cuda else 0.25)
        self.target = HFTarget(target_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                               device="cuda" if cuda else "cpu")

    def prompt(self, item: PromptItem) -> dict:
        text = item.chat_text(self.target.processor)
        if item.image is None:
            return {"prompt": text}
        return {"prompt": text, "multi_modal_data": {"image": item.image}}

    def run(self, items: list[PromptItem], shard: int) -> list[dict]:
        from vllm import SamplingParams

        prompts = [self.prompt(it) for it in items]
        jobs = []  # (item, prompt, mode, sampling params)
        for r in self.responses:
            for k in range(r["n"]):
                for j, (it, p) in enumerate(zip(items, prompts)):
                    seed = None if r["mode"] == "greedy" else hash((self.seed, shard, j, k)) % (2**31)
                    jobs.append((it, p, f"{r['mode']}{k if r['n'] > 1 else ''}",
                                 SamplingParams(temperature=r["temperature"], max_tokens=self.max_tokens, seed=seed)))
        outs = self.llm.generate([j[1] for j in jobs], [j[3] for j in jobs], use_tqdm=False)
        records = []
        for (it, _, mode, _), o in zip(jobs, outs):
            prompt_ids = list(o.prompt_token_ids)
            ids = torch.tensor(prompt_ids + list(o.outputs[0].token_ids))
            spans = image_spans(prompt_ids, self.target.image_token_id)
            hidden, image_embeds = self.target.hidden_states(ids, it.image)
            assert len(image_embeds) == int(np.sum(spans[:, 1])), "image rows != placeholder rows"
            records.append({"id": it.id, "kind": it.kind, "mode": mode, "input_ids": ids, "prompt_len": len(prompt_ids),
                            "spans": spans, "hidden": hidden, "image_embeds": image_embeds})
        return records

    def __call__(self, batch: dict) -> dict:
        """Ray Data entry: generate and write the shards named in the batch."""
        results = [self.make_shard(json.loads(s)) for s in batch["task"]]
        return {"result": np.array([json.dumps(r) for r in results])}

    def make_shard(self, task: dict) -> dict:
        items = prompt_source(task["source"], task["start"], task["stop"])
        records = self.run(items, task["shard"])
        path = Path(task["out"]) / task["file"]
        nbytes = write_shard(path, records)
        return {"file": task["file"], "samples": len(records), "bytes": nbytes}


def plan_shards(out: Path, source: dict, num_items: int, shard_size: int) -> list[dict]:
    tasks = []
    for i, start in enumerate(range(0, num_items, shard_size)):
        f = f"shard-{i:05d}.safetensors"
        tasks.append({"shard": i, "start": start, "stop": min(num_items, start + shard_size), "file": f,
                      "source": source, "out": str(out), "done": (out / f).is_file()})
    return tasks


def generate_dataset(target_dir: str, out_dir: str, source: dict, responses: list[dict], shard_size: int = 256,
                     workers: int = 0, max_tokens: int = 160, seed: int = 0,
                     worker_resources: dict | None = None) -> Manifest:
    """Generate (or resume) a dataset. workers=0: in this process; workers>=1: Ray Data actors."""
    cfg = check_target(target_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_items = num_prompts(source)
    if n_items == 0:
        raise DataError("the prompt source is empty")
    man = Manifest(target=str(Path(target_dir).resolve()), tokenizer=tokenizer_fingerprint(target_dir),
                   hidden_size=cfg["text_config"]["hidden_size"], vocab_size=cfg["text_config"]["vocab_size"],
                   image_token_id=int(cfg["image_token_index"]), source=source, responses=responses)
    if (out / "manifest.json").is_file():
        old = Manifest.load(out)
        if (old.tokenizer, old.source, old.responses) != (man.tokenizer, man.source, man.responses):
            raise DataError(f"{out} holds a dataset of another target, source or response set; use a new --out")
    tasks = plan_shards(out, source, n_items, shard_size)
    records = sum(t["stop"] - t["start"] for t in tasks if not t["done"]) * sum(r["n"] for r in responses)
    need = records * (max_tokens + EST_PROMPT_ROWS) * man.hidden_size * 2 * 2
    free = shutil.disk_usage(out).free
    if need > free:
        raise DataError(f"not enough disk space in {out}: ~{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
    todo = [t for t in tasks if not t["done"]]
    results = []
    if todo and workers == 0:
        worker = TargetWorker(target_dir, responses, max_tokens, seed)
        for t in tqdm(todo, desc="shards"):
            results.append(worker.make_shard(t))
    elif todo:
        import ray

        ds = ray.data.from_items([{"task": json.dumps(t)} for t in todo])
        res = ds.map_batches(TargetWorker, fn_constructor_kwargs=dict(target_dir=target_dir, responses=responses,
                                                                       max_tokens=max_tokens, seed=seed),
                             batch_size=1, concurrency=workers, **(worker_resources or {"num_cpus": 1}))
        results = [json.loads(r["result"]) for r in res.take_all()]
    known = {sh["file"]: sh for sh in (Manifest.load(out).shards if (out / "manifest.json").is_file() else [])}
    known.update({r["file"]: r for r in results})
    for t in tasks:  # shards on disk that no manifest lists (a run killed after writing them)
        if t["done"] and t["file"] not in known:
            known[t["file"]] = {"file": t["file"], "samples": len(read_shard(out / t["file"])),
                                "bytes": (out / t["file"]).stat().st_size}
    man.shards = [known[t["file"]] for t in tasks if t["file"] in known]
    man.save(out)
    return man


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="vllm-hivis generate-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target VLM directory (local)")
    ap.add_argument("--out", required=True, help="dataset directory (created; an existing one is resumed)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tinyworld", help="SPLIT:START:COUNT of tiny-world scenes (mixed prompt kinds)")
    src.add_argument("--jsonl", help='prompts file: one {"image": path|null, "prompt": text} per line')
    ap.add_argument("--prompt-kind", default="mix", help="tiny world only: mix or one prompt kind")
    ap.add_argument("--responses", default="greedy", help="comma list: greedy, sample:T[xN]")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0, help="Ray Data actors (0: in this process)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg = check_target(args.target)
        source = (tinyworld_source(args.tinyworld, cfg["vision_config"]["image_size"], args.prompt_kind)
                  if args.tinyworld else jsonl_source(args.jsonl))
        man = generate_dataset(args.target, args.out, source, parse_responses(args.responses), args.shard_size,
                               args.workers, args.max_tokens, args.seed)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out}: {man.num_samples} samples in {len(man.shards)} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
