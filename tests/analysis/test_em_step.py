"""EM attention maps (emcl_nb.analysis.em_step): the block matches the evaluation scores, its
invariants hold, the reference recipe collapses and the distinct one does not, the figures
and the explorer build."""
import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from emcl_nb.analysis import ablations, em_explorer, em_figures, em_step, figures  # noqa: E402
from emcl_nb.data import frames as frames_module  # noqa: E402
from emcl_nb.data.synthetic import generate_synthetic  # noqa: E402
from emcl_nb.evaluation import scoring as scoring_module  # noqa: E402
from emcl_nb.evaluation.encode import Features, encode_split  # noqa: E402
from emcl_nb.evaluation.scoring import scoring_setup  # noqa: E402
from emcl_nb.model.emcl import effective_rank  # noqa: E402
from emcl_nb.model.emclnet import pool_frames  # noqa: E402
from emcl_nb.model.similarity import score_block  # noqa: E402
from emcl_nb.params import Params  # noqa: E402
from emcl_nb.training.build import build_model  # noqa: E402

N_TEST, A = 6, 4


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Params:
    """6 test videos of 6 frames at 3 fps: 2 sampled frames of max_frames 4 (2 padded)."""
    data = generate_synthetic(tmp_path_factory.mktemp("synthetic"), train=8, val=0, test=N_TEST,
                              frames=6, fps=3, size=32, workers=1, progress=False)
    return Params(dataset="tiny", run="r", output_root=str(tmp_path_factory.mktemp("out")),
                  layout="msrvtt", anno_path=str(data), video_path=str(data / "videos"),
                  clip_weights="tiny", tiny_width=64, tiny_layers=1, tiny_patch=16, image_size=32,
                  max_words=16, max_frames=4, num_hidden_layers=1, emcl_bases=8, emcl_stages=9,
                  batch_size_val=4, inference_emcl_bases=3, num_workers=0, device="cpu",
                  progress=False)


