"""Annotation loaders on small files in each dataset's exact layout (docs/data.md)."""
import csv
import json
import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

import emcl_nb.data.annotations as annotations_module
from emcl_nb.data.annotations import (
    BROKEN_CLIP,
    EMPTY_CAPTION,
    LIMITED,
    LSMDC_BROKEN_CLIPS,
    MISSING_VIDEO,
    NO_CAPTIONS,
    AnnotationError,
    find_videos,
    has_split,
    load_annotations,
)
from emcl_nb.params import Params

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "annotations"


def make_videos(folder: Path, ids, ext=".mp4"):
    """Placeholder video files (loaders only look files up; nothing is decoded here)."""
    folder.mkdir(parents=True, exist_ok=True)
    for video_id in ids:
        (folder / f"{video_id}{ext}").write_bytes(b"x")


def params_for(layout, tmp_path, **changes):
    return Params().replace(layout=layout, anno_path=str(tmp_path / "anno"),
                            video_path=str(tmp_path / "videos"), **changes)


def write_lines(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def write_msrvtt(anno: Path, train_ids, test_rows, captions_per_video, val_ids=()):
    """MSRVTT_train csv, JSFUSION test csv and MSRVTT_data.json (captions "<id> caption <k>")."""
    write_lines(anno / "MSRVTT_train.9k.csv", ["video_id", *train_ids])
    if val_ids:
        write_lines(anno / "MSRVTT_val.full.csv", ["video_id", *val_ids])
    with open(anno / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for k, (video_id, sentence) in enumerate(test_rows):
            writer.writerow([f"ret{k}", video_id.replace("video", "msr"), video_id, sentence])
    sentences = [{"video_id": v, "caption": f"{v} caption {k}", "sen_id": n}
                 for n, (v, k) in enumerate((v, k) for k in range(captions_per_video)
                                            for v in (*train_ids, *val_ids))]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))


# ---------------------------------------------------------------- MSR-VTT

def test_msrvtt_splits_groups_and_lookup(tmp_path):
    train, val = ["video0", "video1", "video2"], ["video5"]
    test_rows = [("video7", "a man sings"), ("video8", "a cat, on a mat")]
    write_msrvtt(tmp_path / "anno", train, test_rows, captions_per_video=3, val_ids=val)
    make_videos(tmp_path / "videos" / "sub", [*train, *val, "video7", "video8"])
    params = params_for("msrvtt", tmp_path)

    tr = load_annotations(params, "train")
    assert len(tr) == 9 and tr.video_ids == train
    # json order is caption-major: sample i belongs to train[i % 3]
    assert tr.video_index.dtype == np.int64 and tr.video_index.tolist() == [0, 1, 2] * 3
    assert tr.caption_groups == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert all(s.caption.startswith(s.video_id) and s.start is None for s in tr.samples)
    assert tr.video_paths[1] == tmp_path / "videos" / "sub" / "video1.mp4"
    assert not tr.dropped

    te = load_annotations(params, "test")
    assert [(s.video_id, s.caption) for s in te.samples] == test_rows
    assert te.caption_groups == [[0], [1]]

    assert not has_split(params, "val")
    with pytest.raises(AnnotationError, match="msrvtt_val_csv"):
        load_annotations(params, "val")
    with_val = params.replace(msrvtt_val_csv="MSRVTT_val.full.csv")
    assert has_split(with_val, "val")
    va = load_annotations(with_val, "val")
    assert va.video_ids == val and va.caption_groups == [[0, 1, 2]]


def test_a_short_trial_takes_the_first_videos_with_all_their_captions(tmp_path):
    """max_train_videos / max_eval_videos: the first N videos of a split, every caption of
    each, the rest counted as left out (so that a report says how many queries were scored)."""
    train = ["video0", "video1", "video2"]
    test_rows = [("video7", "a man sings"), ("video8", "a cat, on a mat")]
    write_msrvtt(tmp_path / "anno", train, test_rows, captions_per_video=3)
    make_videos(tmp_path / "videos", [*train, "video7", "video8"])
    params = params_for("msrvtt", tmp_path, max_train_videos=2, max_eval_videos=1)
    tr = load_annotations(params, "train")
    assert tr.video_ids == ["video0", "video1"] and len(tr) == 6
    assert tr.caption_groups == [[0, 2, 4], [1, 3, 5]]               # json order is caption-major
    assert [tr.samples[i].video_id for i in tr.caption_groups[1]] == ["video1"] * 3
    assert tr.dropped == {LIMITED: 3}
    te = load_annotations(params, "test")
    assert te.video_ids == ["video7"] and te.dropped == {LIMITED: 1}
    assert load_annotations(params.replace(max_eval_videos=5), "test").video_ids == ["video7", "video8"]


