"""The hivis drafter as a vLLM model (registered as ``HiViSDrafterForCausalLM``).

One EAGLE-style step, t = a drafter position (text tokens only, see method/hide.py):

    f_t   = the target's last-layer (post-norm) state; or, for a multi-layer drafter
            (``feature_layers``, method/checkpoint.py), `combine_hidden_states` of the target's
            auxiliary layers: feature_fc([rms(a_1); ...; norm(a_L)]), computed once per step,
            before the compiled region, on the rows vLLM hands the proposer
    f_in  = f_t                          verified rows
          = f̂_t + b_k                   draft step k >= 1: the drafter's own previous output, plus
                                         the step-dependent bias-correction residual b_k (v2; 0 if off)
    h     = fc([Emb(x_{t+1}) ; f_in])    fuse token embedding and feature (2H -> H, no bias)
    f̂_t+1 = DecoderLayer(h, pos=c)       one Llama layer, no input norm (EAGLE), RoPE at drafter pos
    logits = LMHead_target(f̂_t+1)        the target's own LM head (shared, not in the checkpoint)

CUDA-graph safety, by construction: everything that depends on the draft step runs inside the
compiled region on persistent device buffers. vLLM captures the drafter's graphs with their input
addresses (piecewise graphs in the V1 proposer, FULL decode graphs in the V2 speculator), so the
region takes exactly the proposer's persistent ``input_ids`` / ``positions`` / ``hidden_states``
plus the model's own step counter, and nothing is allocated on the way in. The step index k is that
device counter (``draft_step``): the region reads it, every forward increments it in place (a
replayed graph that contains the forward increments it too), and `begin_proposal` resets it before
each proposal. There is no Python state a captured graph could freeze.

`vllm_hivis.train.drafters.HiViSDrafter` is the plain-torch twin used for training; a parity test
holds the two to the same logits.
"""

import functools
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

from ..method.checkpoint import intermediate_layers


class _DrafterLayer(LlamaDecoderLayer):
    """A Llama decoder layer without input norm (the fused input is not normalised, as in EAGLE),
    whose attention keeps its KV at the target slots of its rows (serving/draft_attention.py)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str, config) -> None:
        from vllm.model_executor.models import llama

        from . import draft_attention

        draft_attention.register()
        # vLLM's LlamaAttention builds its Attention from the module global; for this one layer,
        # with the drafter backend (construction is single-threaded; the global is restored).
        orig = llama.Attention
        llama.Attention = functools.partial(orig, attn_backend=draft_attention.HiViSDraftAttentionBackend)
        try:
            super().__init__(vllm_config, prefix=prefix, config=config)
        finally:
            llama.Attention = orig
        self.input_layernorm = nn.Identity()

    def get_quant_config(self, vllm_config: VllmConfig):
        return get_draft_quant_config(vllm_config)


# draft_step is a graph input (never a constant an inductor "freezing" pass could fold), with no
# dynamic dimension: [1].
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "hidden_states": 0})
class HiViSDrafterModel(nn.Module):
    """The compiled region: step bias + fc + one decoder layer (see the module docstring)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1),
    })

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0) -> None:
        super().__init__()
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        spec = getattr(config, "hivis", None) or {}
        H, dtype = config.hidden_size, vllm_config.model_config.dtype
        # Placeholder: replaced by the target's embedding at load (shared, never in the checkpoint).
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, H, prefix=maybe_prefix(prefix, "embed_tokens"))
        self.fc = ReplicatedLinear(2 * H, H, bias=False, params_dtype=dtype,
                                   quant_config=get_draft_quant_config(vllm_config),
                                   prefix=maybe_prefix(prefix, "fc"), return_bias=False)
        # The attention layer is named after the target's layers (layers.<n_target>) so the two
        # KV caches never collide; the module index stays 0 to match checkpoint keys.
        self.layers = nn.ModuleList([_DrafterLayer(vllm_config, maybe_prefix(prefix, f"layers.{start_layer_id}"),
                                                   config)])
        steps = int(spec.get("step_bias_steps", 0))
        # Row k of the table is b_k (row 0: the verified rows, no bias); loaded from "step_bias".
        self.step_bias_steps = steps
        self.register_buffer("step_bias_table", torch.zeros(steps + 1, H, dtype=dtype), persistent=False)
        # Fixed by the checkpoint (Python constants, never step state): a text-only drafter (the
        # baseline that reads no target feature) zeroes the feature; a drafter without step
        # biases adds nothing.
        self.reads_features = bool(spec.get("uses_target_features", True))
        layers = spec.get("feature_layers") or []
        self.feature_layers, self.rms_eps = list(layers), float(getattr(config, "rms_norm_eps", 1e-6))
        # intermediate target layers come first (sorted ids); the final one, if fused, is normed by
        # the target's own norm, shared at load (`final_norm`, like embed_tokens / lm_head)
        self.num_intermediate = len(intermediate_layers(layers, int(spec.get("num_target_layers") or 0)))
        self.final_norm: nn.Module | None = None
        self.feature_fc = (ReplicatedLinear(len(layers) * H, H, bias=False, params_dtype=dtype,
                                            quant_config=get_draft_quant_config(vllm_config),
                                            prefix=maybe_prefix(prefix, "feature_fc"), return_bias=False)
                           if layers else None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def combine_hidden_states(
        self,
        aux: torch.Tensor,  # [num_tokens, n*H] the target's layers (vLLM: pre-norm, sorted ids)
    ) -> torch.Tensor:  # [num_tokens, H] f_t
        """checkpoint.py's multi-layer feature, from vLLM's auxiliary hidden states (eager)."""
        assert self.feature_fc is not None, "a last-layer drafter has nothing to combine"
        n, H = len(self.feature_layers), aux.shape[-1] // len(self.feature_layers)
        assert aux.shape[-1] == n * H, (aux.shape, self.feature_layers)
        blocks = aux.reshape(aux.shape[0], n, H)
        a = blocks[:, : self.num_intermediate].float()
        parts = [(a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + self.rms_eps)).to(aux.dtype)]
        if self.num_intermediate < n:
            assert self.final_norm is not None, "the target's final norm is shared at load_model"
            parts.append(self.final_norm(blocks[:, n - 1].contiguous())[:, None])
        return self.feature_fc(torch.cat(parts, dim=1).reshape(aux.shape[0], n * H))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens] drafter (compressed) positions
        hidden_states: torch.Tensor,  # [num_tokens, H] the proposer's feature buffer (f_t or f̂_t)
        draft_step: torch.Tensor,  # [1] int64: k, the draft step of this forward (0 = verified rows)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f_in = hidden_states if self.reads_features else torch.zeros_like(hidden_states)  # [num_tokens, H]
        if self.step_bias_steps:
            # row k, clamped: steps past the table reuse its last bias (as the training twin), and
            # dummy / capture runs that never reset the counter stay in bounds
            f_in = f_in + self.step_bias_table[draft_step.clamp(max=self.step_bias_steps)]  # [1, H]
        h = self.fc(torch.cat((self.embed_tokens(input_ids), f_in), dim=-1))
        h, residual = self.layers[0](positions, h, None)
        h = h + residual
        return h, h


