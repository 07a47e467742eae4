"""Evaluation runner on a tiny synthetic MSR-VTT set and the tiny CLIP: reference-checkpoint
loading, the feature cache, the three EMCL scoring modes, validation and the run report."""
import json
import os

import pytest
import torch
import yaml

from emcl_nb import evaluate
from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.synthetic import generate_synthetic
from emcl_nb.evaluation import encode, scoring, validation
from emcl_nb.evaluation import run as evaluation_run
from emcl_nb.model import metrics
from emcl_nb.model.config import ModelConfig
from emcl_nb.model.emcl import seeded_emcl
from emcl_nb.model.similarity import similarity_matrix
from emcl_nb.params import REPO_ROOT, Params, ParamsError
from emcl_nb.training.build import build_model
from emcl_nb.training.checkpoint import CheckpointError, load_model_weights, save_checkpoint

N_TEST, N_VAL, CAPTIONS_PER_VIDEO = 6, 3, 3     # synthetic: 3 captions per video in MSRVTT_data.json


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """6 test and 3 validation videos of 6 frames at 3 fps (2 s: 2 sampled frames of 4)."""
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic(out, train=1, val=N_VAL, test=N_TEST, frames=6, fps=3, size=32,
                              workers=1, progress=False)


@pytest.fixture
def params(data_dir, tmp_path) -> Params:
    return Params(dataset="tiny", run="r", output_root=str(tmp_path), layout="msrvtt",
                  anno_path=str(data_dir), video_path=str(data_dir / "videos"),
                  msrvtt_val_csv="MSRVTT_val.csv", clip_weights="tiny", tiny_width=64,
                  tiny_layers=1, tiny_patch=16, image_size=32, max_words=16, max_frames=4,
                  num_hidden_layers=1, emcl_bases=4, emcl_stages=3, block_size=4,
                  batch_size_val=4, inference_emcl_bases=3, inference_block_size=4,
                  num_workers=0, device="cpu", progress=False)


def make_model(params: Params, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(params).eval()


def reference_layout(model) -> dict:
    """The state dict as the reference code would save it from DDP: no EMCL bases (a plain
    attribute there), every key prefixed "module."."""
    return {f"module.{key}": value.clone() for key, value in model.state_dict().items()
            if not key.startswith("emcl.")}


def seed_bases(model, seed: int) -> None:
    """Give the model the EMCL bases that loading a reference checkpoint re-creates."""
    e = model.emcl
    fresh = seeded_emcl(seed, num_bases=e.num_bases, stage_num=e.stage_num, momentum=e.momentum,
                        lamd=e.lamd, beta=e.beta, init=e.init, dim=model.embed_dim)
    e.load_state_dict(fresh.state_dict())


# ---------------------------------------------------------------- encoding

def test_each_video_is_encoded_once_and_multi_sentence_metrics_are_used(params, monkeypatch):
    model = make_model(params)
    encoded = []
    original = model.encode_video
    monkeypatch.setattr(model, "encode_video",
                        lambda video, mask: encoded.append(video.shape[0]) or original(video, mask))
    features = encode.encode_split(model, params, "val")
    assert sum(encoded) == N_VAL                                    # not once per caption (#10)
    assert features.text.shape == (N_VAL * CAPTIONS_PER_VIDEO, model.embed_dim)
    assert features.video.shape == (N_VAL, params.max_frames, model.embed_dim)
    assert features.frame_mask.sum(dim=1).tolist() == [2] * N_VAL   # 2 s at 1 frame/s, 2 padded
    assert torch.bincount(features.text_video).tolist() == [CAPTIONS_PER_VIDEO] * N_VAL
    assert not features.single_sentence
    # each text feature is that caption's own encoding, wherever its batch put it
    from emcl_nb.data.dataset import tokenize
    ids, mask = tokenize(features.captions[5], params.max_words)
    torch.testing.assert_close(features.text[5], model.encode_text(ids, mask)[0].detach())

    result = scoring.evaluate_features(features, params, model)
    assert result["protocol"] == "multi-sentence"
    assert (result["n_texts"], result["n_videos"]) == (N_VAL * CAPTIONS_PER_VIDEO, N_VAL)
    assert result["chance_R1"] == pytest.approx(100 / N_VAL)
    for key in ("t2v", "v2t", "dsl_t2v", "dsl_v2t"):
        assert 1 <= result[key]["MnR"] <= N_VAL


def test_test_split_is_single_sentence(params):
    result = scoring.evaluate_model(make_model(params), params, "test", cache=False)
    assert result["protocol"] == "single-sentence"
    assert (result["n_texts"], result["n_videos"]) == (N_TEST, N_TEST)
    assert "whole test query bank" in result["dsl"]


# ---------------------------------------------------------------- reference checkpoints

def test_reference_checkpoint_loads_with_a_warning_and_scores_like_its_model(params, tmp_path):
    source = make_model(params, seed=0)
    seed_bases(source, params.seed)
    features = encode.encode_split(source, params, "test")
    expected = scoring.score(features, params, source, emcl_mode="on")
    path = tmp_path / "pytorch_model.bin.4"
    torch.save({"state_dict": reference_layout(source)}, path)

    target = make_model(params, seed=1)           # other weights and other EMCL bases
    before = scoring.score(encode.encode_split(target, params, "test"), params, target, emcl_mode="on")
    assert not torch.allclose(before, expected)
    with pytest.warns(UserWarning, match="no EMCL bases"):
        report = load_model_weights(target, path)
    assert report.layout == "reference" and report.recreated == ["emcl.basis_init"]
    after = scoring.score(encode.encode_split(target, params, "test"), params, target, emcl_mode="on")
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)


