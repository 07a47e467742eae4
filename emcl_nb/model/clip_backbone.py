"""CLIP on clip-anytorch: load weights (name | path | "tiny") and encode text and frames.

`load_clip_model` returns `clip.model.CLIP` itself, so its parameters keep CLIP's own names;
EMCLNet holds it as `self.clip`, which gives the `clip.*` keys of reference checkpoints.
Nothing is ever downloaded: missing weights are one clear error that says where to get them.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from clip.model import CLIP
from clip.model import build_model as build_clip_from_state_dict

from emcl_nb.model.clip_files import TINY, resolve_weights_path

CONTEXT_LENGTH = 77        # CLIP's text context; also the size of the frame position table
VOCAB_SIZE = 49408         # CLIP's BPE vocabulary (EOT = 49407 is the largest id)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Scalars that official TorchScript archives keep in their state dict besides the weights.
_ARCHIVE_SCALARS = ("input_resolution", "context_length", "vocab_size")


class InvalidWeightsError(ValueError):
    """The CLIP weights file is neither a TorchScript CLIP archive nor a CLIP state dict."""


def load_clip_model(weights: str, cache_dir: str, *, tiny_width: int = 128, tiny_layers: int = 2,
              tiny_patch: int = 16, image_size: int = 224) -> CLIP:
    """A CLIP model in fp32 on the CPU.

    `weights`: an official name (ViT-B/32, ViT-B/16, ViT-L/14) looked up as a file in
    `cache_dir`; a path to a `.pt` file (official TorchScript archive or plain state dict,
    architecture read off the shapes); or "tiny": a randomly initialised small CLIP of the
    same architecture, drawn from torch's global RNG (seed it before calling).
    """
    if weights == TINY:
        return build_tiny_clip(tiny_width, tiny_layers, tiny_patch, image_size)
    path = resolve_weights_path(weights, cache_dir)
    state_dict = read_state_dict(path)
    model = clip_from_state_dict(state_dict, path)
    if model.visual.input_resolution != image_size:
        raise ValueError(f"CLIP weights {path} take {model.visual.input_resolution}px frames but "
                         f"image_size={image_size}; set image_size={model.visual.input_resolution}")
    return model


TINY_PATCH_POSITION_STD = 1.0


def build_tiny_clip(width: int, layers: int, patch: int, image_size: int) -> CLIP:
    """A random small CLIP: ViT image tower and text transformer of `width` and `layers`,
    embedding dim = width, the real vocabulary and context (so the BPE tokenizer works)."""
    if width < 64 or width % 64:
        raise ValueError(f"tiny_width must be a positive multiple of 64 (CLIP uses width // 64 "
                         f"attention heads); got {width}")
    if layers < 1 or patch < 1 or image_size % patch:
        raise ValueError(f"tiny CLIP needs tiny_layers >= 1 and image_size divisible by tiny_patch; "
                         f"got tiny_layers={layers}, image_size={image_size}, tiny_patch={patch}")
    model = CLIP(embed_dim=width, image_resolution=image_size, vision_layers=layers,
                 vision_width=width, vision_patch_size=patch, context_length=CONTEXT_LENGTH,
                 vocab_size=VOCAB_SIZE, transformer_width=width, transformer_heads=width // 64,
                 transformer_layers=layers)
    # CLIP draws the patch positions with std width^-0.5: a token's position then carries
    # ~15 % of its norm, too little for a random tower to learn where things are (and so
    # which way they move) in a short run. A unit-std table makes position as loud as content.
    with torch.no_grad():
        model.visual.positional_embedding.normal_(std=TINY_PATCH_POSITION_STD)
    return model.float()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive (the official files) or of a plain state dict."""
    try:
        with warnings.catch_warnings():   # torch.jit's deprecation notice: the official files are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception:   # not a TorchScript archive: try a plain state dict below
        pass
    try:
        # weights_only: a state dict holds tensors only; never unpickle arbitrary objects.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidWeightsError(
            f"{path} is neither a TorchScript CLIP archive nor a state dict saved with torch.save "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Set clip_weights to an official CLIP file or a state dict of one.") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidWeightsError(f"{path} does not hold a state dict (a mapping name -> tensor); "
                                  f"got {type(obj).__name__}. Save CLIP with torch.save(model.state_dict()).")
    return obj


