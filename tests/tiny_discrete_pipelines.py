"""Tiny, randomly initialised components for diffusers' discrete-diffusion text pipelines.

Helper module for tests (not collected as a test file). Everything is built locally with random weights;
nothing is downloaded.

* :func:`tiny_diffusion_gemma_pipeline` -> ``diffusers.DiffusionGemmaPipeline`` around a tiny
  ``transformers.DiffusionGemmaForBlockDiffusion`` (2 layers, hidden size 32, MoE with 2 experts, a
  1-layer 16-wide vision tower because the config cannot drop it).
The pipeline gets a character-level ``PreTrainedTokenizerFast`` with a small Jinja chat template, and
``pipe.call_counter`` (a :class:`ForwardCallCounter`) that counts the denoiser forward calls made by the
pipeline's denoising loop (separately from DiffusionGemma's encoder prefill calls).

Typical use::

    pipe = tiny_diffusion_gemma_pipeline(DiscreteDDIMScheduler())
    pipe.call_counter.reset()
    out = pipe(prompt="hi", gen_length=8, num_inference_steps=4, output_type="seq",
               confidence_threshold=None, eos_early_stop=False, generator=torch.Generator().manual_seed(0))
    assert pipe.call_counter.calls_per_canvas() == [4]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "SPECIAL_TOKENS",
    "CHARSET",
    "CHAT_TEMPLATE",
    "ForwardCallCounter",
    "TinyChatProcessor",
    "build_char_tokenizer",
    "tiny_diffusion_gemma_model",
    "tiny_diffusion_gemma_pipeline",
]

# Fixed ids: pad=0, eos=1, bos=2 match DiffusionGemmaTextConfig's defaults; mask=3 is the tokenizer's mask token.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<mask>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<image>",
    "<boi>",
    "<eoi>",
)
PAD_ID, EOS_ID, BOS_ID, MASK_ID, UNK_ID = range(5)
IMAGE_ID, BOI_ID, EOI_ID = (SPECIAL_TOKENS.index(t) for t in ("<image>", "<boi>", "<eoi>"))
CHARSET = " abcdefghijklmnopqrstuvwxyz0123456789.,!?'\n"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARSET)

# Minimal Gemma-like turn format. Content may be a string or a list of {"type": ..., "text": ...} parts
# (only the text parts are rendered; images are not supported by the tiny processor).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer / processor
# --------------------------------------------------------------------------------------------------------------


def build_char_tokenizer(vocab_size: int = 64, *, chat_template: str | None = CHAT_TEMPLATE):
    """A character-level ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids.

    Ids ``0..9`` are :data:`SPECIAL_TOKENS`, then one id per character of :data:`CHARSET` (unknown characters map
    to ``<unk>``), then ``<unused_k>`` fillers up to ``vocab_size`` so that every id the model can emit decodes.
    Padding is on the left (prompt then canvas, as both pipelines lay sequences out).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    tokens = list(SPECIAL_TOKENS) + list(CHARSET)
    tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One pre-token per character (including newlines); special tokens are split out before this runs.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        mask_token="<mask>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    if len(tokenizer) != vocab_size:  # pragma: no cover - sanity check on the construction above
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, expected {vocab_size}")
    return tokenizer