def test_reference_checkpoint_with_foreign_keys_is_a_clear_error(params):
    model = make_model(params)
    state = reference_layout(model)
    state.pop("module.frame_position_embeddings.weight")
    state["module.text_weight_fc.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="missing frame_position_embeddings.weight.*"
                                              "unexpected text_weight_fc.0.weight"):
        load_model_weights(model, state)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(model, params.out_dir / "nowhere.pt")


def test_our_checkpoint_loads_exactly_including_the_trained_bases(params, tmp_path):
    source = make_model(params, seed=0)
    with torch.no_grad():
        source.emcl.basis_init.mul_(0.5)          # "trained" bases, not any seed's draw
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=source, epoch=3, step=30, params=params.to_dict())
    target = make_model(params, seed=1)
    report = load_model_weights(target, path)
    assert (report.layout, report.epoch, report.recreated) == ("emcl-nb/1", 3, [])
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_a_checkpoint_is_evaluated_without_the_clip_file_it_was_trained_from(params, tmp_path, capsys):
    """The CLIP file named in the checkpoint has moved: CLIP is built from the checkpoint's own
    weights. A file without CLIP's weights needs one, and the clip_weights given now is read."""
    torch.manual_seed(0)
    clip_file = tmp_path / "clip" / "random-clip.pt"
    clip_file.parent.mkdir()
    torch.save(build_model(params).clip.state_dict(), clip_file)       # a CLIP saved as a state dict
    trained = params.replace(clip_weights=str(clip_file))
    model = make_model(trained)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=model, epoch=1, step=1, params=trained.to_dict())
    clip_file.rename(tmp_path / "moved.pt")
    elsewhere = params.replace(clip_weights=str(tmp_path / "nowhere.pt"))   # the old path would fail too
    loaded, run_params, _ = evaluation_run.load_for_evaluation(path, elsewhere, torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert run_params.clip_weights == str(clip_file) and "holds no whole CLIP" not in capsys.readouterr().out

    without_clip = {key: value for key, value in reference_layout(model).items() if ".clip." not in f".{key}"}
    torch.save(without_clip, tmp_path / "heads-only.pt")
    with pytest.raises(Exception, match="nowhere.pt"):                  # the file given now is the one read
        evaluation_run.load_for_evaluation(tmp_path / "heads-only.pt", elsewhere, torch.device("cpu"))
    assert "holds no whole CLIP: it is read from clip_weights=" in capsys.readouterr().out


@pytest.mark.parametrize("stored", ["model_config", "params only (older checkpoints)"])
def test_a_checkpoint_builds_the_model_it_was_trained_as(params, tmp_path, stored):
    trained = params.replace(agg_module="seqLSTM", temp=2.0, emcl_bases=5)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model=make_model(trained), epoch=1, step=1, params=trained.to_dict())
    state = torch.load(path, weights_only=False)
    assert state["model_config"] == ModelConfig.from_params(trained).to_dict()
    if stored == "model_config":
        state["params"] = params.to_dict()       # only the model config says how it was trained
    else:
        del state["model_config"]
    torch.save(state, path)
    model, run_params, _ = evaluation_run.load_for_evaluation(path, params, torch.device("cpu"))
    assert model.config == ModelConfig.from_params(trained)
    assert (run_params.agg_module, run_params.temp, run_params.emcl_bases) == ("seqLSTM", 2.0, 5)


