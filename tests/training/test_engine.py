"""Training engine on random tensors: the loss falls, resume is exact, mistakes stop early."""
import copy
import json
import math
import resource
import sys
import warnings

import pytest
import torch

import emcl_nb.model.loss
from emcl_nb.params import Params, repo_relative
from emcl_nb.training.build import build_model
from emcl_nb.training.checkpoint import read_checkpoint
from emcl_nb.training.checks import TrainingSetupError, check_resumable
from emcl_nb.training.engine import fit
from emcl_nb.training.optim import build_optimizer, warmup_cosine
from emcl_nb.training.run_log import NonFiniteLossError, truncate_log
from emcl_nb.training.runtime import configure_torch

SOT, EOT = 49406, 49407


class RandomClips(torch.utils.data.Dataset):
    """Fixed random (caption, clip) pairs in the batch format of emcl_nb.data.dataset."""

    def __init__(self, n: int, params: Params, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        L, T, S = params.max_words, params.max_frames, params.image_size
        self.text_ids = torch.zeros(n, L, dtype=torch.int64)
        self.text_ids[:, 0] = SOT
        self.text_ids[:, 1:L - 2] = torch.randint(1, 40000, (n, L - 3), generator=g)
        self.text_ids[:, L - 2] = EOT
        self.video = torch.randint(0, 256, (n, T, 3, S, S), dtype=torch.uint8, generator=g)
        self.frame_mask = torch.ones(n, T, dtype=torch.int64)
        self.frame_mask[::3, -1] = 0                      # some clips are shorter

    def __len__(self):
        return len(self.text_ids)

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        return {"text_ids": self.text_ids[index], "text_mask": (self.text_ids[index] > 0).long(),
                "video": self.video[index], "frame_mask": self.frame_mask[index],
                "index": torch.tensor(index), "video_index": torch.tensor(index)}


def tiny_params(tmp_path, **changes) -> Params:
    base = dict(output_root=str(tmp_path), dataset="random", run="r", clip_weights="tiny",
                tiny_width=64, tiny_layers=1, tiny_patch=16, image_size=32, max_frames=4,
                max_words=8, num_hidden_layers=1, emcl_bases=4, emcl_stages=3, batch_size=8,
                epochs=2, lr=1e-3, coef_lr=1.0, num_workers=0, device="cpu", progress=False,
                log_every=2, num_threads=2)
    base.update(changes)
    return Params(**base)


def test_smoke_training_lowers_the_loss(tmp_path):
    params = tiny_params(tmp_path, epochs=8)
    result = fit(params, RandomClips(32, params))
    losses = [json.loads(line)["loss"] for line in result.log_path.read_text().splitlines()]
    assert len(losses) == 8 * 4
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first and last < math.log(params.batch_size), (first, last)  # below chance
    assert result.history[-1]["loss"] == losses[-1]


def test_compiled_training_matches_eager_and_saves_plain_checkpoints(tmp_path, capsys):
    """compile=true trains the same run as eager (losses and weights within float rounding:
    the compiled kernels may sum in another order), prints the first step's time, and its
    checkpoints load into an uncompiled model."""
    eager = fit(tiny_params(tmp_path / "eager", epochs=1), RandomClips(16, tiny_params(tmp_path)))
    compiled = fit(tiny_params(tmp_path / "compiled", epochs=1, compile=True), RandomClips(16, tiny_params(tmp_path)))
    assert "compile=true: the first step took" in capsys.readouterr().out
    losses = [[json.loads(line)["loss"] for line in result.log_path.read_text().splitlines()]
              for result in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    assert losses[0][0] != pytest.approx(losses[0][-1], rel=1e-3)       # the weights moved
    states = [read_checkpoint(result.last_checkpoint)["model"] for result in (eager, compiled)]
    assert states[0].keys() == states[1].keys()                          # no torch.compile prefix
    for name, weight in states[0].items():
        torch.testing.assert_close(states[1][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    build_model(tiny_params(tmp_path)).load_state_dict(states[1])


def test_grad_clip_zero_means_no_clipping(tmp_path):
    """grad_clip=0 leaves the gradients as they are (clip_grad_norm_ to 0 would zero them)."""
    from emcl_nb.training.engine import train_step

    params = tiny_params(tmp_path, grad_clip=0.0)
    torch.manual_seed(0)
    model = build_model(params).train()
    optimizer, scheduler = build_optimizer(model, params, total_steps=4)
    clips = RandomClips(8, params)
    batch = {key: torch.stack([clips[i][key] for i in range(8)]) for key in ("text_ids", "text_mask",
                                                                             "video", "frame_mask")}
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in model.parameters() if p.grad is not None])))))
    train_step(model, batch, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
               dtype=None, grad_clip=0.0)
    assert seen and seen[0] > 1e-3


