"""The public face (emcl_nb.load and its encoders) and text search over a folder of videos, on
a tiny synthetic set with tiny random models; one test trains a small synthetic run and
searches its test videos with their captions."""
import json
import os
import shutil

import pytest
import torch
import yaml

import emcl_nb
from emcl_nb import search as search_command
from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.synthetic import generate_synthetic
from emcl_nb.evaluation import encode
from emcl_nb.evaluation.scoring import scoring_setup
from emcl_nb.model.similarity import query_similarity
from emcl_nb.params import Params, load_params
from emcl_nb.retrieval import index as search_index
from emcl_nb.retrieval.trained import TrainedModel, resolve_checkpoint
from emcl_nb.training.build import build_model
from emcl_nb.training.checkpoint import CheckpointError, save_checkpoint
from emcl_nb.training.run import ensure_trained

N_TEST = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic(out, train=1, val=1, test=N_TEST, frames=6, fps=3, size=32, workers=1,
                              progress=False)


@pytest.fixture
def params(data_dir, tmp_path) -> Params:
    return Params(dataset="tiny", run="r", output_root=str(tmp_path / "outputs"), layout="msrvtt",
                  anno_path=str(data_dir), video_path=str(data_dir / "videos"), clip_weights="tiny",
                  tiny_width=64, tiny_layers=1, tiny_patch=16, image_size=32, max_words=16, max_frames=4,
                  num_hidden_layers=1, emcl_bases=4, emcl_stages=3, block_size=4, batch_size_val=4,
                  num_workers=0, device="cpu", progress=False)


def write_checkpoint(params: Params, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(params).eval()
    path = params.out_dir / "checkpoints" / "last.pt"
    save_checkpoint(path, model=model, epoch=1, step=1, params=params.to_dict())
    return model, path


def split_videos(params) -> list[str]:
    """The test split's video files."""
    return [str(path) for path in load_annotations(params, "test").video_paths]


@pytest.fixture
def videos(params, tmp_path):
    """A folder of the test videos, one in a sub-folder, and a file that is no video."""
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for number, path in enumerate(split_videos(params)):
        shutil.copy2(path, folder / ("sub" if number == 0 else "") / os.path.basename(path))
    (folder / "notes.txt").write_text("not a video, ignored")
    return folder


# ---------------------------------------------------------------- load

def test_load_takes_a_run_name_a_run_folder_or_a_file(params):
    model, path = write_checkpoint(params)
    for given in (path, params.out_dir, str(path)):
        loaded = emcl_nb.load(given, "cpu")
        assert isinstance(loaded, TrainedModel) and loaded.checkpoint == path and not loaded.net.training
        assert loaded.net.config == model.config
        assert (loaded.params.max_frames, loaded.params.block_size) == (4, 4)   # the run's own parameters
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.net.state_dict()[key], value), key
    assert emcl_nb.available_models(params.output_root) == ["tiny/r"]
    assert resolve_checkpoint("tiny/r", params.output_root) == path        # a run name under output_root
    with pytest.raises(CheckpointError, match=r"no checkpoint 'tiny/none'.*runs there: tiny/r"):
        resolve_checkpoint("tiny/none", params.output_root)


def test_a_file_that_is_no_emcl_checkpoint_is_a_clear_error(params, tmp_path):
    torch.manual_seed(0)
    clip_only = tmp_path / "clip.pt"
    torch.save(build_model(params).clip.state_dict(), clip_only)      # CLIP's own keys, no clip.* prefix
    with pytest.raises(CheckpointError, match="neither an emcl-nb checkpoint nor an EMCL-Net state dict"):
        emcl_nb.load(clip_only, "cpu")
    (tmp_path / "list.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot be read"):
        emcl_nb.load(tmp_path / "list.pt", "cpu")


def test_encoders_take_strings_and_paths_and_match_the_evaluation(params):
    """encode_text / encode_videos give the features the evaluation encodes for the split."""
    model, path = write_checkpoint(params)
    loaded = emcl_nb.load(path, "cpu")
    features = encode.encode_split(model, params, "test")
    paths = split_videos(params)
    torch.testing.assert_close(loaded.encode_text(features.captions), features.text)
    encoded = loaded.encode_videos(list(reversed(paths)) + [path])          # the checkpoint is no video
    assert encoded.paths == list(reversed(paths)) and list(encoded.unreadable) == [str(path)]
    torch.testing.assert_close(encoded.video, features.video.flip(0))
    assert torch.equal(encoded.frame_mask, features.frame_mask.flip(0))
    assert loaded.encode_text("one caption").shape == (1, model.embed_dim)


