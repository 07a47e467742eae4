"""EMCLNet: shapes, padding, initialisation trick, scoring pieces (with group dims), loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emcl_nb.evaluation.scoring import scoring_setup
from emcl_nb.model.clip_backbone import normalize_frames
from emcl_nb.model.config import ModelConfig
from emcl_nb.model.emcl import EMCL, seeded_emcl
from emcl_nb.model.emclnet import EMCLNet, block_logits, mean_pool, pool_frames
from emcl_nb.model.loss import EMCLLoss, symmetric_infonce

AGGS = ["None", "seqLSTM", "seqTransf"]


def evaluation_scoring(model, params):
    """(emcl module, normalize) that evaluation uses for the model's own config.emcl."""
    scoring = scoring_setup(model, params)
    return scoring.emcl_module, scoring.normalize


def scores(model, batch, emcl="model"):
    with torch.no_grad():
        t = model.encode_text(batch["text_ids"], batch["text_mask"])
        f = model.encode_video(batch["video"], batch["frame_mask"])
        return model.score(t, f, batch["frame_mask"], emcl_module=model.emcl if emcl == "model" else emcl)


@pytest.mark.parametrize("agg, pooling", [(agg, "text") for agg in AGGS] + [("seqTransf", "mean")])
def test_shapes_loss_and_gradients(make_model, make_batch, agg, pooling):
    model = make_model(agg_module=agg, pooling=pooling).train()
    batch = make_batch(4, valid_frames=[4, 3, 2, 1])
    t = model.encode_text(batch["text_ids"], batch["text_mask"])
    f = model.encode_video(batch["video"], batch["frame_mask"])
    assert t.shape == (4, 64) and f.shape == (4, 4, 64)
    assert model.score(t, f, batch["frame_mask"], emcl_module=model.emcl).shape == (4, 4)
    loss = EMCLLoss()(model, *model(batch))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads["clip.transformer.resblocks.0.mlp.c_fc.weight"].abs().sum() > 0
    assert grads["clip.visual.transformer.resblocks.0.mlp.c_fc.weight"].abs().sum() > 0
    assert grads["clip.logit_scale"].abs() > 0
    agg_params = [g for name, g in grads.items() if name.startswith(("transformerClip", "lstm_visual"))]
    assert (len(agg_params) > 0) == (agg != "None")
    assert all(g is not None and g.abs().sum() > 0 for g in agg_params)
    assert not model.clip.visual.conv1.weight.requires_grad           # freeze_patch_embedding


@pytest.mark.parametrize("agg", AGGS)
def test_padded_frames_do_not_change_scores(make_model, make_batch, agg):
    model = make_model(agg_module=agg).eval()
    batch = make_batch(4, valid_frames=[4, 2, 1, 3])
    before = scores(model, batch)
    padded = (batch["frame_mask"] == 0)
    changed = dict(batch, video=batch["video"].clone())
    changed["video"][padded] = 255 - changed["video"][padded]
    assert torch.allclose(scores(model, changed), before, atol=1e-6)
    valid_changed = dict(batch, video=batch["video"].clone())
    valid_changed["video"][1, 0] = 255 - valid_changed["video"][1, 0]   # a valid frame does matter
    assert not torch.allclose(scores(model, valid_changed), before, atol=1e-4)


