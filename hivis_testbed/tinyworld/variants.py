"""Tiny-world targets of other families, warm-started from the shipped tiny LLaVA-1.5 target and
fine-tuned on the tiny world (CPU, fp32):

    python -m hivis_testbed.tinyworld.variants next --out runs/next --steps 400
    python -m hivis_testbed.tinyworld.variants qwen --out runs/qwen --distill-steps 800 --steps 400

- **LLaVA-NeXT** (any-resolution): the same vision tower, projector and language model, one grid
  pinpoint (336 x 336), so a 168-px scene becomes its base view plus four 2x-upscaled tiles:
  144 + 24 x (24 + 1) = 744 image tokens (photographs of other aspect ratios get fewer after
  unpadding). New weights: `image_newline`. Fine-tuning teaches the language model the longer
  image span and the tiles.
- **Qwen2.5-VL** (M-RoPE): the language model's weights are copied into Qwen2's decoder (q/k/v
  biases zero; on text-only inputs the two compute the same logits, which `convert_qwen` checks);
  three vision tokens are added to the tokenizer. The vision transformer is new: first it is
  distilled to the LLaVA projector's outputs - at 336 px (scenes are upscaled 2x through the image
  processor's `min_pixels`) each merged 2x2 patch covers exactly one LLaVA patch, so its 144
  outputs match LLaVA's 144 row for row - then the whole model is fine-tuned, which teaches the
  language model M-RoPE image positions and the vision tokens.

Both are exported as plain transformers checkpoints (`from_pretrained` loads them; vLLM serves
them) and graded like the LLaVA-1.5 target (describe accuracy on unseen test scenes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_hivis.train.prompts import chat_text
from vllm_hivis.train.target import MM_KEYS as TARGET_MM_KEYS

from . import build
from .batches import IGNORE, answer_ids
from .dataset import sample
from .prompts import grade_description

PINPOINTS = [[336, 336]]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><image><|vision_end|>\n"
SCENE_SIZE = 168  # the shipped target's scenes (its vision tower input)
QWEN_PIXELS = dict(min_pixels=336 * 336, max_pixels=448 * 448)


def _llava(src: str):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(src, local_files_only=True)


def convert_next(src: str):
    """(LlavaNextForConditionalGeneration, processor) holding the LLaVA-1.5 target's weights."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    llava, tok = _llava(src)
    c = llava.config
    text = c.text_config
    text.max_position_embeddings = 2048  # two images: 1488 image tokens
    cfg = LlavaNextConfig(vision_config=c.vision_config, text_config=text, image_token_index=c.image_token_index,
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg)
    missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
    assert missing == ["model.image_newline"] and not unexpected, (missing, unexpected)
    size = c.vision_config.image_size
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                image_grid_pinpoints=PINPOINTS, do_center_crop=True),
        tokenizer=tok, patch_size=build.PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=build.CHAT_TEMPLATE, image_token=build.IMAGE_TOKEN, num_additional_image_tokens=1)
    return model, proc


