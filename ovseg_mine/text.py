"""Noun and class-name embeddings of a frozen text tower, computed in batches and cached.

The same prompt ensemble as mining (:data:`ovseg_mine.mine.matching.VILD_TEMPLATES`: each template's embedding
L2-normalized, averaged over the 14 templates, normalized again; OVSeg's text side), but all new nouns of a
call go through the text tower together (``batch`` sequences per ``encode_text`` call) instead of one noun per
call: training meets thousands of nouns, and one call per noun is dominated by per-call overhead.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ovseg_mine.mine.matching import VILD_TEMPLATES


class NounEmbeddings:
    """Cached, prompt-ensembled, unit-norm text embeddings.

    Args:
        model: an open_clip CLIP (``encode_text``); its text tower is not trained.
        tokenizer: list[str] -> int64 ``[N, L]``.
        device: where the model lives.
        templates: prompt templates with one ``{}`` (default: the 14 ViLD templates).
        batch: text sequences per ``encode_text`` call.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: Any,
        templates: Sequence[str] = VILD_TEMPLATES,
        batch: int = 512,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.templates, self.batch = tuple(templates), batch
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def embed(self, nouns: Sequence[str]) -> torch.Tensor:
        """float32 ``[len(nouns), D]`` unit-norm embeddings on ``device``, in the order given (a plain tensor,
        usable in autograd graphs)."""
        new = [n for n in dict.fromkeys(nouns) if n not in self._cache]
        texts = [t.format(n) for n in new for t in self.templates]
        feats = []
        with torch.no_grad():
            for s in range(0, len(texts), self.batch):
                tokens = self.tokenizer(texts[s : s + self.batch]).to(self.device)
                feats.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        if new:
            mean = torch.cat(feats).view(len(new), len(self.templates), -1).mean(dim=1)
            for noun, vec in zip(new, torch.nn.functional.normalize(mean, dim=-1), strict=True):
                self._cache[noun] = vec
        if not nouns:
            return torch.empty((0, 0), device=self.device)
        return torch.stack([self._cache[n] for n in nouns])