# ---------------------------------------------------------------- feature cache

def test_cached_features_rescore_without_encoding(params, monkeypatch):
    model = make_model(params)
    fresh = scoring.evaluate_model(model, params, "test", cache=False)
    first = scoring.evaluate_model(model, params, "test", cache=True)
    cached_files = list((params.out_dir / "features").glob("test-*.pt"))
    assert len(cached_files) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("a video was encoded again")
    monkeypatch.setattr(model, "encode_video", no_encoding)
    again = scoring.evaluate_model(model, params, "test", cache=True)
    for result in (first, again):
        for key in ("t2v", "v2t", "dsl_t2v", "dsl_v2t"):
            assert result[key] == fresh[key]
    # other EMCL settings re-score the cached features; the trained bases stay in the model
    bases = model.emcl.basis_init.clone()
    features = encode.load_or_encode(model, params, "test")
    plain = scoring.score(features, params, model)
    rescored = scoring.score(features, params, model, emcl_beta=0.5, block_size=2)
    assert not torch.allclose(plain, rescored)
    assert torch.equal(model.emcl.basis_init, bases)
    # settings that change the features miss the cache (and would encode)
    with pytest.raises(AssertionError, match="encoded again"):
        encode.load_or_encode(model, params.replace(max_frames=3), "test")
    # so do other weights
    with torch.no_grad():
        model.clip.visual.proj.add_(0.01)
    with pytest.raises(AssertionError, match="encoded again"):
        encode.load_or_encode(model, params, "test")


def test_cache_key_ignores_the_emcl_bases(params):
    model = make_model(params)
    before = encode.weights_fingerprint(model)
    with torch.no_grad():
        model.emcl.basis_init.neg_()
    assert encode.weights_fingerprint(model) == before
    with torch.no_grad():
        model.frame_position_embeddings.weight[0, 0] += 1
    assert encode.weights_fingerprint(model) != before


# ---------------------------------------------------------------- scoring modes

def test_scoring_overrides_reuse_trained_bases_only_when_they_fit(params):
    model = make_model(params)
    same = scoring.scoring_setup(model, params, "on", emcl_beta=3.0)     # the module's own value
    assert same.emcl_module is model.emcl and not same.notes
    other_beta = scoring.scoring_setup(model, params, "on", emcl_beta=1.0, emcl_stages=5)
    assert other_beta.emcl_module is not model.emcl
    assert (other_beta.emcl_module.beta, other_beta.emcl_module.stage_num) == (1.0, 5)
    assert torch.equal(other_beta.emcl_module.basis_init, model.emcl.basis_init)
    other_k = scoring.scoring_setup(model, params, "on", emcl_bases=6)
    assert other_k.emcl_module.num_bases == 6 and "seed" in other_k.notes[0]
    with pytest.raises(ParamsError, match="max_frames"):
        scoring.scoring_setup(model, params, "on", max_frames=8)
    with pytest.raises(ParamsError, match="emcl_mode"):
        scoring.scoring_setup(model, params, "sometimes")