def convert_qwen(src: str):
    """(Qwen2_5_VLForConditionalGeneration, processor, llava): the LLaVA-1.5 target's language model
    in Qwen2's decoder, a new vision transformer, and the LLaVA model (the distillation teacher)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    llava, tok = _llava(src)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    start, end, video = tok.convert_tokens_to_ids(VISION_TOKENS)
    t = llava.config.text_config
    half = t.head_dim // 2
    section = [half - 2 * (half * 5 // 12), half * 5 // 12, half * 5 // 12]  # Qwen's 16/24/24 split of 64, scaled
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, max_position_embeddings=2048,
                         rms_norm_eps=t.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, out_hidden_size=t.hidden_size,
                           patch_size=build.PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1, 3]),
        image_token_id=build.IMAGE_TOKEN_ID, video_token_id=video, vision_start_token_id=start,
        vision_end_token_id=end, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    src_sd = llava.state_dict()
    sd = model.state_dict()
    n_old = t.vocab_size
    with torch.no_grad():
        for k, v in src_sd.items():
            if k.startswith("model.language_model.") or k == "lm_head.weight":
                if k.endswith("embed_tokens.weight") or k == "lm_head.weight":
                    sd[k][:n_old] = v
                    sd[k][n_old:] = v.mean(0) if "embed" in k else -v.norm(dim=1).mean() * F.normalize(v.mean(0), dim=0)
                else:
                    assert sd[k].shape == v.shape, k
                    sd[k].copy_(v)
        for k in sd:
            if k.startswith("model.language_model.") and k.endswith("_proj.bias"):
                sd[k].zero_()
    model.load_state_dict(sd)
    model.config.architectures = [type(model).__name__]
    _check_same_text_logits(llava, model, tok)
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=build.PATCH_SIZE, merge_size=2, **QWEN_PIXELS),
        video_processor=Qwen2VLVideoProcessor(**QWEN_PIXELS), tokenizer=tok,
        chat_template=build.CHAT_TEMPLATE.replace("<image>\n", QWEN_IMAGE))
    return model, proc, llava


@torch.no_grad()
def _check_same_text_logits(llava, qwen, tok) -> None:
    ids = torch.tensor([tok("<s>USER: What colour is the background? ASSISTANT: The background is",
                            add_special_tokens=False)["input_ids"]])
    a = llava(input_ids=ids).logits[0]
    b = qwen(input_ids=ids).logits[0, :, : a.shape[-1]]
    assert torch.allclose(a, b, atol=1e-4), f"the copied language model differs: {(a - b).abs().max():.2e}"


# the processor's image inputs (vllm_hivis.train.target.MM_KEYS less mm_token_type_ids, which the
# processor gives for the prompt only: the loss recomputes it over prompt + answer)
MM_KEYS = tuple(k for k in TARGET_MM_KEYS if k != "mm_token_type_ids")


def collate(proc, samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Right-padded (ids [B, T], labels [B, T], attention [B, T], image inputs) of prompt + answer."""
    tok = proc.tokenizer
    enc = proc(images=[s.image for s in samples], text=[chat_text(proc, s.qa.question) for s in samples],
               return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    rows, labs = [], []
    for i, s in enumerate(samples):
        p = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        a = answer_ids(tok, s.qa.answer)
        rows.append(p + a)
        labs.append([IGNORE] * len(p) + a)
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    lab = torch.full((len(rows), T), IGNORE)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labs)):
        ids[i, : len(r)], lab[i, : len(lb)], att[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return ids, lab, att, {k: enc[k] for k in MM_KEYS if k in enc}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train(model, steps: int, lr: float, batch_size: int, offset: int, loss_fn, desc: str, log: Path,
          params=None) -> float:
    """AdamW with warmup + cosine; loss_fn(batch of samples) -> scalar. Returns the final EMA loss."""
    params = list(params if params is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    ema, t0 = None, time.time()
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, mininterval=5)):
        batch = [sample("train", offset + step * batch_size + j, SCENE_SIZE) for j in range(batch_size)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, min(50, steps // 10))
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if (step + 1) % 25 == 0:
            with log.open("a") as f:
                rec = {"stage": desc, "step": step + 1, "loss": ema, "elapsed_s": time.time() - t0}
                f.write(json.dumps(rec) + "\n")
    model.eval()
    return ema


def lm_loss(model, proc):
    def loss(batch):
        ids, lab, att, mm = collate(proc, batch)
        if "image_grid_thw" in mm:  # Qwen2.5-VL: sequence-aligned placeholder marks for its rope index
            mm["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
        return model(input_ids=ids, attention_mask=att, labels=lab, **mm).loss
    return loss


def distill_loss(qwen, proc, llava):
    """Relative MSE of Qwen's merged vision outputs against LLaVA's projected features, row for row."""
    def loss(batch):
        images = [s.image for s in batch]
        with torch.no_grad():
            pix = torch.stack([torch.from_numpy(_clip_pixels(im)) for im in images])
            teacher = llava.model.get_image_features(pixel_values=pix, vision_feature_layer=-1,
                                                     vision_feature_select_strategy="default").pooler_output
            teacher = torch.cat(list(teacher))  # [B * 144, H]
        enc = proc.image_processor(images=images, return_tensors="pt")
        feats = qwen.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
        student = torch.cat(list(feats))
        assert student.shape == teacher.shape, (student.shape, teacher.shape)
        return F.mse_loss(student, teacher) / teacher.var()
    return loss


def _clip_pixels(image):
    from .batches import pixels
    return pixels([image])[0].numpy()


@torch.no_grad()
def grade(model, proc, n: int = 50) -> dict:
    """Describe accuracy per attribute and exact match on `n` unseen test scenes (greedy)."""
    acc, exact = {}, []
    tok = proc.tokenizer
    for i in tqdm(range(n), desc="grade", mininterval=5):
        s = sample("test", i, SCENE_SIZE, kind="describe")
        enc = proc(images=[s.image], text=[chat_text(proc, s.qa.question)], return_tensors="pt",
                   add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=96, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        for k, v in grade_description(s.scene, text).items():
            acc.setdefault(k, []).extend(v)
        exact.append(text == s.qa.answer)
    return {"n_describe": n, "describe_accuracy": {k: round(sum(v) / max(1, len(v)), 4) for k, v in acc.items()},
            "describe_exact_match": sum(exact) / n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["next", "qwen"])
    ap.add_argument("--out", required=True, help="run dir; the exported model goes to OUT/model")
    ap.add_argument("--src", default=None, help="the LLaVA-1.5 tiny-world target (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps (whole model, LM loss)")
    ap.add_argument("--distill-steps", type=int, default=800, help="qwen: vision distillation steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--distill-lr", type=float, default=2e-3)
    ap.add_argument("--grade", type=int, default=50, help="test scenes to grade (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from hivis_testbed import assets

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl"
    src = args.src or str(assets.tiny_target())
    t0, prov = time.time(), {}
    if args.kind == "next":
        model, proc = convert_next(src)
    else:
        model, proc, llava = convert_qwen(src)
        prov["distill_loss"] = train(model, args.distill_steps, args.distill_lr, args.batch_size, 300_000,
                                     distill_loss(model, proc, llava), "distill", log,
                                     params=model.model.visual.parameters())
        prov["distill_seconds"] = round(time.time() - t0)
    t1 = time.time()
    prov["final_lm_loss"] = train(model, args.steps, args.lr, args.batch_size, 400_000, lm_loss(model, proc),
                                  "finetune", log)
    prov["finetune_seconds"] = round(time.time() - t1)
    prov.update(command="python -m hivis_testbed.tinyworld.variants " + " ".join(argv or __import__("sys").argv[1:]),
                args=vars(args), threads=args.threads, torch=torch.__version__)
    if args.grade:
        prov["metrics"] = grade(model, proc, args.grade)
        print(json.dumps(prov["metrics"]))
    prov["train_seconds"] = round(time.time() - t0)
    export(model, proc, out / "model", prov)
    print(f"exported {out / 'model'}")


def export(model, proc, out: Path, provenance: dict) -> Path:
    """fp16 checkpoint + processor + provenance (LLaVA-NeXT in the hub layout vLLM's loader reads)."""
    if type(model).__name__.startswith("LlavaNext"):
        return build.save_llava(model, proc, out, dtype=torch.float16, provenance=provenance)
    provenance = {"image_size": SCENE_SIZE, **provenance}  # the scene side it learned (any-size tower)
    model.to(torch.float16).save_pretrained(out)
    proc.save_pretrained(out)
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