class HiViSDrafterForCausalLM(nn.Module, SupportsEagle):
    """vLLM entry class. Returns (features for logits, features fed to the next draft step)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = config = vllm_config.speculative_config.draft_model_config.hf_config
        if getattr(config, "draft_vocab_size", None) is None:
            config.draft_vocab_size = config.vocab_size
        self.model = HiViSDrafterModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                       start_layer_id=vllm_config.model_config.get_num_layers(
                                           vllm_config.parallel_config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        # The draft step of the next forward: 0 = the first pass over verified rows.
        self.register_buffer("draft_step", torch.zeros(1, dtype=torch.long), persistent=False)

    def begin_proposal(self) -> None:
        """Called by the proposer (eagerly) before each proposal: the next forward is draft step 0."""
        self.draft_step.zero_()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    @property
    def combines_layers(self) -> bool:
        return self.model.feature_fc is not None

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [num_tokens, n*H] auxiliary target layers -> [num_tokens, H] (EAGLE-3's name for this step)
        return self.model.combine_hidden_states(hidden_states)

    def share_target_norm(self, target_model) -> None:
        """A drafter that fuses the target's final layer norms it with the target's own norm (vLLM
        hands auxiliary layers over before the norm); called by the proposers at load_model."""
        if self.model.num_intermediate < len(self.model.feature_layers):
            get = getattr(target_model, "get_language_model", None)  # a VLM: its LlamaForCausalLM
            self.model.final_norm = (get() if get is not None else target_model).model.norm

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        hidden_states: torch.Tensor,  # [num_tokens, H]
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise ValueError("the hivis drafter reads text token ids only; it never takes image embeddings")
        out = self.model(input_ids, positions, hidden_states, self.draft_step)
        self.draft_step.add_(1)  # a device op: a captured graph that contains this call replays it too
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        table = self.model.step_bias_table
        loaded: set[str] = set()

        def rename(item):
            name, w = item
            if name == "step_bias":  # [S, H] -> rows 1..S of the table (an in-place copy: the address stays)
                assert w.shape == (table.shape[0] - 1, table.shape[1]), (w.shape, table.shape)
                table[1:].copy_(w.to(table.dtype))
                loaded.add("model.step_bias_table")
                return None
            if not name.startswith("lm_head"):
                name = "model." + name
            process_eagle_weight(self, name)
            return name, w

        loaded |= AutoWeightsLoader(self).load_weights(x for x in map(rename, weights) if x is not None)
        return loaded
