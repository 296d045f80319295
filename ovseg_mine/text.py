"""Text embeddings of nouns and class names: the prompt ensemble OVSeg's text side uses, in one place.

Mining matches nouns against masked crops (:mod:`ovseg_mine.mine.algorithms.matching`), finetuning uses the nouns as the
contrastive loss's classes (:mod:`ovseg_mine.finetune.train`) and evaluation classifies ground-truth masks among
category names (:mod:`ovseg_mine.finetune.evaluate`): all three embed a word the same way. Each of the 14 ViLD
prompt templates (Gu et al., ICLR 2022, as OVSeg uses them: ``open_vocab_seg/utils/predefined_templates``)
is filled with the word and encoded by the frozen text tower, each template's embedding is L2-normalized, the 14
are averaged and the mean normalized again. Embeddings are computed once per word and cached.

The new words of a call are tokenized together and their tokens sent to the device in one copy (from pinned
memory and without blocking the host on CUDA), then encoded ``nouns_per_call`` words at a time: a word's tokens,
hence its embedding, do not depend on the words tokenized with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch

#: The 14 ViLD prompt templates (Gu et al., ICLR 2022), as used by OVSeg's text side.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


#: New words tokenized together (rounded down to a multiple of ``nouns_per_call``): their tokens take one copy to
#: the device (256 words x 14 templates x 77 int64 tokens: 2.2 MB).
TOKENIZED_TOGETHER = 256


class NounEmbeddings:
    """Cached, prompt-ensembled, unit-norm text embeddings of nouns (or class names).

    Args:
        model: an open_clip CLIP (``encode_text``); its text tower is not trained. Its weights may be float32 or
            cast to bf16/fp16 (:func:`ovseg_mine.precision.cast_model`); embeddings are float32 either way.
        tokenizer: ``open_clip.get_tokenizer(arch)``: list[str] -> int64 ``[N, L]``.
        device: where the model lives.
        templates: prompt templates with exactly one ``{}`` each (default: the 14 ViLD templates).
        nouns_per_call: new words that go through ``encode_text`` together (``nouns_per_call * len(templates)``
            sequences per call). Training and evaluation meet thousands of words, and one call per word is
            dominated by per-call overhead. Mining uses 1: a word's embedding is then computed by the same
            kernels whatever other words an actor met first, so it does not depend on the order of the data.
        precision: ``ovseg_mine.precision`` name to run the text tower in (``amp_*`` autocasts).

    Raises:
        ValueError: a template without exactly one ``{}``, or ``nouns_per_call < 1``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[[list[str]], "torch.Tensor"],
        device: Any,
        templates: Sequence[str] = VILD_TEMPLATES,
        *,
        nouns_per_call: int = 32,
        precision: str = "fp32",
    ) -> None:
        import torch

        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError("each prompt template must contain exactly one '{}'")
        if nouns_per_call < 1:
            raise ValueError(f"nouns_per_call must be at least 1, got {nouns_per_call}")
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.templates, self.nouns_per_call, self.precision = tuple(templates), nouns_per_call, precision
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def embed(self, nouns: Sequence[str]) -> "torch.Tensor":
        """float32 ``[len(nouns), D]`` unit-norm embeddings on ``device``, in the order given; ``[0, 0]`` for no
        noun. A plain tensor (computed under ``no_grad``), usable as a constant in autograd graphs."""
        import torch
        from torch.nn.functional import normalize

        from ovseg_mine.precision import autocast

        new = [n for n in dict.fromkeys(nouns) if n not in self._cache]
        per_call, width = self.nouns_per_call, len(self.templates)
        group = per_call * max(1, TOKENIZED_TOGETHER // per_call)  # words whose tokens go to the device together
        with torch.no_grad(), autocast(self.precision, self.device):
            for first in range(0, len(new), group):
                words = new[first : first + group]
                tokens = self._tokens(words)  # [len(words) * width, L] on the device
                for start in range(0, len(words), per_call):
                    chunk = words[start : start + per_call]
                    feats = self.model.encode_text(tokens[start * width : (start + len(chunk)) * width])
                    feats = normalize(feats.float(), dim=-1)
                    mean = normalize(feats.view(len(chunk), width, -1).mean(dim=1), dim=-1)
                    self._cache.update(zip(chunk, mean, strict=True))
        if not nouns:
            return torch.empty((0, 0), device=self.device)
        return torch.stack([self._cache[n] for n in nouns])

    def _tokens(self, words: Sequence[str]) -> "torch.Tensor":
        """int64 ``[len(words) * len(templates), L]`` tokens of every template filled with every word (word-major),
        on the device: one copy from pinned memory that does not block the host on CUDA, none on a CPU."""
        tokens = self.tokenizer([t.format(n) for n in words for t in self.templates])
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        return tokens.to(self.device, non_blocking=True)  # on a CPU: the tokens themselves
