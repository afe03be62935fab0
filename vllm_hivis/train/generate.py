"""Generate drafter training data from a target VLM: vLLM answers, transformers hidden states.

    vllm-hivis generate-data --target DIR --out DATA --tinyworld train:0:4096 --responses greedy,sample:1.0
    vllm-hivis generate-data --target DIR --out DATA --jsonl prompts.jsonl
    vllm-hivis generate-data ... --feature-layers 1,2,3   # also record intermediate layers (multi-layer drafters)

The prompt list is cut into shards of ``--shard-size`` prompts, made in two phases so that one
device never holds two copies of the target (a 7B target at vLLM's 0.9 memory utilisation leaves
no room for a second one):
  1. ``AnswerWorker``: vLLM answers every shard's prompts (greedy and/or sampled) and writes
     ``answers-XXXXX.json``; the engine is then shut down;
  2. ``HiddenWorker``: transformers teacher-forces each answer and records the target's hidden
     states in the dtype vLLM served the target in (fp16 for llava-1.5), writing the shard.
With ``--workers N`` each phase runs as a Ray Data pipeline over N actors (GPU: one per GPU).
Existing answers and shard files are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import DataError, Manifest, compact_layers, image_spans, read_shard, tokenizer_fingerprint, write_shard
from .prompts import PromptItem, jsonl_source, num_prompts, prompt_source, tinyworld_source
from .target import HFTarget, check_target, image_size, image_token_id

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


class AnswerWorker:
    """Phase 1 on one device: the target's answers from vLLM, written as ``answers-XXXXX.json``."""

    def __init__(self, target_dir: str, responses: list[dict], max_tokens: int = 160, seed: int = 0):
        from transformers import AutoProcessor
        from vllm import LLM

        check_target(target_dir)
        self.responses, self.max_tokens, self.seed = responses, max_tokens, seed
        cuda = torch.cuda.is_available()
        self.llm = LLM(model=target_dir, dtype="auto" if cuda else "float32", max_model_len=1024,
                       enforce_eager=not cuda, seed=seed, limit_mm_per_prompt={"image": 4},
                       gpu_memory_utilization=0.9 if cuda else 0.25)
        self.dtype = str(self.llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
        self.processor = AutoProcessor.from_pretrained(target_dir, local_files_only=True)

    def prompt(self, item: PromptItem) -> dict:
        text = item.chat_text(self.processor)
        if item.image is None:
            return {"prompt": text}
        return {"prompt": text, "multi_modal_data": {"image": item.image}}

    def answer(self, items: list[PromptItem], shard: int) -> list[dict]:
        from vllm import SamplingParams

        prompts = [self.prompt(it) for it in items]
        jobs = []  # (item index, mode, sampling params)
        for r in self.responses:
            for k in range(r["n"]):
                for j in range(len(items)):
                    seed = None if r["mode"] == "greedy" else hash((self.seed, shard, j, k)) % (2**31)
                    jobs.append((j, f"{r['mode']}{k if r['n'] > 1 else ''}",
                                 SamplingParams(temperature=r["temperature"], max_tokens=self.max_tokens, seed=seed)))
        outs = self.llm.generate([prompts[j] for j, _, _ in jobs], [sp for _, _, sp in jobs], use_tqdm=False)
        return [{"item": j, "id": items[j].id, "kind": items[j].kind, "mode": mode,
                 "input_ids": list(o.prompt_token_ids) + list(o.outputs[0].token_ids),
                 "prompt_len": len(o.prompt_token_ids)} for (j, mode, _), o in zip(jobs, outs)]

    def run(self, task: dict) -> dict:
        items = prompt_source(task["source"], task["start"], task["stop"])
        answers = self.answer(items, task["shard"])
        path = Path(task["out"]) / answers_file(task)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"dtype": self.dtype, "answers": answers}))
        os.replace(tmp, path)
        return {"file": path.name, "answers": len(answers)}

    def close(self) -> None:
        """Shut the engine down and give its memory back (phase 2 needs the device)."""
        import gc

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __call__(self, batch: dict) -> dict:  # Ray Data entry
        return {"result": np.array([json.dumps(self.run(json.loads(t))) for t in batch["task"]])}