def make_model(params: Params, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(params.replace(**overrides)).eval()


@pytest.fixture(scope="module")
def model(params):
    return make_model(params)


@pytest.fixture(scope="module")
def features(model, params) -> Features:
    return encode_split(model, params, "test")


@pytest.fixture(scope="module")
def block(model, features, params) -> em_step.EMBlock:
    return em_step.em_block(model, features, range(A), params=params)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def random_features(n: int = 6, frames: int = 4, dim: int = 64, seed: int = 0) -> Features:
    """Features with a strong common component (like CLIP embeddings); every other video
    has its second half of frames padded; text i belongs to video i."""
    g = torch.Generator().manual_seed(seed)
    common = 2.0 * torch.randn(dim, generator=g)
    mask = torch.ones(n, frames, dtype=torch.long)
    mask[::2, frames // 2:] = 0
    return Features("test", torch.randn(n, dim, generator=g) + common,
                    torch.randn(n, frames, dim, generator=g) + common, mask, torch.arange(n),
                    [f"video{i}" for i in range(n)], [f"caption {i}" for i in range(n)])


# ---------------------------------------------------------------- the block

def test_block_shapes(block, features):
    D, K, T = features.text.shape[1], 8, 4
    V = A                                          # one caption per video: the texts' own videos
    assert block.video_indices.tolist() == features.text_video[:A].tolist()
    assert block.positive.tolist() == list(range(A))
    assert block.w.shape == (A, V, T) and block.frame_mask.shape == (V, T)
    assert block.z.shape == (D, K)
    assert block.mu_video.shape == (A, V, K) and block.mu_text.shape == (A, K)
    assert block.recon.shape == (A * V + A, D)
    for name in ("text_before", "text_after"):
        assert getattr(block, name).shape == (A, D)
    for name in ("video_before", "video_after"):
        assert getattr(block, name).shape == (A, V, D)
    assert block.sim.shape == block.sim_plain.shape == (A, V)
    assert block.captions == features.captions[:A] and len(block.video_ids) == V


def test_block_invariants(block):
    # responsibilities: each column sums to 1 (up to the reference's 1e-6)
    assert torch.allclose(block.z.sum(0), torch.ones(block.z.shape[1]), atol=1e-4)
    assert (block.z >= 0).all()
    # frame weights: zero on padded frames, at most 1 in total over the valid ones
    padded = block.frame_mask == 0
    assert padded.any()
    assert (block.w[:, padded] == 0).all()
    assert ((block.w.sum(-1) <= 1 + 1e-6) & (block.w.sum(-1) > 0)).all()
    # the split bases put together again give the reconstruction R = mu Zᵀ
    mu = torch.cat([block.mu_video.reshape(-1, block.mu_video.shape[-1]), block.mu_text])
    assert torch.allclose(mu @ block.z.T, block.recon, atol=1e-5)
    # the embeddings are unit vectors, and S (normalize "after") is their cosine
    for e in (block.text_before, block.video_before, block.text_after, block.video_after):
        assert torch.allclose(e.norm(dim=-1), torch.ones(e.shape[:-1]), atol=1e-5)
    assert torch.allclose(block.sim, torch.einsum("ad,avd->av", block.text_after, block.video_after), atol=1e-5)
    assert torch.allclose(block.sim_plain, torch.einsum("ad,avd->av", block.text_before, block.video_before),
                          atol=1e-5)
    assert not torch.allclose(block.sim, block.sim_plain)          # beta R changed the scores


def test_block_scores_are_the_evaluation_scores(block, model, params, features):
    vi = block.video_indices
    t, f, mask = features.text[:A], features.video[vi], features.frame_mask[vi]
    expected = score_block(t, f, mask, temp=model.temp, emcl_module=model.emcl)
    assert torch.allclose(block.sim, expected, atol=1e-6)
    assert torch.allclose(block.sim_plain, score_block(t, f, mask, temp=model.temp, emcl_module=None), atol=1e-6)
    # eval mode: the kept bases did not move
    before = model.emcl.basis_init.clone()
    em_step.em_block(model, features, range(A), params=params)
    assert torch.equal(model.emcl.basis_init, before)


def test_chosen_videos_and_absent_positives(model, params, features):
    block = em_step.em_block(model, features, [0, 1], [5, 1, 3], params=params)
    assert block.video_ids == [features.video_ids[i] for i in (5, 1, 3)]
    assert block.positive.tolist() == [-1, 1]                     # video 0 is not in the block
    assert block.w.shape[:2] == (2, 3) and block.mu_video.shape[:2] == (2, 3)


def test_reference_recipe_collapses_and_distinct_bases_do_not(params):
    features = random_features()
    reference = em_step.em_block(make_model(params, emcl_init="reference"), features, range(6), params=params)
    distinct = em_step.em_block(make_model(params, emcl_init="distinct"), features, range(6), params=params)
    assert reference.rank <= 2
    assert distinct.rank > 2
    # reference: at most two distinct bases, so at most two distinct responsibility columns
    columns = {tuple(col) for col in reference.z.T.round(decimals=3).tolist()}
    assert len(columns) <= 2


def test_inference_only_emcl(params, features):
    """A model trained without EMCL gets the inference-only module (docs/method.md §7):
    its K, beta, and scores on normalised inputs with no renormalisation afterwards."""
    model = make_model(params, emcl="off")
    block = em_step.em_block(model, features, range(A), params=params)
    assert block.mode == "inference"
    assert block.z.shape[1] == params.inference_emcl_bases and block.beta == params.inference_emcl_beta
    scoring = scoring_setup(model, params, "inference")
    vi = block.video_indices
    expected = score_block(features.text[:A], features.video[vi], features.frame_mask[vi],
                           temp=model.temp, emcl_module=scoring.emcl_module, normalize="before")
    assert torch.allclose(block.sim, expected, atol=1e-6)
    with pytest.raises(ValueError, match="no EM step"):
        em_step.em_block(model, features, range(A), emcl_mode="off", params=params)


def test_modality_gap_numbers():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    video = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert em_step.modality_gap(text, video) == pytest.approx(math.sqrt(2))
    params = Params(clip_weights="tiny", tiny_width=64, tiny_layers=1, image_size=32,
                    num_hidden_layers=1, emcl_bases=8, device="cpu")
    model = make_model(params)
    features = random_features()
    block = em_step.em_block(model, features, range(6), params=params)
    for gap in (block.gap_before, block.gap_after):
        assert math.isfinite(gap) and 0 < gap < 2                  # unit vectors: at most 2 apart
    # before EMCL: the normalised texts and their text-conditioned pooled videos
    pooled, _ = pool_frames(features.text, features.video, features.frame_mask, model.temp)
    text_mean = torch.nn.functional.normalize(features.text, dim=-1).mean(0)
    video_mean = torch.nn.functional.normalize(pooled, dim=-1).reshape(-1, 64).mean(0)
    assert block.gap_before == pytest.approx(float((text_mean - video_mean).norm()), abs=1e-5)


def test_pca_keeps_distances_of_planar_points():
    g = torch.Generator().manual_seed(0)
    plane = torch.linalg.qr(torch.randn(10, 2, generator=g)).Q               # [10, 2] orthonormal
    x = torch.randn(7, 2, generator=g) @ plane.T + torch.randn(10, generator=g)   # [7, 10] in a plane
    xy = em_step.pca_2d(x)
    assert xy.shape == (7, 2)
    assert torch.allclose(torch.cdist(xy, xy), torch.cdist(x, x), atol=1e-4)
    assert torch.allclose(xy.mean(0), torch.zeros(2), atol=1e-5)


# ---------------------------------------------------------------- figures, frames, explorer

def test_plots_return_figures_with_their_axes(block, params, features, tmp_path):
    frames = frames_module.frame_reader(params, features)(block.video_indices)
    cases = {"responsibilities": (em_figures.plot_responsibilities(block), 2),     # heat map + colour bar
             "loadings": (em_figures.plot_basis_loadings(block), 3),               # videos, texts, colour bar
             "weights": (em_figures.plot_frame_weights(block, top=3), 3),          # one bar chart per video
             "thumbs": (em_figures.plot_frame_weights(block, frames, top=3), 6),   # + a strip of frames each
             "gap": (em_figures.plot_modality_gap(block), 2)}                      # before, after
    for name, (fig, n_axes) in cases.items():
        assert isinstance(fig, matplotlib.figure.Figure), name
        assert len(fig.axes) == n_axes, name
        assert figures.save_figure(fig, tmp_path / "figures" / f"{name}.png").stat().st_size > 0
    gap = cases["gap"][0]
    assert f"{block.gap_before:.3f}" in gap.axes[0].get_title()
    assert f"{block.gap_after:.3f}" in gap.axes[1].get_title()
    # the top video is listed first in the frame-weight figure
    best = int(block.sim[0].argmax())
    assert cases["weights"][0].axes[0].get_title().startswith(f"#1 {block.video_ids[best]}")


def test_frame_reader_gives_the_sampled_frames_and_reads_annotations_once(params, features,
                                                                          monkeypatch):
    reads = []
    real = frames_module.load_annotations
    monkeypatch.setattr(frames_module, "load_annotations", lambda *a, **k: reads.append(a) or real(*a, **k))
    read = frames_module.frame_reader(params, features)
    frames = read([2, 0])
    assert np.array_equal(read([0])[0], frames[1]) and len(reads) == 1
    assert frames.dtype.name == "uint8"
    assert frames.shape == (2, params.max_frames, params.image_size, params.image_size, 3)
    mask = features.frame_mask[[2, 0]].bool()
    assert (frames[~mask.numpy()] == 0).all()                      # padded frames are black
    assert all(frame.max() > 0 for frame in frames[mask.numpy()])  # real frames are not
    assert not (frames[0] == frames[1]).all()


def test_explorer_shows_the_chosen_caption(model, params, features, monkeypatch):
    pytest.importorskip("ipywidgets")
    shown = []
    real = em_step.em_block
    monkeypatch.setattr(em_step, "em_block",
                        lambda *args, **kw: shown.append(args[2]) or real(*args, **kw))
    widget = em_explorer.explorer(model, features, params=params, top=3)
    controls, scores, _ = widget.children                  # the controls stay above the output
    dropdown, status = controls.children
    assert len(dropdown.options) == features.n_texts
    dropdown.value = 4
    assert shown == [[0], [4]]
    assert status.value.startswith("caption 4:") and not dropdown.disabled
    assert "evaluation score" in scores.value and "S in this block" in scores.value


def test_explorer_sets_up_the_em_scoring_once(params, features, capsys):
    """A model trained with EMCL off: the inference module is set up (and noted) once, not on
    every caption chosen."""
    pytest.importorskip("ipywidgets")
    model = make_model(params, emcl="off")
    widget = em_explorer.explorer(model, features, params=params, top=3)
    dropdown = widget.children[0].children[0]
    dropdown.value, dropdown.value = 4, 2
    assert capsys.readouterr().out.count("trained with emcl=off: showing EMCL") == 1


def test_top_k_figure_decodes_each_video_once(model, params, features):
    sim = scoring_module.score(features, params, model)
    asked = []

    def frames_of(videos):      # [n, T, 2, 2, 3]: video b's frame t filled with 10 b + t
        asked.append(videos)
        return np.array(videos, dtype=np.uint8)[:, None, None, None, None] * 10 + \
            np.arange(5, dtype=np.uint8)[None, :, None, None, None] + np.zeros((1, 1, 2, 2, 3), np.uint8)

    queries = list(range(features.n_texts))
    fig = figures.plot_top_k(sim, features.text_video, features.captions, frames_of, queries, k=3)
    top = sim[queries].topk(3, dim=1).indices                              # [Q, 3]
    assert len(asked) == 1 and sorted(asked[0]) == sorted(set(top.flatten().tolist()))
    for row, subfig in enumerate(fig.subfigs):
        for col, ax in enumerate(subfig.axes):                             # the middle frame, 2
            assert (np.asarray(ax.images[0].get_array()) == 10 * int(top[row, col]) + 2).all()


def test_basis_loadings_label_rows_with_the_caption_numbers_of_the_split(model, params, features):
    block = em_step.em_block(model, features, [4, 2], params=params)
    fig = em_figures.plot_basis_loadings(block)
    left, right = fig.axes[:2]
    assert [label.get_text() for label in left.get_yticklabels()] == ["caption 4", "caption 2"]
    assert [label.get_text().split(":")[0] for label in right.get_yticklabels()] == ["4", "2"]


# ---------------------------------------------------------------- the ablations' rank column

def test_correction_rank_is_the_rank_of_the_correction_added(model, params, features):
    from emcl_nb.analysis.ablations import correction_rank

    on = scoring_setup(model, params, "on", block_size=4, emcl_beta=2.0)
    rank = correction_rank(features, model, on)
    # the same block scored the way evaluation scores it, and the correction it added
    score_block(features.text[:4], features.video[:4], features.frame_mask[:4], temp=model.temp,
                emcl_module=on.emcl_module, normalize=on.normalize)
    assert rank == int(effective_rank(2.0 * on.emcl_module.last.recon)) >= 1
    assert correction_rank(features, model, scoring_setup(model, params, "on", emcl_beta=0.0)) == 0
    assert correction_rank(features, model, scoring_setup(model, params, "off")) is None


def test_the_views_work_on_a_mean_pooling_model(params):
    """meanP + EMCL at inference: one EM row per video, repeated for every caption."""
    model = make_model(params.replace(pooling="mean", agg_module="None", emcl="off"))
    features = encode_split(model, params, "test")
    block = em_step.em_block(model, features, range(A), params=params)
    V = len(block.video_ids)
    assert block.recon.shape[0] == V + A                     # N = V + A rows entered the EM
    assert block.mu_video.shape[:2] == (A, V) and torch.equal(block.mu_video[0], block.mu_video[-1])
    assert "N = " in em_step.describe(block)
    for figure in (em_figures.plot_basis_loadings(block), em_figures.plot_modality_gap(block),
                   em_figures.plot_frame_weights(block), em_figures.plot_responsibilities(block)):
        assert figure.axes


@pytest.mark.parametrize("mode", ["on", "off"])
def test_ablation_per_query_hits_average_to_the_reported_recall(model, params, features, mode):
    """The ablation grid's bootstrap resamples these per-query hits: their mean must be the
    R@1 the same setting reports, and EMCL switched off must score as the evaluation does."""
    scored = ablations.score_setting(features, model, params, mode, {})
    assert len(scored["hits"]) == features.n_texts
    assert 100 * np.mean(scored["hits"]) == pytest.approx(scored["t2v"]["R1"], abs=1e-6)
    expected = scoring_module.evaluate_features(features, params, model, emcl_mode=mode)
    assert scored["t2v"] == expected["t2v"] and scored["v2t"] == expected["v2t"]