def clip_from_state_dict(state_dict: dict[str, torch.Tensor], source: Path | str) -> CLIP:
    """Build CLIP with the architecture read off the shapes, then load the weights in fp32."""
    try:
        # clip's builder casts to fp16 before loading; build there, then reload in fp32 so
        # that fp32 weights are not rounded through fp16.
        model = build_clip_from_state_dict(dict(state_dict)).float()
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in _ARCHIVE_SCALARS})
    except (KeyError, RuntimeError, ValueError, IndexError) as err:
        raise InvalidWeightsError(
            f"{source} holds tensors but not a CLIP model's state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0][:300]}).") from None
    return model.train()


# The modules whose weights the reference's `convert_weights` stores in fp16, and the
# attention and projection tensors it converts by name: everything else (embeddings, position
# tables, LayerNorms, logit_scale) stays fp32.
FP16_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
FP16_ATTENTION_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                          "in_proj_bias", "bias_k", "bias_v")
FP16_PROJECTIONS = ("text_projection", "proj")


def convert_to_fp16(model: CLIP) -> CLIP:
    """Store CLIP's weights in fp16 as the reference does on CUDA (its `convert_weights`): the
    weights and biases of every Linear and Conv layer (the attention's output projection
    included), the attention in-projections, `text_projection` and the vision tower's `proj`.
    In place; returns the model. Its towers then compute in fp16 (`model.dtype`)."""
    def convert(module: torch.nn.Module) -> None:
        if isinstance(module, FP16_MODULES):
            names = ("weight", "bias")
        elif isinstance(module, torch.nn.MultiheadAttention):
            names = FP16_ATTENTION_TENSORS
        else:
            names = FP16_PROJECTIONS
        for name in names:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.half()
    model.apply(convert)
    return model


def encode_text(model: CLIP, text_ids: torch.Tensor) -> torch.Tensor:
    """Sentence features [B,D] of token ids [B,L], L <= 77: the EOT position (largest id)
    after ln_final and text_projection, not normalised.

    CLIP's text transformer, batch-first through `residual_block` with causal attention
    (equal to model.encode_text within float rounding). Positions past the EOT never
    reach it, so `max_words` < 77 runs without padding to 77 (tests/test_clip_backbone.py
    checks that the result equals the padded one).
    """
    if text_ids.dim() != 2 or text_ids.shape[1] > model.context_length:
        raise ValueError(f"text_ids must be [B, L] with L <= {model.context_length} "
                         f"(set max_words <= {model.context_length}); got {tuple(text_ids.shape)}")
    L, dtype = text_ids.shape[1], model.dtype                               # the tower's dtype (fp16 converted)
    x = model.token_embedding(text_ids).to(dtype) + model.positional_embedding[:L].to(dtype)  # [B, L, C]
    for block in model.transformer.resblocks:
        x = residual_block(block, x, causal=True)
    eot = x[torch.arange(len(x), device=x.device), text_ids.argmax(dim=-1)]  # [B, C]
    return model.ln_final(eot) @ model.text_projection                      # [B, D] (ln per token)


def encode_frames(model: CLIP, frames: torch.Tensor) -> torch.Tensor:
    """Projected CLS features [N,D] of normalised float frames [N,3,H,W], through CLIP's own
    forward: the plain path the tests compare `encode_uint8_frames` with (the model uses that)."""
    side = model.visual.input_resolution
    if frames.dim() != 4 or frames.shape[1:] != (3, side, side):
        raise ValueError(f"frames must be [N, 3, {side}, {side}] for this CLIP "
                         f"(set image_size={side}); got {tuple(frames.shape)}")
    return model.encode_image(frames)