def test_msrvtt_bad_samples_are_counted_or_raised(tmp_path, caplog):
    train = ["video0", "video1", "video2", "video3"]
    write_msrvtt(tmp_path / "anno", train, [("video9", "x")], captions_per_video=2)
    data_path = tmp_path / "anno" / "MSRVTT_data.json"
    data = json.loads(data_path.read_text())
    data["sentences"][0]["caption"] = "   "                          # video0's first caption
    data["sentences"] = [s for s in data["sentences"] if s["video_id"] != "video3"]
    data_path.write_text(json.dumps(data))
    make_videos(tmp_path / "videos", ["video0", "video2", "video3"])  # video1 has no file

    with caplog.at_level(logging.WARNING):
        tr = load_annotations(params_for("msrvtt", tmp_path), "train")
    assert tr.video_ids == ["video2", "video0"]                     # order of first kept caption
    assert [s.caption for s in tr.samples] == ["video2 caption 0", "video0 caption 1",
                                               "video2 caption 1"]
    assert tr.dropped == {EMPTY_CAPTION: 1, MISSING_VIDEO: 2, NO_CAPTIONS: 1}
    assert "dropped 4 sample(s)" in caplog.text

    strict = params_for("msrvtt", tmp_path, on_bad_sample="raise")
    with pytest.raises(AnnotationError, match="'video3' is listed but has no caption"):
        load_annotations(strict, "train")
    data["sentences"].append({"video_id": "video3", "caption": "fine", "sen_id": 99})
    data_path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="empty caption for video 'video0'"):
        load_annotations(strict, "train")
    data["sentences"][0]["caption"] = "fine again"
    data_path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="'video1' has no file"):
        load_annotations(strict, "train")


@pytest.mark.skipif(not (SHARED / "msrvtt").is_dir(), reason="real MSR-VTT split files absent")
def test_real_msrvtt_split_files(tmp_path):
    real = SHARED / "msrvtt"
    train_ids = (real / "MSRVTT_train.9k.csv").read_text().split()[1:]
    raw_rows = (real / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[1:]
    anno = tmp_path / "anno"
    anno.mkdir()
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        (anno / name).symlink_to(real / name)
    sentences = [{"video_id": v, "caption": f"caption of {v}", "sen_id": i}
                 for i, v in enumerate(train_ids)]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    test_ids = [row.split(",")[2] for row in raw_rows]
    make_videos(tmp_path / "videos", {*train_ids, *test_ids})
    params = params_for("msrvtt", tmp_path)

    tr = load_annotations(params, "train")
    assert tr.num_videos == len(set(tr.video_ids)) == 9000 and len(tr) == 9000
    te = load_annotations(params, "test")
    assert len(te) == te.num_videos == 1000 and not te.dropped
    for k in (0, 1, 517, 999):                      # the sentence is everything after 3 commas
        _, _, video_id, sentence = raw_rows[k].split(",", 3)
        assert (te.samples[k].video_id, te.samples[k].caption) == (video_id, sentence.strip())


@pytest.mark.skipif(not (SHARED / "msrvtt").is_dir(), reason="real MSR-VTT split files absent")
def test_real_msrvtt_validation_list_is_held_out_of_training(tmp_path):
    """MSRVTT_val.full.csv lies inside the 9k training list: training must leave it out."""
    real = SHARED / "msrvtt"
    anno = tmp_path / "anno"
    anno.mkdir()
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_val.full.csv"):
        (anno / name).symlink_to(real / name)
    train_ids = (real / "MSRVTT_train.9k.csv").read_text().split()[1:]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"sentences": [
        {"video_id": v, "caption": f"caption of {v}", "sen_id": i} for i, v in enumerate(train_ids)]}))
    make_videos(tmp_path / "videos", set(train_ids))
    params = params_for("msrvtt", tmp_path).replace(msrvtt_val_csv="MSRVTT_val.full.csv")

    train, val = load_annotations(params, "train"), load_annotations(params, "val")
    assert val.num_videos == 497 and train.num_videos == 9000 - 497
    assert not set(train.video_ids) & set(val.video_ids)


