"""lib.sae.trainer: learning on data with known features, schedules, resampling, checkpoint and resume."""
from __future__ import annotations

import torch

from lib.sae.base import SAEConfig, make_sae
from lib.sae.buffer import TensorSource
from lib.sae.trainer import CHECKPOINT_NAME, Trainer, TrainConfig, train_sae


def sparse_data(n: int = 4096, d: int = 16, n_feat: int = 32, p: float = 0.06, seed: int = 0):
    """x = sum of a few of n_feat random unit directions with positive magnitudes, plus a mean."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    on = torch.rand(n, n_feat, generator=g) < p
    mags = torch.rand(n, n_feat, generator=g) + 0.5
    return (on * mags) @ dirs + 0.5, dirs


def test_relu_sae_learns_sparse_features():
    x, dirs = sparse_data()
    cfg = SAEConfig(d_in=16, d_sae=64)
    sae, hist = train_sae(cfg, TensorSource(x, 256, seed=0),
                          TrainConfig(total_tokens=256 * 400, batch_size=256, lr=3e-3, sparsity_coefficient=0.3,
                                      log_every=100))
    with torch.no_grad():
        x_hat, f = sae(x, output_features=True)
        fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(fvu) < 0.15
    assert float((f != 0).sum(-1).float().mean()) < 8  # sparse: ~2 true features per input (32 x 0.06)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    # most true directions have a decoder row close to them
    cos = (dirs @ sae.W_dec.T).max(1).values
    assert float((cos > 0.9).float().mean()) > 0.6
    assert [h["step"] for h in hist] == [100, 200, 300, 400]


def test_schedules():
    sae = make_sae(SAEConfig(d_in=4, d_sae=8), seed=0)
    tr = Trainer(sae, iter([]), TrainConfig(total_tokens=1000, batch_size=10, lr=1.0, lr_warmup_steps=10,
                                            lr_decay_frac=0.2, sparsity_coefficient=2.0, sparsity_warmup_frac=0.1))
    assert tr.lr_at(0) == 0.1 and tr.lr_at(9) == 1.0 and tr.lr_at(50) == 1.0
    assert tr.lr_at(80) == 1.0 and abs(tr.lr_at(90) - 0.5) < 1e-9 and abs(tr.lr_at(99) - 0.05) < 1e-9
    assert tr.coefficient_at(0) == 0.2 and tr.coefficient_at(9) == 2.0 and tr.coefficient_at(500) == 2.0


def test_dead_latents_are_tracked_and_resampled():
    x, _ = sparse_data(n=512)
    sae = make_sae(SAEConfig(d_in=16, d_sae=32), seed=0)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # latents 0..7 can never fire
    tr = Trainer(sae, TensorSource(x, 64), TrainConfig(total_tokens=64 * 6, batch_size=64, dead_after_tokens=256,
                                                     sparsity_coefficient=0.0))
    tr.fit()
    assert tr.dead_mask[:8].all() and not tr.dead_mask[8:].all()
    batch = x[:64]
    n = tr.resample_dead(batch)
    assert n == int(tr.dead_mask.numel() - (~tr.dead_mask).sum()) or n >= 8
    assert not tr.dead_mask.any()
    with torch.no_grad():
        torch.testing.assert_close(sae.W_dec[:8].norm(dim=-1), torch.ones(8))
        assert (sae.b_enc[:8] == 0).all()
        # each new decoder row points at some (centred) input of the batch
        centred = batch - sae.b_dec
        centred = centred / centred.norm(dim=-1, keepdim=True)
        assert float((sae.W_dec[:8] @ centred.T).max(1).values.min()) > 0.999
        assert int((sae.encode(batch)[:, :8] != 0).sum()) > 0  # they fire again


def test_resampling_resets_the_gated_magnitude_path():
    x, _ = sparse_data(n=512)
    sae = make_sae(SAEConfig(d_in=16, d_sae=32, architecture="gated"), seed=0)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # these gates never open
        sae.r_mag[:8] = 3.0  # a stale magnitude scale and bias that a reborn latent must not inherit
        sae.b_mag[:8] = -5.0
    tr = Trainer(sae, TensorSource(x, 64), TrainConfig(total_tokens=64 * 6, batch_size=64, dead_after_tokens=256,
                                                     sparsity_coefficient=0.0))
    tr.fit()
    assert tr.dead_mask[:8].all()
    tr.resample_dead(x[:64])
    with torch.no_grad():
        assert (sae.r_mag[:8] == 0).all() and (sae.b_mag[:8] == 0).all()
        for p in (sae.r_mag, sae.b_mag):
            assert (tr.opt.state[p]["exp_avg"][:8] == 0).all()
        assert int((sae.encode(x[:64])[:, :8] != 0).sum()) > 0


class FlakySource:
    """A TensorSource that dies after ``fail_after`` batches, like a run killed mid-training."""

    def __init__(self, src: TensorSource, fail_after: int):
        self.src, self.left = src, fail_after

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return next(self.src)

    def state_dict(self):
        return self.src.state_dict()


def test_checkpoint_resume_is_exact(tmp_path):
    x, _ = sparse_data(n=1024)
    cfg = SAEConfig(d_in=16, d_sae=32)

    def train_cfg(folder):
        return TrainConfig(total_tokens=64 * 20, batch_size=64, checkpoint_dir=str(folder), checkpoint_every=5,
                           resample_every=4, dead_after_tokens=128, sparsity_coefficient=0.05, log_every=5)

    straight = Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=0), train_cfg(tmp_path / "a"))
    straight.fit()
    try:  # killed during step 13: the last checkpoint is at step 10
        Trainer(make_sae(cfg, seed=0), FlakySource(TensorSource(x, 64, seed=0), 12), train_cfg(tmp_path / "b")).fit()
    except KeyboardInterrupt:
        pass
    resumed_sae = make_sae(cfg, seed=1)  # a different init: everything must come from the checkpoint
    tr = Trainer(resumed_sae, TensorSource(x, 64, seed=0), train_cfg(tmp_path / "b"))
    assert tr.step == 10
    tr.fit()
    for (k, a), b in zip(straight.sae.state_dict().items(), resumed_sae.state_dict().values()):
        assert torch.equal(a, b), k
    assert tr.history == straight.history
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [CHECKPOINT_NAME]  # no temporaries


def test_training_is_scale_equivariant_with_scaled_bias_lr():
    """Activations x 4 with the l2 loss, bias lr x 4 and no clipping: the same SAE, biases x 4."""
    x, _ = sparse_data(n=1024)
    cfg = SAEConfig(d_in=16, d_sae=32)

    def train(c: float):
        tc = TrainConfig(total_tokens=64 * 40, batch_size=64, lr=3e-3, recon="l2", sparsity_coefficient=0.05,
                         grad_clip=None, bias_lr_scale=c, resample_every=10, dead_after_tokens=200)
        return train_sae(cfg, TensorSource(x, 64, seed=0, scale=c), tc)[0]

    a, b = train(1.0), train(4.0)
    torch.testing.assert_close(b.W_enc, a.W_enc, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b.W_dec, a.W_dec, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b.b_enc, 4 * a.b_enc, atol=4e-3, rtol=1e-3)
    torch.testing.assert_close(b.b_dec, 4 * a.b_dec, atol=4e-3, rtol=1e-3)


# --- resuming: only the same run continues ----------------------------------------------------------
import pytest  # noqa: E402

from lib.sae.trainer import CheckpointError, ResumeWarning  # noqa: E402


def _resume_setup(tmp_path, **overrides):
    x, _ = sparse_data(n=1024)
    cfg = SAEConfig(d_in=16, d_sae=32)
    base = dict(total_tokens=64 * 10, batch_size=64, checkpoint_dir=str(tmp_path), checkpoint_every=5,
                sparsity_coefficient=0.05, lr=1e-3)
    Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=0), TrainConfig(**base)).fit()
    return x, cfg, TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("field,value", [("lr", 3e-3), ("total_tokens", 64 * 20), ("sparsity_coefficient", 0.5)])
def test_resume_refuses_a_changed_configuration(tmp_path, field, value):
    x, cfg, changed = _resume_setup(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=rf"{field} .* in the checkpoint, .* now") as err:
        Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=0), changed)
    assert str(tmp_path / CHECKPOINT_NAME) in str(err.value)


def test_resume_accepts_changes_that_do_not_touch_the_math(tmp_path):
    x, cfg, changed = _resume_setup(tmp_path, log_every=7, checkpoint_every=3)
    assert Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=0), changed).step == 10


def test_a_finished_checkpoint_is_not_reused_with_new_data(tmp_path):
    x, cfg, same = _resume_setup(tmp_path)
    assert Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=0), same).step == 10  # same data: reused
    with pytest.raises(CheckpointError, match="different data.*finished"):
        Trainer(make_sae(cfg, seed=0), TensorSource(x + 1.0, 64, seed=0), same)
    with pytest.raises(CheckpointError, match="different data"):  # a different order is other data too
        Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=5), same)


class NoPositionSource:
    """A data source that cannot save its position (no state_dict)."""

    def __init__(self, src, fail_after: int | None = None):
        self.src, self.left = src, fail_after

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            raise KeyboardInterrupt
        if self.left is not None:
            self.left -= 1
        return next(self.src)


def test_resume_says_when_the_data_order_cannot_be_restored(tmp_path):
    x, _ = sparse_data(n=1024)
    cfg = SAEConfig(d_in=16, d_sae=32)
    tc = TrainConfig(total_tokens=64 * 20, batch_size=64, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    try:  # killed during step 8: the checkpoint at step 5 has no data position
        Trainer(make_sae(cfg, seed=0), NoPositionSource(TensorSource(x, 64), fail_after=7), tc).fit()
    except KeyboardInterrupt:
        pass
    with pytest.warns(ResumeWarning, match="data order cannot be restored"):
        tr = Trainer(make_sae(cfg, seed=0), NoPositionSource(TensorSource(x, 64)), tc)
    assert tr.step == 5


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x02garbage"])
def test_an_empty_or_truncated_checkpoint_is_named(tmp_path, content):
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    x, _ = sparse_data(n=256)
    tc = TrainConfig(total_tokens=64 * 4, batch_size=64, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="(?i)delete it") as err:
        Trainer(make_sae(SAEConfig(d_in=16, d_sae=32), seed=0), TensorSource(x, 64), tc)
    assert str(tmp_path / CHECKPOINT_NAME) in str(err.value)


def test_a_cut_real_checkpoint_is_named(tmp_path):
    x, cfg, same = _resume_setup(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        Trainer(make_sae(cfg, seed=0), TensorSource(x, 64, seed=0), same)
