"""The evaluation similarity matrix of EMCL-Net, computed block by block (docs/evaluation.md).

EMCL mixes everything in its input, so the reference scores the test set in blocks of
`block_size` texts x `block_size` videos (the last chunks smaller) and a pair's score depends
on its block: the block size is part of the protocol (docs/reference-differences.md #3).

- `block_similarity_loop`: the reference loop over blocks, kept as the test oracle.
- `block_similarity`: the same scores with all blocks batched on the device: blocks of the
  same shape (at most 4 shapes) are stacked on a leading group dim and scored in a few
  sub-batches.
- `full_similarity`: one block = the whole matrix, or, without EMCL, pooling + cosine in
  text chunks (scores do not depend on the chunking then).

Pooling "text" stacks A*V text-pooled video vectors and A texts per block; "mean" stacks
V mean-pooled video vectors and A texts (the EMCL block of the reference inference module).
- `similarity_matrix`: picks one of the above from `emcl_module` and `block_size`.
- `query_similarity`: search over a video collection: each query scored on its own, in
  blocks of 1 text x block_size videos (batched), so its ranking never depends on the
  other queries asked with it.
"""
from __future__ import annotations

import torch

from emcl_nb.model.emclnet import block_logits, pool

# (text, video) pairs scored per batched call: 64 blocks of 32 x 32 keep one call near 1 GiB at D 512.
MAX_PAIRS_PER_BATCH = 65_536
# On a CPU, calls that stay in cache win (README, "Benchmark notes").
MAX_PAIRS_PER_BATCH_CPU = 4_096
# A search query's 1 x block_size blocks, batched this many per call on a CPU: the EM's
# responsibilities [G, D, K] then stay in cache (bench/search.py).
QUERY_BLOCKS_PER_BATCH_CPU = 32


