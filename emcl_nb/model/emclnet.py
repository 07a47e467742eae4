"""EMCLNet: CLIP encoders, temporal aggregation, frame pooling, EMCL and the logits; the
training loss over them is `emcl_nb.model.loss.EMCLLoss`.

Shapes: B texts / videos in a batch, T frames, D the CLIP embedding width, A texts and V
videos in a scoring block. `pool`, `pool_frames`, `mean_pool` and `block_logits` accept
extra leading group dims so that evaluation can score many blocks in one batched call.
Everything after CLIP (temporal aggregation, pooling, EMCL, logits, loss) runs in fp32
even under autocast, as in the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from clip.model import CLIP, ResidualAttentionBlock
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emcl_nb.model.clip_backbone import CONTEXT_LENGTH, encode_text, encode_uint8_frames, load_clip_model
from emcl_nb.model.config import ModelConfig
from emcl_nb.model.emcl import EMCL

MAX_LOGIT_SCALE = math.log(100.0)
NORMALIZE = ("after", "before")


# ---------------------------------------------------------------------------------------
# Functional scoring pieces (optional leading group dims "...")
# ---------------------------------------------------------------------------------------

def pool_frames(t: torch.Tensor, f: torch.Tensor, frame_mask: torch.Tensor,
                temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-conditioned frame pooling (docs/method.md §3).

    t [...,A,D], f [...,V,T,D], frame_mask [...,V,T] -> v [...,A,V,D], w [...,A,V,T].
    w = softmax over all T of t·f/temp, then multiplied by the mask (no renormalisation).
    """
    logits = torch.einsum("...ad,...vtd->...avt", t, f) / temp             # [..., A, V, T]
    w = logits.softmax(dim=-1) * frame_mask.unsqueeze(-3).to(logits.dtype)  # [..., A, V, T]
    v = torch.einsum("...avt,...vtd->...avd", w, f.to(w.dtype))             # [..., A, V, D]
    return v, w