class HiddenWorker:
    """Phase 2 on one device: teacher-forced hidden states of the answers, in the dtype the target
    was served in (vLLM's engine dtype, recorded by phase 1), written as the shard."""

    def __init__(self, target_dir: str, feature_layers: tuple[int, ...] = ()):
        self.target_dir, self.feature_layers = target_dir, tuple(feature_layers)
        self.target: HFTarget | None = None

    def _target(self, dtype: str) -> HFTarget:
        if self.target is None or self.target.dtype != getattr(torch, dtype):
            cuda = torch.cuda.is_available()
            self.target = HFTarget(self.target_dir, dtype=getattr(torch, dtype), device="cuda" if cuda else "cpu")
        return self.target

    def run(self, task: dict) -> dict:
        path = Path(task["out"]) / answers_file(task)
        data = json.loads(path.read_text())
        target = self._target(data["dtype"])
        items = prompt_source(task["source"], task["start"], task["stop"])
        records = []
        for a in data["answers"]:
            ids = torch.tensor(a["input_ids"])
            spans = image_spans(a["input_ids"][: a["prompt_len"]], target.image_token_id)
            hidden, image_embeds, layers = target.hidden_states(ids, items[a["item"]].image, self.feature_layers)
            # image features: one per placeholder row, or none where the model does not return them
            # (Qwen2.5-VL: only the ViSpec-style baseline needs them, and says so)
            if len(image_embeds) not in (0, int(np.sum(spans[:, 1]))):
                raise DataError(f"answer {a['id']!r}: the target returned {len(image_embeds)} image feature rows "
                                f"for {int(np.sum(spans[:, 1]))} image placeholder tokens; the processor and the "
                                "model disagree on the image token count (check the target's processor config)")
            records.append({"id": a["id"], "kind": a["kind"], "mode": a["mode"], "input_ids": ids,
                            "prompt_len": a["prompt_len"], "spans": spans, "hidden": hidden,
                            "image_embeds": image_embeds,
                            "layers": None if layers is None else compact_layers(layers, spans),
                            "feature_layers": self.feature_layers})
        nbytes = write_shard(Path(task["out"]) / task["file"], records)
        path.unlink()
        return {"file": task["file"], "samples": len(records), "bytes": nbytes}

    def __call__(self, batch: dict) -> dict:  # Ray Data entry
        return {"result": np.array([json.dumps(self.run(json.loads(t))) for t in batch["task"]])}


def answers_file(task: dict) -> str:
    return f"answers-{task['shard']:05d}.json"


def plan_shards(out: Path, source: dict, num_items: int, shard_size: int) -> list[dict]:
    tasks = []
    for i, start in enumerate(range(0, num_items, shard_size)):
        f = f"shard-{i:05d}.safetensors"
        tasks.append({"shard": i, "start": start, "stop": min(num_items, start + shard_size), "file": f,
                      "source": source, "out": str(out), "done": (out / f).is_file()})
    return tasks


def default_worker_resources() -> dict:
    """What each Ray Data actor asks for: one GPU where the driver sees CUDA (vLLM and the HF
    target need it visible; an actor asking only for CPUs gets CUDA_VISIBLE_DEVICES=""), else one
    CPU. Each phase's actors exit when its dataset is consumed, so phase 2 finds the GPUs free."""
    return {"num_gpus": 1} if torch.cuda.is_available() else {"num_cpus": 1}