def test_video_encoder_normalises_like_clip(make_model, make_batch):
    model = make_model(agg_module="None").eval()
    batch = make_batch(2, valid_frames=[4, 2])
    with torch.no_grad():
        f = model.encode_video(batch["video"], batch["frame_mask"])
        valid = model.clip.encode_image(normalize_frames(batch["video"][1, :2]))
        zero = model.clip.encode_image(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(f[1, :2], valid, atol=1e-5)
    assert torch.allclose(f[1, 2:], zero.expand(2, -1), atol=1e-5)    # padded frames are fed as zeros


def test_temporal_transformer_is_non_causal_and_residual(make_model, make_batch):
    model = make_model(agg_module="seqTransf").eval()
    batch = make_batch(1, valid_frames=[4])
    with torch.no_grad():
        f = model.encode_video(batch["video"], batch["frame_mask"])
        changed = batch["video"].clone()
        changed[0, 3] = 255 - changed[0, 3]
        g = model.encode_video(changed, batch["frame_mask"])
        assert not torch.allclose(f[0, 0], g[0, 0], atol=1e-5)     # frame 0 sees the last frame
        for block in model.transformerClip.resblocks:              # zero residual branches -> f' = f
            for layer in (block.attn.out_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        frames = model.clip.encode_image(normalize_frames(batch["video"][0])).unsqueeze(0)
        h = model.encode_video(batch["video"], batch["frame_mask"])
    # then Transformer(x) = x, so f' = f + (f + P[:T])
    positions = model.frame_position_embeddings.weight[:4]
    assert torch.allclose(h, 2 * frames + positions, atol=1e-5)


def test_init_trick_copies_clip_text_weights(tiny_clip, tiny_params):
    # loaded weights (any clip_weights but "tiny") get the trick; 3 temporal layers, CLIP text has 2
    model = EMCLNet(tiny_clip, ModelConfig.from_params(tiny_params.replace(clip_weights="ViT-B-32.pt")))
    assert torch.equal(model.frame_position_embeddings.weight, model.clip.positional_embedding)
    ours, theirs = model.transformerClip.resblocks, model.clip.transformer.resblocks
    for i in range(2):
        for (name, a), (_, b) in zip(ours[i].state_dict().items(), theirs[i].state_dict().items()):
            assert torch.equal(a, b), (i, name)
    assert not torch.equal(ours[2].attn.in_proj_weight, theirs[1].attn.in_proj_weight)
    keys = set(model.state_dict())
    for key in ("clip.visual.conv1.weight", "clip.logit_scale", "frame_position_embeddings.weight",
                "transformerClip.resblocks.0.attn.in_proj_weight", "transformerClip.resblocks.2.ln_2.bias",
                "emcl.basis_init"):
        assert key in keys


def test_random_clip_keeps_a_visible_frame_position_table(make_model):
    """A random CLIP's text positions (std 0.01) would hide the frame order: not copied."""
    model = make_model(agg_module="seqTransf")
    table = model.frame_position_embeddings.weight
    assert not torch.equal(table, model.clip.positional_embedding)
    assert table.std() > 50 * model.clip.positional_embedding.std()


def test_pool_frames_matches_formula():
    torch.manual_seed(0)
    t, f = torch.randn(2, 5), torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    v, w = pool_frames(t, f, mask, temp=3.0)
    for a in range(2):
        for b in range(3):
            weights = torch.softmax(torch.stack([t[a] @ f[b, k] / 3.0 for k in range(4)]), dim=0) * mask[b]
            assert torch.allclose(w[a, b], weights, atol=1e-6)
            assert torch.allclose(v[a, b], (weights[:, None] * f[b]).sum(0), atol=1e-6)
    assert (w[:, 2].sum(-1) < 1).all()                               # no renormalisation after masking


def test_mean_pool_is_clip4clip_meanp():
    torch.manual_seed(0)
    f = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    v, w = mean_pool(f, mask)
    for b in range(3):
        frames = [f[b, k] / f[b, k].norm() for k in range(4) if mask[b, k]]
        mean = sum(frames) / max(1, len(frames)) if frames else torch.zeros(5)
        want = mean / mean.norm() if frames else mean
        assert torch.allclose(v[b], want, atol=1e-6)
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_mean_pooled_block_stacks_the_videos_then_the_texts():
    torch.manual_seed(0)
    t, v = torch.randn(3, 8), torch.randn(2, 8)                    # A texts, V mean-pooled videos
    assert torch.allclose(block_logits(t, v, None), F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T,
                          atol=1e-6)
    emcl = EMCL(num_bases=4, stage_num=3).eval()
    x = emcl(torch.cat([v, t]))                                    # [V + A, D]
    after = F.normalize(x[2:], dim=-1) @ F.normalize(x[:2], dim=-1).T
    assert torch.allclose(block_logits(t, v, emcl), after, atol=1e-6)
    xn = emcl(torch.cat([F.normalize(v, dim=-1), F.normalize(t, dim=-1)]))
    assert torch.allclose(block_logits(t, v, emcl, normalize="before"), xn[2:] @ xn[:2].T, atol=1e-6)


def test_head_after_clip_runs_in_fp32_under_autocast(make_model, make_batch):
    model = make_model(pooling="text").eval()
    batch = make_batch(4)
    with torch.no_grad():
        t = model.encode_text(batch["text_ids"], batch["text_mask"])
        f = model.clip.encode_image(normalize_frames(batch["video"].flatten(0, 1))).float().reshape(4, 4, -1)
        plain = model.aggregate(f, batch["frame_mask"]), model.score(t, f, batch["frame_mask"], emcl_module=model.emcl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.transformerClip.resblocks[0].mlp(f).dtype == torch.bfloat16   # autocast is on
            head = (model.aggregate(f, batch["frame_mask"]),
                    model.score(t, f, batch["frame_mask"], emcl_module=model.emcl))
    for ours, want in zip(head, plain):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_emcl_initial_values_are_the_reference_first_draw_after_seeding(tiny_params):
    from emcl_nb.training.build import build_model
    for seed in (0, 3):
        torch.manual_seed(seed)                  # what the reference does, then builds EMCL first
        K = tiny_params.emcl_bases
        m = torch.Tensor(1, K).normal_(0, math.sqrt(2.0 / K))
        m = m / (1e-6 + m.norm(dim=0, keepdim=True))
        torch.manual_seed(123)                   # our global generator state does not matter
        model = build_model(tiny_params.replace(seed=seed))
        assert torch.equal(model.emcl.basis_init, m)


def test_block_logits_without_emcl_is_cosine_and_with_emcl_stacks_videos_then_texts():
    torch.manual_seed(0)
    t, v = torch.randn(3, 8), torch.randn(3, 2, 8)
    cosine = torch.stack([F.cosine_similarity(t[a].expand(2, -1), v[a], dim=-1) for a in range(3)])
    assert torch.allclose(block_logits(t, v, None), cosine, atol=1e-6)
    assert torch.allclose(block_logits(t, v, None, normalize="before"), cosine, atol=1e-6)

    emcl = EMCL(num_bases=4, stage_num=3).eval()
    x = emcl(torch.cat([v.reshape(6, 8), t]))                      # [A*V + A, D]
    vv, tt = F.normalize(x[:6].reshape(3, 2, 8), dim=-1), F.normalize(x[6:], dim=-1)
    assert torch.allclose(block_logits(t, v, emcl), (tt[:, None] * vv).sum(-1), atol=1e-6)
    xn = emcl(torch.cat([F.normalize(v, dim=-1).reshape(6, 8), F.normalize(t, dim=-1)]))
    before = (xn[6:, None] * xn[:6].reshape(3, 2, 8)).sum(-1)     # no renormalisation afterwards
    assert torch.allclose(block_logits(t, v, emcl, normalize="before"), before, atol=1e-6)


@pytest.mark.parametrize("init", ["reference", "distinct"])
def test_group_dim_equals_per_block(init):
    torch.manual_seed(0)
    G, A, V, T, D = 3, 4, 5, 6, 16
    t, f = torch.randn(G, A, D), torch.randn(G, V, T, D)
    mask = (torch.rand(G, V, T) > 0.3).long()
    emcl = EMCL(num_bases=4, stage_num=3, init=init, dim=D).eval()
    v, w = pool_frames(t, f, mask, temp=3.0)
    for normalize in ("after", "before"):
        for module in (emcl, None):
            grouped = block_logits(t, v, module, normalize)
            for g in range(G):
                vg, wg = pool_frames(t[g], f[g], mask[g], temp=3.0)
                assert torch.allclose(v[g], vg, atol=1e-6) and torch.allclose(w[g], wg, atol=1e-6)
                assert torch.allclose(grouped[g], block_logits(t[g], vg, module, normalize), atol=1e-5)


def test_symmetric_infonce_matches_manual():
    torch.manual_seed(0)
    sims, scale = torch.randn(4, 4), torch.tensor(math.log(20.0))
    logits = 20.0 * sims
    t2v = -torch.log_softmax(logits, dim=1).diag().mean()
    v2t = -torch.log_softmax(logits, dim=0).diag().mean()
    assert torch.allclose(symmetric_infonce(sims, scale), (t2v + v2t) / 2, atol=1e-6)
    assert symmetric_infonce(torch.eye(4), scale) < symmetric_infonce(1 - torch.eye(4), scale)
    with pytest.raises(ValueError, match="square"):
        symmetric_infonce(torch.randn(3, 4), scale)


def test_emcl_modes(make_model, make_batch, tiny_params):
    batch = make_batch(4)
    off = make_model(emcl="off").eval()
    with torch.no_grad():
        t = off.encode_text(batch["text_ids"], batch["text_mask"])
        f = off.encode_video(batch["video"], batch["frame_mask"])
        want = symmetric_infonce(off.score(t, f, batch["frame_mask"], emcl_module=None), off.clip.logit_scale)
        assert torch.allclose(EMCLLoss()(off, *off(batch)), want, atol=1e-6)
    assert evaluation_scoring(off, tiny_params) == (None, "after")

    on = make_model(emcl="on").train()
    m0 = on.emcl.basis_init.clone()
    EMCLLoss()(on, *on(batch))
    assert not torch.equal(on.emcl.basis_init, m0)                  # training updates the bases
    assert evaluation_scoring(on, tiny_params) == (on.emcl, "after")

    inference = make_model(emcl="inference")
    module, normalize = evaluation_scoring(inference, tiny_params)
    p = tiny_params
    assert normalize == "before" and not module.training
    assert (module.num_bases, module.stage_num, module.lamd, module.beta) == (
        p.inference_emcl_bases, p.inference_emcl_stages, p.inference_emcl_lamd, p.inference_emcl_beta)
    seeded = seeded_emcl(p.seed, num_bases=p.inference_emcl_bases, stage_num=1, momentum=0.9,
                         lamd=1.0, beta=1.0, init="reference", dim=inference.embed_dim)
    assert torch.equal(module.basis_init, seeded.basis_init)        # drawn from params.seed


def test_optimiser_steps_lower_the_loss(make_model, make_batch):
    model = make_model().train()
    batch = make_batch(4)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = EMCLLoss()(model, *model(batch))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        model.clamp_logit_scale()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_clamp_logit_scale(make_model):
    model = make_model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.clip.logit_scale.item() == pytest.approx(math.log(100.0))


def test_bad_video_input_is_clear(make_model, make_batch):
    model = make_model()
    batch = make_batch(2)
    with pytest.raises(ValueError, match="uint8"):
        model.encode_video(batch["video"].float(), batch["frame_mask"])
    with pytest.raises(ValueError, match="frame_mask"):
        model.encode_video(batch["video"], batch["frame_mask"][:, :2])
