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