def parse_feature_layers(spec: str | None, target_dir: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]: intermediate target layers to record (1..L-1 for an L-layer target; the
    final state is always recorded)."""
    if not spec:
        return []
    try:
        ids = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise DataError(f"--feature-layers takes comma-separated layer indices such as 1,2,3; got {spec!r}") from None
    n = int(check_target(target_dir)["text_config"]["num_hidden_layers"])
    bad = [i for i in ids if not 1 <= i < n]
    if bad:
        raise DataError(f"--feature-layers {bad} out of range: the target has {n} decoder layers, so intermediate "
                        f"layers are 1..{n - 1} (the final layer, {n}, is always recorded as the hidden state)")
    return ids


def generate_dataset(target_dir: str, out_dir: str, source: dict, responses: list[dict], shard_size: int = 256,
                     workers: int = 0, max_tokens: int = 160, seed: int = 0,
                     worker_resources: dict | None = None, feature_layers: list[int] | None = None) -> Manifest:
    """Generate (or resume) a dataset. workers=0: in this process; workers>=1: Ray Data actors.
    feature_layers: intermediate target layers recorded besides the final one (parse_feature_layers)."""
    cfg = check_target(target_dir)
    feature_layers = list(feature_layers or [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_items = num_prompts(source)
    if n_items == 0:
        raise DataError("the prompt source is empty")
    man = Manifest(target=str(Path(target_dir).resolve()), tokenizer=tokenizer_fingerprint(target_dir),
                   hidden_size=cfg["text_config"]["hidden_size"], vocab_size=cfg["text_config"]["vocab_size"],
                   image_token_id=image_token_id(cfg), source=source, responses=responses,
                   feature_layers=feature_layers)
    if (out / "manifest.json").is_file():
        old = Manifest.load(out)
        if ((old.tokenizer, old.source, old.responses, old.feature_layers)
                != (man.tokenizer, man.source, man.responses, man.feature_layers)):
            raise DataError(f"{out} holds a dataset of another target, source, response set or feature layers; "
                            "use a new --out")
    tasks = plan_shards(out, source, n_items, shard_size)
    records = sum(t["stop"] - t["start"] for t in tasks if not t["done"]) * sum(r["n"] for r in responses)
    # hidden states and image features at every row; layers at the text rows only (an upper bound: 1/3 of them)
    need = records * (max_tokens + EST_PROMPT_ROWS) * man.hidden_size * 2 * (2 + len(feature_layers) / 3)
    free = shutil.disk_usage(out).free
    if need > free:
        raise DataError(f"not enough disk space in {out}: ~{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
    todo = [t for t in tasks if not t["done"]]
    # Phase 1 (vLLM answers) for shards without answers, then phase 2 (hidden states): never both
    # models on a device at once, and each phase resumes where it stopped.
    answer = [t for t in todo if not (out / answers_file(t)).is_file()]
    ray_kw = dict(batch_size=1, concurrency=workers, **(worker_resources or default_worker_resources()))
    if answer and workers == 0:
        worker = AnswerWorker(target_dir, responses, max_tokens, seed)
        try:
            for t in tqdm(answer, desc="answers (vLLM)"):
                worker.run(t)
        finally:
            worker.close()
    elif answer:
        import ray

        ray.data.from_items([{"task": json.dumps(t)} for t in answer]).map_batches(
            AnswerWorker, fn_constructor_kwargs=dict(target_dir=target_dir, responses=responses,
                                                     max_tokens=max_tokens, seed=seed), **ray_kw).take_all()
    results = []
    if todo and workers == 0:
        worker = HiddenWorker(target_dir, tuple(feature_layers))
        results = [worker.run(t) for t in tqdm(todo, desc="hidden states")]
    elif todo:
        import ray

        res = ray.data.from_items([{"task": json.dumps(t)} for t in todo]).map_batches(
            HiddenWorker, fn_constructor_kwargs=dict(target_dir=target_dir, feature_layers=tuple(feature_layers)),
            **ray_kw).take_all()
        results = [json.loads(r["result"]) for r in res]
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
    ap.add_argument("--feature-layers", default="",
                    help="comma list of intermediate target layers to record too (1..L-1), for multi-layer drafters")
    args = ap.parse_args(argv)
    try:
        for name in ("shard_size", "max_tokens"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.workers < 0:
            raise DataError(f"--workers must be >= 0 (0: in this process), got {args.workers}")
        check_target(args.target)
        layers = parse_feature_layers(args.feature_layers, args.target)
        source = (tinyworld_source(args.tinyworld, image_size(args.target), args.prompt_kind)
                  if args.tinyworld else jsonl_source(args.jsonl))
        man = generate_dataset(args.target, args.out, source, parse_responses(args.responses), args.shard_size,
                               args.workers, args.max_tokens, args.seed, feature_layers=layers)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out}: {man.num_samples} samples in {len(man.shards)} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
