"""CLIP loading (state dict, TorchScript archive, named file, tiny) and the encoders."""
from __future__ import annotations

import pytest
import torch

from emcl_nb.model import clip_backbone
from emcl_nb.model.clip_backbone import (
    CLIP_MEAN,
    CLIP_STD,
    InvalidWeightsError,
    build_tiny_clip,
    encode_frames,
    encode_text,
    encode_uint8_frames,
    load_clip_model,
    normalize_frames,
)
from emcl_nb.model.clip_files import WeightsNotFoundError


@pytest.fixture
def outputs(make_text_ids):
    """outputs(model) -> text and frame features of fixed inputs."""
    def run(model):
        text = make_text_ids(3, 8, seed=1)
        frames = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return encode_text(model, text), encode_frames(model, frames)
    return run


def tiny_kwargs(p):
    return dict(tiny_width=p.tiny_width, tiny_layers=p.tiny_layers, tiny_patch=p.tiny_patch,
                image_size=p.image_size)


def test_tiny_is_seeded_and_shaped(tiny_params, outputs):
    torch.manual_seed(5)
    a = load_clip_model("tiny", "unused", **tiny_kwargs(tiny_params))
    torch.manual_seed(5)
    b = load_clip_model("tiny", "unused", **tiny_kwargs(tiny_params))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    text, frames = outputs(a)
    assert text.shape == (3, 64) and frames.shape == (2, 64)
    assert a.token_embedding.num_embeddings == 49408 and a.context_length == 77
    assert all(p.dtype == torch.float32 for p in a.parameters())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_state_dict_and_torchscript_archive_load_the_same(tiny_clip, outputs, make_text_ids, tmp_path):
    want_text, want_frames = outputs(tiny_clip)
    torch.save(tiny_clip.state_dict(), tmp_path / "state.pt")
    # An archive the way the official files are made: a traced CLIP saved with torch.jit.
    example = (torch.randn(1, 3, 32, 32), make_text_ids(1, 77))
    torch.jit.save(torch.jit.trace(tiny_clip.eval(), example), str(tmp_path / "archive.pt"))

    for name in ("state.pt", "archive.pt"):
        loaded = load_clip_model(str(tmp_path / name), "unused", image_size=32)
        text, frames = outputs(loaded)
        assert torch.allclose(text, want_text, atol=1e-5), name      # fp32 kept (no fp16 rounding)
        assert torch.allclose(frames, want_frames, atol=1e-5), name
        assert set(loaded.state_dict()) == set(tiny_clip.state_dict())


def test_official_name_is_looked_up_in_cache(tiny_clip, tmp_path):
    torch.save(tiny_clip.state_dict(), tmp_path / "ViT-B-32.pt")
    loaded = load_clip_model("ViT-B/32", str(tmp_path), image_size=32)
    assert torch.equal(loaded.text_projection, tiny_clip.text_projection)


def test_missing_named_weights_give_one_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_clip_model("ViT-B/16", str(tmp_path))
    message = str(info.value)
    for part in ("ViT-B-16.pt", str(tmp_path), "clip_weights", "clip_cache",
                 "https://openaipublic.azureedge.net/clip/models/"):
        assert part in message
    assert info.value.__cause__ is None and isinstance(info.value, FileNotFoundError)


def test_missing_path_gives_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="clip_weights") as info:
        load_clip_model(str(tmp_path / "nope.pt"), str(tmp_path))
    assert str(tmp_path / "nope.pt") in str(info.value)


def test_invalid_files_give_clear_errors(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"this is not a model")
    with pytest.raises(InvalidWeightsError, match="garbage.pt"):
        load_clip_model(str(tmp_path / "garbage.pt"), str(tmp_path))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InvalidWeightsError, match="not a CLIP model"):
        load_clip_model(str(tmp_path / "other.pt"), str(tmp_path))
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InvalidWeightsError, match="state dict"):
        load_clip_model(str(tmp_path / "list.pt"), str(tmp_path))


def test_image_size_must_match_loaded_weights(tiny_clip, tmp_path):
    torch.save(tiny_clip.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match="image_size=32"):
        load_clip_model(str(tmp_path / "state.pt"), "unused", image_size=224)


def test_tiny_width_must_be_a_multiple_of_64():
    with pytest.raises(ValueError, match="tiny_width"):
        build_tiny_clip(width=96, layers=1, patch=16, image_size=32)


def test_short_context_equals_padding_to_77(tiny_clip, make_text_ids):
    """max_words < 77: cut positions + L x L causal mask give the same EOT feature as the
    full 77-token context, and tokens after EOT cannot reach it (causal)."""
    ids = make_text_ids(4, 8, seed=2)
    padded = torch.zeros(4, 77, dtype=torch.long)
    padded[:, :8] = ids
    after_eot = torch.where(ids == 0, torch.randint(1, 1000, ids.shape), ids)   # EOT stays the max
    with torch.no_grad():
        short = encode_text(tiny_clip, ids)
        assert torch.allclose(short, encode_text(tiny_clip, padded), atol=1e-5)
        assert torch.allclose(short, encode_text(tiny_clip, after_eot), atol=1e-5)
        assert not torch.allclose(short, encode_text(tiny_clip, ids.roll(1, dims=0)))
    with pytest.raises(ValueError, match="max_words"):
        encode_text(tiny_clip, torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("width", [64, 128])
def test_text_encoder_equals_clips_own_text_path(make_text_ids, width):
    """encode_text (batch-first blocks, causal SDPA, folded QuickGELU) equals CLIP's own
    encode_text: features and the gradient of every text-tower weight, with one attention
    head and with two."""
    torch.manual_seed(0)
    tiny_clip = build_tiny_clip(width, layers=2, patch=16, image_size=32)
    ids = make_text_ids(5, 12, seed=4)
    weights = torch.randn(5, width, generator=torch.Generator().manual_seed(4))   # a loss that sees every output

    def run(encode):
        tiny_clip.zero_grad(set_to_none=True)
        out = encode(ids)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tiny_clip.named_parameters() if p.grad is not None}

    ours, our_grads = run(lambda text: encode_text(tiny_clip, text))
    clips, clip_grads = run(tiny_clip.encode_text)
    assert torch.allclose(ours, clips, rtol=1e-4, atol=1e-5 * clips.abs().max())
    assert our_grads.keys() == clip_grads.keys() and "transformer.resblocks.0.mlp.c_fc.weight" in our_grads
    for name, grad in clip_grads.items():
        assert torch.allclose(our_grads[name], grad, rtol=1e-3, atol=1e-5 * grad.abs().max()), name