def test_resume_after_epoch_one_continues_the_run_exactly(tmp_path):
    uninterrupted = fit(tiny_params(tmp_path / "a"), RandomClips(24, tiny_params(tmp_path)))

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    params = tiny_params(tmp_path / "b")
    with pytest.raises(Stop):
        fit(params, RandomClips(24, params), on_epoch_end=stop)
    assert read_checkpoint(params.out_dir / "checkpoints" / "last.pt")["epoch"] == 1
    with open(params.out_dir / "log.jsonl", "a") as log:     # a killed epoch 2 had logged step 3
        log.write(json.dumps({"step": 3, "epoch": 1, "loss": 9.9}) + "\n")
    resumed = fit(params, RandomClips(24, params))

    a = read_checkpoint(uninterrupted.last_checkpoint)
    b = read_checkpoint(resumed.last_checkpoint)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in uninterrupted.history] == [r["loss"] for r in resumed.history]
    steps = [[json.loads(line)["step"] for line in result.log_path.read_text().splitlines()]
             for result in (uninterrupted, resumed)]
    assert steps[0] == steps[1] == list(range(6))


def test_resume_with_other_training_parameters_is_an_error(tmp_path):
    params = tiny_params(tmp_path, epochs=1)
    fit(params, RandomClips(16, params))
    changed = params.replace(lr=5e-4)
    with pytest.raises(TrainingSetupError, match="lr: 0.001 -> 0.0005"):
        fit(changed, RandomClips(16, changed))


def test_too_small_training_set_is_an_error_before_any_work(tmp_path):
    params = tiny_params(tmp_path, batch_size=16)
    with pytest.raises(TrainingSetupError, match="fewer than one batch"):
        fit(params, RandomClips(10, params))
    assert not params.out_dir.exists()