def test_search_scores_each_query_alone_with_the_models_own_scoring(params):
    model, path = write_checkpoint(params)
    loaded = emcl_nb.load(path, "cpu")
    videos = loaded.encode_videos(split_videos(params))
    queries = ["a red circle moves left", "a blue square", "the green triangle turns white"]
    sim = loaded.score(queries, videos)                                        # [3, V]
    for q, query in enumerate(queries):
        torch.testing.assert_close(loaded.score([query], videos)[0], sim[q])   # alone = with others
    scoring = scoring_setup(model, params)
    assert scoring.emcl_module is not None and scoring.block_size < N_TEST     # EMCL blocks, not one
    expected = query_similarity(loaded.encode_text(queries), videos.video, videos.frame_mask, temp=model.temp,
                                emcl_module=scoring.emcl_module, block_size=scoring.block_size)
    torch.testing.assert_close(sim, expected)
    cosine = torch.nn.functional.normalize(loaded.encode_text(queries), dim=-1) @ \
        torch.nn.functional.normalize(videos.video.mean(1), dim=-1).t()
    assert not torch.allclose(sim, cosine, atol=1e-3)                           # not a plain cosine


# ---------------------------------------------------------------- the index

def test_index_resumes_after_a_kill_and_follows_changed_and_deleted_files(params, videos, tmp_path, monkeypatch):
    _, path = write_checkpoint(params)
    loaded = emcl_nb.load(path, "cpu", overrides="batch_size_val=2")
    index = tmp_path / "index"
    (videos / "broken.mp4").write_bytes(b"not a video")
    original = TrainedModel.encode_video_batches

    def killed_after_two_batches(self, *args, **kwargs):
        for number, batch in enumerate(original(self, *args, **kwargs)):
            if number == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(TrainedModel, "encode_video_batches", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        search_index.build_index(loaded, videos, index, chunk_videos=2)
    monkeypatch.setattr(TrainedModel, "encode_video_batches", original)
    done_before = set(json.loads((index / "index.json").read_text())["videos"])
    assert len(done_before) == 3           # broken.mp4 + 1 video, then 2 videos: one part written, then killed

    report = search_index.build_index(loaded, videos, index, chunk_videos=2)
    assert report.kept == 3 and len(report.encoded) == N_TEST - 3 and not set(report.encoded) & done_before
    assert report.videos == N_TEST and list(report.unreadable) == ["broken.mp4"]
    assert "broken.mp4: " in report.summary() and len(list(index.glob("part-*.pt"))) == 1   # merged

    fresh = search_index.build_index(loaded, videos, tmp_path / "fresh")
    resumed, whole = search_index.read_index(index), search_index.read_index(tmp_path / "fresh")
    assert resumed.paths == whole.paths and "sub/" in resumed.paths[0] and len(resumed) == N_TEST
    assert torch.equal(resumed.video, whole.video) and torch.equal(resumed.frame_mask, whole.frame_mask)
    assert fresh.encoded == whole.paths                                     # all encoded, in path order

    changed, deleted = whole.paths[1], whole.paths[2]
    os.utime(videos / changed, ns=(0, 10**9))
    (videos / deleted).unlink()
    report = search_index.build_index(loaded, videos, index)
    assert report.encoded == [changed] and sorted(report.dropped) == sorted([changed, deleted])
    assert report.kept == N_TEST - 2 and list(report.unreadable) == ["broken.mp4"]   # not retried: unchanged
    updated = search_index.read_index(index)
    assert deleted not in updated.paths and len(updated) == N_TEST - 1
    torch.testing.assert_close(updated.video[updated.paths.index(changed)], whole.video[whole.paths.index(changed)])


def test_an_index_of_another_model_or_settings_is_refused_unless_rebuilt(params, videos, tmp_path):
    _, path = write_checkpoint(params)
    search_index.build_index(emcl_nb.load(path, "cpu"), videos, tmp_path / "index")
    other = emcl_nb.load(path, "cpu", overrides="max_frames=3")
    with pytest.raises(search_index.SearchIndexError, match=r"built otherwise \(max_frames: 4 -> 3\).*--rebuild"):
        search_index.build_index(other, videos, tmp_path / "index")
    assert search_index.build_index(other, videos, tmp_path / "index", rebuild=True).videos == N_TEST
    with pytest.raises(search_index.SearchIndexError, match="no index in"):
        search_index.read_index(tmp_path / "nothing")


def test_the_command_line_indexes_and_answers_queries(params, videos, tmp_path, capsys):
    _, path = write_checkpoint(params)
    index = tmp_path / "index"
    search_command.main(["index", "--checkpoint", str(path), "--videos", str(videos), "--index", str(index),
                         "--device", "cpu"])
    assert f"{N_TEST} videos indexed ({N_TEST} encoded, 0 kept" in capsys.readouterr().out
    search_command.main(["query", "--index", str(index), "a red circle", "a blue square", "-k", "3",
                         "--json", "--device", "cpu"])
    answers = json.loads(capsys.readouterr().out)
    assert [a["query"] for a in answers] == ["a red circle", "a blue square"]
    hits = answers[0]["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert all(h["path"].startswith(str(videos)) and 0 <= h["time"] <= 2.0 for h in hits)   # 2 s videos
    loaded = search_index.load_index_model(search_index.read_index(index), "cpu")
    expected = loaded.score(["a red circle"], search_index.read_index(index))[0]
    assert hits[0]["score"] == pytest.approx(float(expected.max()), abs=1e-6)
    search_command.main(["query", "--index", str(index), "a red circle", "-k", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert '"a red circle": top 2 of 6 videos' in printed and "rank    score     time  path" in printed


def test_a_reference_code_checkpoint_loads_and_searches_with_the_params_given(params, videos, tmp_path):
    """A plain state dict, "module."-prefixed, without EMCL bases: the ModelConfig comes from
    the parameters given (a YAML file and overrides)."""
    model, _ = write_checkpoint(params)
    state = {f"module.{key}": value for key, value in model.state_dict().items() if not key.startswith("emcl.")}
    reference = tmp_path / "pytorch_model.bin.4"
    torch.save(state, reference)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in params.to_dict().items() if k != "published"}))
    with pytest.warns(UserWarning, match="no EMCL bases"):
        loaded = emcl_nb.load(reference, "cpu", params=str(config))
    assert loaded.report.layout == "reference" and loaded.net.config == model.config
    with pytest.raises(CheckpointError, match="missing transformerClip.resblocks.1"):
        emcl_nb.load(reference, "cpu", params=str(config), overrides="num_hidden_layers=2")
    index = tmp_path / "index"
    with pytest.warns(UserWarning, match="no EMCL bases"):
        search_command.main(["index", "--checkpoint", str(reference), "--videos", str(videos),
                             "--index", str(index), "--params", str(config), "--set", "num_workers=0"])
    found = search_index.read_index(index)
    with pytest.warns(UserWarning, match="no EMCL bases"):
        again = search_index.load_index_model(found, "cpu")     # the recorded parameters rebuild it
    hits = search_index.search(again, found, ["a red circle"], k=N_TEST)[0]
    assert sorted(hit.video for hit in hits) == list(range(N_TEST))


# ---------------------------------------------------------------- done when

def test_a_trained_model_finds_the_captioned_video_in_its_top_5(tmp_path):
    """A small synthetic run (the demo recipe, 3 epochs) indexes its 50 test videos; queried with
    10 test captions, each caption's video is in the top 5 for at least 8 of them."""
    overrides = [f"anno_path={tmp_path}/data", f"video_path={tmp_path}/data/videos",
                 f"output_root={tmp_path}/outputs", "run=search", "synthetic_val=10", "synthetic_test=50",
                 "epochs=3", "eval_every_epoch=false", "reference_selection=false", "progress=false",
                 "num_workers=0"]
    params = load_params("synthetic", overrides, use_env=False)
    ensure_trained(params)
    test = load_annotations(params, "test")
    folder = tmp_path / "test-videos"                           # the test split's videos alone
    folder.mkdir()
    for path in test.video_paths:
        (folder / path.name).symlink_to(path)
    index = tmp_path / "index"
    search_command.main(["index", "--checkpoint", str(params.out_dir), "--videos", str(folder),
                         "--index", str(index)])
    found = search_index.read_index(index)
    model = search_index.load_index_model(found, "cpu")
    captions = [sample.caption for sample in test.samples[:10]]
    results = search_index.search(model, found, captions, k=5)
    hits = [any(os.path.samefile(hit.path, test.video_paths[i]) for hit in top) for i, top in enumerate(results)]
    assert sum(hits) >= 8, hits


def test_the_search_box_shows_a_query_and_its_frame_strips(params, videos, tmp_path, monkeypatch):
    from emcl_nb.analysis import figures, search_box

    _, path = write_checkpoint(params)
    loaded = emcl_nb.load(path, "cpu")
    search_index.build_index(loaded, videos, tmp_path / "index")
    found = search_index.read_index(tmp_path / "index")
    drawn = []
    monkeypatch.setattr(search_box, "search_strips",
                        lambda query, hits, frames: drawn.append((query, len(hits), frames.shape))
                        or figures.search_strips(query, hits, frames))
    box = search_box.search_box(loaded, found, k=3)
    (text, button), status, _ = box.children[0].children, box.children[1], box.children[2]
    text.value = "a red circle"
    assert drawn == [("a red circle", 3, (3, 4, 32, 32, 3))] and "top 3 of 6 videos" in status.value
    button.click()
    assert len(drawn) == 2 and not button.disabled
    frames = loaded.frames([found.root / found.paths[0], tmp_path / "missing.mp4"])
    assert frames[0].any() and not frames[1].any()                  # an unreadable file is black