def test_loading_captions_scales_linearly(tmp_path, monkeypatch):
    """Parsing and assembly grow linearly with the captions (MSR-VTT: ~200k over 10k videos):
    10x the captions may take at most 30x the time, where a quadratic step would take ~100x.
    A ratio, not a time limit, so it holds on any CPU and on busy cores."""
    def best_load_time(root: Path, num_videos: int) -> float:
        ids = [f"video{i}" for i in range(num_videos)]
        write_msrvtt(root / "anno", ids, [("video0", "x")], captions_per_video=20)
        make_videos(root / "videos", ids)
        videos = find_videos(root / "videos")      # the file-system walk is timed elsewhere
        monkeypatch.setattr(annotations_module, "find_videos", lambda video_path: videos)
        best = float("inf")
        for _ in range(3):                          # best of three: shared, busy cores
            began = time.perf_counter()
            annotations = load_annotations(params_for("msrvtt", root), "train")
            best = min(best, time.perf_counter() - began)
        assert len(annotations) == 20 * num_videos and annotations.num_videos == num_videos
        return best

    small, large = best_load_time(tmp_path / "small", 1_000), best_load_time(tmp_path / "large", 10_000)
    assert large < 30 * small, f"10x the captions took {large / small:.0f}x the time ({small:.3f} s -> {large:.3f} s)"


# ---------------------------------------------------------------- MSVD

def write_msvd(anno: Path, splits: dict, captions: dict):
    for split, ids in splits.items():
        write_lines(anno / f"{split}_list.txt", ids)
    with open(anno / "raw-captions.pkl", "wb") as f:
        pickle.dump({v: [c.split() for c in caps] for v, caps in captions.items()}, f)


def recall_at_1(sim, video_index, caption_groups):
    """Text-to-video and video-to-text R@1 (%) of a texts x videos matrix, multi-sentence
    protocol (docs/evaluation.md): v2t scores a group by its best caption."""
    true = sim[np.arange(len(sim)), video_index]
    t2v_rank = 1 + (sim > true[:, None]).sum(axis=1)
    group_best = np.stack([sim[group].max(axis=0) for group in caption_groups])   # [groups, videos]
    v2t = group_best.T                                                              # [videos, groups]
    v2t_rank = 1 + (v2t > np.diag(v2t)[:, None]).sum(axis=1)
    return 100 * np.mean(t2v_rank == 1), 100 * np.mean(v2t_rank == 1)


def test_msvd_caption_groups_score_a_perfect_matrix_100(tmp_path):
    ids = ["a_1_5", "b_2_9", "c_0_3", "d_4_7", "e_1_2"]
    counts = [3, 1, 4, 2, 3]
    captions = {v: [f"{v} says thing {k}" for k in range(n)] for v, n in zip(ids, counts)}
    write_msvd(tmp_path / "anno", {"train": ids[:1], "val": ids[:1], "test": ids}, captions)
    make_videos(tmp_path / "videos", [v for v in ids if v != "b_2_9"], ext=".avi")
    te = load_annotations(params_for("msvd", tmp_path), "test")

    assert te.video_ids == ["a_1_5", "c_0_3", "d_4_7", "e_1_2"]
    assert te.dropped == {MISSING_VIDEO: 1}
    assert [len(g) for g in te.caption_groups] == [3, 4, 2, 3]
    assert te.samples[3].caption == "c_0_3 says thing 0"         # tokens joined with spaces
    for v, group in enumerate(te.caption_groups):
        assert all(te.samples[i].video_id == te.video_ids[v] for i in group)

    sim = (te.video_index[:, None] == np.arange(te.num_videos)[None]).astype(float)
    assert recall_at_1(sim, te.video_index, te.caption_groups) == (100.0, 100.0)
    # the check has teeth: groups misaligned by two captions (like docs/reference-differences.md #8) score below 100
    shifted = [[i + 2 for i in g if i + 2 < len(te)] for g in te.caption_groups]
    assert recall_at_1(sim, te.video_index, shifted)[1] < 100.0


