"""Is a radiograph a FRONTAL (PA or AP) chest film? The plausibility check before the chest X-ray encoder reads it.

The encoder learned frontal chest radiographs only, so two kinds of image that read well as files are refused with one
sentence before any model sees them (`check_frontal_chest`): an axial CT slice saved as a picture, and a lateral view
(or an inverted film). The rule looks at two things a frontal chest film always shows, on a copy of the image
shrunk to 96 pixels on its longer side and blurred by one pixel (so the film's size, noise and bit depth do not
matter); grey levels are measured on the image's own scale, lo..hi = its 1st..99th percentiles:

1. **The body fills the film from top to bottom.** A frontal (or lateral) film runs from the neck to the abdomen, so
   its central columns (40-60 % of the width) are tissue in the top and bottom 8 % of the rows. An axial CT slice
   shows the whole cross-section of the body with air above it (in front of the chest) and below it (behind the
   back, around the table). "Air" is darker than lo + 0.15 (hi - lo). More than 35 % of the top or of the bottom
   band in air -> a CT slice. Measured (the larger of the two bands): real frontal films and phantom DRRs 0.0,
   lateral DRRs <= 0.16, axial slices of the real CT lung1 (lung and mediastinal windows) and of phantoms 0.54-1.0
   (tests/test_radiograph_view.py).
2. **Two dark lung fields either side of a brighter mediastinum.** Over the rows that cross the lungs (25-60 % of the
   height) the mean row profile is taken across the body (the columns brighter than air). A frontal film's centre
   (40-60 % of the body's width: mediastinum and spine) is brighter than the darkest point of each flank (10-42 % and
   58-90 %: the lungs) by at least 0.15 (hi - lo), and the two dips are alike (the smaller at least 0.6 x the
   larger), as two mirror-image lung fields make them. A lateral view has one lung field (both lungs superimposed)
   between the sternum and the spine, whose anterior and posterior sides differ, so one dip is missing or much
   smaller; an inverted film has a dark centre (and its dark abdomen usually trips rule 1 first). Measured: real
   frontal films and frontal DRRs (of lung1 and of held-out phantoms with effusion, cardiomegaly, consolidation,
   augmented or not) smaller dip 0.27-0.46 and ratio >= 0.73;
   lateral DRRs of lung1 and of the same phantoms smaller dip <= 0.10, or (a phantom with cardiomegaly, whose big
   heart fills the lateral's middle) ratio 0.49. A frontal film whose one side is white (a whole lung opaque) is
   refused too: the rule cannot tell it from a lateral.

Black bars added around a film (exactly uniform rows at the top or bottom, as an export's padding is) are left out
before measuring, so a letterboxed film is not taken for a CT slice; a CT slice's air is refused all the same, because
the body's outline is curved: the air beside the sternum and behind the back stays in the central end bands.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import UserError
from engine.radiograph import Radiograph

WORKING_SIDE = 96            # pixels on the longer side of the measured copy
AIR_LEVEL = 0.15             # air: darker than lo + AIR_LEVEL (hi - lo)
END_BAND = 0.08              # the top / bottom share of rows checked for air
CENTRE_COLUMNS = (0.4, 0.6)  # of the image's width: where the body (mediastinum, spine) is on any chest film
MAX_AIR_AT_ENDS = 0.35       # more air than this in the top or bottom band: an axial CT slice
LUNG_ROWS = (0.25, 0.6)      # of the height: rows that cross both lungs on a frontal film
BODY_CENTRE = (0.4, 0.6)     # of the body's width: mediastinum and spine
LEFT_FLANK, RIGHT_FLANK = (0.1, 0.42), (0.58, 0.9)   # of the body's width: the lung fields
MIN_LUNG_DIP = 0.15          # the centre must be brighter than each flank's darkest point by this share of hi - lo
MIN_DIP_RATIO = 0.6          # and the smaller dip at least this share of the larger: two alike lung fields


@dataclass
class ViewEvidence:
    """What the check measured (see the module docstring): air_top / air_bottom are shares (0..1) of the central end
    bands in air; left_dip / right_dip how much brighter the body's centre is than each lung flank, in units of the
    image's hi - lo (negative: the flank is brighter)."""
    air_top: float
    air_bottom: float
    left_dip: float
    right_dip: float

    @property
    def looks_like_ct_slice(self) -> bool:
        return max(self.air_top, self.air_bottom) > MAX_AIR_AT_ENDS

    @property
    def looks_frontal(self) -> bool:
        small, large = sorted((self.left_dip, self.right_dip))
        return small >= MIN_LUNG_DIP and small >= MIN_DIP_RATIO * large


