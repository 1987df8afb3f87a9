"""The phantom's renders pinned before its split into a package (issue 10, item 5): same (seed, findings, grid) ->
the same float32 HU bytes, the same masks and the same report, bit for bit.

The checksums below were recorded from engine/phantom.py at f5f8008 (the single-file phantom, before the split), after
checking that two renders in two processes gave identical bytes. A refactor that changes any voxel of any case fails
here. Together the cases draw all 18 labels and every sub-type of KINDS (pacemaker, port catheter, prosthetic valve,
sternotomy wires; centrilobular, paraseptal and bullous emphysema; plate-like and segmental atelectasis; solid and
ground-glass nodules; cylindrical, varicose and cystic bronchiectasis), on the demo grid and on a finer, anisotropic
grid with its own spacing. When the phantom is changed on purpose, the checksums are rewritten (and the commit says
so) with `PYTHONPATH=. python tests/test_phantom_pinned.py`, which prints them.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from engine.labels import KINDS, LABELS, Finding
from engine.phantom import make_study, phantom_masks, render_phantom, sample_findings

OTHER_GRID = {"shape_zyx": (56, 120, 112), "spacing_xyz": (3.1, 2.9, 5.2)}   # (z, y, x) voxels, (x, y, z) mm


def _findings(name: str) -> list[Finding]:
    """The findings of each pinned case (explicit records where a sub-type must be covered)."""
    if name == "normal":
        return []
    if name == "pleural effusion":
        return sample_findings(["Pleural effusion"], np.random.default_rng(1))
    if name == "nodules":
        return [Finding("Lung nodule", side="left", lobe="left upper lobe", size_mm=12.0, kind="solid"),
                Finding("Lung nodule", side="right", lobe="right lower lobe", size_mm=9.0, severity="mild",
                        kind="ground-glass")]
    if name == "devices":
        return [Finding("Medical material", side="left", severity="mild", kind="pacemaker"),
                Finding("Medical material", severity="mild", kind="prosthetic valve"),
                Finding("Medical material", severity="mild", kind="sternotomy wires"),
                Finding("Medical material", side="right", severity="mild", kind="port catheter")]
    if name == "airways and parenchyma":
        return [Finding("Emphysema", side="bilateral", size_mm=45.0, severity="severe", kind="bullous"),
                Finding("Emphysema", side="right", severity="severe", kind="paraseptal"),
                Finding("Emphysema", side="left", severity="moderate", kind="centrilobular"),
                Finding("Atelectasis", side="right", lobe="right lower lobe", severity="severe", kind="plate-like"),
                Finding("Atelectasis", side="left", lobe="left lower lobe", kind="segmental"),
                Finding("Bronchiectasis", side="right", lobe="right middle lobe", severity="severe", kind="varicose"),
                Finding("Bronchiectasis", side="left", lobe="left lower lobe", kind="cystic"),
                Finding("Bronchiectasis", side="left", lobe="lingula", severity="mild", kind="cylindrical"),
                Finding("Peribronchial thickening", side="left", lobe="left lower lobe", severity="severe")]
    if name == "all 18":
        return sample_findings(list(LABELS), np.random.default_rng(7))
    raise KeyError(name)


# (case, seed, grid) -> sha256 of the rendered float32 HU array's bytes
RENDERS = {
    ('normal', 0, 'demo'): 'ec2f57d03072422544224d781c607ad08783c4b1c8e1f726f09a9f018cbf6926',
    ('pleural effusion', 1, 'demo'): '8cd30b8af782b31e17b9fb2a7eb1eb29b1ebd5c546140dff69a17ff36ffe162d',
    ('nodules', 2, 'demo'): 'ab4465ce7b09809e5ab68f93c45d6579f7e0b7e618cac2edc22b6de92d5c67fd',
    ('devices', 4, 'demo'): '4542f0b4fe3bb096c9d7c196f46cbaeea7a351eab2cd416b4f2898d1122bb88e',
    ('airways and parenchyma', 6, 'demo'): '98c137c6c428792aaf8814413464f11420e440be2b78dfb0ad7f86cb1ba413c3',
    ('all 18', 7, 'demo'): '1307df857923bad7de9244b88d707aa1e509250c5804a2deb32d2c37c54e0a49',
    ('normal', 0, 'other'): 'c8714823bbf3ed7d3b7c189223bf99c640ed5dafc1fff8236e4cab42fffbec4b',
    ('all 18', 9, 'other'): 'ac44fbf11ebc235bd5f6c4b104004a179ddfc28eff1b0e06f908294bffa96556',
    ('airways and parenchyma', 10, 'other'): '414b29c945547f248d7d412b096d1d6829e4346d05d6e68de0da080c2dff64ed',
}
# (case, seed, grid) -> sha256 of phantom_masks' boolean masks (names sorted, each name then its packed bits)
MASKS = {
    ('normal', 3, 'demo'): 'f41bf10455444cc6e24d1217ebc98fab563672e92fb3ce5004205d0072fa36d3',
    ('all 18', 5, 'other'): '001be906953d1a309be5529075289f3bb2f308b1c482106cfe5b5f4884cbb0a2',
}
# seed -> sha256 of make_study(seed): label set (drawn from CT-RATE's table), findings, report text and volume
STUDIES = {
    21: '9d21ad0cc95a257f4573c45aa1f8232c6ce659ca0c66d9c443704d170d049958',
    22: '79f1fec89e5d1c4d23772d69375ac1122504bb9e617318bd23ad114d4f982bb2',
}


def _grid(name: str) -> dict:
    return {} if name == "demo" else dict(OTHER_GRID)


def render_digest(case: str, seed: int, grid: str) -> str:
    volume = render_phantom(_findings(case), seed, **_grid(grid))
    assert volume.array.dtype == np.float32
    return hashlib.sha256(np.ascontiguousarray(volume.array).tobytes()).hexdigest()


def masks_digest(case: str, seed: int, grid: str) -> str:
    masks = phantom_masks(seed, findings=_findings(case), **_grid(grid))
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(np.packbits(masks[name].astype(bool)).tobytes())
    return digest.hexdigest()


def study_digest(seed: int) -> str:
    study = make_study(seed)
    digest = hashlib.sha256()
    digest.update(repr(study.labels).encode())
    digest.update(repr([f.to_json() for f in study.findings]).encode())
    digest.update(study.report.text.encode())
    digest.update(np.ascontiguousarray(study.volume.array).tobytes())
    return digest.hexdigest()


def test_the_cases_draw_every_label_and_every_kind():
    findings = [f for case in {key[0] for key in RENDERS} for f in _findings(case)]
    assert {f.label for f in findings} == set(LABELS)
    kinds = {(f.label, f.kind) for f in findings}
    for label in ("Medical material", "Emphysema", "Atelectasis", "Lung nodule", "Bronchiectasis"):
        assert {(label, k) for k in KINDS[label]} <= kinds, label


@pytest.mark.parametrize("key", list(RENDERS), ids=lambda key: f"{key[0]}-seed{key[1]}-{key[2]}")
def test_render_is_unchanged(key):
    assert render_digest(*key) == RENDERS[key]


@pytest.mark.parametrize("key", list(MASKS), ids=lambda key: f"{key[0]}-seed{key[1]}-{key[2]}")
def test_masks_are_unchanged(key):
    assert masks_digest(*key) == MASKS[key]


@pytest.mark.parametrize("seed", list(STUDIES))
def test_study_and_report_are_unchanged(seed):
    assert study_digest(seed) == STUDIES[seed]


if __name__ == "__main__":
    print("RENDERS = {")
    for key in RENDERS:
        print(f"    {key!r}: {render_digest(*key)!r},")
    print("}\nMASKS = {")
    for key in MASKS:
        print(f"    {key!r}: {masks_digest(*key)!r},")
    print("}\nSTUDIES = {" + ", ".join(f"{s}: {study_digest(s)!r}" for s in STUDIES) + "}")