@pytest.mark.skipif(not (SHARED / "msvd").is_dir(), reason="real MSVD lists absent")
def test_real_msvd_lists(tmp_path):
    anno = tmp_path / "anno"
    anno.mkdir()
    lists = {s: (SHARED / "msvd" / f"{s}_list.txt").read_text().split() for s in ("train", "val", "test")}
    for split in lists:
        (anno / f"{split}_list.txt").symlink_to(SHARED / "msvd" / f"{split}_list.txt")
    every = [v for ids in lists.values() for v in ids]
    write_msvd(anno, {}, {v: ["one caption", "another caption"] for v in every})
    make_videos(tmp_path / "videos", every, ext=".avi")
    params = params_for("msvd", tmp_path)
    for split, expected in (("train", 1200), ("val", 100), ("test", 670)):
        annotations = load_annotations(params, split)
        assert annotations.num_videos == expected and len(annotations) == 2 * expected


# ---------------------------------------------------------------- LSMDC

def test_lsmdc_lines_broken_clips_and_missing_videos(tmp_path):
    broken = sorted(LSMDC_BROKEN_CLIPS)[0]
    clips = ["1001_Movie_00.00.01.000-00.00.03.500", "1001_Movie_00.00.04.000-00.00.05.000",
             "1002_Other_00.10.00.000-00.10.02.000", broken]
    lines = [f"{c}\t00.00.01.000\t00.00.03.500\t00.00.01.000\t00.00.03.500\tSOMEONE does thing {k}."
             for k, c in enumerate(clips)]
    lines.append(f"{clips[0]}\t0\t1\t0\t1\tSOMEONE, again.")
    write_lines(tmp_path / "anno" / "LSMDC16_annos_training.csv", lines)
    make_videos(tmp_path / "videos" / "1001_Movie", clips[:2] + [broken], ext=".avi")
    params = params_for("lsmdc", tmp_path)

    tr = load_annotations(params, "train")
    assert tr.video_ids == clips[:2]                               # dots kept in the ids
    assert [s.caption for s in tr.samples] == ["SOMEONE does thing 0.", "SOMEONE does thing 1.",
                                               "SOMEONE, again."]
    assert tr.caption_groups == [[0, 2], [1]]
    assert tr.dropped == {MISSING_VIDEO: 1, BROKEN_CLIP: 1}
    # the reference skip list is not an error even when bad samples raise
    with pytest.raises(AnnotationError, match="'1002_Other"):
        load_annotations(params.replace(on_bad_sample="raise"), "train")

    write_lines(tmp_path / "anno" / "LSMDC16_annos_val.csv", [lines[0], "only\ttwo"])
    with pytest.raises(AnnotationError, match=r"LSMDC16_annos_val.csv:2: expected 6"):
        load_annotations(params, "val")
    assert not has_split(params, "test")                          # file absent
    with pytest.raises(AnnotationError, match="LSMDC16_challenge_1000_publictect.csv not found"):
        load_annotations(params, "test")


# ---------------------------------------------------------------- ActivityNet

def test_activity_paragraphs_and_segments(tmp_path):
    anno = tmp_path / "anno"
    anno.mkdir()
    def entry(d, sents):
        return {"duration": d, "timestamps": [[0, 1]] * len(sents), "sentences": sents}
    (anno / "train_ids.json").write_text(json.dumps(["v_aaa", "v_bbb"]))
    (anno / "train.json").write_text(json.dumps({
        "v_aaa": entry(82.73, ["A man runs.", " He jumps. "]),
        "v_bbb": entry(10.0, ["One."]), "v_zzz": entry(5.0, ["Not listed."])}))
    (anno / "val_ids.json").write_text(json.dumps(["v_ccc", "v_ddd"]))
    (anno / "val_1.json").write_text(json.dumps({"v_ccc": entry(3.2, ["Test paragraph."])}))
    make_videos(tmp_path / "videos", ["v_aaa", "v_bbb", "v_ccc", "v_ddd"], ext=".mkv")
    params = params_for("activity", tmp_path)

    tr = load_annotations(params, "train")
    assert [(s.video_id, s.caption, s.start, s.end) for s in tr.samples] == [
        ("v_aaa", "A man runs. He jumps.", 0.0, 83.0), ("v_bbb", "One.", 0.0, 10.0)]
    assert tr.caption_groups == [[0], [1]]
    te = load_annotations(params, "test")                          # test = val_1
    assert te.video_ids == ["v_ccc"] and te.samples[0].end == 4.0
    assert te.dropped == {NO_CAPTIONS: 1}
    assert not has_split(params, "val")
    with pytest.raises(AnnotationError, match="no 'val' split"):
        load_annotations(params, "val")


