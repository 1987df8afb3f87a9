"""Every Hounsfield value the phantom paints, in one table (non-contrast chest CT, shared/notes/ct-appearance.md).

HU holds tissue values; HU_BY_SEVERITY the values a finding takes at mild / moderate / severe; HU_RANGE the ranges a
finding's value is drawn from. Painters read these by name and write no HU literal of their own (shifts of a value,
such as emphysema's -25 HU, are parameters of the painter, not tissue values).
"""
from __future__ import annotations

HU = {
    "air": -1000.0, "lung": -865.0, "fat": -95.0, "water": 8.0, "muscle": 45.0, "blood": 38.0, "myocardium": 48.0,
    "liver": 60.0, "spleen": 48.0, "kidney": 32.0, "node": 42.0, "cancellous": 260.0, "cortical": 1100.0,
    "cartilage": 130.0, "disc": 85.0, "csf": 20.0, "calcium": 650.0,
    # metal attenuates far beyond the scanner's 3071 HU ceiling: painted at its "true" value and clipped at the end,
    # so a sub-voxel wire still saturates its voxel (blooming), as on real scans
    "metal": 15000.0,
    # normal anatomy beside the tissues above
    "breast gland": 25.0, "neck soft tissue": 40.0, "ct table": -150.0, "bowel": 30.0, "stomach wall": 42.0,
    "gastric fluid": 18.0, "fissure": 30.0, "bronchial wall": 20.0, "tracheal wall": 25.0,
    "vertebral cortex": 800.0, "vertebral arch": 550.0, "scapula": 700.0, "sternal cortex": 900.0,
    "clavicle": 700.0,
    # findings
    "ground glass": -520.0, "solid nodule": 45.0, "bulla wall": -50.0, "atelectatic band": 25.0,
    "atelectasis": 38.0, "consolidation": 32.0, "fibrotic band": 10.0, "reticulation": -100.0,
    "pleural fluid": 10.0, "hernia fluid": 15.0, "catheter": 600.0,
}

HU_BY_SEVERITY = {                                   # (mild, moderate, severe)
    "ground-glass opacity": (-650.0, -600.0, -520.0),
    "septal lines": (-250.0, -150.0, -80.0),
    "compressed lung": (-250.0, -150.0, -50.0),      # the band of lung along a pleural effusion's margin
}

HU_RANGE = {                                         # (low, high): each plaque's value is drawn from it
    "aortic plaque": (450.0, 900.0),
    "coronary plaque": (400.0, 900.0),
}
