"""The CT CLIP pipeline: preprocessing + model + library, on a small randomly initialised model (structure checks that
do not depend on training) and on the shipped demo checkpoint (behaviour that depends on it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.labels import LABELS
from engine.models.ctclip import zero_shot_prompts
from engine.pipelines.base import Cancelled
from engine.pipelines.ctclip import CTClipPipeline
from engine.query import check_query_text
from engine.settings import ctclip_dir
from engine.study_library import StudyLibrary
from engine.volume import read_ct
from tests.tiny_models import TINY_SHAPE, TINY_SPACING, tiny_ctclip_config


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A real CT CLIP with small towers (random CT-ViT, pretrained MiniLM text tower) saved and reloaded as assets are;
    the pipeline takes its preprocessing from the folder (preprocessing.json)."""
    from engine.models.ctclip import CTCLIP

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_ctclip")
    CTCLIP.build(tiny_ctclip_config()).save_pretrained(directory)
    model = CTCLIP.from_pretrained(directory)
    return CTClipPipeline(model, model_id="tiny-test")


def test_preprocessing_comes_from_the_checkpoint_folder(tiny_pipeline):
    assert tiny_pipeline.preprocessing.shape_zyx == TINY_SHAPE
    assert tiny_pipeline.preprocessing.spacing_xyz == pytest.approx(TINY_SPACING)


def test_seed_gives_a_generator_and_a_generator_passes_through():
    from engine.pipelines.base import make_generator

    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert not torch.equal(torch.rand(4, generator=make_generator(7)), torch.rand(4, generator=make_generator(8)))
    own = torch.Generator().manual_seed(1)
    assert make_generator(own) is own


