"""lib.finetune: data mixing in the full fine-tune, and LoRA adapters (peft) merged into a bridge."""
from __future__ import annotations

import pytest
import torch

from lib import softprompts as sp
from lib.finetune import LORA_TARGETS, finetune, lora_finetune, lora_targets

PROMPTS, TARGETS = ["The city of Paris is in", "a banana"], [" France.", " shed."]
MIX = ["Alice went to the shed with a banana.", "The Spanish word 'gato' means 'cat'."]


def test_mixing_adds_the_corpus_loss_and_keeps_the_corpus(tiny_model_dirs):
    from lib.models import load_model

    plain, mixed = (load_model(tiny_model_dirs["neox"], device="cpu") for _ in range(2))
    corpus_nll = lambda m: sp.target_nll(m, None, [""] * 2, MIX).mean()  # noqa: E731
    start, target_start = corpus_nll(plain), sp.target_nll(plain, None, PROMPTS, TARGETS).mean()
    log_plain = finetune(plain, PROMPTS, TARGETS, steps=40, lr=3e-3, batch_size=2)
    log_mixed = finetune(mixed, PROMPTS, TARGETS, steps=40, lr=3e-3, batch_size=2, mix_texts=MIX, mix_rows=2)
    assert "mix_loss" not in log_plain and len(log_mixed["mix_loss"]) == 40
    assert log_mixed["mix_loss"][-1] < log_mixed["mix_loss"][0]  # the corpus term is trained too
    assert corpus_nll(mixed) < min(start, corpus_nll(plain))
    assert sp.target_nll(mixed, None, PROMPTS, TARGETS).mean() < 0.7 * target_start  # the targets are learned too
    with pytest.raises(ValueError, match="mix_texts"):
        finetune(plain, PROMPTS, TARGETS, steps=1, mix_rows=2)


def _lora_params(hf, targets, rank):
    """rank x (in + out) for every linear layer whose last name is a target: what LoRA adds."""
    total = 0
    for name, mod in hf.named_modules():
        if name.split(".")[-1] in targets and hasattr(mod, "weight") and mod.weight.dim() == 2:
            total += rank * sum(mod.weight.shape)
    return total


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_lora_trains_only_adapters_and_merges_into_a_new_bridge(arch, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    from lib.models import load_model

    base = load_model(tiny_model_dirs[arch], device="cpu")
    before = sp.target_nll(base, None, PROMPTS, TARGETS).mean()
    tuned, log = lora_finetune(tiny_model_dirs[arch], PROMPTS, TARGETS, rank=4, steps=40, lr=1e-2, batch_size=2,
                               device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
    assert log["trainable_params"] == _lora_params(hf, LORA_TARGETS[hf.config.model_type], 4)
    after = sp.target_nll(tuned, None, PROMPTS, TARGETS).mean()
    assert after < before - 2.0  # random tiny models: rank 4 gains 2.7 nats of 23 in 40 steps, then plateaus
    assert after == pytest.approx(log["loss"][-1], abs=0.1)  # the bridge scores what was trained
    assert sp.target_nll(load_model(tiny_model_dirs[arch], device="cpu"), None, PROMPTS, TARGETS).mean() == \
        pytest.approx(before, rel=1e-5)  # the saved model is untouched
    ids = torch.tensor([[0, 5, 9, 11]])
    assert torch.allclose(tuned(ids), tuned.original_model(ids).logits, atol=1e-5)  # the bridge runs the merged weights
    assert not any(p.requires_grad for p in tuned.parameters())
    emb = [n for n, _ in tuned.original_model.named_modules() if "lora" in n.lower()]
    assert not emb  # merged: no adapter modules left


def test_lora_seed_and_target_errors(tiny_model_dirs):
    a, _ = lora_finetune(tiny_model_dirs["neox"], PROMPTS, TARGETS, rank=2, steps=5, seed=0, device="cpu")
    b, _ = lora_finetune(tiny_model_dirs["neox"], PROMPTS, TARGETS, rank=2, steps=5, seed=0, device="cpu")
    c, _ = lora_finetune(tiny_model_dirs["neox"], PROMPTS, TARGETS, rank=2, steps=5, seed=1, device="cpu")
    ids = torch.tensor([[0, 5, 9, 11]])
    assert torch.equal(a(ids), b(ids)) and not torch.equal(a(ids), c(ids))
    with pytest.raises(ValueError, match="no LoRA target modules known"):
        lora_targets("mamba")