def view_evidence(image: np.ndarray) -> ViewEvidence:
    """Measure a [0, 1] grey image (H, W), brighter = more attenuation (engine.radiograph's convention)."""
    from scipy.ndimage import gaussian_filter
    from skimage.transform import resize

    image = _without_padding_rows(np.asarray(image, dtype=np.float32))
    h, w = image.shape
    scale = WORKING_SIDE / max(h, w)
    small = resize(image, (max(8, round(h * scale)), max(8, round(w * scale))), order=1, anti_aliasing=scale < 1,
                   preserve_range=True)
    small = gaussian_filter(small, 1.0)
    h, w = small.shape
    lo, hi = np.percentile(small, [1, 99])
    span = max(float(hi - lo), 1e-6)
    air = small < lo + AIR_LEVEL * span
    centre = air[:, int(w * CENTRE_COLUMNS[0]):int(np.ceil(w * CENTRE_COLUMNS[1]))]
    band = max(1, round(h * END_BAND))
    profile = small[int(h * LUNG_ROWS[0]):max(int(h * LUNG_ROWS[1]), int(h * LUNG_ROWS[0]) + 1)].mean(axis=0)
    body = np.flatnonzero(profile >= lo + AIR_LEVEL * span)
    if len(body) < 8:                 # no body across the lung rows: nothing frontal to measure
        dips = (-1.0, -1.0)
    else:
        left, n = body[0], body[-1] + 1 - body[0]

        def part(bounds):
            a, b = left + int(bounds[0] * n), left + int(bounds[1] * n)
            return profile[a:max(b, a + 1)]

        middle = float(part(BODY_CENTRE).mean())
        dips = ((middle - float(part(LEFT_FLANK).min())) / span, (middle - float(part(RIGHT_FLANK).min())) / span)
    return ViewEvidence(air_top=float(centre[:band].mean()), air_bottom=float(centre[-band:].mean()),
                        left_dip=dips[0], right_dip=dips[1])


def _without_padding_rows(image: np.ndarray) -> np.ndarray:
    """Drop exactly uniform rows at the top and bottom (an export's letterbox bars), unless they are most of the
    image. Measured on the file's own pixels, before any resizing blurs the bars' edge."""
    flat = np.ptp(image, axis=1) == 0
    top, bottom = 0, len(image)
    while top < bottom and flat[top]:
        top += 1
    while bottom > top and flat[bottom - 1]:
        bottom -= 1
    return image[top:bottom] if bottom - top >= len(image) // 2 else image


def check_frontal_chest(radiograph: Radiograph) -> ViewEvidence:
    """Refuse (UserError, one sentence) an image that is not a frontal chest radiograph; the evidence otherwise."""
    evidence = view_evidence(radiograph.image)
    name = _name(radiograph)
    if evidence.looks_like_ct_slice:
        raise UserError(f"The image {name} looks like an axial CT slice (air above and below the body), not a chest "
                        "radiograph: open the CT itself in the CT viewer instead.")
    if not evidence.looks_frontal:
        raise UserError(f"The image {name} does not look like a frontal (PA or AP) chest radiograph: it lacks two "
                        "darker lung fields either side of a brighter mediastinum, as a lateral view or an inverted "
                        "film does, and only frontal films can be read.")
    return evidence


def _name(radiograph: Radiograph) -> str:
    from pathlib import Path

    source = radiograph.source or ""
    if source.startswith("DRR"):
        return "simulated from the CT"
    return repr(Path(source).name) if source else "given"
