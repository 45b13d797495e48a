"""Models nobody here wrote: Hugging Face GPT-2, Llama and BERT built from configs at
random init (no downloads). Every recipe covers >= 95% of their forward+backward GEMM
FLOPs outside what it keeps in high precision on purpose, and a short training of each
causal LM on real text (the King James Bible) ends within 5% of FP32's loss."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.experiments.data import load_kjv

transformers = pytest.importorskip("transformers")

VOCAB = 96


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    return transformers.BertForMaskedLM(config)


@pytest.mark.parametrize("build", [gpt2, llama, bert])
@pytest.mark.parametrize("recipe", ["fp16", "bf16", "fp8", "fp8-hybrid"])
def test_coverage_of_hugging_face_models(build, recipe: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 32))
    report = mixprec.coverage(build(), {"input_ids": ids}, recipe)
    assert report.share_outside_kept >= 0.95, str(report)
    assert {call.op for call in report.calls if call.emulated} >= {"sdpa.qk", "sdpa.pv"}  # attention too
    if recipe.startswith("fp8"):
        assert report.kept  # embeddings and head, said in the report
    else:
        assert report.share >= 0.95


def _train(build, recipe: str, corpus, steps: int = 40) -> float:
    torch.manual_seed(0)
    model = mixprec.convert(build(), recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler = mixprec.GradScaler(recipe)
    data = corpus.split()[0]
    sampler = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        offsets = torch.randint(0, len(data) - 33, (8,), generator=sampler)
        ids = data[offsets[:, None] + torch.arange(32)]
        loss = model(input_ids=ids, labels=ids).loss.float()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.slow
@pytest.mark.parametrize("build", [gpt2, llama])
def test_causal_lms_train_on_real_text_within_5_percent_of_fp32(build) -> None:
    corpus = load_kjv()
    assert corpus.vocabulary_size <= VOCAB
    fp32 = _train(build, "fp32", corpus)
    assert fp32 < 3.3  # it learned (ln 96 = 4.56 at the start)
    for recipe in ("fp16", "bf16", "fp8", "fp8-hybrid"):
        loss = _train(build, recipe, corpus)
        assert abs(loss - fp32) / fp32 < 0.05, (recipe, loss, fp32)