def _check_inputs(t: torch.Tensor, f: torch.Tensor, frame_mask: torch.Tensor, block_size: int | None):
    if t.ndim != 2 or f.ndim != 3 or frame_mask.shape != f.shape[:2] or t.shape[1] != f.shape[2]:
        raise ValueError(
            f"expected text features t [A,D], frame features f [V,T,D] and frame_mask [V,T] with the "
            f"same D; got t {tuple(t.shape)}, f {tuple(f.shape)}, frame_mask {tuple(frame_mask.shape)}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _check_eval_mode(emcl_module):
    """EMCL must not update its bases while scoring the test set (no momentum update)."""
    if emcl_module is not None and emcl_module.training:
        raise RuntimeError("the EMCL module is in training mode and would update its bases while "
                           "scoring; call model.eval() (or emcl_module.eval()) before computing similarities")
    return emcl_module


@torch.no_grad()
def score_block(t, f, frame_mask, *, temp: float, emcl_module, normalize: str = "after",
                pooling: str = "text") -> torch.Tensor:
    """Scores of one block, or of G stacked blocks: t [..,A,D], f [..,V,T,D] -> [..,A,V].

    `pooling`: "text" (text-conditioned, `temp`) or "mean" (CLIP4Clip meanP). `normalize`
    is passed to `block_logits`: "after" EMCL (trained model) or "before" it (EMCL as an
    inference-only module, docs/method.md §7).
    """
    pooled, _ = pool(t, f, frame_mask, pooling, temp)                  # [.., (A,) V, D]
    return block_logits(t, pooled, _check_eval_mode(emcl_module), normalize)  # [.., A, V]


@torch.no_grad()
def block_similarity_loop(t, f, frame_mask, *, temp: float, emcl_module, block_size: int,
                          normalize: str = "after", pooling: str = "text") -> torch.Tensor:
    """The reference protocol: a Python loop over (text chunk, video chunk) blocks -> [A, V].

    Kept as the oracle that `block_similarity` must reproduce.
    """
    _check_inputs(t, f, frame_mask, block_size)
    sim = t.new_empty(t.shape[0], f.shape[0])
    for row in range(0, t.shape[0], block_size):
        for col in range(0, f.shape[0], block_size):
            rows, cols = slice(row, row + block_size), slice(col, col + block_size)
            sim[rows, cols] = score_block(t[rows], f[cols], frame_mask[cols], temp=temp, emcl_module=emcl_module,
                                           normalize=normalize, pooling=pooling)
    return sim


def _chunks(n: int, block_size: int):
    """(start, number of chunks, chunk size) for the full chunks and the smaller last one."""
    n_full, rest = divmod(n, block_size)
    parts = [(0, n_full, block_size)] if n_full else []
    return parts + ([(n_full * block_size, 1, rest)] if rest else [])


@torch.no_grad()
def block_similarity(t, f, frame_mask, *, temp: float, emcl_module, block_size: int,
                     normalize: str = "after", pooling: str = "text",
                     max_blocks_per_batch: int | None = None) -> torch.Tensor:
    """The block protocol's scores [A, V], all blocks batched on the device.

    Blocks of one shape (full or last text chunk x full or last video chunk) are stacked on
    a leading group dim G and scored `max_blocks_per_batch` at a time, which bounds memory
    to a few copies of G x block_size^2 x D floats. None: as many blocks as hold
    MAX_PAIRS_PER_BATCH pairs on a GPU (64 blocks of 32 x 32), MAX_PAIRS_PER_BATCH_CPU on a CPU.
    """
    _check_inputs(t, f, frame_mask, block_size)
    if max_blocks_per_batch is not None and max_blocks_per_batch < 1:
        raise ValueError(f"max_blocks_per_batch must be >= 1 (or None), got {max_blocks_per_batch}")
    sim = t.new_empty(t.shape[0], f.shape[0])
    n_frames, dim = f.shape[1:]
    for row, n_text_chunks, text_size in _chunks(t.shape[0], block_size):
        texts = t[row:row + n_text_chunks * text_size].reshape(n_text_chunks, text_size, dim)  # [I, a, D]
        for col, n_video_chunks, video_size in _chunks(f.shape[0], block_size):
            cols = slice(col, col + n_video_chunks * video_size)
            videos = f[cols].reshape(n_video_chunks, video_size, n_frames, dim)              # [J, b, T, D]
            masks = frame_mask[cols].reshape(n_video_chunks, video_size, n_frames)           # [J, b, T]
            # out[i, j] is the (a x b) block of text chunk i and video chunk j (a view of sim).
            out = sim[row:row + n_text_chunks * text_size, cols].unflatten(0, (n_text_chunks, text_size))
            out = out.unflatten(2, (n_video_chunks, video_size)).permute(0, 2, 1, 3)     # [I, J, a, b]
            n_blocks = n_text_chunks * n_video_chunks
            budget = MAX_PAIRS_PER_BATCH_CPU if t.device.type == "cpu" else MAX_PAIRS_PER_BATCH
            per_call = max_blocks_per_batch or max(1, budget // (text_size * video_size))
            for start in range(0, n_blocks, per_call):
                block = torch.arange(start, min(start + per_call, n_blocks), device=t.device)
                i, j = block // n_video_chunks, block % n_video_chunks                    # [G], [G]
                out[i, j] = score_block(texts[i], videos[j], masks[j], temp=temp, emcl_module=emcl_module,
                                        normalize=normalize, pooling=pooling)            # [G, a, b]
    return sim


@torch.no_grad()
def full_similarity(t, f, frame_mask, *, temp: float, emcl_module=None, normalize: str = "after",
                    pooling: str = "text", chunk_size: int | None = None) -> torch.Tensor:
    """Scores [A, V] without the block protocol.

    With `emcl_module`: one block holding the whole matrix (what `block_size >= max(A, V)` means;
    needs A x V x D floats). Without EMCL: pooling + cosine, computed `chunk_size` texts at
    a time to bound memory (None: as many as make MAX_PAIRS_PER_BATCH pairs); each score
    depends only on its own pair, so the chunking does not change the result.
    """
    _check_inputs(t, f, frame_mask, None)
    if emcl_module is not None:
        return score_block(t, f, frame_mask, temp=temp, emcl_module=emcl_module, normalize=normalize,
                           pooling=pooling)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
    chunk_size = chunk_size or max(1, MAX_PAIRS_PER_BATCH // max(1, f.shape[0]))
    return torch.cat([score_block(rows, f, frame_mask, temp=temp, emcl_module=None, pooling=pooling)
                      for rows in t.split(chunk_size)])                # [A, V]


def similarity_matrix(t, f, frame_mask, *, temp: float, emcl_module, block_size: int,
                      normalize: str = "after", pooling: str = "text",
                      max_blocks_per_batch: int | None = None) -> torch.Tensor:
    """The evaluation matrix [A, V]: batched blocks when EMCL is used, a chunked cosine when
    not. `emcl_module, normalize` as set by `scoring.scoring_setup`; `pooling` the model's."""
    if emcl_module is None or block_size >= max(t.shape[0], f.shape[0]):
        return full_similarity(t, f, frame_mask, temp=temp, emcl_module=emcl_module, normalize=normalize,
                               pooling=pooling)
    return block_similarity(t, f, frame_mask, temp=temp, emcl_module=emcl_module, block_size=block_size,
                            normalize=normalize, pooling=pooling,
                            max_blocks_per_batch=max_blocks_per_batch)


def query_similarity(t, f, frame_mask, *, temp: float, emcl_module, block_size: int,
                     normalize: str = "after", pooling: str = "text",
                     max_blocks_per_batch: int | None = None) -> torch.Tensor:
    """Search scores [Q, V]: every query alone against all videos, in blocks of 1 text x
    `block_size` videos (the last smaller), all of a query's blocks batched (one
    `similarity_matrix` of a single text). A query's scores do not depend on the other
    queries; a video's score depends on the `block_size` - 1 videos that share its block,
    as at evaluation. Without EMCL: pooling + cosine. `max_blocks_per_batch` None:
    QUERY_BLOCKS_PER_BATCH_CPU on a CPU, `block_similarity`'s budget on a GPU."""
    _check_inputs(t, f, frame_mask, block_size)
    if max_blocks_per_batch is None and t.device.type == "cpu":
        max_blocks_per_batch = QUERY_BLOCKS_PER_BATCH_CPU
    return torch.cat([similarity_matrix(query[None], f, frame_mask, temp=temp, emcl_module=emcl_module,
                                        block_size=block_size, normalize=normalize, pooling=pooling,
                                        max_blocks_per_batch=max_blocks_per_batch)
                      for query in t]) if len(t) else t.new_empty(0, f.shape[0])      # [Q, V]
