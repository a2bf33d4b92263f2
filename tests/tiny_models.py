"""Tiny randomly initialised models of the real architectures, built offline from configs.

The real-model code paths (``load_model`` on a Hugging Face directory, hooks, tokenizers) are
exercised on these instead of downloading ``gpt2`` / Pythia / Llama.  Each builder writes a
complete Hugging Face directory (config, safetensors weights, fast BPE tokenizer with BOS, EOS
and its own PAD token) and returns its path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
TEXT = [
    "The city of Paris is in France. That is true.",
    "The city of Tokyo is not in Chile. That is true.",
    "The Spanish word 'gato' means 'cat'. Fifty-one is larger than fifty-two. That is false.",
    "Alice went to the shed with a banana.",
]
ARCHITECTURES = ("gpt2", "neox", "llama")


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[2]
    )


def build_tiny_model(arch: str, directory: str | Path, d_model: int = 32, n_layers: int = 2,
                     n_ctx: int = 64, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` model ("gpt2" | "neox" | "llama") to ``directory``."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, vocab_size=len(tok))
    if arch == "gpt2":
        cfg = GPT2Config(n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = GPTNeoXConfig(max_position_embeddings=n_ctx, hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=2, intermediate_size=4 * d_model,
                            use_parallel_residual=False, **ids)
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(max_position_embeddings=n_ctx, hidden_size=d_model, num_hidden_layers=n_layers,
                          num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * d_model, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    directory = Path(directory)
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# stand-ins for the real families: the toy world's tokenizer, each family's special-token rules
# --------------------------------------------------------------------------------------------
FAMILIES = {
    # family: (BOS, EOS, pad, whether TransformerLens prepends BOS by default)
    "gpt2": ("<|eos|>", "<|eos|>", None, True),  # GPT-2: one <|endoftext|> is BOS and EOS, no pad token
    "neox": ("<|eos|>", "<|eos|>", None, False),  # Pythia: the same, and to_tokens does not prepend BOS
    "llama": ("<|bos|>", "<|eos|>", None, True),  # Llama: <s> BOS (prepended), </s> EOS, no pad token
}


def standin_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The toy world's BPE tokenizer (statements tokenize as in the toy models) with ``family``'s
    special-token conventions (``FAMILIES``): no pad token, and BOS = EOS for GPT-2 and Pythia."""
    from lib import paths
    from lib.world.registry import DEFAULT_MODEL

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    base = PreTrainedTokenizerFast.from_pretrained(paths.models_dir() / DEFAULT_MODEL)
    bos, eos, pad, _ = FAMILIES[family]
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token=bos, eos_token=eos,
                                   pad_token=pad, padding_side="right")


def build_standin(family: str, directory: str | Path, d_model: int = 64, n_layers: int = 4, n_ctx: int = 256,
                  seed: int = 0) -> Path:
    """Write a tiny random model of ``family``'s architecture with :func:`standin_tokenizer` to
    ``directory``: what a notebook meets when ``model`` is a real GPT-2, Pythia or Llama folder.  Four
    blocks, as the toy default has, so that the notebooks' default layers exist; the Llama stand-in
    shares one key/value head between its query heads (grouped-query attention, as Llama 3 does)."""
    torch.manual_seed(seed)
    tok = standin_tokenizer(family)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None, vocab_size=len(tok))
    heads = max(2, d_model // 32)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=heads,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    elif family == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(max_position_embeddings=n_ctx, hidden_size=d_model,
                                                 num_hidden_layers=n_layers, num_attention_heads=heads,
                                                 intermediate_size=4 * d_model, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=n_ctx, hidden_size=d_model,
                                             num_hidden_layers=n_layers, num_attention_heads=heads,
                                             num_key_value_heads=1, intermediate_size=2 * d_model, **ids))
    directory = Path(directory)
    model.eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