def test_batch_not_divisible_by_processes_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    params = tiny_params(tmp_path, batch_size=8)
    with pytest.raises(TrainingSetupError, match="not divisible by the number of processes"):
        fit(params, RandomClips(16, params))


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    params = tiny_params(tmp_path, epochs=3, log_every=1)
    real_loss, calls = emcl_nb.model.loss.symmetric_infonce, []

    def poisoned(sims, logit_scale):
        calls.append(1)
        loss = real_loss(sims, logit_scale)
        return loss * float("nan") if len(calls) == 5 else loss   # step 4 (epoch 2)
    monkeypatch.setattr(emcl_nb.model.loss, "symmetric_infonce", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 4 .epoch 2."):
        fit(params, RandomClips(24, params))
    assert read_checkpoint(params.out_dir / "checkpoints" / "last.pt")["epoch"] == 1


class BrokenClips(RandomClips):
    """A dataset whose clips cannot be read (as a video folder of broken files)."""

    def __getitem__(self, key):
        raise OSError("cannot read clip")


def test_a_run_that_fails_at_its_start_leaves_no_run_folder(tmp_path):
    params = tiny_params(tmp_path)
    with pytest.raises(OSError, match="cannot read clip"):
        fit(params, BrokenClips(16, params))
    assert not params.out_dir.exists()
    fit(params.replace(epochs=1), RandomClips(16, params))        # a trained run's folder is kept
    with pytest.raises(OSError, match="cannot read clip"):
        fit(params.replace(epochs=1), BrokenClips(16, params), resume=False)
    assert list(params.out_dir.rglob("last.pt"))                  # (kept, or kept aside)


def test_weight_decay_exempts_biases_norms_embeddings_and_logit_scale(tmp_path):
    params = tiny_params(tmp_path)
    model = build_model(params)
    optimizer, _ = build_optimizer(model, params, total_steps=10)
    groups = {group["name"]: group for group in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert "clip.logit_scale" in no_decay and "clip.token_embedding.weight" in no_decay
    assert "clip.ln_final.weight" in no_decay and "frame_position_embeddings.weight" in no_decay
    assert all(n in no_decay for n in names.values() if n.endswith(".bias"))
    assert "clip.visual.conv1.weight" not in names.values() or not model.clip.visual.conv1.weight.requires_grad
    clip_params = {id(p) for p in model.clip.parameters()}
    for group in groups.values():
        assert all((id(p) in clip_params) == group["name"].startswith("clip") for p in group["params"])
    assert groups["clip_decay"]["initial_lr"] == params.lr * params.coef_lr
    assert groups["new_decay"]["initial_lr"] == params.lr


def test_decay_exempt_reference_decays_what_the_reference_decays(tmp_path):
    params = tiny_params(tmp_path, decay_exempt="reference")
    model = build_model(params)
    optimizer, _ = build_optimizer(model, params, total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {n for n in names.values() if "bias" in n}       # CLIP's norms are ln_*
    assert "clip.logit_scale" not in no_decay and "clip.ln_final.weight" not in no_decay


def reference_warmup_cosine(x: float, warmup: float) -> float:
    """Transcription of the reference schedule on total progress x."""
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


@pytest.mark.parametrize("total, warmup", [(100, 0.1), (37, 0.25), (10, 0.0)])
def test_schedule_is_the_reference_formula_on_every_update(total, warmup):
    factor = warmup_cosine(total, warmup)
    for step in range(total):
        assert factor(step) == pytest.approx(reference_warmup_cosine(step / total, warmup), abs=1e-12)
    assert factor(0) == (0.0 if warmup > 0 else 1.0)      # lr 0 at the first update


def reference_bertadam(params, grads_per_step, groups, total, warmup):
    """Transcription of the reference BertAdam (b1 .9, b2 .98, eps 1e-6, max_grad_norm 1):
    per tensor, clip the gradient to norm 1, update m and v without bias correction, add the
    weight decay to the update, step by the scheduled lr."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step):
        lr_factor = reference_warmup_cosine(step / total, warmup)
        for i, g in enumerate(grads):
            g = g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))
            m[i] = 0.9 * m[i] + (1 - 0.9) * g
            v[i] = 0.98 * v[i] + (1 - 0.98) * g * g
            update = m[i] / (v[i].sqrt() + 1e-6)
            lr, weight_decay = groups[i]
            if weight_decay > 0:
                update = update + weight_decay * params[i]
            params[i] = params[i] - lr * lr_factor * update
    return params


def test_bertadam_reproduces_the_reference_update_step_by_step(tmp_path):
    params = tiny_params(tmp_path, optimizer="bertadam", lr=1e-2, coef_lr=0.1, weight_decay=0.2,
                         warmup_proportion=0.4)
    model = build_model(params)
    total = 6
    optimizer, scheduler = build_optimizer(model, params, total)
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    groups = [(group["initial_lr"], group["weight_decay"])
              for group in optimizer.param_groups for _ in group["params"]]
    start = [p.detach().clone() for p in tensors]
    g = torch.Generator().manual_seed(0)
    grads_per_step = [[torch.randn(p.shape, generator=g) * (10.0 if i % 2 else 0.01)   # clipped or not
                       for i, p in enumerate(tensors)] for _ in range(total)]
    for step, grads in enumerate(grads_per_step):
        for p, grad in zip(tensors, grads):
            p.grad = grad.clone()
        optimizer.step()
        scheduler.step()
        expected = reference_bertadam(start, grads_per_step[:step + 1], groups, total,
                                      params.warmup_proportion)
        for p, want in zip(tensors, expected):
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
        if step == 0:           # lr 0 at the first update: nothing moves
            assert all(torch.equal(p.detach(), p0) for p, p0 in zip(tensors, start))
    moved = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(tensors, start))
    assert moved > 1e-3       # far above the tolerance: the comparison has teeth


def test_bertadam_survives_a_copy_and_a_state_dict_round_trip(tmp_path):
    """A deep copy (which keeps only torch's optimiser state) and load_state_dict into an
    optimiser on a copy of the model both step on exactly as the original does: the moments
    of the earlier update come with them."""
    params = tiny_params(tmp_path, optimizer="bertadam", lr=1e-2)
    model = build_model(params)
    optimizer, scheduler = build_optimizer(model, params, total_steps=4)
    with warnings.catch_warnings():             # torch warns of a schedule step before any update
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
        scheduler.step()                        # past the warm-up's lr 0: the updates move weights
    assert all(group["lr"] > 0 for group in optimizer.param_groups)

    def tensors(opt):
        return [p for group in opt.param_groups for p in group["params"]]

    def give_gradients(opt, seed):              # the same gradients in the same order for each copy
        g = torch.Generator().manual_seed(seed)
        for p in tensors(opt):
            p.grad = torch.randn(p.shape, generator=g)

    give_gradients(optimizer, 0)
    optimizer.step()                            # the moments are no longer zero
    copied = copy.deepcopy(optimizer)           # its own copies of the parameters
    model_copy = copy.deepcopy(model)
    again, _ = build_optimizer(model_copy, params, total_steps=4)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")      # as a checkpoint keeps it
    again.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    before = [p.detach().clone() for p in tensors(optimizer)]
    for opt in (optimizer, copied, again):
        give_gradients(opt, 1)
        opt.step()
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(tensors(optimizer), before))   # it moved
    for other in (copied, again):
        assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(tensors(optimizer), tensors(other)))
    assert {id(p) for p in tensors(again)} == {id(p) for p in model_copy.parameters() if p.requires_grad}


def test_adamw_stays_available(tmp_path):
    params = tiny_params(tmp_path, optimizer="adamw")
    optimizer, _ = build_optimizer(build_model(params), params, total_steps=10)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["lr"] == 0.0 for group in optimizer.param_groups)    # warm-up starts at 0


def test_reference_selection_scores_at_the_reference_steps_and_keeps_the_best(tmp_path, capsys):
    params = tiny_params(tmp_path, epochs=2, reference_selection=True, reference_eval_steps=2)
    scores = iter([10.0, 30.0, 30.0, 20.0])      # steps 1, 2, 4, 6 (3 steps per epoch)
    result = fit(params, RandomClips(24, params), reference=lambda model: {"t2v": {"R1": next(scores)}})
    printed = capsys.readouterr().out
    assert printed.count("reference_selection: scoring test took") == 1          # said once, at step 1
    assert "every 2 updates: 3 more time(s)" in printed                        # steps 2, 4, 6
    assert "training took" in printed and "reference selection" in printed
    selection = json.loads((result.out_dir / "reference.json").read_text())
    assert [e["step"] for e in selection["evaluations"]] == [1, 2, 4, 6]
    assert selection["split"] == "test" and selection["best"]["step"] == 4   # ties: the later step
    assert read_checkpoint(result.out_dir / "checkpoints" / "reference.pt")["step"] == 4


def test_max_steps_ends_a_short_trial_with_the_schedule_fitted_to_it(tmp_path, capsys):
    """3 epochs of 2 updates, max_steps=5: updates 0-4, the third epoch cut after one; the
    warm-up + cosine schedule spans the 5 updates; the run is then complete."""
    params = tiny_params(tmp_path, epochs=3, max_steps=5, warmup_proportion=0.2, lr=1e-3, coef_lr=1.0)
    result = fit(params, RandomClips(16, params))
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [record["step"] for record in log] == [0, 1, 2, 3, 4]
    assert [record["epoch"] for record in result.history] == [1, 2, 3]
    last_lr = next(value for key, value in log[-1].items() if key.startswith("lr_new"))
    assert last_lr == pytest.approx(1e-3 * warmup_cosine(5, 0.2)(4))          # the schedule of 5 steps
    assert read_checkpoint(result.last_checkpoint)["step"] == 5
    fit(params, RandomClips(16, params))
    assert "is complete: 3/3 epochs, 5/5 steps" in capsys.readouterr().out


def test_a_killed_epoch_leaves_no_reference_checkpoint_behind(tmp_path, monkeypatch):
    """The selection's best of an epoch becomes reference.pt only once last.pt has saved the
    epoch: a run killed before that resumes with the reference.pt its last.pt knows about."""
    import emcl_nb.training.checkpoint as checkpoint

    params = tiny_params(tmp_path, epochs=2, reference_selection=True, reference_eval_steps=2)
    checkpoints = params.out_dir / "checkpoints"

    def killed_before_epoch_2_is_saved(path, **kwargs):
        if kwargs["epoch"] == 2 and path.name == "last.pt":
            raise KeyboardInterrupt
        real_save(path, **kwargs)
    real_save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_before_epoch_2_is_saved)
    scores = iter([10.0, 20.0, 30.0, 40.0])                       # steps 1, 2 | 4, 6: rising
    with pytest.raises(KeyboardInterrupt):
        fit(params, RandomClips(24, params), reference=lambda model: {"t2v": {"R1": next(scores)}})
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert read_checkpoint(checkpoints / "reference.pt")["step"] == 2     # epoch 1's best
    assert (checkpoints / "reference.pending.pt").is_file()              # epoch 2's, unsaved
    redo = iter([5.0, 5.0])                                               # the redone epoch scores lower
    fit(params, RandomClips(24, params), reference=lambda model: {"t2v": {"R1": next(redo)}})
    assert not (checkpoints / "reference.pending.pt").exists()
    selection = json.loads((params.out_dir / "reference.json").read_text())
    assert [e["step"] for e in selection["evaluations"]] == [1, 2, 4, 6]
    assert selection["best"]["step"] == 2 == read_checkpoint(checkpoints / "reference.pt")["step"]


def test_a_pending_reference_is_promoted_only_when_its_epoch_was_saved(tmp_path):
    from emcl_nb.training.checkpoint import RunCheckpoints, save_checkpoint

    model = build_model(tiny_params(tmp_path))
    checkpoints = RunCheckpoints(tmp_path)
    pending, reference = checkpoints.pending_reference, checkpoints.reference
    save_checkpoint(pending, model=model, epoch=1, step=4, params={})
    checkpoints.promote_reference(saved_step=3)                   # its epoch was not saved
    assert not pending.exists() and not reference.exists()
    save_checkpoint(pending, model=model, epoch=1, step=4, params={})
    checkpoints.promote_reference(saved_step=6)                   # killed after last.pt
    assert not pending.exists() and read_checkpoint(reference)["step"] == 4


def test_a_field_the_run_did_not_record_counts_as_changed(tmp_path):
    """A run of an earlier version, from before `optimizer` existed, is not this recipe."""
    saved = Params().to_dict()
    del saved["optimizer"]
    with pytest.raises(TrainingSetupError, match=r"optimizer: '\(not recorded\)' -> 'bertadam'"):
        check_resumable(Params(), saved, tmp_path / "last.pt")


def test_configure_torch_flushes_denormals_that_slow_the_em_step():
    torch.set_flush_denormal(False)                 # earlier tests may have configured torch
    denormal = torch.tensor([1e-39])                # below float32's smallest normal, 1.2e-38
    assert (denormal * 1.0).item() > 0.0
    try:
        configure_torch(Params(num_threads=0))
        assert (denormal * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_configure_torch_keeps_determinism_without_filling_every_new_tensor():
    """Deterministic algorithms stay on; the NaN fill of new tensors (a third of a CPU
    training step) is off."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        configure_torch(Params(num_threads=0, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
        torch.set_flush_denormal(False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_configure_torch_reuses_freed_large_blocks_instead_of_faulting_them_in_again():
    configure_torch(Params(num_threads=0))
    torch.set_flush_denormal(False)

    def faults_of_a_fresh_64_mib_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)                 # 64 MiB, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_fresh_64_mib_tensor()
    assert faults_of_a_fresh_64_mib_tensor() < 1000        # 16,384 pages if handed back to the OS


def test_validation_ties_go_to_the_later_epoch_as_in_the_reference(tmp_path):
    params = tiny_params(tmp_path, epochs=2)
    result = fit(params, RandomClips(16, params), validate=lambda model: {"val": {"t2v": {"R1": 50.0}}})
    assert read_checkpoint(result.best_checkpoint)["epoch"] == 2


def test_synthetic_fields_are_checked_only_for_synthetic_data(tmp_path):
    saved = Params(synthetic_train=16).to_dict()
    check_resumable(Params(synthetic=False, synthetic_train=24), saved, tmp_path / "last.pt")
    with pytest.raises(TrainingSetupError, match="synthetic_train: 16 -> 24"):
        check_resumable(Params(synthetic=True, synthetic_train=24), saved, tmp_path / "last.pt")


def rising_validation():
    """A validator whose T2V R@1 rises every call: each epoch is strictly the best so far."""
    calls = []

    def validate(model):
        calls.append(1)
        return {"val": {"t2v": {"R1": 10.0 * len(calls)}, "v2t": {"R1": 10.0 * len(calls)}}}
    return validate


def test_a_run_killed_between_best_and_last_keeps_its_best_final_epoch(tmp_path, monkeypatch):
    """The final epoch is strictly best; the process dies after the first of its two
    checkpoint writes, whichever is first. Its best must survive that and the resume."""
    import emcl_nb.training.checkpoint as checkpoint

    params = tiny_params(tmp_path, epochs=2)
    real_save, writes = checkpoint.save_checkpoint, []

    def killed_at_second_write_of_epoch_2(path, **kwargs):
        writes.append(kwargs["epoch"])
        if writes.count(2) == 2:
            raise KeyboardInterrupt                          # the process dies here
        real_save(path, **kwargs)
    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_at_second_write_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(params, RandomClips(16, params), validate=rising_validation())   # R@1 10, then 20
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    checkpoints = params.out_dir / "checkpoints"
    assert read_checkpoint(checkpoints / "best.pt")["epoch"] == 2    # written first
    assert read_checkpoint(checkpoints / "last.pt")["epoch"] == 1    # so epoch 2 is redone...

    def worse(model):
        return {"val": {"t2v": {"R1": 5.0}, "v2t": {"R1": 5.0}}}
    result = fit(params, RandomClips(16, params), validate=worse)    # ...and scores lower
    assert read_checkpoint(result.best_checkpoint)["metrics"]["best_score"] == 20.0
    assert [r["epoch"] for r in json.loads((params.out_dir / "history.json").read_text())] == [1, 2]


def test_a_second_run_into_a_locked_folder_fails_naming_the_holder(tmp_path):
    import os

    from emcl_nb.io import FolderBusyError, folder_lock

    params = tiny_params(tmp_path, epochs=1)
    with folder_lock(params.out_dir):
        with pytest.raises(FolderBusyError, match=f"{params.out_dir}.*process {os.getpid()}"):
            fit(params, RandomClips(16, params))
    assert not (params.out_dir / "checkpoints").exists()
    fit(params, RandomClips(16, params))                     # released: the run goes ahead


def test_resume_sweeps_stale_temporaries_and_drops_a_torn_log_line(tmp_path, capsys):
    params = tiny_params(tmp_path, epochs=1)
    fit(params, RandomClips(16, params))
    stale = params.out_dir / "checkpoints" / ".last.pt.0a1b2c.tmp"
    stale.write_bytes(b"half a checkpoint")
    evaluating = params.out_dir / ".metrics.json.9f8e7d.tmp"    # an evaluation writing right now
    evaluating.write_text("{")
    log = params.out_dir / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 2, "epo')      # killed mid-append
    more = params.replace(epochs=1)
    fit(more, RandomClips(16, more))
    assert not stale.exists() and evaluating.exists()
    printed = capsys.readouterr().out
    assert "torn last line 3" in printed and repo_relative(stale) in printed
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1]


def test_a_broken_line_inside_the_log_is_a_clear_error(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0}\n{"st\n{"step": 1}\n')
    with pytest.raises(TrainingSetupError, match="log.jsonl line 2 is not JSON"):
        truncate_log(log, 2)


@pytest.mark.parametrize("val, sign", [
    ({"t2v": {"R1": 100.0}, "v2t": {"R1": 6.0}}, "differ by more than"),
    ({"t2v": {"R1": 12.0}, "v2t": {"R1": 12.0}, "constant_rows": 8, "n_texts": 8}, "alike"),
])
def test_validation_that_looks_collapsed_warns_once(tmp_path, val, sign):
    params = tiny_params(tmp_path, epochs=2)
    with pytest.warns(UserWarning, match=sign) as caught:
        fit(params, RandomClips(16, params), validate=lambda model: {"val": val})
    assert sum(sign in str(w.message) for w in caught) == 1


def test_train_step_is_one_whole_update(tmp_path):
    """train_step: the loss, an optimiser step on the clipped gradients, a schedule step and
    logit_scale clamped to ln 100."""
    from emcl_nb.model.emclnet import MAX_LOGIT_SCALE
    from emcl_nb.training.engine import train_step

    grad_clip = 1e-3                                   # far below the gradients' norm: always clipped
    params = tiny_params(tmp_path, warmup_proportion=0.5, grad_clip=grad_clip)
    torch.manual_seed(0)
    model = build_model(params).train()
    optimizer, scheduler = build_optimizer(model, params, total_steps=4)
    seen_norms = []                                    # the total gradient norm each optimiser step sees

    def record_norm(opt, args, kwargs):                # runs as optimizer.step starts
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        seen_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    optimizer.register_step_pre_hook(record_norm)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clips = RandomClips(8, params)
    batch = {key: torch.stack([clips[i][key] for i in range(8)]) for key in ("text_ids", "text_mask",
                                                                             "video", "frame_mask")}
    with torch.no_grad():
        model.clip.logit_scale.fill_(MAX_LOGIT_SCALE + 1.0)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    lrs_before = [group["lr"] for group in optimizer.param_groups]
    loss = train_step(model, batch, optimizer, scheduler, scaler, dtype=None, grad_clip=grad_clip)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert float(model.clip.logit_scale.detach()) == pytest.approx(MAX_LOGIT_SCALE, abs=1e-6)   # clamped (float32)
    assert scheduler.last_epoch == 1 and [group["lr"] for group in optimizer.param_groups] != lrs_before
    # the first update runs at warm-up lr 0: the weights only move from the second on
    train_step(model, batch, optimizer, scheduler, scaler, dtype=None, grad_clip=grad_clip)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert len(seen_norms) == 2 and all(abs(norm - grad_clip) < 1e-5 for norm in seen_norms), seen_norms


def test_no_resume_sets_the_earlier_checkpoints_aside(tmp_path, capsys):
    """Retraining with --no-resume and validation off kept the earlier run's best.pt, which
    evaluation then reported as this run's (issue 24); it is moved aside, never deleted."""
    params = tiny_params(tmp_path)
    data = RandomClips(16, params)
    validated = {"val": {"t2v": {"R1": 10.0}, "v2t": {"R1": 10.0}}}
    first = fit(params, data, validate=lambda model: validated)
    assert first.best_checkpoint is not None
    old_best = read_checkpoint(first.best_checkpoint)["model"]
    again = fit(params.replace(seed=1, epochs=1), data, resume=False)
    assert again.best_checkpoint is None
    aside = params.out_dir / "checkpoints" / "earlier-1"
    assert sorted(path.name for path in aside.iterdir()) == ["best.pt", "history.json", "last.pt", "log.jsonl"]
    assert torch.equal(read_checkpoint(aside / "best.pt")["model"]["clip.logit_scale"],
                       old_best["clip.logit_scale"])
    assert "kept in" in capsys.readouterr().out
    fit(params.replace(seed=2, epochs=1), data, resume=False)
    assert (params.out_dir / "checkpoints" / "earlier-2" / "last.pt").is_file()


def test_a_run_does_not_resume_on_other_data(tmp_path):
    """Resuming with anno_path / video_path at other captions went on without a word (issue 24)."""
    from emcl_nb.training.checks import OtherDataError
    data = {name: tmp_path / name for name in ("a", "b")}
    for name, folder in data.items():
        (folder / "videos").mkdir(parents=True)
        (folder / "MSRVTT_data.json").write_text(f'{{"sentences": ["{name}"]}}')
        (folder / "videos" / "video0.mp4").write_bytes(b"0" * 10)
    params = tiny_params(tmp_path, anno_path=str(data["a"]), video_path=str(data["a"] / "videos"))

    def stop(record):
        raise KeyboardInterrupt                               # killed after epoch 1 of 2
    with pytest.raises(KeyboardInterrupt):
        fit(params, RandomClips(16, params), on_epoch_end=stop)
    assert read_checkpoint(params.out_dir / "checkpoints" / "last.pt")["data"]["annotations"]
    with pytest.raises(OtherDataError, match="trained on other data: the annotation files changed"):
        fit(params.replace(anno_path=str(data["b"])), RandomClips(16, params))
    (data["a"] / "videos" / "video1.mp4").write_bytes(b"1" * 10)
    with pytest.raises(OtherDataError, match="the video files .* changed"):
        fit(params, RandomClips(16, params))
    (data["a"] / "videos" / "video1.mp4").unlink()
    assert fit(params, RandomClips(16, params)).history[-1]["epoch"] == 2     # its own data: resumes


def test_a_run_still_at_chance_is_warned_once(tmp_path):
    """A run at chance (loss ln B, R@1 at chance) gave no warning (issue 24)."""
    from types import SimpleNamespace

    from emcl_nb.training.engine import validate_epoch
    params = tiny_params(tmp_path)
    training = SimpleNamespace(params=params, env=SimpleNamespace(is_main=True), collapse_warned=False,
                               chance_warned=False, run=SimpleNamespace(best_score=-math.inf))
    model = build_model(params)

    def at(r1):
        return lambda model: {"val": {"t2v": {"R1": r1}, "v2t": {"R1": r1}, "chance_R1": 2.0, "n_texts": 50}}
    uniform = math.log(params.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_epoch(training, model, {"epoch": 1, "loss": uniform}, at(2.0))        # too early to say
        validate_epoch(training, model, {"epoch": 2, "loss": uniform / 2}, at(2.0))    # the loss falls
        validate_epoch(training, model, {"epoch": 2, "loss": uniform}, at(30.0))       # it retrieves
    with pytest.warns(UserWarning, match="epoch 2: after 2 epochs .* still at chance"):
        validate_epoch(training, model, {"epoch": 2, "loss": uniform * 1.01}, at(4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_epoch(training, model, {"epoch": 3, "loss": uniform}, at(2.0))        # once
