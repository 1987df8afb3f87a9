"""CT reading, writing and inspection on real CTs (lung1, lung1 small, the aorta crop, the LIDC DICOM slice) and on
DICOM series / zips written in the test from lung1 with SimpleITK (stored unsigned + RescaleIntercept -1024)."""
from __future__ import annotations

import gzip
import json
import shutil
import struct
import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from engine.errors import UserError
from engine.volume import (IDENTITY_DIRECTION, Volume, classify_intensities, inspect_ct, read_ct, volume_to_image,
                           write_nifti)

FAKE_PATIENT = {"0010|0010": "Fakename^Secretia", "0010|0020": "PID-SECRET-4711", "0010|0030": "19440704"}
SECRETS = ("Fakename", "Secretia", "PID-SECRET-4711", "19440704")
INSPECT_KEYS = {"shape", "spacing", "orientation", "hu_range", "is_hu", "looks_like_chest_ct", "warnings"}


def write_dicom_series(image: sitk.Image, folder, series_uid: str) -> None:
    """One CT DICOM file per axial slice, written by SimpleITK's ImageFileWriter with full geometry tags and
    RescaleIntercept -1024: GDCM stores HU + 1024 (all >= 0), then PixelRepresentation is set to unsigned, so the
    files hold unsigned stored values that only become HU through the rescale."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = sitk.GetArrayFromImage(image).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        plane = sitk.GetImageFromArray(hu[k])
        plane.SetSpacing(image.GetSpacing()[:2])
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": series_uid + ".0", "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.4f}" for p in position), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{image.GetSpacing()[2]:g}", "0028|1052": "-1024", "0028|1053": "1", **FAKE_PATIENT,
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.min() >= 0
        ds.PixelRepresentation = 0              # same bytes, now read as unsigned stored values
        ds.save_as(path)


@pytest.fixture(scope="module")
def lung1_image(lung1_path) -> sitk.Image:
    return sitk.ReadImage(str(lung1_path))


@pytest.fixture(scope="module")
def lung1(lung1_path) -> Volume:
    return read_ct(lung1_path)


@pytest.fixture(scope="module")
def dicom_series(lung1_image, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "lung1_series"
    write_dicom_series(lung1_image, folder, "1.2.826.0.1.3680043.2.1125.9.1")
    return folder


def test_lung1_nifti_reads_as_lps_hu(lung1):
    assert lung1.array.dtype == np.float32 and lung1.array.shape == (48, 512, 512)
    assert lung1.spacing == pytest.approx((0.5703125, 0.5703125, 5.0))
    assert lung1.origin == pytest.approx((-146.0, -325.0, -777.5))
    assert lung1.direction == pytest.approx(IDENTITY_DIRECTION)
    assert lung1.is_hu and lung1.warnings == []
    info = inspect_ct(lung1)
    assert set(info) == INSPECT_KEYS
    assert info["shape"] == [512, 512, 48] and info["spacing"] == pytest.approx([0.5703125, 0.5703125, 5.0])
    assert info["orientation"] == "LPS" and info["hu_range"] == [-1024.0, 3071.0]
    assert info["is_hu"] is True and info["looks_like_chest_ct"] is True and info["warnings"] == []
    json.dumps(info)  # the CLI prints it as JSON


def test_small_and_cropped_real_cts(shared_data):
    small = inspect_ct(read_ct(shared_data / "ct" / "lung1_image_small128.nii.gz"))
    assert small["shape"] == [128, 128, 48] and small["looks_like_chest_ct"] is True
    aorta = inspect_ct(read_ct(shared_data / "ct" / "aorta_ct_cropped.nii.gz"))
    assert aorta["shape"] == [120, 126, 164] and aorta["spacing"] == [1.5, 1.5, 1.5] and aorta["is_hu"]
    # A 180 mm crop around the heart: its lungs touch the crop's edges, so few slices show lungs inside a body.
    assert aorta["looks_like_chest_ct"] is False
    assert any("does not look like a chest CT" in w for w in aorta["warnings"])


def test_tiny_and_non_chest_volumes_are_not_chest_cts(lung1):
    tiny = Volume(array=lung1.array[20:24, 200:232, 200:232].copy(), spacing=lung1.spacing)
    assert inspect_ct(tiny)["looks_like_chest_ct"] is False
    # The same body with its lungs filled with soft tissue (40 HU): a body outline without air, like an abdomen.
    airless = lung1.array.copy()
    inside = np.zeros(airless.shape, bool)
    from scipy import ndimage
    for k in range(airless.shape[0]):
        inside[k] = ndimage.binary_erosion(ndimage.binary_fill_holes(airless[k] > -400), iterations=3)
    airless[inside & (airless < -400)] = 40.0
    info = inspect_ct(Volume(array=airless, spacing=lung1.spacing))
    assert info["is_hu"] is True and info["looks_like_chest_ct"] is False


def test_single_dicom_ct_slice_is_a_flagged_volume(shared_data):
    volume = read_ct(shared_data / "ct" / "lidc_slice_0.dcm")
    assert volume.array.shape == (1, 512, 512) and volume.spacing == pytest.approx((0.625, 0.625, 1.0))
    info = inspect_ct(volume)
    assert info["is_hu"] and info["looks_like_chest_ct"] is False
    assert any("single CT slice" in w for w in info["warnings"])
    # LIDC pads outside the scanner's circle with -2048: set to -1024 HU, with a warning.
    assert info["hu_range"][0] >= -1100 and any("Padding" in w for w in info["warnings"])


def test_nifti_round_trip_is_exact(lung1, tmp_path):
    out = write_nifti(lung1, tmp_path / "lung1_copy.nii.gz")
    header = sitk.ImageFileReader()
    header.SetFileName(str(out))
    header.ReadImageInformation()
    assert header.GetPixelID() == sitk.sitkInt16          # whole HU values fit int16
    again = read_ct(out)
    np.testing.assert_array_equal(again.array, lung1.array)
    assert again.spacing == lung1.spacing and again.origin == lung1.origin and again.direction == lung1.direction


def test_nifti_round_trip_of_fractional_values_is_float32(lung1, tmp_path):
    volume = Volume(array=lung1.array[:8] + np.float32(0.25), spacing=(0.7, 0.8, 2.5), origin=(1.5, -2.25, 30.0))
    out = write_nifti(volume, tmp_path / "fractional.nii")
    header = sitk.ImageFileReader()
    header.SetFileName(str(out))
    header.ReadImageInformation()
    assert header.GetPixelID() == sitk.sitkFloat32
    again = read_ct(out)
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.spacing == pytest.approx(volume.spacing) and again.origin == pytest.approx(volume.origin)


def test_ras_file_is_reoriented_to_lps(shared_data, tmp_path):
    path = shared_data / "ct" / "lung1_image_small128.nii.gz"
    lps = read_ct(path)
    ras = sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS")
    sitk.WriteImage(ras, str(tmp_path / "ras.nii.gz"))
    volume = read_ct(tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(volume.array, lps.array)
    assert volume.origin == pytest.approx(lps.origin) and volume.direction == pytest.approx(IDENTITY_DIRECTION)
    assert any("stored in RAS orientation" in w for w in volume.warnings)
    assert inspect_ct(volume)["orientation"] == "LPS"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_metaimage(shared_data, tmp_path, suffix):
    path = shared_data / "ct" / "lung1_image_small128.nii.gz"
    reference = read_ct(path)
    sitk.WriteImage(volume_to_image(reference, np.int16), str(tmp_path / f"small{suffix}"))
    volume = read_ct(tmp_path / f"small{suffix}")
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing == pytest.approx(reference.spacing) and volume.origin == pytest.approx(reference.origin)


def _assert_no_identifiers(volume: Volume, tmp_path, capfd):
    info = inspect_ct(volume)
    out = write_nifti(volume, tmp_path / "from_dicom.nii.gz")
    written = gzip.decompress(out.read_bytes())
    captured = capfd.readouterr()
    texts = [repr(volume.warnings), volume.source, json.dumps(info), repr(vars(volume).keys()), captured.out,
             captured.err]
    for secret in SECRETS:
        assert all(secret not in text for text in texts)
        assert secret.encode() not in written


def test_dicom_series_folder_with_unsigned_stored_values(dicom_series, lung1, tmp_path, capfd):
    stored = pydicom.dcmread(next(dicom_series.glob("*.dcm")))
    assert stored.PixelRepresentation == 0 and float(stored.RescaleIntercept) == -1024
    assert stored.pixel_array.min() >= 0                          # the files do not hold HU
    volume = read_ct(dicom_series)
    np.testing.assert_array_equal(volume.array, lung1.array)      # rescaled exactly once
    assert volume.spacing == pytest.approx(lung1.spacing, abs=1e-4)
    assert volume.origin == pytest.approx(lung1.origin, abs=1e-4)
    assert volume.direction == pytest.approx(IDENTITY_DIRECTION)
    assert volume.warnings == []
    assert inspect_ct(volume)["looks_like_chest_ct"] is True
    _assert_no_identifiers(volume, tmp_path, capfd)


def test_zip_of_a_dicom_series(dicom_series, lung1, tmp_path, capfd):
    archive = tmp_path / "lung1_dicom.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(dicom_series.iterdir()):
            zf.write(path, f"export/CT/{path.name}")
    volume = read_ct(archive)
    np.testing.assert_array_equal(volume.array, lung1.array)
    assert volume.spacing == pytest.approx(lung1.spacing, abs=1e-4)
    assert volume.source == str(archive)
    _assert_no_identifiers(volume, tmp_path, capfd)


def test_folder_with_two_series_is_refused(dicom_series, shared_data, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(dicom_series, mixed)
    other = sitk.ReadImage(str(shared_data / "ct" / "lung1_image_small128.nii.gz"))
    write_dicom_series(other[:, :, :4], mixed / "other", "1.2.826.0.1.3680043.2.1125.9.2")
    with pytest.raises(UserError) as err:
        read_ct(mixed)
    message = str(err.value)
    assert message.startswith("The folder 'mixed' holds 2 DICOM series;") and "only one" in message
    assert "\n" not in message and message.endswith(".")


def test_raw_unsigned_values_are_shifted_with_a_warning(shared_data, tmp_path):
    reference = read_ct(shared_data / "ct" / "lung1_image_small128.nii.gz")
    raw = sitk.GetImageFromArray((reference.array + 1024).astype(np.uint16))   # intercept -1024 lost
    raw.SetSpacing(reference.spacing)
    raw.SetOrigin(reference.origin)
    sitk.WriteImage(raw, str(tmp_path / "raw.nii.gz"))
    assert classify_intensities(sitk.GetArrayFromImage(raw)) == "raw_unsigned"
    volume = read_ct(tmp_path / "raw.nii.gz")
    np.testing.assert_array_equal(volume.array, reference.array)
    assert any("-1024" in w for w in volume.warnings)


def _nifti_with_scaling(tmp_path, array: np.ndarray, reference: Volume, slope: float, inter: float):
    """An uncompressed NIfTI-1 whose header's scl_slope / scl_inter (bytes 112..119) are set by hand."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    path = tmp_path / f"scaled_{slope:g}_{inter:g}.nii"
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    assert struct.unpack("<i", data[:4])[0] == 348
    data[112:120] = struct.pack("<2f", slope, inter)
    path.write_bytes(bytes(data))
    return path


def test_nifti_scaling_is_applied_exactly_once(shared_data, tmp_path):
    reference = read_ct(shared_data / "ct" / "lung1_image_small128.nii.gz")
    stored = (reference.array + 1024).astype(np.uint16)
    volume = read_ct(_nifti_with_scaling(tmp_path, stored, reference, 1.0, -1024.0))
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.warnings == []


def test_nifti_scaling_that_would_double_rescale_is_undone(shared_data, tmp_path):
    reference = read_ct(shared_data / "ct" / "lung1_image_small128.nii.gz")
    already_hu = reference.array.astype(np.int16)   # HU stored, yet the header says "add -1024" (CT-RATE's pitfall)
    volume = read_ct(_nifti_with_scaling(tmp_path, already_hu, reference, 1.0, -1024.0))
    np.testing.assert_array_equal(volume.array, reference.array)
    assert any("second time" in w for w in volume.warnings)


def test_write_nifti_refuses_other_suffixes(lung1, tmp_path):
    with pytest.raises(UserError):
        write_nifti(lung1, tmp_path / "out.png")
