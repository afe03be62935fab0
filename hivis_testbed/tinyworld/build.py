"""Build the tiny LLaVA's parts: tokenizer, chat template, processor, config, checkpoint I/O.

The target is a real ``LlavaForConditionalGeneration`` (CLIP vision tower + projector + Llama),
saved in the hub key layout (``vision_tower.vision_model.*``) that both transformers and vLLM load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .dataset import sample
from .prompts import KINDS

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0..4
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 4
PATCH_SIZE = 14

# LLaVA-1.5 conversation format. Starts with the BOS token so that chat prompts through the
# server equal offline prompts. Accepts string content and OpenAI-style part lists.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %} ASSISTANT: "
    "{% elif message['role'] == 'system' %}"
    "{% else %}{{ raise_exception('unsupported role ' + message['role']) }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or part['type'] == 'image_pil' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% elif message['role'] == 'system' %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def prompt_text(question: str, with_image: bool = True) -> str:
    """The raw prompt string (without BOS) that the chat template produces for one turn."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:" if with_image else f"USER: {question} ASSISTANT:"


def train_tokenizer(num_texts: int = 4000, vocab_size: int = 1024):
    """Byte-level BPE over tiny-world prompts and answers (every template word becomes a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for i in range(num_texts):
        s = sample("train", i, image_size=42, kind=KINDS[i % len(KINDS)])
        texts.append(prompt_text(s.qa.question) + " " + s.qa.answer)
    texts.append("A chat between a user and an assistant. What is shown in this picture? Hello!")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_processor(tokenizer, image_size: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=1)


def make_config(vocab_size: int, image_size: int = 126, vision_hidden: int = 128, vision_layers: int = 2,
                text_hidden: int = 192, text_layers: int = 4, text_heads: int = 4, text_ffn: int = 512,
                max_positions: int = 1024):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    assert image_size % (3 * PATCH_SIZE) == 0, "grid cells must be whole patches"
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4,
                              image_size=image_size, patch_size=PATCH_SIZE, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=text_ffn, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, num_key_value_heads=text_heads, vocab_size=vocab_size,
                       max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                       image_seq_length=(image_size // PATCH_SIZE) ** 2, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def _hub_key(k: str) -> str:
    """transformers 5 module path -> the hub layout vLLM's llava loader expects."""
    k = k.removeprefix("model.")
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        k = "vision_tower.vision_model." + k.removeprefix("vision_tower.")
    if k.startswith("language_model.") and not k.startswith("language_model.model."):
        k = "language_model.model." + k.removeprefix("language_model.")
    return k


def save_llava(model, processor, out_dir: str | os.PathLike, dtype=torch.float16,
               provenance: dict | None = None) -> Path:
    """Save a LLaVA-family model (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
    in hub layout with its processor and provenance."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        hk = "language_model.lm_head.weight" if k == "lm_head.weight" else _hub_key(k)
        sd[hk] = v.detach().to(dtype).contiguous()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config
    cfg.dtype = dtype
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(out)
    processor.save_pretrained(out)
    if provenance is not None:
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