def clip_statistics(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's per-channel pixel mean and std [3] on `device`, made once per device and dtype
    (a new tensor on a GPU is a blocking host-to-device copy in every step). Under
    torch.compile they are made in the traced graph (constants there), not looked up."""
    if torch.compiler.is_compiling():
        return _clip_statistics.__wrapped__(device, dtype)
    return _clip_statistics(device, dtype)


@functools.cache
def _clip_statistics(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(CLIP_MEAN, dtype=dtype, device=device),
            torch.tensor(CLIP_STD, dtype=dtype, device=device))


def normalize_frames(frames_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames [...,3,H,W] -> float, scaled to [0,1], normalised with CLIP's mean/std."""
    mean, std = clip_statistics(frames_uint8.device, dtype)
    return (frames_uint8.to(dtype) / 255.0 - mean.view(3, 1, 1)) / std.view(3, 1, 1)


def folded_patch_embedding(conv1: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's normalisation folded into its patch embedding (conv1, no bias): weights
    [C,3,P,P] and offset [C] with conv(x, weight) - offset == conv1(normalize_frames(x))
    for x in 0..255. Exact algebra: normalize is x / (255 std) - mean / std per input
    channel, so the weights scale by 1 / (255 std) and the offset is conv1 of the constant
    image mean / std. Differentiable in conv1.weight, so it serves a trained conv1 too."""
    w = conv1.weight.float()                           # [C, 3, P, P], folded in fp32 (fp16 CLIP too)
    mean, std = clip_statistics(w.device, w.dtype)
    weight = w / (255.0 * std).view(1, 3, 1, 1)                             # [C, 3, P, P]
    offset = (w * (mean / std).view(1, 3, 1, 1)).sum((1, 2, 3))           # [C], fp32 even under autocast
    return weight, offset


PATCH_BLOCK_ELEMENTS = 2 ** 20   # frame pixels per block of the CPU patch embedding (4 MiB as fp32)


def encode_uint8_frames(model: CLIP, frames_uint8: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Projected CLS features [N,D] of uint8 frames [N,3,H,W]; frames with keep 0 are
    encoded as all-zero normalised frames (how padded frames are fed).

    Equal (within float rounding) to encode_frames(model, normalize_frames(frames) * keep),
    without any full-resolution float pass besides the one conversion the patch embedding
    reads (to fp32, or to the autocast dtype under autocast): normalisation is folded into
    the patch embedding (folded_patch_embedding) and the mask applied to its output (a zero
    frame embeds to zero patches: conv1 has no bias).
    """
    visual = model.visual
    side = visual.input_resolution
    if frames_uint8.dim() != 4 or frames_uint8.shape[1:] != (3, side, side):
        raise ValueError(f"frames must be [N, 3, {side}, {side}] for this CLIP "
                         f"(set image_size={side}); got {tuple(frames_uint8.shape)}")
    weight, offset = folded_patch_embedding(visual.conv1)
    # conv1 has stride = kernel: a matmul over the patches, cut from the uint8 frames (a
    # quarter of the bytes of float) and read in token order, faster than the convolution.
    N, P = frames_uint8.shape[0], visual.conv1.kernel_size[0]
    g = side // P                  # conv1 drops the pixels past the last whole patch; so do we
    centre = torch.is_autocast_enabled(frames_uint8.device.type)
    if centre:
        # Low-precision matmul: the pixels are converted straight to its dtype and centred
        # there (exact: 0..255 - 128 fits bf16 / fp16), so its rounding scales with the
        # centred sum, not with the patch's brightness.
        offset = offset - 128.0 * weight.flatten(1).sum(1)                    # [C]
    pixels_dtype = torch.get_autocast_dtype(frames_uint8.device.type) if centre else weight.dtype
    weight = weight.flatten(1).t()                                           # [3*P*P, C]
    keep = keep.view(-1, 1, 1)                                               # [N, 1, 1]
    # On the CPU the patches are cut, converted and embedded a few frames at a time, each
    # block still in cache when the next pass reads it; a GPU takes all frames in one block.
    per_block = N if frames_uint8.is_cuda else max(1, PATCH_BLOCK_ELEMENTS // (3 * side * side))
    blocks = []
    for start in range(0, N, per_block):
        block = frames_uint8[start:start + per_block, :, :g * P, :g * P]
        n = len(block)
        patches = block.reshape(n, 3, g, P, g, P).permute(0, 2, 4, 1, 3, 5)   # [n, g, g, 3, P, P]
        patches = patches.reshape(n, g * g, 3 * P * P).to(pixels_dtype)       # [n, g*g, 3*P*P]
        y = (patches - 128.0 if centre else patches) @ weight                  # [n, g*g, C]
        blocks.append((y - offset) * keep[start:start + n].to(y.dtype))       # [n, g*g, C]
    x = blocks[0] if len(blocks) == 1 else torch.cat(blocks)                 # [N, g*g, C]
    return encode_patches(visual, x)


def encode_patches(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's VisionTransformer.forward after conv1: patch embeddings [N,g*g,C] -> [N,D].
    Runs batch-first (CLIP permutes to [L,N,C] and back; the result is the same), and the
    last block computes the CLS token alone: nothing reads the other tokens' outputs. An
    fp16 tower (convert_to_fp16) runs its residual stream in fp16, as the reference's."""
    x = x.to(visual.conv1.weight.dtype)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)      # [N, 1, C]
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [N, 1 + g*g, C]
    x = visual.ln_pre(x)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = residual_block(block, x)
    x = residual_block(last, x, first_only=True)                            # [N, 1, C]
    x = visual.ln_post(x[:, 0])                                             # [N, C] (CLS)
    return x @ visual.proj if visual.proj is not None else x                # [N, D]


QUICK_GELU_SCALE = 1.702   # CLIP's QuickGELU: x * sigmoid(1.702 x) = silu(1.702 x) / 1.702


def residual_block(block: torch.nn.Module, x: torch.Tensor, *, causal: bool = False,
                   first_only: bool = False) -> torch.Tensor:
    """CLIP's ResidualAttentionBlock on batch-first x [N,L,C], in fewer passes over the
    activations than nn.MultiheadAttention and QuickGELU take: q, k, v are views of one
    projection (no zero-filled gradient buffers per chunk), and QuickGELU is
    silu(1.702 h) / 1.702 with both scalings folded into the weights around it (c_fc's
    weight and bias times 1.702, c_proj's weight over 1.702). Equal within float rounding.

    `causal`: the text tower's mask (each token attends to itself and those before it).
    `first_only`: the output of the first token alone, [N,1,C]; it still attends to every
    token, and the other tokens' queries, attention outputs and MLP are never computed.
    """
    attn = block.attn
    N, L, C = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    if first_only:
        if causal:
            raise ValueError("first_only takes the first token's query: no causal mask applies")
        x = x[:, :1]                                                         # [N, 1, C]
        q = F.linear(h[:, :1], attn.in_proj_weight[:C], attn.in_proj_bias[:C])   # [N, 1, C]
        q = q.view(N, 1, heads, C // heads).transpose(1, 2)                  # [N, H, 1, C/H]
        kv = F.linear(h, attn.in_proj_weight[C:], attn.in_proj_bias[C:])     # [N, L, 2C]
        k, v = kv.view(N, L, 2, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, C/H]
    else:
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)            # [N, L, 3C]
        q, k, v = qkv.view(N, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, C/H]
    h = F.scaled_dot_product_attention(q, k, v, is_causal=causal)            # [N, H, Lq, C/H]
    h = h.transpose(1, 2).reshape(N, -1, C)                                  # [N, Lq, C]
    x = x + F.linear(h, attn.out_proj.weight, attn.out_proj.bias)
    c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj
    h = F.linear(block.ln_2(x), c_fc.weight * QUICK_GELU_SCALE, c_fc.bias * QUICK_GELU_SCALE)  # [N, Lq, 4C]
    return x + F.linear(F.silu(h), c_proj.weight / QUICK_GELU_SCALE, c_proj.bias)              # [N, Lq, C]