# ---------------------------------------------------------------- DiDeMo

def test_didemo_paragraph_per_video(tmp_path):
    anno = tmp_path / "anno"
    write_lines(anno / "test_list.txt", ["111@222.mov", "333@444.mp4"])
    (anno / "test_data.json").write_text(json.dumps([
        {"video": "111@222.mov", "description": "a dog runs", "times": [[0, 1]]},
        {"video": "333@444.mp4", "description": "a kid laughs ", "times": [[2, 3]]},
        {"video": "111@222.mov", "description": "the dog stops", "times": [[4, 4]]},
        {"video": "555@666.mp4", "description": "not listed", "times": [[0, 0]]}]))
    make_videos(tmp_path / "videos", ["111@222.mov", "333@444.mp4"], ext=".mp4")
    te = load_annotations(params_for("didemo", tmp_path), "test")
    assert [(s.video_id, s.caption, s.start, s.end) for s in te.samples] == [
        ("111@222.mov", "a dog runs the dog stops", 0.0, 31.0),
        ("333@444.mp4", "a kid laughs", 0.0, 31.0)]
    assert te.video_paths[0].name == "111@222.mov.mp4"


def test_didemo_videos_follow_the_data_json_order_as_in_the_reference(tmp_path):
    anno = tmp_path / "anno"
    write_lines(anno / "test_list.txt", ["a", "b", "c", "d"])
    (anno / "test_data.json").write_text(json.dumps([
        {"video": v, "description": f"about {v}", "times": [[0, 1]]} for v in ("c", "x", "a", "b", "c")]))
    make_videos(tmp_path / "videos", ["a", "b", "c", "d"])
    te = load_annotations(params_for("didemo", tmp_path), "test")
    assert te.video_ids == ["c", "a", "b"]                        # json order, unlisted x left out
    assert te.samples[0].caption == "about c about c" and te.dropped == {NO_CAPTIONS: 1}


# ---------------------------------------------------------------- shared behaviour

def test_find_videos_walks_once_and_rejects_duplicates(tmp_path):
    make_videos(tmp_path / "v" / "a", ["x1", "x2"])
    make_videos(tmp_path / "v" / "b" / "c", ["x3"], ext=".webm")
    (tmp_path / "v" / ".x4.mp4.123.partial").write_bytes(b"x")    # hidden leftovers ignored
    assert find_videos(tmp_path / "v") == {
        "x1": tmp_path / "v" / "a" / "x1.mp4", "x2": tmp_path / "v" / "a" / "x2.mp4",
        "x3": tmp_path / "v" / "b" / "c" / "x3.webm"}
    make_videos(tmp_path / "v" / "b", ["x1"], ext=".avi")
    with pytest.raises(AnnotationError, match="two video files for id 'x1'"):
        find_videos(tmp_path / "v")
    with pytest.raises(AnnotationError, match="set video_path"):
        find_videos(tmp_path / "nowhere")


def test_unknown_split_and_all_dropped(tmp_path):
    write_msrvtt(tmp_path / "anno", ["video0"], [("video1", "x")], captions_per_video=1)
    (tmp_path / "videos").mkdir()
    params = params_for("msrvtt", tmp_path)
    with pytest.raises(AnnotationError, match="unknown split 'dev'"):
        has_split(params, "dev")
    with pytest.raises(AnnotationError, match="no usable samples"):
        load_annotations(params, "train")


