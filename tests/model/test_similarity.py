"""Batched block similarity equals the reference loop over blocks; the EMCL-off path is
pooling + cosine (docs/method.md §3); evaluation never updates the EMCL bases."""
import pytest
import torch

from emcl_nb.model.emcl import EMCL
from emcl_nb.model.similarity import block_similarity, block_similarity_loop, full_similarity, similarity_matrix

DIM, FRAMES, TEMP = 32, 6, 3.0


def features(n_texts: int, n_videos: int, seed: int = 0, scale: float = 1.0):
    """Random text features [A,D], frame features [V,T,D] and a temporal padding mask [V,T]."""
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(n_texts, DIM, generator=g)
    f = scale * torch.randn(n_videos, FRAMES, DIM, generator=g)
    lengths = torch.randint(1, FRAMES + 1, (n_videos,), generator=g)              # [V]
    frame_mask = (torch.arange(FRAMES)[None, :] < lengths[:, None]).long()        # [V, T]
    f = f * frame_mask[..., None]                                                 # padded frames are zeros
    return t, f, frame_mask


def emcl_module(init: str) -> EMCL:
    g = torch.Generator().manual_seed(1)
    return EMCL(8, stage_num=9, momentum=0.9, lamd=1.0, beta=3.0, init=init, dim=DIM, generator=g).eval()


# The reference recipe's K identical bases split apart on float32 rounding noise once the
# inputs are large (unit-variance features: a 1e-7 change of X moves R by ~7e-2), so two
# summation orders cannot agree to 1e-5 there, whatever the batching; at scale 0.2 the EM
# is well conditioned and batched == loop to ~1e-7. The distinct init is tested at scale 1.
@pytest.mark.parametrize("init, scale", [("reference", 0.2), ("distinct", 1.0)])
@pytest.mark.parametrize("n_texts, n_videos, block_size, max_blocks", [
    (64, 64, 32, 64),      # exact multiples of the block
    (70, 45, 32, 64),      # smaller last text and video chunks: all 4 block shapes
    (70, 45, 16, 3),       # many blocks, sub-batches of 3 with a partial last sub-batch
    (70, 45, 100, 64),     # block larger than the matrix: one block
])
@pytest.mark.parametrize("pooling", ["text", "mean"])
def test_batched_blocks_equal_the_loop_oracle(init, scale, n_texts, n_videos, block_size, max_blocks,
                                              pooling):
    t, f, frame_mask = features(n_texts, n_videos, scale=scale)
    emcl = emcl_module(init)
    kwargs = dict(temp=TEMP, emcl_module=emcl, block_size=block_size, pooling=pooling)
    loop = block_similarity_loop(t, f, frame_mask, **kwargs)
    batched = block_similarity(t, f, frame_mask, max_blocks_per_batch=max_blocks, **kwargs)
    assert batched.shape == (n_texts, n_videos)
    assert (batched - loop).abs().max() <= 1e-5
    routed = similarity_matrix(t, f, frame_mask, **kwargs)
    assert (routed - loop).abs().max() <= 1e-5


def test_block_size_changes_the_scores_so_the_oracle_check_means_something():
    t, f, frame_mask = features(70, 45)
    emcl = emcl_module("distinct")
    blocks = block_similarity(t, f, frame_mask, temp=TEMP, emcl_module=emcl, block_size=16)
    whole = full_similarity(t, f, frame_mask, temp=TEMP, emcl_module=emcl)
    assert (blocks - whole).abs().max() > 1e-3


def test_whole_matrix_path_is_one_block():
    t, f, frame_mask = features(20, 12, scale=0.2)
    emcl = emcl_module("reference")
    whole = full_similarity(t, f, frame_mask, temp=TEMP, emcl_module=emcl)
    one_block = block_similarity_loop(t, f, frame_mask, temp=TEMP, emcl_module=emcl, block_size=20)
    assert (whole - one_block).abs().max() <= 1e-5


def test_emcl_off_is_text_conditioned_pooling_and_cosine():
    t, f, frame_mask = features(23, 17)
    # docs/method.md §3 by hand: softmax over all frames, mask after the softmax, no renormalising.
    weights = torch.softmax(torch.einsum("ad,vtd->avt", t, f) / TEMP, dim=-1) * frame_mask  # [A, V, T]
    pooled = torch.einsum("avt,vtd->avd", weights, f)                                      # [A, V, D]
    expected = torch.nn.functional.cosine_similarity(t[:, None, :], pooled, dim=-1)        # [A, V]
    for chunk_size in (5, 64):
        got = full_similarity(t, f, frame_mask, temp=TEMP, emcl_module=None, chunk_size=chunk_size)
        assert (got - expected).abs().max() <= 1e-5
    routed = similarity_matrix(t, f, frame_mask, temp=TEMP, emcl_module=None, block_size=8)
    assert (routed - expected).abs().max() <= 1e-5


def test_evaluation_never_updates_the_bases():
    t, f, frame_mask = features(40, 40, scale=0.2)
    emcl = emcl_module("reference")
    before = {k: v.clone() for k, v in emcl.state_dict().items()}
    block_similarity(t, f, frame_mask, temp=TEMP, emcl_module=emcl, block_size=16)
    block_similarity_loop(t, f, frame_mask, temp=TEMP, emcl_module=emcl, block_size=16)
    assert all(torch.equal(before[k], v) for k, v in emcl.state_dict().items())
    emcl.train()
    with pytest.raises(RuntimeError, match="eval"):
        block_similarity(t, f, frame_mask, temp=TEMP, emcl_module=emcl, block_size=16)


def test_mismatched_shapes_are_refused():
    t, f, frame_mask = features(8, 8)
    with pytest.raises(ValueError, match="frame_mask"):
        block_similarity(t, f, frame_mask[:, :-1], temp=TEMP, emcl_module=None, block_size=4)


def test_inference_only_emcl_normalising_before_matches_the_loop():
    # docs/method.md §7: K 7, 10 stages, lambda 0.1, beta 4, inputs normalised, no renormalising.
    t, f, frame_mask = features(70, 45)
    emcl = EMCL(7, stage_num=10, lamd=0.1, beta=4.0, generator=torch.Generator().manual_seed(2)).eval()
    kwargs = dict(temp=TEMP, emcl_module=emcl, block_size=32, normalize="before")
    loop = block_similarity_loop(t, f, frame_mask, **kwargs)
    assert (block_similarity(t, f, frame_mask, **kwargs) - loop).abs().max() <= 1e-5
    assert (loop - block_similarity_loop(t, f, frame_mask, **{**kwargs, "normalize": "after"})).abs().max() > 1e-3