class TinyChatProcessor:
    """Processor-shaped wrapper around a tokenizer, as ``DiffusionGemmaPipeline`` uses its ``processor``.

    The pipeline calls ``processor.apply_chat_template(messages, add_generation_prompt=..., tokenize=True,
    return_tensors="pt", return_dict=True)`` and ``processor.batch_decode(seqs, skip_special_tokens=True)``, and
    reads ``processor.tokenizer.eos_token_id``. Unlike a bare tokenizer (whose ``apply_chat_template`` defaults to
    ``padding=False``), this pads batched conversations (left), so a list of prompts of unequal length works.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def eos_token_id(self):
        return self.tokenizer.eos_token_id

    def apply_chat_template(self, conversation, **kwargs):
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        if batched and kwargs.get("tokenize", False):
            kwargs.setdefault("padding", True)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Forward-call counting
# --------------------------------------------------------------------------------------------------------------


def _first_tensor(args: tuple, kwargs: dict, names: tuple[str, ...]) -> torch.Tensor | None:
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    return None


@dataclass
class ForwardCallCounter:
    """Counts forward calls of a denoiser module (and optionally of a separate encoder/prefill module).

    Hooks are registered on the modules themselves, so a count is one ``module(...)`` call made by the pipeline
    (inner submodule calls are not counted). ``denoiser_shapes[i]`` is the token-id shape of the i-th denoiser
    call, and ``denoiser_groups[i]`` the number of encoder calls seen before it (DiffusionGemma: the canvas index)
    or, without an encoder, the input sequence length.
    """

    denoiser_calls: int = 0
    encoder_calls: int = 0
    denoiser_shapes: list[tuple[int, ...]] = field(default_factory=list)
    denoiser_groups: list[int] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _has_encoder: bool = field(default=False, repr=False)

    @classmethod
    def attach(cls, denoiser: torch.nn.Module, encoder: torch.nn.Module | None = None) -> ForwardCallCounter:
        counter = cls()
        counter._handles.append(denoiser.register_forward_pre_hook(counter._on_denoiser, with_kwargs=True))
        if encoder is not None:
            counter._has_encoder = True
            counter._handles.append(encoder.register_forward_pre_hook(counter._on_encoder, with_kwargs=True))
        return counter

    def _on_denoiser(self, module, args, kwargs):
        ids = _first_tensor(args, kwargs, ("decoder_input_ids", "input_ids"))
        shape = tuple(ids.shape) if ids is not None else ()
        self.denoiser_calls += 1
        self.denoiser_shapes.append(shape)
        self.denoiser_groups.append(self.encoder_calls if self._has_encoder else (shape[-1] if shape else -1))

    def _on_encoder(self, module, args, kwargs):
        self.encoder_calls += 1

    def calls_per_canvas(self) -> list[int]:
        """Denoiser calls grouped by canvas, in order of first appearance."""
        counts: dict[int, int] = {}
        for group in self.denoiser_groups:
            counts[group] = counts.get(group, 0) + 1
        return list(counts.values())

    def reset(self) -> None:
        self.denoiser_calls = 0
        self.encoder_calls = 0
        self.denoiser_shapes.clear()
        self.denoiser_groups.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------------------------
# DiffusionGemma
# --------------------------------------------------------------------------------------------------------------


def tiny_diffusion_gemma_model(
    vocab_size: int = 64,
    canvas_length: int = 8,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    cache_kwarg_shim: bool = True,
):
    """A randomly initialised, ~40k-parameter ``DiffusionGemmaForBlockDiffusion`` in eval mode.

    The last layer is full attention (the config forces that), the others sliding-window. The MoE block cannot be
    disabled (router + experts are always built), so it has 2 experts with top-1 routing. ``DiffusionGemmaConfig``
    always builds a vision sub-config (not optional), so a 1-layer, 16-wide ``Gemma4VisionConfig`` is given.
    Image/boi/eoi token ids point to the tokenizer's ``<image>``/``<boi>``/``<eoi>`` specials.
    ``cache_kwarg_shim`` works around a diffusers 0.42.1 / transformers 5.24.0 mismatch, see
    :func:`_add_cache_kwarg_shim`; without it ``DiffusionGemmaPipeline.__call__`` raises ``TypeError``.
    """
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    num_heads = 2
    head_dim = hidden_size // num_heads
    layer_types = ["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"]
    text_config = DiffusionGemmaTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        global_head_dim=head_dim,  # popped by __post_init__; the default (512) would make full layers huge
        max_position_embeddings=512,
        sliding_window=32,
        layer_types=layer_types,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=hidden_size // 2,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    vision_config = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=4,
        position_embedding_size=32,
    )
    config = DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=canvas_length,
        image_token_id=IMAGE_ID,
        boi_token_id=BOI_ID,
        eoi_token_id=EOI_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    if cache_kwarg_shim:
        _add_cache_kwarg_shim(model.model.decoder)
    return model.to(dtype=dtype).eval()


def _add_cache_kwarg_shim(decoder: torch.nn.Module) -> None:
    """Let ``decoder.create_diffusion_decoder_attention_mask`` accept ``past_key_values=`` again.

    diffusers 0.42.1's ``DiffusionGemmaPipeline`` calls it with ``past_key_values=...``; transformers 5.24.0 renamed
    that argument to ``cache`` (the model/encoder forwards keep a deprecation alias, this static method does not), so
    the unpatched pipeline raises ``TypeError``. The shim is an attribute on this one decoder instance only (the
    class is untouched) and is skipped when the method already takes ``past_key_values``.
    """
    import inspect

    original = type(decoder).create_diffusion_decoder_attention_mask
    params = inspect.signature(original).parameters
    if "past_key_values" in params or "cache" not in params:
        return

    def create_diffusion_decoder_attention_mask(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs.setdefault("cache", past_key_values)
        return original(*args, **kwargs)

    decoder.create_diffusion_decoder_attention_mask = create_diffusion_decoder_attention_mask


def tiny_diffusion_gemma_pipeline(
    scheduler,
    vocab_size: int = 64,
    canvas_length: int = 8,
    *,
    seed: int = 0,
    wrap_processor: bool = True,
    dtype: torch.dtype = torch.float32,
    cache_kwarg_shim: bool = True,
):
    """``DiffusionGemmaPipeline(model=tiny DiffusionGemmaForBlockDiffusion, scheduler=scheduler, processor=...)``.

    ``processor`` is a :class:`TinyChatProcessor` around :func:`build_char_tokenizer` (or the bare tokenizer if
    ``wrap_processor=False``; both work, the wrapper additionally pads batched prompts). The progress bar is
    disabled. ``pipe.call_counter`` counts ``pipe.model(...)`` calls (the denoising loop, including corrector
    sweeps) as ``denoiser_calls`` and ``pipe.model.model.encoder(...)`` prefill calls (one per canvas) as
    ``encoder_calls``; ``calls_per_canvas()`` splits the former by canvas.

    Note: the tokenizer has an EOS id (1) and the random model can emit it, which ends generation after that
    canvas unless ``eos_early_stop=False`` is passed to the pipeline call.
    """
    from diffusers import DiffusionGemmaPipeline

    model = tiny_diffusion_gemma_model(
        vocab_size, canvas_length, seed=seed, dtype=dtype, cache_kwarg_shim=cache_kwarg_shim
    )
    tokenizer = build_char_tokenizer(vocab_size)
    processor = TinyChatProcessor(tokenizer) if wrap_processor else tokenizer
    pipe = DiffusionGemmaPipeline(model=model, scheduler=scheduler, processor=processor)
    pipe.set_progress_bar_config(disable=True)
    pipe.call_counter = ForwardCallCounter.attach(model, encoder=model.model.encoder)
    return pipe