# ---------------------------------------------------------------- errors that name the file

def msrvtt_params(tmp_path, test_rows=(("video7", "a man sings"),)):
    write_msrvtt(tmp_path / "anno", ["video0"], list(test_rows), captions_per_video=1)
    make_videos(tmp_path / "videos", ["video0", "video7", "video8"])
    return params_for("msrvtt", tmp_path)


def test_a_caption_that_is_not_utf8_names_the_file_line_and_encoding(tmp_path):
    params = msrvtt_params(tmp_path)
    test_csv = tmp_path / "anno" / "MSRVTT_JSFUSION_test.csv"
    test_csv.write_bytes(test_csv.read_bytes().replace(b"a man sings", "a café".encode("latin1")))
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv:2: not valid utf-8.*iconv"):
        load_annotations(params, "test")


def test_a_truncated_json_names_the_file_and_line(tmp_path):
    params = msrvtt_params(tmp_path)
    data = tmp_path / "anno" / "MSRVTT_data.json"
    data.write_text(json.dumps(json.loads(data.read_text()), indent=1)[:-20])
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json:\d+: not valid JSON.*download"):
        load_annotations(params, "train")


def test_a_sentence_without_caption_names_the_record(tmp_path):
    params = msrvtt_params(tmp_path)
    data = tmp_path / "anno" / "MSRVTT_data.json"
    content = json.loads(data.read_text())
    del content["sentences"][0]["caption"]
    data.write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match="MSRVTT_data.json: sentence 0 of 'sentences' has no 'caption'"):
        load_annotations(params, "train")


def test_records_of_other_layouts_name_their_field(tmp_path):
    anno = tmp_path / "anno"
    write_lines(anno / "test_list.txt", ["111@222.mov"])
    (anno / "test_data.json").write_text(json.dumps([{"video": "111@222.mov", "descr": "x"}]))
    make_videos(tmp_path / "videos", ["111@222.mov"])
    with pytest.raises(AnnotationError, match="test_data.json: record 0 has no 'description'"):
        load_annotations(params_for("didemo", tmp_path), "test")
    (anno / "val_ids.json").write_text(json.dumps(["v_a"]))
    (anno / "val_1.json").write_text(json.dumps({"v_a": {"duration": "long", "sentences": ["x"]}}))
    with pytest.raises(AnnotationError, match="val_1.json: entry 'v_a' has 'duration' = 'long', not a int or float"):
        load_annotations(params_for("activity", tmp_path), "test")


def test_a_damaged_msvd_pickle_is_named(tmp_path):
    write_msvd(tmp_path / "anno", {"test": ["a"]}, {"a": ["x y"]})
    pkl = tmp_path / "anno" / "raw-captions.pkl"
    pkl.write_bytes(pkl.read_bytes()[:10])
    make_videos(tmp_path / "videos", ["a"])
    with pytest.raises(AnnotationError, match="raw-captions.pkl: cannot be unpickled"):
        load_annotations(params_for("msvd", tmp_path), "test")


def test_an_msvd_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)
    write_msvd(tmp_path / "anno", {"test": ["a"]}, {"a": ["x y"]})
    (tmp_path / "anno" / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [["x"]], "b": Payload()}))
    make_videos(tmp_path / "videos", ["a"])
    with pytest.raises(AnnotationError, match="raw-captions.pkl: cannot be unpickled.*plain data only"):
        load_annotations(params_for("msvd", tmp_path), "test")
    assert not marker.exists()


def test_a_duplicate_test_id_in_a_single_sentence_layout_is_an_error(tmp_path):
    params = msrvtt_params(tmp_path, [("video7", "a man sings"), ("video8", "x"),
                                      ("video7", "a man sings again")])
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv: 1 test video id.*'video7' \(2 times\)"):
        load_annotations(params, "test")
    # MSVD's test split is multi-sentence: several captions per video are its protocol
    write_msvd(tmp_path / "msvd", {"test": ["a"]}, {"a": ["x y", "z w"]})
    make_videos(tmp_path / "videos", ["a"])
    msvd = params.replace(layout="msvd", anno_path=str(tmp_path / "msvd"))
    assert load_annotations(msvd, "test").caption_groups == [[0, 1]]
