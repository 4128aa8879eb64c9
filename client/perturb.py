"""Perturbations of one case before pyradiomics, for the robustness filter (profile ``robustness`` block).

Each perturbed copy is drawn from a generator seeded by the profile's seed, the case's content hash (its input
files' sha256) and the copy's index, so a re-run, or another machine, gives the same copy; no site secret is
involved. Images keep their stored pixel type (integer images are rounded and clipped back into it), as the
originals do (client.extract).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import SimpleITK as sitk

from common.profile import Perturbation


def draw_seed(profile_seed: int, inputs: Mapping[str, str], index: int) -> int:
    """The generator seed of a case's ``index``-th perturbed copy: profile seed + content hash + index."""
    text = json.dumps({"seed": profile_seed, "inputs": dict(sorted(inputs.items())), "copy": index}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _as_stored(values: np.ndarray, like: sitk.Image) -> sitk.Image:
    """float values back in ``like``'s pixel type and geometry (rounded and clipped for integer types)."""
    dtype = sitk.GetArrayViewFromImage(like).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.CopyInformation(like)
    return image


def _add_noise(image: sitk.Image, mask: sitk.Image, sigma: float, rng: np.random.Generator) -> sitk.Image:
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    inside = values[sitk.GetArrayViewFromImage(mask) > 0]
    scale = float(np.std(inside)) if inside.size else float(np.std(values))
    return _as_stored(values + rng.normal(0.0, sigma * scale, values.shape), image)


def _mask_centre(mask: sitk.Image) -> tuple[float, ...]:
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0).mean(axis=0)[::-1]  # numpy z,y,x -> ITK x,y,z
    return mask.TransformContinuousIndexToPhysicalPoint([float(i) for i in index])


def _transform(kind: str, amount: float, mask: sitk.Image, rng: np.random.Generator) -> sitk.Transform:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    if kind == "translate":
        return sitk.TranslationTransform(3, (amount * direction).tolist())
    rotation = sitk.VersorRigid3DTransform()
    rotation.SetCenter(_mask_centre(mask))
    rotation.SetRotation(direction.tolist(), float(np.deg2rad(rng.uniform(-amount, amount))))
    return rotation


def _resample(image: sitk.Image, transform: sitk.Transform, interpolator: int) -> sitk.Image:
    fill = float(np.min(sitk.GetArrayViewFromImage(image)))  # outside the field of view: the image's background
    return sitk.Resample(image, image, transform, interpolator, fill, image.GetPixelID())


def _morph(mask: sitk.Image, labels: list[int], kind: str, voxels: int) -> sitk.Image:
    """Each label grown into the background only (lower labels first where two compete) or shrunk, by ``voxels``
    steps of the image's finest axis: on a thick-slice axis the radius is that distance in its own voxels, rounded
    (usually 0), so one step does not strip a whole 5 mm slice off every region."""
    finest = min(mask.GetSpacing())
    radius = [int(round(voxels * finest / s)) for s in mask.GetSpacing()]
    values = sitk.GetArrayFromImage(mask)
    out = values.copy() if kind == "dilate" else np.zeros_like(values)
    for label in labels:
        region = sitk.Cast(mask == label, sitk.sitkUInt8)
        # GetArrayFromImage (a copy): a view of a temporary image would read freed memory
        if kind == "dilate":
            grown = sitk.GetArrayFromImage(sitk.BinaryDilate(region, radius)) > 0
            out[grown & (out == 0)] = label
        else:
            kept = sitk.GetArrayFromImage(sitk.BinaryErode(region, radius)) > 0
            out[kept] = label
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return image


def perturb_case(volumes: Mapping[str, sitk.Image], mask: sitk.Image, labels: list[int], perturbation: Perturbation,
                 seed: int) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """One perturbed copy of a case (every sequence and the mask); the inputs are not changed."""
    rng = np.random.default_rng(seed)
    kind = perturbation.kind
    if kind == "noise":
        return {seq: _add_noise(img, mask, perturbation.amount, rng) for seq, img in volumes.items()}, mask
    if kind in ("dilate", "erode"):
        return dict(volumes), _morph(mask, labels, kind, int(perturbation.amount))
    transform = _transform(kind, perturbation.amount, mask, rng)
    moved = {seq: _resample(img, transform, sitk.sitkLinear) for seq, img in volumes.items()}
    return moved, _resample(mask, transform, sitk.sitkNearestNeighbor)
