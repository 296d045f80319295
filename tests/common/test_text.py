"""Noun text embeddings: the 14 ViLD templates averaged, cached per noun, the same whatever the batching."""

from __future__ import annotations

import open_clip
import pytest
import torch

from ovseg_mine.models import load_clip
from ovseg_mine.text import VILD_TEMPLATES, NounEmbeddings


class _CountingText(torch.nn.Module):
    """Stand-in text tower: the embedding is a fixed function of the tokens; counts calls and sequences."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.sequences = 0

    def encode_text(self, tokens):
        self.calls += 1
        self.sequences += len(tokens)
        return torch.stack(
            [tokens.float().sum(1), tokens.float().max(1).values, tokens.shape[1] * torch.ones(len(tokens))], 1
        )


def test_embeddings_average_the_14_vild_templates_and_are_cached():
    assert len(VILD_TEMPLATES) == 14 and VILD_TEMPLATES[0] == "a photo of a {}."
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    model = _CountingText()
    cache = NounEmbeddings(model, tokenizer, "cpu")
    emb = cache.embed(["dog", "fire hydrant", "dog"])
    assert emb.shape == (3, 3) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    feats = model.encode_text(tokenizer([t.format("dog") for t in VILD_TEMPLATES]))
    feats = feats / feats.norm(dim=1, keepdim=True)
    torch.testing.assert_close(emb[0], feats.mean(0) / feats.mean(0).norm())
    calls = model.calls
    cache.embed(["fire hydrant", "dog"])
    assert model.calls == calls and len(cache) == 2
    assert cache.embed([]).shape == (0, 0)


def test_nouns_per_call_batches_the_text_tower_without_changing_the_embeddings():
    model, tokenizer, _ = load_clip("ovseg-tiny-vit", "random")
    names = ["person", "fire hydrant", "cat", "dog", "teddy bear"]
    one = NounEmbeddings(model, tokenizer, "cpu", nouns_per_call=1).embed(names)
    batched = NounEmbeddings(model, tokenizer, "cpu", nouns_per_call=2).embed(names)
    torch.testing.assert_close(one, batched, rtol=0, atol=1e-5)
    counting = _CountingText()
    NounEmbeddings(counting, tokenizer, "cpu", nouns_per_call=2).embed(names)
    assert (counting.calls, counting.sequences) == (3, 5 * 14)


def test_a_nouns_embedding_does_not_depend_on_the_nouns_tokenized_with_it():
    """Mining embeds a batch's new nouns together, one noun per text-tower call: each is bit-identical to the noun
    embedded alone, whatever came with it."""
    model, tokenizer, _ = load_clip("ovseg-tiny-vit", "random")
    names = ["person", "fire hydrant", "cat", "dog", "teddy bear"]
    together = NounEmbeddings(model, tokenizer, "cpu", nouns_per_call=1).embed(names)
    for name, row in zip(names, together, strict=True):
        assert torch.equal(NounEmbeddings(model, tokenizer, "cpu", nouns_per_call=1).embed([name])[0], row)


def test_bad_templates_and_batch_sizes_are_refused():
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with pytest.raises(ValueError, match="exactly one"):
        NounEmbeddings(_CountingText(), tokenizer, "cpu", templates=["a {} and a {}"])
    with pytest.raises(ValueError, match="nouns_per_call"):
        NounEmbeddings(_CountingText(), tokenizer, "cpu", nouns_per_call=0)