def test_frame_encoder_checks_size(tiny_clip):
    with pytest.raises(ValueError, match="image_size=32"):
        encode_frames(tiny_clip, torch.zeros(2, 3, 64, 64))


def test_normalize_frames_uses_clip_statistics():
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = normalize_frames(frames)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, 0, 0], -mean / std)
    assert torch.allclose(out[1, :, 0, 0], (1 - mean) / std)


@pytest.mark.parametrize("frozen, frames_per_block, width", [(True, 6, 64), (False, 6, 128), (True, 4, 128),
                                                              (False, 1, 64)])
def test_folded_normalisation_matches_normalising_the_pixels(frozen, frames_per_block, width, monkeypatch):
    """encode_uint8_frames (normalisation folded into conv1, mask on its output, the last block
    for the CLS token alone) equals normalising and masking the pixels first: outputs and every
    gradient, conv1 frozen or not, the patches taken in one block or in several (the last one
    shorter), one attention head or two (width 128: the heads' order matters)."""
    monkeypatch.setattr(clip_backbone, "PATCH_BLOCK_ELEMENTS", frames_per_block * 3 * 32 * 32)
    torch.manual_seed(0)
    tiny_clip = build_tiny_clip(width, layers=2, patch=16, image_size=32)
    tiny_clip.visual.conv1.requires_grad_(not frozen)
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    keep = torch.tensor([1, 1, 0, 1, 0, 1])                            # two padded frames
    weights = torch.randn(6, width, generator=g)                       # a loss that sees every output

    def run(encode):
        tiny_clip.zero_grad(set_to_none=True)
        out = encode()
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in tiny_clip.visual.named_parameters() if p.grad is not None}
        return out.detach(), grads

    fused, fused_grads = run(lambda: encode_uint8_frames(tiny_clip, frames, keep))
    plain, plain_grads = run(lambda: encode_frames(
        tiny_clip, normalize_frames(frames) * keep.view(-1, 1, 1, 1).float()))
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-4 * plain.abs().max())
    assert fused_grads.keys() == plain_grads.keys()
    assert ("conv1.weight" in fused_grads) == (not frozen)
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max()), name
    # padded frames do not depend on their pixels
    other = frames.clone()
    other[keep == 0] = 255 - other[keep == 0]
    with torch.no_grad():
        assert torch.allclose(encode_uint8_frames(tiny_clip, other, keep), fused, atol=1e-6)


def test_uint8_frame_encoder_checks_size(tiny_clip):
    with pytest.raises(ValueError, match="image_size=32"):
        encode_uint8_frames(tiny_clip, torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.ones(2))


def random_clip(image_size: int, patch: int, width: int):
    """A randomly initialised CLIP with one vision layer (any size, unlike the tiny CLIP)."""
    import clip.model

    torch.manual_seed(0)
    return clip.model.CLIP(embed_dim=64, image_resolution=image_size, vision_layers=1, vision_width=width,
                           vision_patch_size=patch, context_length=77, vocab_size=49408,
                           transformer_width=64, transformer_heads=1, transformer_layers=1).float()


def test_folded_patch_embedding_drops_partial_patches():
    """A side that is not a multiple of the patch (60 px, patch 16) encodes as conv1 does: the
    pixels past the last whole patch are dropped."""
    clip_model = random_clip(60, 16, 64)
    frames = torch.randint(0, 256, (4, 3, 60, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        exact = encode_frames(clip_model, normalize_frames(frames) * keep.view(-1, 1, 1, 1).float())
        fused = encode_uint8_frames(clip_model, frames, keep)
    assert torch.allclose(fused, exact, rtol=1e-4, atol=1e-4 * exact.abs().max())


def test_folded_patch_embedding_under_bf16_autocast_is_as_close_as_normalising_pixels():
    """Under bf16 autocast the folded path (offset kept in fp32, pixels centred before the
    matmul) stays as close to fp32 as CLIP's own bf16 path. Filters with a mean, as trained
    ones may have, make an uncentred sum of 0..255 pixels large, and its bf16 rounding with it."""
    clip_model = random_clip(224, 32, 768)
    with torch.no_grad():
        clip_model.visual.conv1.weight.add_(0.02)
    frames = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = encode_frames(clip_model, normalize_frames(frames))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = encode_uint8_frames(clip_model, frames, torch.ones(8)).float()
            plain = encode_frames(clip_model, normalize_frames(frames)).float()
    fused_error, plain_error = (fused - exact).abs().max(), (plain - exact).abs().max()
    assert fused_error <= 1.5 * plain_error, (fused_error, plain_error)
