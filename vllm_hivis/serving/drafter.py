"""The hivis drafter as a vLLM model (registered as ``HiViSDrafterForCausalLM``).

One EAGLE-style step, t = a drafter position (text tokens only, see hide.py):

    f_in  = f_t                          verified rows: the target's last-layer (post-norm) state
          = f̂_t + b_k                   draft step k >= 1: the drafter's own previous output, plus
                                         the step-dependent bias-correction residual b_k (v2; 0 if off)
    h     = fc([Emb(x_{t+1}) ; f_in])    fuse token embedding and feature (2H -> H, no bias)
    f̂_t+1 = DecoderLayer(h, pos=c)       one Llama layer, no input norm (EAGLE), RoPE at drafter pos
    logits = LMHead_target(f̂_t+1)        the target's own LM head (shared, not in the checkpoint)

`vllm_hivis.train.drafters.HiViSDrafter` is the plain-torch twin used for training; a parity test
holds the two to the same logits.
"""


from collections.abc import Iterable

import torch
import torch.nn as nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsEagle
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_draft_quant_config,
    maybe_prefix,
    process_eagle_weight,
)


class _DrafterLayer(LlamaDecoderLayer):
    """A Llama decoder layer without input norm (the fused input is not normalised, as in EAGLE)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str, config) -> None:
        super().__init__(vllm_config, prefix=prefix, config=config)
        self.input_layernorm = nn.Identity()

    def get_quant_config(self, vllm_config: VllmConfig):
        return get_draft_quant_config(vllm_config)


@support_torch_compile
class HiViSDrafterModel(nn.Module):
    """fc + one decoder layer; the compiled region (the step bias is applied outside it)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1),
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0) -> None:
        super().__init__()
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        H = config.hidden_size
        # Placeholder: replaced by the target's embedding at load (shared, never in the checkpoint).
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, H, prefix=maybe_prefix(prefix, "embed_tokens"))
        self.fc = ReplicatedLinear(2 * H, H, bias=False, params_dtype=vllm_config.model_config.dtype,
                                   quant_config=get_draft_quant_config(vllm_config),
                                   prefix=maybe_prefix(prefix, "fc"), return_bias=False)
        # The attention layer is named after the target's layers (layers.<n_target>) so the two
        # KV caches never collide; the module index stays 0 to match checkpoint keys.
        self.layers = nn.ModuleList([_DrafterLayer(vllm_config, maybe_prefix(prefix, f"layers.{start_layer_id}"),
                                                   config)])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens] drafter (compressed) positions
        hidden_states: torch.Tensor,  # [num_tokens, H] input features f_in
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(torch.cat((self.embed_tokens(input_ids), hidden_states), dim=-1))
        h, residual = self.layers[0](positions, h, None)
        h = h + residual
        return h, h


class HiViSDrafterForCausalLM(nn.Module, SupportsEagle):
    """vLLM entry class. Returns (features for logits, features fed to the next draft step)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        spec = getattr(config, "hivis", None) or {}
        if getattr(config, "draft_vocab_size", None) is None:
            config.draft_vocab_size = config.vocab_size
        self.model = HiViSDrafterModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                       start_layer_id=vllm_config.model_config.get_num_layers(
                                           vllm_config.parallel_config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        steps = int(spec.get("step_bias_steps", 0))
        self.step_bias = nn.Parameter(torch.zeros(steps, config.hidden_size, dtype=vllm_config.model_config.dtype),
                                      requires_grad=False) if steps else None
        self._draft_step = 0
        self.uses_target_features = bool(spec.get("uses_target_features", True))

    def begin_proposal(self) -> None:
        """Called by the proposer before each propose(): the next forward is draft step 0."""
        self._draft_step = 0

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        hidden_states: torch.Tensor,  # [num_tokens, H]
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise ValueError("the hivis drafter reads text token ids only; it never takes image embeddings")
        k = self._draft_step
        self._draft_step += 1
        if not self.uses_target_features:  # a text-only drafter (baseline): no feature input
            hidden_states = torch.zeros_like(hidden_states)
        elif k > 0 and self.step_bias is not None:
            hidden_states = hidden_states + self.step_bias[min(k, self.step_bias.shape[0]) - 1]
        return self.model(input_ids, positions, hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(item):
            name, w = item
            if name != "step_bias" and not name.startswith("lm_head"):
                name = "model." + name
            process_eagle_weight(self, name)
            return name, w

        return AutoWeightsLoader(self).load_weights(map(rename, weights))
