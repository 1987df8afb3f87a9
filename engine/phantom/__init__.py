"""The digital chest phantom: a procedural, non-contrast chest CT in Hounsfield units with the 18 CT-RATE findings.

`render_phantom(findings, seed)` is a deterministic function of (findings, seed, grid): the same inputs give a
bit-identical float32 HU array indexed (z, y, x) in LPS (array[k] is an axial slice, k increasing towards the head;
row index increasing = posterior; column index increasing = patient's left).

The package, in reading order
- hu.py           every Hounsfield value painted (HU, HU_BY_SEVERITY, HU_RANGE), from shared/notes/ct-appearance.md.
- label_table.py  CT-RATE's label table (shipped compactly in assets/phantom/label_sets.json) and label-set draws.
- findings.py     sample_findings: side, lobe, size, severity, kind per label; finding_lung / finding_sides, the one
                  home of "which lung is this finding in"; each finding's own random stream.
- grid.py         Grid (shape (z, y, x), spacing (x, y, z) mm, centred on the origin), partial-volume tubes, noise.
- anatomy.py      the per-seed anatomy in mm (cached per seed, so re-rendering a seed on another grid or with other
                  findings is cheap): cavity, domes, spine, ribs, heart, mediastinal vessel paths, lung trees.
- canvas.py       the HU volume being painted, and the dense layer (calcium, metal) painted after the blur.
- scene.py        one rendering's declared shared state: the parts each render step writes for the next.
- normal.py, bones.py   the normal anatomy's render steps, from the outside in.
- painters.py     one painter per label in a table keyed by label name (PAINTERS), each at a named step.
- render.py       the steps in order, the scanner (noise, blur, streaks), masks; render_phantom, make_study.

How it is built
- Geometry lives in physical millimetres, independent of the grid: x = patient's left, y = posterior, z = head,
  origin at the centre of the field of view (350 x 350 x 300 mm unless the spacing says otherwise).
- Rendering paints tissues in HU from the outside in, then adds CT noise and a slight Gaussian blur (the scanner's
  point-spread, which also anti-aliases edges). Calcium and metal are painted after the blur so that thin, dense
  objects keep their HU, then metal adds streak artefacts.
- Tubes (vessels, airways, wires, leads, clavicles) are rasterised with partial-volume occupancy in per-segment
  bounding boxes, all segments at once; vessel and airway trees fill each lung by recursive partition of random
  target points (a space-filling branching tree, radius ~ (served leaves)^0.45), so they differ per seed.
- Random streams are separate: anatomy from SeedSequence([seed, 0]); finding number j of a label from
  ([seed, 1, label index, j]); CT noise from ([seed, 2]). The same seed with and without a finding therefore differs
  only where the finding is drawn (plus the lungs it displaces).

Findings are `engine.labels.Finding` records (label, side, lobe, size_mm, severity, kind, stations); the report writer
reads the same records, so the picture and the text agree. At the demo grid (2.7 mm in-plane, 4.7 mm slices) fine
findings (septal lines, wires, plaques, bronchial walls) are drawn bolder than life so that they remain measurable;
each place where this happens says so.
"""
from engine.phantom.anatomy import (AIRWAYS, MEDIASTINAL_VESSELS, Anatomy, Heart, Tree, grow_tree, heart_geometry,
                                    lung_inside_points, lymph_station_centres, sample_anatomy, sample_lung_points,
                                    vessel_paths)
from engine.phantom.findings import finding_lung, finding_sides, sample_findings
from engine.phantom.grid import FOV_XYZ_MM, Box, Grid, occupancy_volume, rasterize_tubes, resolve_grid
from engine.phantom.hu import HU, HU_BY_SEVERITY, HU_RANGE
from engine.phantom.label_table import (build_label_sets_json, label_table_csv, load_label_table,
                                        sample_label_set)
from engine.phantom.painters import PAINTERS
from engine.phantom.render import (PHANTOM_REVISION, PhantomStudy, build_scene, finding_masks, make_study, phantom_masks,
                                   render_phantom, render_scene, study_findings)

__all__ = [
    "AIRWAYS", "FOV_XYZ_MM", "PHANTOM_REVISION", "HU", "HU_BY_SEVERITY", "HU_RANGE", "label_table_csv",
    "MEDIASTINAL_VESSELS", "PAINTERS", "Anatomy", "Box", "Grid", "Heart", "PhantomStudy", "Tree",
    "build_label_sets_json", "build_scene", "finding_lung", "finding_masks", "finding_sides", "grow_tree", "heart_geometry",
    "load_label_table", "lung_inside_points", "lymph_station_centres", "make_study", "occupancy_volume",
    "phantom_masks", "rasterize_tubes", "render_phantom", "render_scene", "resolve_grid", "sample_anatomy",
    "sample_findings", "sample_label_set", "sample_lung_points", "study_findings", "vessel_paths",
]
