"""The stand-ins for GPT-2, Pythia and Llama (``tests.tiny_models.build_standin``): each family's
special-token conventions as a notebook meets them, and the library paths that padding, BOS and a pad
id equal to BOS could break, on every family (issue 25's first step)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.activations import harvest, sequence_logprobs, tokenize
from lib.hooks import hook_name
from lib.models import load_model, prepend_bos_default
from lib.sae.base import SAEConfig, make_sae
from lib.sae.metrics import evaluate
from tests.tiny_models import FAMILIES

TEXTS = ["The city of Paris is in France.", "The Spanish word 'gato' means 'cat'.",
         "Seventy-seven is larger than eighty-seven. That is false."]


@pytest.fixture(scope="module")
def standins(standin_dirs) -> dict:
    return {family: load_model(path, device="cpu") for family, path in standin_dirs.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standin_has_the_family_special_tokens(standins, family):
    model = standins[family]
    tok = model.tokenizer
    bos, eos, _, prepends = FAMILIES[family]
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == bos and tok.convert_ids_to_tokens(tok.eos_token_id) == eos
    assert (tok.bos_token_id == tok.eos_token_id) == (family != "llama")
    # the saved tokenizer has no pad token; the bridge pads with EOS, as TransformerLens does for GPT-2
    assert tok.pad_token_id == tok.eos_token_id
    assert prepend_bos_default(model) is prepends
    first = model.to_tokens(TEXTS[0])[0, 0].item()
    assert (first == tok.bos_token_id) is prepends
    # statements tokenize as in the toy models
    toy = load_model("toy-4l", device="cpu").tokenizer
    assert tok(TEXTS[0], add_special_tokens=False)["input_ids"] == toy(TEXTS[0], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padding_with_the_bos_id_changes_no_read(standins, family):
    """With pad = EOS (= BOS for GPT-2 and Pythia), a text read in a padded batch gives what it gives
    alone: the last-token activation, the whole-text log-probability, the SAE's counted tokens."""
    model = standins[family]
    hook = hook_name(1)
    together = harvest(model, TEXTS, hook, "last", prepend_bos=True, cache=False)[hook]
    alone = torch.cat([harvest(model, [t], hook, "last", prepend_bos=True, cache=False)[hook] for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    lp_together = sequence_logprobs(model, TEXTS, prepend_bos=True)
    lp_alone = np.array([sequence_logprobs(model, [t], prepend_bos=True)[0] for t in TEXTS])
    np.testing.assert_allclose(lp_together, lp_alone, rtol=1e-4)
    batch = tokenize(model, TEXTS, 64, pad_to=64)
    n_text_tokens = sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert batch.n_real == n_text_tokens + len(TEXTS)  # one BOS each, however BOS and pad share an id
    sae = make_sae(SAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, hook_name=hook), seed=0)
    metrics = evaluate(sae, model, batch)
    assert metrics["n_tokens"] == n_text_tokens and metrics["n_ce_tokens"] == n_text_tokens
