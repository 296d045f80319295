"""``engine.compile`` (ovseg_mine.mine.algorithms.compiled) with TorchInductor on a CPU and the tiny SAM and CLIP: each
part is one graph without a break, compiles are counted per new shape, ``reduce-overhead`` runs as ``default`` off
CUDA with one notice, and (slow: Inductor's C++ compiles take about a minute on 2 cores) compiled parts equal eager
ones, three image sizes compile each part once, and a compiled mining run gives the same pairs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine.config import build_config
from ovseg_mine.mine.algorithms import compiled as compiled_module
from ovseg_mine.mine.algorithms.compiled import CompiledParts, compile_part
from ovseg_mine.mine.algorithms.engine import ImageJob, MiningEngine
from ovseg_mine.mine.algorithms.matching import call_sizes
from ovseg_mine.models import load_clip, load_sam

NOUNS = [["dog", "bed"], ["man", "snowboard", "slope"], ["player"]]
#: The graphs each part may compile in a run of mixed image sizes (the bounds in the compiled module's docstring,
#: with pooled CLIP calls: one call size).
BOUNDS = {"sam_encoder": 1, "sam_decoder": 1, "clip_image": 1}


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """A fresh Inductor cache for this module (the compiles do not depend on an earlier run's), and Dynamo's
    in-memory graphs dropped before and after (counts start at zero)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        torch.compiler.reset()
        yield
        torch.compiler.reset()


def _engine(compile: str, *overrides: str) -> MiningEngine:
    # 3 x 3 points in batches of 4: each image's last decoder call has 1 prompt (padded to 4 when compiled)
    cfg = build_config(
        "smoke",
        ["sam.points_per_side=3", "sam.points_per_batch=4", f"engine.compile='{compile}'", *overrides],
    )
    sam, _ = load_sam("tiny", "random", seed=0)
    clip, tokenizer, _ = load_clip("ovseg-tiny-vit", "random", seed=0)
    return MiningEngine(cfg, sam, clip, tokenizer, torch.device("cpu"))


@pytest.fixture(scope="module")
def images(sample) -> list[np.ndarray]:
    """Three COCO images of three sizes (426 x 640, 480 x 640, 400 x 500)."""
    found = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((sample / "images").glob("*.jpg"))[:3]]
    assert len({image.shape for image in found}) == 3
    return found


def _jobs(engine: MiningEngine, images: list[np.ndarray]) -> list[ImageJob]:
    return [
        ImageJob(i, engine.to_device(image), engine.to_device(engine.resize_for_sam(image)), nouns)
        for i, (image, nouns) in enumerate(zip(images, NOUNS[: len(images)], strict=True))
    ]


def test_off_is_the_function_itself_and_a_bad_mode_a_clear_error():
    def double(x):
        return 2 * x

    assert compile_part("double", double, "off", "cpu") is double
    parts = CompiledParts("off", "cpu")
    assert parts.wrap("double", double) is double and parts.stats() == {}
    with pytest.raises(ValueError, match="compile mode"):
        CompiledParts("max-autotune", "cpu")


GPU_RULES = ["engine.device_rules='cuda'", "sam.precision='bf16'", "clip.precision='bf16'"]


@pytest.mark.parametrize("rules", [[], GPU_RULES], ids=["cpu-rules", "gpu-rules"])
def test_each_part_is_one_graph_without_a_break(images, rules):
    """``torch._dynamo.explain`` of the encoder, the decoder step and CLIP's image tower, with the inputs mining
    gives them, under a CPU's rules (fp32) and a GPU's (bf16 weights, SDPA attention, pooled CLIP calls)."""
    engine = _engine("off", *rules)
    sam, size = engine.sam, images[0].shape[:2]
    assert sam.dtype == (torch.bfloat16 if rules else torch.float32)
    with torch.inference_mode():
        x = torch.zeros((sam.encoder_batch_size, 3, sam.img_size, sam.img_size), dtype=sam.dtype)
        encoder = sam.sam.prompt_encoder
        features = torch.randn((1, encoder.embed_dim, *encoder.image_embedding_size)).to(sam.decoder_dtype)
        prompts = sam._sparse_prompts(size)[: sam.points_per_batch]  # noqa: SLF001 (the decoder's own input)
        crops = torch.zeros((engine.cfg.clip.batch_size, 3, engine.input_size, engine.input_size))
        crops = crops.to(next(engine.clip.parameters()).dtype)
        for part, args in [
            (sam._encoder, (x,)),  # noqa: SLF001
            (sam._stock_step, (features, prompts)),  # noqa: SLF001
            (engine.clip.encode_image, (crops,)),
        ]:
            explained = torch._dynamo.explain(part)(*args)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_new_shape_is_a_new_graph_counted_and_logged(caplog):
    parts = CompiledParts("default", "cpu")
    affine = parts.wrap("affine", lambda x: 2 * x + 1)
    with caplog.at_level(logging.INFO, logger="ovseg_mine"):
        for n in (3, 3, 4, 3):
            assert torch.equal(affine(torch.ones(n)), torch.full((n,), 3.0))
    stats = parts.stats()["affine"]
    assert (stats["mode"], stats["compiles"], stats["calls"], stats["eager_calls"]) == ("default", 2, 4, 0)
    assert stats["seconds"] > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled affine")]
    assert len(lines) == 2 and "[3] float32" in lines[0] and "[4] float32" in lines[1]
    # past Dynamo's recompile limit (fullgraph=True raises there) a new shape runs eagerly, warned once, counted
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.INFO, logger="ovseg_mine"):
        for n in (5, 6, 3):
            assert torch.equal(affine(torch.ones(n)), torch.full((n,), 3.0))
    stats = parts.stats()["affine"]
    assert (stats["compiles"], stats["calls"], stats["eager_calls"]) == (2, 7, 2)
    assert sum("recompile limit" in r.getMessage() for r in caplog.records) == 1