def test_progress_and_cancel_follow_the_pipeline_convention(tiny_pipeline, lung1_path):
    import threading

    volume = read_ct(lung1_path)
    seen = []
    tiny_pipeline.zero_shot(volume, progress=lambda fraction, message: seen.append((fraction, message)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(isinstance(m, str) and m for _, m in seen)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        tiny_pipeline.zero_shot(volume, cancel=stop)
    calls = []

    def cancel_after_first_step():   # a callable works as well as an Event; checked between steps
        calls.append(1)
        return len(calls) > 1
    with pytest.raises(Cancelled):
        tiny_pipeline.heatmap(volume, "right pleural effusion", cancel=cancel_after_first_step)
    assert len(calls) == 2


def test_query_text_checks():
    assert check_query_text("  right pleural\n effusion ") == "right pleural effusion"
    for bad in ("", "   ", "12345 !!!", "x" * 30_000, "Плевральный выпот справа"):
        with pytest.raises(UserError):
            check_query_text(bad)


def test_embeddings_are_unit_vectors(tiny_pipeline, lung1_path):
    volume = read_ct(lung1_path)
    v = tiny_pipeline.embed_volume(volume)
    t = tiny_pipeline.embed_texts(["Bilateral pleural effusion.", "No acute findings."])
    assert v.shape == (32,) and t.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(v), 1, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-4)


def test_zero_shot_uses_cached_prompts_and_matches_the_reference_loop(tiny_pipeline, lung1_path):
    volume = read_ct(lung1_path)
    probs = tiny_pipeline.zero_shot(volume)
    assert list(probs) == list(LABELS)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    cached = tiny_pipeline.prompt_latents
    assert tiny_pipeline.prompt_latents is cached  # computed once
    # The reference's loop (encode both prompts per label, softmax over the pair) gives the same probabilities.
    image = tiny_pipeline.embed_volume(volume)
    scale = float(tiny_pipeline.model.logit_scale.detach())
    for label in ("Emphysema", "Pleural effusion"):
        t = tiny_pipeline.embed_texts(list(zero_shot_prompts(label)))
        logits = torch.tensor(scale * t @ image)
        assert probs[label] == pytest.approx(float(logits.softmax(0)[0]), abs=1e-5)


def test_heatmap_score_is_the_cosine_and_the_map_is_the_models_token_shares(tiny_pipeline, lung1_path):
    volume = read_ct(lung1_path)
    heat, score = tiny_pipeline.heatmap(volume, "mass in the right upper lobe")
    assert heat.shape == volume.array.shape
    assert heat.min() >= 0 and 0.5 < heat.max() <= 1 + 1e-6  # scaled to [0, 1]; linear resampling keeps the peak
    # The token shares add up to the cosine score (linear head, mean pooling).
    image = tiny_pipeline.embed_volume(volume)
    query = tiny_pipeline.embed_query("mass in the right upper lobe")
    assert score == pytest.approx(float(image @ query), abs=1e-5)
    # and they are CTCLIP.token_scores' (the tested decomposition), not a second copy of its algebra
    _, tokens = tiny_pipeline.volume_tokens(volume)
    with torch.no_grad():
        shares = tiny_pipeline.model.token_scores(tokens, torch.from_numpy(query))[0]
    assert score == pytest.approx(float(shares.sum()), abs=1e-6)


def test_library_search_ranks_by_cosine_and_indexes_idempotently(tiny_pipeline, tmp_path, shared_data):
    library = StudyLibrary(tiny_pipeline, user_dir=tmp_path / "lib")
    small = shared_data / "ct" / "lung1_image_small128.nii.gz"
    other = shared_data / "ct" / "lung2_image_small128.nii.gz"
    sid, new = library.index_file(small)
    assert new
    assert library.index_file(small) == (sid, False)  # idempotent
    sid2, _ = library.index_file(other)
    results = library.search(tiny_pipeline.embed_volume(read_ct(small)), k=5)
    assert results[0].id == sid and results[0].score == pytest.approx(1.0, abs=1e-3)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert {r.id for r in results} >= {sid, sid2}
    # Reopened from disk: the same library.
    again = StudyLibrary(tiny_pipeline, user_dir=tmp_path / "lib")
    assert len(again.user_index) == 2
    assert again.volume(sid).array.shape == read_ct(small).array.shape


# ------------------------------------------------------------------------------------ the shipped demo checkpoint

shipped = pytest.mark.skipif(not (ctclip_dir() / "config.json").is_file(), reason="no shipped CT CLIP checkpoint")


@pytest.fixture(scope="module")
def demo_pipeline():
    return CTClipPipeline.from_pretrained()


@shipped
def test_demo_zero_shot_reads_drawn_findings(demo_pipeline):
    """On fresh phantoms (seeds never used in training) the drawn finding gets a higher P than in the same
    anatomy without it. Checked on the labels the shipped checkpoint reads (held-out AUROC >= 0.79 in
    assets/ctclip/metrics.json); the full 18-label quality is measured there, not asserted here."""
    from engine.phantom import render_phantom, sample_findings

    wins = 0
    checks = 0
    for label in ("Pleural effusion", "Cardiomegaly", "Consolidation", "Mosaic attenuation pattern"):
        for seed in (2_900_001, 2_900_002):
            findings = sample_findings([label], np.random.default_rng(seed))
            with_f = demo_pipeline.zero_shot(render_phantom(findings, seed))[label]
            without = demo_pipeline.zero_shot(render_phantom([], seed))[label]
            wins += with_f > without
            checks += 1
    assert wins >= checks - 1, f"{wins}/{checks}"


@shipped
def test_demo_text_retrieval_finds_matching_studies(demo_pipeline, tmp_path):
    library = StudyLibrary(demo_pipeline, user_dir=tmp_path / "empty")
    assert len(library.demo_ids) == len(library.demo.studies) > 100  # shipped embeddings match the checkpoint
    # Queries on findings the shipped checkpoint reads (see the zero-shot test above); metrics.json has the rest.
    for query, label in (("bilateral pleural effusion", "Pleural effusion"), ("cardiomegaly", "Cardiomegaly")):
        results = library.search(demo_pipeline.embed_query(query), k=10)
        assert len(results) == 10
        prevalence = np.mean([s.label_dict[label] for s in library.demo.studies])
        precision = np.mean([r.labels[label] for r in results])
        assert precision > min(0.9, 2 * prevalence), (query, precision, prevalence)


def test_weights_folder_loading(tiny_pipeline, tmp_path):
    from engine.convert.ctclip import load_ctclip_directory

    with pytest.raises(UserError):
        load_ctclip_directory(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="CT-CLIP_v2.pt"):
        load_ctclip_directory(tmp_path / "empty")
    tiny_pipeline.model.save_pretrained(tmp_path / "converted_ckpt", half=False)
    model = load_ctclip_directory(tmp_path / "converted_ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_pipeline.model.state_dict().items()):
        assert torch.equal(a, b), name
