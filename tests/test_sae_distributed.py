"""Data-parallel SAE training: 2 gloo processes under torchrun against 1 process, and resume with 2 ranks.

The runs go through the real entry points (``python -m lib.sae.train`` and ``torchrun --standalone``),
on saved activations, TopK SAE with the sparse kernels, and a global batch of 64 rows.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from lib.sae.io import load_sae
from lib.sae.train import launch, load_config, make_data
from lib.sae.distributed import World

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
D_IN, D_SAE, BATCH, STEPS = 12, 48, 64, 24


def _config(folder, name, arch="topk", **train) -> str:
    acts = folder / "acts.pt"
    if not acts.exists():
        g = torch.Generator().manual_seed(0)
        directions = torch.randn(30, D_IN, generator=g)
        codes = torch.rand(2000, 30, generator=g) * (torch.rand(2000, 30, generator=g) < 0.1)
        torch.save(codes @ directions, acts)
    cfg = {"sae": {"d_in": D_IN, "d_sae": D_SAE, "architecture": arch, "k": 4},
           "train": {"total_tokens": STEPS * BATCH, "batch_size": BATCH, "lr": 3e-3, "log_every": 4,
                     "dead_after_tokens": 5 * BATCH, "resample_every": 8 if arch == "relu" else None,
                     "sparsity_coefficient": 0.3, **train},
           "data": {"activations": "acts.pt"}, "out": f"sae_{name}"}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _weights(folder, name):
    sae = load_sae(folder / f"sae_{name}")
    return sae.state_dict(), json.loads((folder / f"sae_{name}" / "history.json").read_text())


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_two_gloo_ranks_train_the_same_sae_as_one_process(tmp_path, arch):
    launch(_config(tmp_path, "one", arch), nproc=1)
    launch(_config(tmp_path, "two", arch), nproc=2)
    one, h1 = _weights(tmp_path, "one")
    two, h2 = _weights(tmp_path, "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(one["W_dec"], load_sae(tmp_path / "sae_one").W_dec.new_zeros(D_SAE, D_IN))
    # the logged loss is the global batch's (averaged over ranks), step for step
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for a, b in zip(h1, h2):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"]))
        assert a["frac_alive"] == b["frac_alive"]  # dead-latent bookkeeping agrees across ranks


def test_two_ranks_resume_from_rank_zeros_checkpoint(tmp_path):
    """Stopped at step 10 and started again, two ranks end where an uninterrupted two-rank run ends."""
    launch(_config(tmp_path, "straight", checkpoint_dir="ckpt_straight"), nproc=2)
    cfg = _config(tmp_path, "resumed", checkpoint_dir="ckpt_resumed", checkpoint_every=5)
    launch(cfg, nproc=2, stop_at=10)
    ckpt = torch.load(tmp_path / "ckpt_resumed" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 10 and not (tmp_path / "sae_resumed").exists()  # stopped, nothing final written
    assert not list((tmp_path / "ckpt_resumed").glob(".*.tmp"))  # written atomically, once, by rank 0
    launch(cfg, nproc=2)
    straight, _ = _weights(tmp_path, "straight")
    resumed, hist = _weights(tmp_path, "resumed")
    assert hist[-1]["step"] == STEPS
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-6, msg=name)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    cfg = load_config(_config(tmp_path, "odd"))
    cfg["train"]["batch_size"] = 63
    with pytest.raises(ValueError, match="does not divide over 2 processes"):
        make_data(cfg, World(rank=0, size=2), torch.device("cpu"))


def test_a_failed_run_reports_the_processes_error(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"sae": {"d_in": D_IN, "d_sae": D_SAE}, "train": {"total_tokens": 640, "batch_size": 64},
                               "data": {"activations": "missing.pt"}}))
    with pytest.raises(RuntimeError, match="failed with exit code"):
        launch(cfg, nproc=2)


def test_train_on_with_two_processes_gives_the_one_process_sae():
    """The notebooks' ``sae_processes`` parameter: lib.sae.recipe.train_on(..., processes=2)."""
    from lib.sae.recipe import train_on

    acts = torch.randn(1024, D_IN, generator=torch.Generator().manual_seed(3))
    kw = dict(total_tokens=16 * BATCH, batch_size=BATCH, seed=1, architecture="topk", sae_kwargs={"k": 4})
    one = train_on(acts, "blocks.0.hook_resid_post", D_SAE, 0.0, **kw)
    two = train_on(acts, "blocks.0.hook_resid_post", D_SAE, 0.0, processes=2, **kw)
    assert two.cfg == one.cfg
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_a_failing_rank_says_why_in_the_error(tmp_path):
    """A rank's own exception reaches the caller (from torchrun's per-rank log), not only torchrun's summary."""
    cfg = _config(tmp_path, "broken")
    (tmp_path / "acts.pt").unlink()
    with pytest.raises(RuntimeError) as err:
        launch(cfg, nproc=2)
    msg = str(err.value)
    assert "--- rank 1" in msg and "--- rank 0" in msg
    assert "No such file or directory" in msg.split("--- rank 1")[1]