def mean_pool(f: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP4Clip meanP: each frame L2-normalised, averaged over the valid frames, normalised
    again. f [...,V,T,D], frame_mask [...,V,T] -> v [...,V,D], w [...,V,T] (1 / valid frames)."""
    mask = frame_mask.to(f.dtype)                                          # [..., V, T]
    w = mask / mask.sum(dim=-1, keepdim=True).clamp_min(1.0)               # [..., V, T]
    v = torch.einsum("...vt,...vtd->...vd", w, F.normalize(f, dim=-1))     # [..., V, D]
    return F.normalize(v, dim=-1), w


def pool(t: torch.Tensor, f: torch.Tensor, frame_mask: torch.Tensor, pooling: str,
         temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled videos and frame weights: pooling "text" -> v [...,A,V,D], w [...,A,V,T]
    (pool_frames); "mean" -> v [...,V,D], w [...,V,T] (mean_pool, one vector per video)."""
    if pooling == "mean":
        return mean_pool(f, frame_mask)
    return pool_frames(t, f, frame_mask, temp)


def block_logits(t: torch.Tensor, v: torch.Tensor, emcl_module: EMCL | None,
                 normalize: str = "after") -> torch.Tensor:
    """Similarities S [...,A,V] of one block (or a stack of blocks) of texts and pooled videos.

    v is [...,A,V,D] (text pooling: one vector per pair) or [...,V,D] (mean pooling: one
    per video). X = cat(video rows, t) per block goes through `emcl_module`, is split back, and
    S[a,b] = t'[a]·v'[a,b] (or t'[a]·v'[b]). normalize="after" (training recipe):
    L2-normalise t', v' after EMCL. normalize="before" (EMCL as an inference-only module,
    docs/method.md §7): normalise the inputs and not the EMCL output. With emcl_module None both are
    the plain cosine.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    per_video = v.dim() == t.dim()
    if normalize == "before":
        t, v = F.normalize(t, dim=-1), F.normalize(v, dim=-1)
    if emcl_module is not None:
        rows = v if per_video else v.flatten(-3, -2)                      # [..., V or A*V, D]
        n = rows.shape[-2]
        x = emcl_module(torch.cat([rows, t], dim=-2))                             # [..., n + A, D]
        v = x[..., :n, :].reshape(v.shape)                                 # [..., (A,) V, D]
        t = x[..., n:, :]                                                  # [..., A, D]
    if normalize == "after" or emcl_module is None:
        t, v = F.normalize(t, dim=-1), F.normalize(v, dim=-1)
    if per_video:
        return t @ v.transpose(-1, -2)                                     # [..., A, V]
    return torch.einsum("...ad,...avd->...av", t, v)                       # [..., A, V]


# ---------------------------------------------------------------------------------------
# Temporal aggregation
# ---------------------------------------------------------------------------------------

class MaskedResidualAttentionBlock(ResidualAttentionBlock):
    """CLIP's residual attention block (same parameter names), non-causal, with padded
    frames masked as keys, its LayerNorms at `ln_eps`."""

    def __init__(self, width: int, heads: int, ln_eps: float):
        super().__init__(width, heads)
        self.ln_1.eps = self.ln_2.eps = ln_eps

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        # x [T, B, D]; key_padding_mask [B, T], True = ignore this frame as a key
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """A stack of `layers` masked residual attention blocks over the frames."""

    def __init__(self, width: int, layers: int, heads: int, ln_eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(MaskedResidualAttentionBlock(width, heads, ln_eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, key_padding_mask)
        return x


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

class EMCLNet(nn.Module):
    """CLIP (`self.clip`) + temporal aggregation + pooling (text-conditioned or mean) + EMCL
    (`self.emcl`), built from a `ModelConfig` alone."""

    def __init__(self, clip_model: CLIP, config: ModelConfig):
        super().__init__()
        self.clip = clip_model
        self.config = config
        self.agg_module = config.agg_module
        self.temp = config.temp
        self.pooling = config.pooling
        D = clip_model.text_projection.shape[1]
        self.embed_dim = D

        if config.agg_module == "seqTransf":
            self.frame_position_embeddings = nn.Embedding(CONTEXT_LENGTH, D)
            self.transformerClip = TemporalTransformer(D, config.num_hidden_layers, max(1, D // 64),
                                                       config.temporal_ln_eps)
            if config.clip_weights != "tiny":
                # The trick transfers pretrained structure. A random CLIP's text positions are
                # drawn with std 0.01, 1 % of a frame feature's norm, which would hide the
                # frame order; the fresh N(0, 1) table keeps it visible.
                self._copy_from_clip_text()
        elif config.agg_module == "seqLSTM":
            self.lstm_visual = nn.LSTM(input_size=D, hidden_size=D, num_layers=1, batch_first=True)
        elif config.agg_module != "None":
            raise ValueError(f"agg_module must be None, seqLSTM or seqTransf; got {config.agg_module!r}")

        # Always built, so that the state_dict is the same for every `emcl` mode. The initial
        # bases are the first draw of a generator seeded with config.seed: the reference
        # builds its EMCL module first after seeding, so seed s gives the reference's values.
        self.emcl = EMCL(config.emcl_bases, config.emcl_stages, config.emcl_momentum,
                         config.emcl_lamd, config.emcl_beta, init=config.emcl_init, dim=D,
                         generator=torch.Generator().manual_seed(config.seed))

    def _copy_from_clip_text(self) -> None:
        """Initialisation trick: frame positions from CLIP's text positional embedding, the
        temporal layers from the first layers of CLIP's text transformer (when widths match)."""
        text_pos = self.clip.positional_embedding
        if text_pos.shape != self.frame_position_embeddings.weight.shape:
            return   # text width != embedding width: keep the fresh initialisation
        with torch.no_grad():
            self.frame_position_embeddings.weight.copy_(text_pos)
        for ours, theirs in zip(self.transformerClip.resblocks, self.clip.transformer.resblocks):
            ours.load_state_dict(theirs.state_dict())   # same parameter names (CLIP's block)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def fp32_head(self):
        """Autocast off: what follows CLIP runs in fp32, as in the reference."""
        return torch.autocast(self.device.type, enabled=False)

    # ---- encoders ----

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """EOT features [B,D] in fp32, not normalised. `text_mask` is not needed: CLIP's causal
        mask and the EOT position (largest id) already ignore the padding (as in the reference)."""
        return encode_text(self.clip, text_ids).float()

    def encode_video(self, video: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Per-frame features [B,T,D] after temporal aggregation, not normalised.

        `video` [B,T,3,H,W] uint8 is normalised here (on its device, folded into the patch
        embedding). Padded frames (mask 0) are encoded as zero frames after normalisation,
        as the reference feeds them, so their pixels never change a result.
        """
        if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be uint8 frames [B, T, 3, H, W] (normalised inside "
                             f"encode_video); got {video.dtype} {tuple(video.shape)}")
        B, T = video.shape[:2]
        if tuple(frame_mask.shape) != (B, T):
            raise ValueError(f"frame_mask must be [B, T] = {(B, T)}; got {tuple(frame_mask.shape)}")
        keep = frame_mask.reshape(B * T)                                          # [B*T]
        f = encode_uint8_frames(self.clip, video.flatten(0, 1), keep)             # [B*T, D]
        f = f.float().reshape(B, T, -1)                                           # [B, T, D]
        return self.aggregate(f, frame_mask)

    def aggregate(self, f: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Temporal aggregation of frame features [B,T,D] (residual for both sequence models),
        in fp32 under autocast too."""
        with self.fp32_head():
            return self._aggregate(f.float(), frame_mask)

    def _aggregate(self, f: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        if self.agg_module == "None":
            return f
        B, T, D = f.shape
        if self.agg_module == "seqLSTM":
            # valid frames are a prefix of each video; padded positions get zeros + f
            lengths = frame_mask.sum(dim=-1).clamp_min(1).cpu()
            packed = pack_padded_sequence(f, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm_visual(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # [B, T, D]
            return f + out
        x = f + self.frame_position_embeddings.weight[:T]                         # [B, T, D]
        padded = frame_mask == 0
        padded = padded & ~padded.all(dim=-1, keepdim=True)   # a video with no valid frame: mask none
        x = self.transformerClip(x.permute(1, 0, 2), padded)                      # [T, B, D]
        return f + x.permute(1, 0, 2)                                             # [B, T, D]

    # ---- scoring and loss ----

    def score(self, t: torch.Tensor, f: torch.Tensor, frame_mask: torch.Tensor, *,
              emcl_module: EMCL | None, normalize: str = "after") -> torch.Tensor:
        """S [A,V]: pooling + EMCL on the whole (A x V) block + cosine (see block_logits),
        in fp32 under autocast too."""
        with self.fp32_head():
            t, f = t.float(), f.float()
            v, _ = pool(t, f, frame_mask, self.pooling, self.temp)                # [(A,) V, D]
            return block_logits(t, v, emcl_module, normalize)

    @property
    def training_emcl(self) -> EMCL | None:
        """The EMCL module training scores with: `self.emcl` when config.emcl is "on", else None."""
        return self.emcl if self.config.emcl == "on" else None

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text [B,D], video [B,T,D], frame_mask [B,T]) of a training batch already on the
        model's device: what `EMCLLoss` gathers over processes and scores."""
        text = self.encode_text(batch["text_ids"], batch["text_mask"])           # [B, D]
        video = self.encode_video(batch["video"], batch["frame_mask"])           # [B, T, D]
        return text, video, batch["frame_mask"]

    def clamp_logit_scale(self) -> None:
        """Keep logit_scale <= ln 100 (called after every optimiser step)."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=MAX_LOGIT_SCALE)


def create_model(config: ModelConfig, *, clip_model: CLIP | None = None,
                 clip_cache: str = "~/.cache/clip") -> EMCLNet:
    """EMCLNet of `config` (fp32, CPU; move it afterwards), on `clip_model` or the CLIP that
    config.clip_weights names (an official name looked up in `clip_cache`, a file, or "tiny":
    drawn from torch's global RNG, seed it first)."""
    if clip_model is None:
        clip_model = load_clip_model(config.clip_weights, clip_cache, tiny_width=config.tiny_width,
                                     tiny_layers=config.tiny_layers, tiny_patch=config.tiny_patch,
                                     image_size=config.image_size)
    return EMCLNet(clip_model, config)