def test_inference_only_emcl_on_a_model_trained_without_it(params):
    params = params.replace(emcl="off")
    model = make_model(params)
    features = encode.encode_split(model, params, "test")
    plain = scoring.score(features, params, model)                       # default: the model's own mode
    torch.testing.assert_close(plain, scoring.score(features, params, model, emcl_mode="off"))
    inference = scoring.score(features, params, model, emcl_mode="inference")
    assert torch.isfinite(inference).all() and not torch.allclose(inference, plain)
    # inference-only EMCL (docs/method.md §7): inference_emcl_* settings, reference init drawn
    # from params.seed, normalised inputs
    module = seeded_emcl(params.seed, num_bases=params.inference_emcl_bases,
                         stage_num=params.inference_emcl_stages, momentum=params.emcl_momentum,
                         lamd=params.inference_emcl_lamd, beta=params.inference_emcl_beta,
                         init="reference", dim=model.embed_dim)
    oracle = similarity_matrix(features.text, features.video, features.frame_mask, temp=model.temp,
                               emcl_module=module, block_size=params.inference_block_size,
                               normalize="before")
    torch.testing.assert_close(inference, oracle, rtol=0, atol=0)
    # with beta 0 EMCL adds nothing: normalised inputs, no renormalisation -> the plain cosine
    torch.testing.assert_close(
        scoring.score(features, params, model, emcl_mode="inference", inference_emcl_beta=0.0),
        plain, rtol=0, atol=1e-6)