def test_reduce_overhead_on_a_cpu_tells_once_and_runs_as_default(monkeypatch, caplog):
    """Three parts asked for CUDA graphs on a CPU, in a process that has not been told yet: one notice."""
    monkeypatch.setattr(compiled_module, "_fallback_told", False)
    with caplog.at_level(logging.INFO, logger="ovseg_mine"):
        parts = CompiledParts("reduce-overhead", "cpu")
        triple = parts.wrap("triple", lambda x: 3 * x)
        alone = compile_part("alone", lambda x: x - 1, "reduce-overhead", torch.device("cpu"))
        CompiledParts("reduce-overhead", "cpu")
        x = torch.arange(4.0)
        assert torch.equal(triple(x), 3 * x)  # one Inductor compile: they take seconds
    assert [parts.mode, alone.stats.mode, parts.stats()["triple"]["mode"]] == ["default"] * 3
    assert parts.stats()["triple"]["compiles"] == 1
    notices = [r for r in caplog.records if "reduce-overhead" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING
    assert "runs as 'default'" in notices[0].getMessage()


@pytest.fixture(scope="module", params=["stock", "fused"])
def mined(images, request):
    """The three images mined one at a time by an eager and a compiled engine (pooled CLIP calls; stock kernels,
    then fused ones: the fused decoder, selection and crop chunks), then the first two as one batch by the compiled
    engine; the compiled engine's compile counts after the first image and after all runs."""
    kernels = f"engine.kernels='{request.param}'"
    eager = _engine("off", "engine.batching='pooled'", kernels)
    compiled = _engine("default", "engine.batching='pooled'", kernels)
    torch.compiler.reset()
    expected = [eager.mine([job])[0] for job in _jobs(eager, images)]
    got, counts, jobs = [], [], _jobs(compiled, images)
    for job in jobs:
        got.append(compiled.mine([job])[0])
        counts.append({name: stats["compiles"] for name, stats in compiled.compile_stats().items()})
    got += compiled.mine(jobs[:2])
    expected += expected[:2]
    counts.append({name: stats["compiles"] for name, stats in compiled.compile_stats().items()})
    return eager, compiled, expected, got, counts


@pytest.mark.slow
def test_three_image_sizes_compile_each_part_once(mined):
    _, engine, *_, counts = mined
    if engine.fused:  # the chunk bodies: the image size is dynamic, so sizes add no graph (compiled.py's bounds)
        stats = engine.compile_stats()
        assert stats["crop_chunk"]["buckets"] == 1 and 1 <= counts[-1].pop("crop_chunk") <= 2
        assert 1 <= counts[-1].pop("select_chunk") <= stats["select_chunk"]["buckets"] + 1
        for count in counts[:-1]:
            count.pop("crop_chunk", None), count.pop("select_chunk", None)
    assert counts[0] == BOUNDS  # the first image compiles every part
    assert counts[-1] == BOUNDS  # the other sizes, and a batch of two, reuse its graphs


@pytest.mark.slow
def test_a_compiled_mining_run_gives_the_same_pairs(mined):
    _, _, expected, got, _ = mined
    assert [o.num_proposals for o in got] == [16] * 5  # the smoke recipe's cap: the selection ran
    for a, b in zip(expected, got, strict=True):
        assert (a.num_proposals, a.num_generated, a.num_matches) == (b.num_proposals, b.num_generated, b.num_matches)
        assert [(m.noun_index, m.mask_index, m.bbox, m.area) for m in a.matches] == [
            (m.noun_index, m.mask_index, m.bbox, m.area) for m in b.matches
        ]
        for x, y in zip(a.matches, b.matches, strict=True):
            assert np.array_equal(x.runs, y.runs)
            for key in ("similarity", "probability", "predicted_iou", "stability_score"):
                assert getattr(x, key) == pytest.approx(getattr(y, key), abs=1e-5)


@pytest.mark.slow
def test_compiled_parts_equal_eager_ones(mined, images):
    """Each compiled part (its graph from the run above: no new compile) against its own eager function, on the
    inputs mining gives it. Measured differences: encoder 2e-6 (outputs up to 4), decoder 2e-7, CLIP 6e-7."""
    _, engine, *_ = mined
    sam, size = engine.sam, images[1].shape[:2]
    job = _jobs(engine, images[1:2])[0]
    before = {name: stats["compiles"] for name, stats in engine.compile_stats().items()}
    with torch.inference_mode():
        x = torch.zeros((sam.encoder_batch_size, 3, sam.img_size, sam.img_size))
        x[0, :, : job.sam_image.shape[1], : job.sam_image.shape[2]] = (job.sam_image - 114.0) / 58.0
        features = sam._encoder.fn(x)  # noqa: SLF001
        prompts = sam._sparse_prompts(size)[: sam.points_per_batch]  # noqa: SLF001
        # a call size the run used: 16 crops per image go in calls of the smallest pooled size (matching.call_sizes)
        crops = torch.randn((call_sizes(engine.cfg.clip.batch_size)[-1], 3, engine.input_size, engine.input_size))
        for part, args in [
            (sam._encoder, (x,)),  # noqa: SLF001
            (sam._step, (sam._fused.context(features[:1]) if engine.fused else features[:1], prompts)),  # noqa: SLF001
            (engine.clip.encode_image, (crops,)),
        ]:
            torch.testing.assert_close(part(*args), part.fn(*args), atol=1e-5, rtol=1e-5)
    assert {name: stats["compiles"] for name, stats in engine.compile_stats().items()} == before