def reference_inference_logits(t, f, frame_mask, m, *, stages, lamd, beta, logit_scale, block):
    """Transcription of the reference inference module on meanP features, block by block:
    frames L2-normalised, averaged over the valid frames, normalised again; texts normalised;
    EM on cat(videos, texts) with bases starting at m (no update); logit_scale * t' v'^T."""
    sim = torch.empty(t.shape[0], f.shape[0])
    for row in range(0, t.shape[0], block):
        for col in range(0, f.shape[0], block):
            frames = f[col:col + block] / f[col:col + block].norm(dim=-1, keepdim=True)
            mask = frame_mask[col:col + block].float().unsqueeze(-1)
            video = (frames * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            video = video / video.norm(dim=-1, keepdim=True)
            text = t[row:row + block] / t[row:row + block].norm(dim=-1, keepdim=True)
            x = torch.cat([video, text])
            mu = m.repeat(x.shape[0], 1)
            for _ in range(stages):
                z = torch.softmax(x.T @ mu / lamd, dim=1)
                z = z / (1e-6 + z.sum(dim=0, keepdim=True))
                mu = x @ z
                mu = mu / (1e-6 + mu.norm(dim=0, keepdim=True))
            x = beta * (mu @ z.T) + x
            n = video.shape[0]
            sim[row:row + block, col:col + block] = logit_scale * x[n:] @ x[:n].T
    return sim


def test_mean_pooling_with_inference_emcl_is_the_reference_inference_module(params):
    params = params.replace(emcl="off", pooling="mean", agg_module="None", inference_block_size=3)
    model = make_model(params)
    features = encode.encode_split(model, params, "test")
    module = seeded_emcl(params.seed, num_bases=params.inference_emcl_bases, stage_num=1,
                         momentum=0.9, lamd=1.0, beta=1.0, init="reference", dim=model.embed_dim)
    scale = float(model.clip.logit_scale.detach().exp())
    want = reference_inference_logits(
        features.text, features.video, features.frame_mask, module.basis_init,
        stages=params.inference_emcl_stages, lamd=params.inference_emcl_lamd,
        beta=params.inference_emcl_beta, logit_scale=scale, block=params.inference_block_size)
    ours = scoring.score(features, params, model, emcl_mode="inference")
    torch.testing.assert_close(ours * scale, want, rtol=1e-4, atol=1e-4 * scale)
    plain = scoring.score(features, params, model, emcl_mode="off")      # CLIP4Clip meanP
    assert (ours - plain).abs().max() > 1e-2                               # EMCL changed the scores


# ---------------------------------------------------------------- validation during training

def test_validator_scores_val_and_the_reference_selection_its_split(params):
    model = make_model(params)
    assert validation.make_validator(params.replace(eval_every_epoch=False)) is None
    assert validation.make_validator(params.replace(msrvtt_val_csv="")) is None     # no val split
    validated = validation.make_validator(params)(model)
    assert set(validated) == {"val"} and validated["val"]["n_videos"] == N_VAL
    assert validated["val"]["t2v"] == scoring.evaluate_model(model, params, "val", cache=False)["t2v"]
    assert validation.make_reference_validator(params) is None
    reference = validation.make_reference_validator(params.replace(reference_selection=True))(model)
    assert reference["split"] == "test" and reference["n_videos"] == N_TEST    # msrvtt: on test
    assert (params.reference_split, params.reference_interval) == ("test", 150)
    assert params.replace(layout="msvd").reference_split == "val"
    assert params.replace(layout="lsmdc").reference_interval == 30


def test_validator_decodes_each_video_once_across_epochs(params, monkeypatch):
    """The validation loaders are built once: with cache_decoded_clips, the second epoch
    reads no video file and gives the same numbers."""
    from emcl_nb.data import dataset
    reads = []
    real_load_clip = dataset.load_clip
    monkeypatch.setattr(dataset, "load_clip",
                        lambda path, *a, **kw: reads.append(path) or real_load_clip(path, *a, **kw))
    model = make_model(params)
    validate = validation.make_validator(params.replace(cache_decoded_clips=True))
    first = validate(model)
    assert len(reads) == N_VAL
    assert validate(model) == first and len(reads) == N_VAL


def test_a_reference_selection_on_val_shares_the_validation_loaders(params, monkeypatch):
    """MSVD / LSMDC select on val: the reference selection reuses the per-epoch validator's
    loaders (and their decoded clips) instead of building a second set."""
    built = []
    real_split_loaders = encode.split_loaders
    monkeypatch.setattr(validation, "split_loaders",
                        lambda *a, **kw: built.append(a[1:]) or real_split_loaders(*a, **kw))
    model = make_model(params)
    on_val = params.replace(reference_selection=True, reference_eval_steps=0)
    monkeypatch.setattr(type(on_val), "reference_split", property(lambda self: "val"))
    validate = validation.make_validator(on_val)
    reference = validation.make_reference_validator(on_val, validate)
    assert reference(model)["t2v"] == validate(model)["val"]["t2v"]
    assert len(built) == 1


# ---------------------------------------------------------------- run report

def write_run(params: Params) -> dict:
    """best.pt (epoch 1), last.pt (epoch 2) and reference.pt (step 15) with different
    weights, and the reference.json that engine.fit writes beside them."""
    ckpt_dir = params.out_dir / "checkpoints"
    models = {}
    for name, epoch, step, seed in (("best", 1, 10, 1), ("last", 2, 20, 2), ("reference", 1, 15, 3)):
        models[name] = make_model(params, seed=seed)
        save_checkpoint(ckpt_dir / f"{name}.pt", model=models[name], epoch=epoch, step=step,
                        params=params.to_dict())
    best = {"step": 15, "epoch": 2, "t2v_R1": 40.0}
    selection = {"split": "test", "every": 15, "evaluations": [best], "best": best}
    (params.out_dir / "reference.json").write_text(json.dumps(selection))
    return models


def test_evaluate_run_writes_best_last_and_reference_rows(params):
    params = params.replace(published={"code release": {"t2v": {"R1": 48.2}, "v2t": {"R1": 45.2}}})
    models = write_run(params)
    summary = evaluation_run.evaluate_run(params)

    results = summary["results"]
    assert list(results) == ["best", "last", "reference_protocol"]     # the headline first
    assert (results["best"]["epoch"], results["last"]["epoch"]) == (1, 2)
    for name, model in models.items():
        direct = scoring.evaluate_model(model, params, "test", cache=False)
        key = "reference_protocol" if name == "reference" else name
        assert results[key]["t2v"] == direct["t2v"] and results[key]["v2t"] == direct["v2t"]

    written = json.loads((params.out_dir / "metrics.json").read_text())
    assert written["results"]["last"]["t2v"] == results["last"]["t2v"]
    markdown = (params.out_dir / "metrics.md").read_text()
    for row in ("| best on val (epoch 1) |", "| last (epoch 2) |",
                "| last (epoch 2) + DSL (whole test query bank) |",
                "| reference protocol (selected on test every 15 steps: step 15) |",
                "| code release (published) | 48.2 |",
                "- 'reference protocol': the checkpoint the reference code keeps"):
        assert row in markdown, row


def test_the_report_carries_a_qbnorm_row_labelled_with_its_bank(params):
    """The bank: training captions (the tiny set has 1 training video with 3 captions),
    encoded by the checkpoint's model and scored against the test videos as the test queries."""
    write_run(params)
    summary = evaluation_run.evaluate_run(params, ("last",))
    last = summary["results"]["last"]
    assert last["qbnorm"] == {"bank": 3, "split": "train", "available": 3, "beta": 20.0}
    model, run_params, _ = evaluation_run.load_for_evaluation(params.out_dir / "checkpoints" / "last.pt", params,
                                                              torch.device("cpu"))
    features = encode.load_or_encode(model, run_params, "test")
    scoring_used = scoring.scoring_setup(model, run_params)
    bank_text = encode.encode_captions(model, [s.caption for s in load_annotations(params, "train").samples], params)
    expected = metrics.evaluate_qbnorm(scoring.score_with(features, model, scoring_used),
                                       scoring.score_with(features, model, scoring_used, text=bank_text))
    assert last["qbnorm_t2v"] == expected["t2v"]
    markdown = (params.out_dir / "metrics.md").read_text()
    assert "| last (epoch 2) + QB-Norm (3 train queries, β 20) |" in markdown
    assert "- '+ QB-Norm' rows:" in markdown and "3 of the 3 train captions" in markdown
    small = evaluation_run.evaluate_run(params.replace(qbnorm_bank=2, qbnorm_beta=5.0), ("last",))
    assert "+ QB-Norm (2 train queries, β 5) |" in small["table"]
    assert "QB-Norm" not in evaluation_run.evaluate_run(params.replace(qbnorm_bank=0), ("last",))["table"]


def test_checkpoint_paths_are_taken_from_the_repository_root(params, tmp_path, monkeypatch):
    write_run(params)
    last = params.out_dir / "checkpoints" / "last.pt"
    relative = os.path.relpath(last, REPO_ROOT)
    monkeypatch.chdir(tmp_path)
    assert evaluation_run._checkpoint_path(relative, params) == REPO_ROOT / relative
    assert evaluation_run._checkpoint_path(last, params) == last
    _, _, report = evaluation_run.load_for_evaluation(evaluation_run._checkpoint_path(relative, params), params,
                                                torch.device("cpu"))
    assert report.epoch == 2


def test_evaluate_run_without_best_and_the_command_line(params, capsys):
    write_run(params)
    (params.out_dir / "checkpoints" / "best.pt").unlink()
    config = params.out_dir.parent / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in params.to_dict().items() if k != "published"}))
    evaluate.main(["--params", str(config), "--emcl", "inference", "--name", "inference",
                   "--set", "inference_emcl_beta=2", "progress=false"])
    printed = capsys.readouterr().out
    assert "| last (epoch 2) |" in printed and "best on val" not in printed
    written = json.loads((params.out_dir / "inference.json").read_text())
    assert set(written["results"]) == {"last", "reference_protocol"}
    assert written["results"]["last"]["emcl_mode"] == "inference"
    assert written["results"]["last"]["scoring"]["beta"] == 2.0


def test_a_foreign_checkpoint_gets_no_reference_protocol_row(params, tmp_path):
    write_run(params)
    other = tmp_path / "elsewhere" / "other.pt"
    save_checkpoint(other, model=make_model(params, seed=3), epoch=5, step=50, params=params.to_dict())
    summary = evaluation_run.evaluate_run(params, [str(other)])
    assert set(summary["results"]) == {"other.pt"}
    assert "reference protocol" not in summary["table"]


def test_report_states_the_tie_rule_and_the_dropped_queries(params):
    write_run(params)
    test_ids = load_annotations(params, "test").video_ids
    video = os.path.join(params.video_path, f"{test_ids[0]}.mp4")     # one test video goes missing
    hidden = os.path.join(params.video_path, f".{test_ids[0]}.mp4")
    os.rename(video, hidden)
    try:
        summary = evaluation_run.evaluate_run(params, ["last"])
    finally:
        os.rename(hidden, video)
    assert summary["results"]["last"]["dropped_queries"] == {"no video file": 1}
    markdown = (params.out_dir / "metrics.md").read_text()
    assert f"{N_TEST - 1} of {N_TEST} test queries scored; 1 dropped (1 no video file" in markdown
    assert "ties never help" in markdown


class _Payload:
    """Unpickling it would create a file: what a malicious "checkpoint" could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("wrap", [lambda p: p, lambda p: {"state_dict": {"w": p}}])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(params, tmp_path, wrap):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "reference_model.bin"
    torch.save(wrap(_Payload(marker)), path)
    with pytest.raises(CheckpointError, match="was not loaded.*weights_only=True.*re-save"):
        load_model_weights(make_model(params), path)
    assert not marker.exists()


def test_our_checkpoints_load_with_weights_only(params, tmp_path):
    from emcl_nb.training.checkpoint import read_checkpoint

    save_checkpoint(tmp_path / "c.pt", model=make_model(params), epoch=1, step=1, params=params.to_dict())
    state = read_checkpoint(tmp_path / "c.pt")                  # RNG state (numpy) allow-listed
    assert state["epoch"] == 1 and state["rng"]["numpy"][0] == "MT19937"


def test_collapsed_video_features_score_chance_and_are_flagged(params):
    model = make_model(params)
    features = encode.encode_split(model, params, "test")
    features.video[:] = features.video[:1]                      # every video embedding the same
    result = scoring.evaluate_features(features, params, model, emcl_mode="off")
    assert result["constant_rows"] == result["n_texts"] == N_TEST
    assert result["t2v"]["R1"] == pytest.approx(100 / N_TEST)   # chance, not 100


def test_new_checkpoints_hold_nothing_beyond_plain_data(params, tmp_path):
    save_checkpoint(tmp_path / "c.pt", model=make_model(params), epoch=1, step=1, params=params.to_dict())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "c.pt") == []


def test_checkpoints_of_earlier_versions_load_whichever_numpy_wrote_them(params, tmp_path):
    """Earlier versions pickled numpy's RNG state as an ndarray, named after the numpy that
    wrote it (numpy 2: numpy._core, numpy 1: numpy.core)."""
    import zipfile

    import numpy as np

    from emcl_nb.training.checkpoint import read_checkpoint, set_rng_state

    for module in ("numpy._core", "numpy.core"):
        original, path = tmp_path / "new.pt", tmp_path / f"{module}.pt"
        torch.save({"format": "emcl-nb/1", "epoch": 1, "rng": {"numpy": np.random.get_state()}}, original)
        with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
            for item in source.infolist():
                data = source.read(item)
                if item.filename.endswith("data.pkl"):      # protocol 2: "c<module>\n<name>\n"
                    data = data.replace(b"numpy._core.multiarray\n", f"{module}.multiarray\n".encode())
                target.writestr(item, data)
        state = read_checkpoint(path)
        assert state["epoch"] == 1
        set_rng_state({**state["rng"], "python": __import__("random").getstate(),
                       "torch": torch.get_rng_state()})


def test_dropped_statement_counts_queries_and_uncaptioned_videos_apart():
    from emcl_nb.data.annotations import MISSING_VIDEO, NO_CAPTIONS

    result = {"n_texts": 16, "dropped_queries": {MISSING_VIDEO: 1, NO_CAPTIONS: 2}}
    statement = evaluation_run.dropped_statement(result, "test")
    assert statement.startswith("16 of 17 test queries scored; 1 dropped (1 no video file")
    assert statement.endswith("; 2 listed video(s) without captions left out")
    assert evaluation_run.dropped_statement({"n_texts": 5}, "test") == "all 5 test queries scored, none dropped"


def test_no_reference_row_without_the_reference_checkpoint(params):
    write_run(params)
    (params.out_dir / "checkpoints" / "reference.pt").unlink()
    assert evaluation_run.reference_protocol_label(params.out_dir) is None
    assert "reference_protocol" not in evaluation_run.evaluate_run(params, ("last",))["results"]


def test_a_deleted_best_checkpoint_is_reported_as_deleted(params, capsys):
    """It was reported as "no validation split selected a best epoch" (issue 24)."""
    write_run(params)
    history = [{"epoch": 1, "val": {"t2v": {"R1": 50.0}}}, {"epoch": 2, "val": {"t2v": {"R1": 40.0}}}]
    save_checkpoint(params.out_dir / "checkpoints" / "last.pt", model=make_model(params, seed=2), epoch=2,
                    step=20, params=params.to_dict(), metrics={"history": history})
    (params.out_dir / "checkpoints" / "best.pt").unlink()
    summary = evaluation_run.evaluate_run(params, ("best", "last"))
    assert "best" not in summary["results"]
    printed = capsys.readouterr().out
    assert "validated epochs 1, 2, so the file was deleted or moved" in printed
    assert "no validation split" not in printed


def test_a_run_is_not_scored_on_other_data_unless_asked(params, tmp_path, capsys):
    """A second run regenerating a shared synthetic folder with synthetic_seed=1 made
    evaluating the first score it on the new videos without a word (issue 24)."""
    from emcl_nb.data.identity import data_identity
    from emcl_nb.training.checks import OtherDataError
    folder = tmp_path / "shared"
    sizes = dict(train=1, val=N_VAL, test=N_TEST, frames=6, fps=3, size=32, workers=1, progress=False)
    generate_synthetic(folder, seed=0, **sizes)
    params = params.replace(anno_path=str(folder), video_path=str(folder / "videos"), synthetic=True)
    last = params.out_dir / "checkpoints" / "last.pt"
    save_checkpoint(last, model=make_model(params), epoch=1, step=1, params=params.to_dict(),
                    data=data_identity(params))
    assert set(evaluation_run.evaluate_run(params, ("last",))["results"]) == {"last"}    # its own data
    generate_synthetic(folder, seed=1, **sizes)                 # another run's set, same folder
    with pytest.raises(OtherDataError, match=r"other data .*the synthetic set .*seed: 0 -> 1.*allow_other_data"):
        evaluation_run.evaluate_run(params, ("last",))
    with pytest.warns(UserWarning, match="allow_other_data=true: .* scored on other data"):
        evaluation_run.evaluate_run(params.replace(allow_other_data=True), ("last",))
    save_checkpoint(last, model=make_model(params), epoch=1, step=1, params=params.to_dict())   # older: no record
    capsys.readouterr()
    evaluation_run.evaluate_run(params, ("last",))
    assert "does not record the identity of its data" in capsys.readouterr().out


def test_the_dsl_row_names_the_split_it_was_scored_on(params):
    """`--split val` labelled its DSL row "whole test query bank" (issue 24)."""
    write_run(params)
    table = evaluation_run.evaluate_run(params, ("last",), split="val", name="val")["table"]
    assert "| last (epoch 2) + DSL (whole val query bank) |" in table and "test query bank" not in table
    assert "the whole val query bank" in (params.out_dir / "val.md").read_text()
