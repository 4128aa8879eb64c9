"""The synthetic MRI phantom behind the demo: one case's T1c, FLAIR and ADC images and its label mask.

An ellipsoidal "brain" (white/grey-matter-like smooth texture, background ~0) holds one lesion: a necrotic core
(label 2) inside an enhancing rim (label 1), surrounded by peritumoral edema (label 3). Lesion parameters come from
overlapping class distributions that follow the imaging literature (radfed.synth's docstring); each site's scanner
model (gain, offset, Rician noise, smooth bias field, slice thickness) is applied last. The tissue constants, the
class-conditional lesion parameters and the scanner model are read together, so they stay in one module.

Only numpy and SimpleITK are used. Smoothing is FFT-based, and the lesion is rendered on a finer z grid inside its
bounding box and averaged down, which gives slice-thickness partial volume without a full fine grid.
"""

import math
import zlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

SEQUENCES = ("t1c", "flair", "adc")
DIAGNOSES = ("HGG", "BM")
MIN_LABEL_VOXELS = 30


@dataclass(frozen=True)
class SiteSpec:
    """One hospital: its case counts and the scanner model applied to all of its images."""

    name: str
    n_hgg: int
    n_bm: int
    spacing: tuple[float, float, float]  # (x, y, z) mm; z is the slice thickness
    size: tuple[int, int, int]  # (x, y, z) voxels
    gain: float
    offset: float
    noise: float
    bias: float


# --------------------------------------------------------------------------------------------------------------
# Tissue model

# White matter intensity per sequence: the reference for noise and offset (T1c/FLAIR arbitrary units, ADC in
# 1e-6 mm^2/s). On post-contrast T1 white matter is brighter than grey matter; on FLAIR and ADC it is darker.
_WM = {"t1c": 600.0, "flair": 420.0, "adc": 720.0}
_GM = {"t1c": 500.0, "flair": 500.0, "adc": 840.0}
# Phantom brain semi-axes in mm (x, y, z), shrunk to 46 % of the field of view on small test grids.
_BRAIN_MM = (44.0, 50.0, 40.0)
_BRAIN_FOV_FRACTION = 0.46

# Class-conditional lesion parameters: (HGG mean, BM mean, sd, low clip, high clip). Means differ by only
# ~0.5-0.7 SD because the signals add up across many features (and several parameters move the same
# feature): tuned so the best single features reach AUC ~0.75-0.8 and a multivariable model ~0.85-0.9.
_CLASS_PARAMS: dict[str, tuple[float, float, float, float, float]] = {
    # enhancing-tumour radius relative to the mean brain semi-axis (BM: smaller enhancing volume)
    "size": (0.305, 0.275, 0.05, 0.17, 0.42),
    # necrosis radius / tumour radius (HGG: thicker rim)
    "core": (0.54, 0.59, 0.08, 0.32, 0.78),
    # edema radius / tumour radius (BM: larger edema-to-tumour ratio)
    "edema": (1.64, 1.78, 0.20, 1.25, 2.40),
    # amplitude of the low-frequency radial perturbation (HGG: lobulated)
    "lobes": (0.17, 0.125, 0.07, 0.02, 0.38),
    # correlation of the necrosis outline with the rim outline (BM: concentric, even rim thickness)
    "core_corr": (0.35, 0.75, 0.25, 0.0, 0.95),
    # width (mm) of the tumour/edema intensity transition (HGG: infiltrative)
    "margin": (1.3, 1.0, 0.5, 0.2, 3.0),
    # width (mm) of the edema/brain transition
    "edema_margin": (2.2, 1.7, 0.8, 0.5, 4.0),
    # relative amplitude of spatially correlated noise in the enhancing rim (HGG: heterogeneous)
    "rim_het": (0.14, 0.11, 0.05, 0.02, 0.32),
    # relative amplitude of correlated FLAIR texture in the edema (HGG: infiltrated, textured)
    "edema_tex": (0.10, 0.075, 0.04, 0.01, 0.25),
    # edema ADC (BM: pure vasogenic edema, higher)
    "edema_adc": (1450.0, 1530.0, 150.0, 1100.0, 2000.0),
    # ADC dip in the edema next to the tumour, as a fraction of 250 units (HGG: infiltrating cells)
    "infiltration": (0.6, 0.4, 0.45, 0.0, 1.6),
}


def _draw(rng: np.random.Generator, key: str, diagnosis: str) -> float:
    hgg, bm, sd, lo, hi = _CLASS_PARAMS[key]
    return float(np.clip(rng.normal(hgg if diagnosis == "HGG" else bm, sd), lo, hi))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], *sigmas_vox: tuple[float, ...]) -> list[np.ndarray]:
    """Unit-variance Gaussian random fields: one white noise low-passed by a Gaussian (per-axis sigma in voxels)
    in Fourier space, once per requested sigma. Periodic boundaries are harmless for texture."""
    spectrum = np.fft.rfftn(rng.standard_normal(shape, dtype=np.float32))
    fields = []
    for sigma_vox in sigmas_vox:
        filtered = spectrum.copy()
        for axis, (n, sigma) in enumerate(zip(shape, sigma_vox, strict=True)):
            freq = np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)
            transfer = np.exp(-2.0 * (np.pi * freq * sigma) ** 2).astype(np.float32)
            filtered *= transfer.reshape([-1 if a == axis else 1 for a in range(len(shape))])
        field = np.fft.irfftn(filtered, s=shape, axes=tuple(range(len(shape)))).astype(np.float32)
        field -= field.mean()
        field /= field.std() + 1e-6
        fields.append(field)
    return fields


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Smoothstep from 0 (d <= -2 width) to 1 (d >= 2 width). Compact support, so the lesion's influence
    ends inside its bounding box and leaves no seam at the box edge."""
    t = np.clip(d / np.float32(4.0 * width) + np.float32(0.5), 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _sphere_points(n: int = 256) -> np.ndarray:
    """Near-uniform unit vectors (Fibonacci sphere), used to normalise and bound the radial functions."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = np.pi * (1.0 + 5**0.5) * k
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


_SPHERE = _sphere_points()


class _Radial:
    """Standardised smooth function on the unit sphere: a few random Fourier terms (spherical-harmonic-like)."""

    def __init__(self, rng: np.random.Generator, freq: tuple[float, float], terms: int = 5) -> None:
        dirs = rng.standard_normal((terms, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.omega = dirs * rng.uniform(*freq, size=(terms, 1))
        self.phase = rng.uniform(0, 2 * np.pi, size=terms)
        self.weight = rng.uniform(0.5, 1.0, size=terms)
        self.mean = 0.0
        self.std = 1.0
        ref = self._raw(_SPHERE[:, 0], _SPHERE[:, 1], _SPHERE[:, 2])
        self.mean, self.std = float(ref.mean()), float(ref.std() + 1e-9)

    def _raw(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(ux.shape, uy.shape, uz.shape), dtype=np.float32)
        for (wx, wy, wz), ph, w in zip(self.omega, self.phase, self.weight, strict=True):
            out += np.float32(w) * np.cos(
                np.float32(wx) * ux + np.float32(wy) * uy + np.float32(wz) * uz + np.float32(ph)
            )
        return out

    def __call__(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        return (self._raw(ux, uy, uz) - np.float32(self.mean)) / np.float32(self.std)


# --------------------------------------------------------------------------------------------------------------
# Case generation


def _axes_mm(spec: SiteSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (mm) relative to the grid centre, for x, y, z."""
    return tuple(
        ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(spec.size, spec.spacing, strict=True)
    )


def _brain(spec: SiteSpec, rng: np.random.Generator) -> dict:
    """Brain partial-volume fraction and noise-free tissue intensities on the native grid, (z, y, x) arrays."""
    x, y, z = _axes_mm(spec)
    fov = [n * s for n, s in zip(spec.size, spec.spacing, strict=True)]
    # Patients differ a little in head size and position.
    semi = np.array([min(m, _BRAIN_FOV_FRACTION * f) for m, f in zip(_BRAIN_MM, fov, strict=True)])
    semi *= rng.uniform(0.95, 1.02, size=3)
    centre = rng.normal(0.0, 1.5, size=3) * np.array([1.0, 1.0, 0.5])
    xn = ((x - centre[0]) / semi[0])[None, None, :]
    yn = ((y - centre[1]) / semi[1])[None, :, None]
    zc = (z - centre[2])[:, None, None]
    # Exact fraction of each slab (slice thickness) inside the ellipsoid: the brain's own z partial volume.
    half = semi[2] * np.sqrt(np.clip(1.0 - xn**2 - yn**2, 0.0, None))
    sz = spec.spacing[2]
    frac = np.clip(np.minimum(zc + sz / 2, half) - np.maximum(zc - sz / 2, -half), 0.0, sz) / sz
    q = np.sqrt(xn**2 + yn**2 + (zc / semi[2]) ** 2)
    mean_semi = float(np.prod(semi) ** (1 / 3))
    coarse, detail = _smooth_noise(
        rng, frac.shape, tuple(4.0 / s for s in spec.spacing[::-1]), tuple(1.2 / s for s in spec.spacing[::-1])
    )
    gm_tex = _sigmoid(2.5 * coarse - 0.5)
    ribbon = _sigmoid((q - (1.0 - 5.0 / mean_semi)) / 0.02)  # cortical grey-matter ribbon under the surface
    gm = 1.0 - (1.0 - 0.85 * gm_tex) * (1.0 - ribbon)
    fine = 1.0 + 0.02 * detail
    scale = rng.normal(1.0, 0.03)  # patient-level intensity variation (coil loading, physiology)
    tissue = {seq: ((_WM[seq] * (1.0 - gm) + _GM[seq] * gm) * fine * scale).astype(np.float32) for seq in SEQUENCES}
    return {"frac": frac.astype(np.float32), "tissue": tissue, "semi": semi, "centre": centre, "mean_semi": mean_semi}


def _lesion_params(spec: SiteSpec, brain: dict, diagnosis: str, rng: np.random.Generator) -> dict:
    p = {key: _draw(rng, key, diagnosis) for key in _CLASS_PARAMS}
    sxy = max(spec.spacing[:2])
    voxel_volume = float(np.prod(spec.spacing))
    # Keep the necrosis large enough to survive downsampling to thick slices (tiny grids only).
    r_min_core = (3.0 * 50.0 * voxel_volume / (4.0 * np.pi)) ** (1 / 3)
    p["r_core"] = max(p["size"] * p["core"] * brain["mean_semi"], r_min_core)
    p["r_tumour"] = max(p["size"] * brain["mean_semi"], p["r_core"] / 0.78, p["r_core"] + 1.5 * sxy)
    p["r_edema"] = p["edema"] * p["r_tumour"]
    freq = (2.5, 6.0)
    p["shape_tumour"] = _Radial(rng, freq)
    p["shape_core"] = _Radial(rng, freq)
    p["shape_edema"] = _Radial(rng, (3.0, 7.0))  # edema spreads along white matter: always irregular
    p["lobes_edema"] = float(np.clip(rng.normal(0.16, 0.05), 0.04, 0.3))
    # Per-patient intensity levels shared by both classes.
    p["t1c_rim"] = rng.normal(1.75, 0.15) * _WM["t1c"]
    p["t1c_core"] = rng.normal(0.42, 0.05) * _WM["t1c"]
    p["t1c_edema"] = rng.normal(0.86, 0.03)  # multiplies the underlying tissue: slightly hypointense
    p["flair_rim"] = rng.normal(650.0, 50.0)
    p["flair_core"] = rng.normal(560.0, 50.0)
    p["flair_edema"] = rng.normal(780.0, 60.0)
    p["adc_rim"] = rng.normal(980.0, 110.0)
    p["adc_core"] = rng.normal(1900.0, 180.0)

    # Bound the outlines over the sphere so the tumour stays inside the brain and the ROI holds the edema.
    dirs = _SPHERE.T.astype(np.float32)
    rt = p["r_tumour"] * np.clip(1.0 + p["lobes"] * p["shape_tumour"](*dirs), 0.4, None)
    re_ = p["r_edema"] * np.clip(1.0 + p["lobes_edema"] * p["shape_edema"](*dirs), 0.5, None)
    reach_tumour = 1.05 * float(rt.max())
    # Beyond this radius nothing of the tumour (labels 1/2 or its blurred margin) can appear.
    p["reach_tumour"] = reach_tumour + 2.0 * max(p["margin"], 0.6) + 1.5 * sxy
    p["extent"] = 1.05 * float(max(re_.max(), reach_tumour + 1.5 * sxy)) + 2.0 * p["edema_margin"] + sxy
    room = brain["semi"] - reach_tumour - 3.0
    room = np.maximum(room, 0.0)
    for _ in range(100):  # uniform in the shrunken ellipsoid
        u = rng.uniform(-1.0, 1.0, size=3)
        if np.sum(u**2) <= 1.0:
            break
    p["centre"] = brain["centre"] + u * room
    return p


def _render(spec: SiteSpec, brain: dict, p: dict, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Render the lesion on a fine-z grid inside its bounding box, average down, and composite into the brain."""
    sx, sy, sz = spec.spacing
    nx, ny, nz = spec.size
    sub = int(min(4, max(1, round(sz / min(sx, sy)))))  # z sub-slices per slice, for partial volume
    x, y, z = _axes_mm(spec)
    c = p["centre"]
    box = []
    for axis_mm, n, s, cc in ((x, nx, sx, c[0]), (y, ny, sy, c[1]), (z, nz, sz, c[2])):
        lo = int(np.clip(np.floor((cc - p["extent"] - axis_mm[0]) / s), 0, n - 1))
        hi = int(np.clip(np.ceil((cc + p["extent"] - axis_mm[0]) / s) + 1, lo + 1, n))
        box.append((lo, hi))
    (x0, x1), (y0, y1), (z0, z1) = box
    zf = (z[z0:z1, None] + ((np.arange(sub) + 0.5) / sub - 0.5)[None, :] * sz).reshape(-1).astype(np.float32)
    dx = (x[x0:x1] - c[0])[None, None, :]
    dy = (y[y0:y1] - c[1])[None, :, None]
    dz = (zf - c[2])[:, None, None]
    r = np.sqrt(dx**2 + dy**2 + dz**2) + np.float32(1e-3)
    ux, uy, uz = dx / r, dy / r, dz / r

    # Tumour and necrosis outlines are only evaluated where they can matter (the trig dominates the cost);
    # elsewhere radius 0 means "outside".
    inner = r < p["reach_tumour"]
    iux, iuy, iuz = ux[inner], uy[inner], uz[inner]
    shape_t = p["shape_tumour"](iux, iuy, iuz)
    # BM necrosis follows the rim outline (even thickness); HGG necrosis is independent (irregular rim).
    rho = p["core_corr"]
    shape_c = rho * shape_t + math.sqrt(1.0 - rho**2) * p["shape_core"](iux, iuy, iuz)
    r_t = np.zeros_like(r)
    r_c = np.zeros_like(r)
    r_t[inner] = p["r_tumour"] * np.clip(1.0 + p["lobes"] * shape_t, 0.4, None)
    r_c[inner] = np.minimum(p["r_core"] * np.clip(1.0 + p["lobes"] * shape_c, 0.4, None), r_t[inner] - max(sx, sy))
    r_e = np.maximum(
        p["r_edema"] * np.clip(1.0 + p["lobes_edema"] * p["shape_edema"](ux, uy, uz), 0.5, None),
        r_t + 1.5 * max(sx, sy),
    )

    frac = np.repeat(brain["frac"][z0:z1, y0:y1, x0:x1], sub, axis=0)
    labels = np.where(r < r_c, 2, np.where(r < r_t, 1, np.where((r < r_e) & (frac >= 0.5), 3, 0))).astype(np.uint8)

    # Soft memberships: the transition widths carry the sharp (BM) vs infiltrative (HGG) margins.
    s_core = _ramp(r_c - r, 0.6) * inner
    s_tum = _ramp(r_t - r, p["margin"]) * inner
    s_les = _ramp(r_e - r, p["edema_margin"]) * frac

    def fine_sigma(mm: float) -> tuple[float, float, float]:
        return (mm / (sz / sub), mm / sy, mm / sx)

    (rim_field,) = _smooth_noise(rng, r.shape, fine_sigma(2.0))
    edema_field, core_field = _smooth_noise(rng, r.shape, fine_sigma(3.0), fine_sigma(4.0))
    near = np.exp(-np.clip(r - r_t, 0.0, None) / np.float32(6.0))  # infiltration is densest next to the tumour

    tissue = {seq: np.repeat(brain["tissue"][seq][z0:z1, y0:y1, x0:x1], sub, axis=0) for seq in SEQUENCES}
    het, tex = p["rim_het"], p["edema_tex"]
    rim = {
        "t1c": p["t1c_rim"] * (1.0 + het * rim_field),
        "flair": p["flair_rim"] * (1.0 + 0.5 * het * rim_field),
        "adc": p["adc_rim"] * (1.0 - 0.25 * het * rim_field),  # cellular (bright) spots restrict diffusion
    }
    core = {
        "t1c": p["t1c_core"] * (1.0 + 0.06 * core_field),
        "flair": p["flair_core"] * (1.0 + 0.06 * core_field),
        "adc": p["adc_core"] * (1.0 + 0.05 * core_field),
    }
    edema = {
        "t1c": p["t1c_edema"] * tissue["t1c"] * (1.0 - 0.3 * tex * edema_field),
        "flair": p["flair_edema"] * (1.0 + tex * edema_field),
        "adc": (p["edema_adc"] - 250.0 * p["infiltration"] * near) * (1.0 + 0.5 * tex * edema_field),
    }

    images = {}
    m = s_les.reshape(z1 - z0, sub, *r.shape[1:]).mean(axis=1)
    for seq in SEQUENCES:
        lesion = (1.0 - s_tum) * edema[seq] + s_tum * ((1.0 - s_core) * rim[seq] + s_core * core[seq])
        li = (s_les * lesion).reshape(z1 - z0, sub, *r.shape[1:]).mean(axis=1)
        img = brain["frac"] * brain["tissue"][seq]
        roi = img[z0:z1, y0:y1, x0:x1]
        img[z0:z1, y0:y1, x0:x1] = roi - m * brain["tissue"][seq][z0:z1, y0:y1, x0:x1] + li
        images[seq] = img

    # Ground-truth labels to the slice grid by majority over the sub-slices (ties go to the lower label).
    counts = np.stack([(labels == k).reshape(z1 - z0, sub, *r.shape[1:]).sum(axis=1) for k in range(4)])
    mask = np.zeros((nz, ny, nx), dtype=np.uint8)
    mask[z0:z1, y0:y1, x0:x1] = np.argmax(counts, axis=0).astype(np.uint8)
    return images, mask


def _bias_field(spec: SiteSpec, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field exp(bias * T), T a quadratic in normalised coordinates with max |T| = 1.

    The pattern is fixed per site (coil geometry, seeded from the site name) plus a small per-case jitter.
    """
    x, y, z = (a / max(float(np.abs(a).max()), 1e-6) for a in _axes_mm(spec))
    x, y, z = x[None, None, :], y[None, :, None], z[:, None, None]
    site_coef = np.random.default_rng(zlib.crc32(spec.name.encode())).standard_normal(9)
    coef = (site_coef + 0.25 * rng.standard_normal(9)).astype(np.float32)
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    field = sum(cf * t for cf, t in zip(coef, terms, strict=True))
    field = np.broadcast_to(field, (len(z.ravel()), len(y.ravel()), len(x.ravel())))
    return np.exp(spec.bias * field / (np.abs(field).max() + 1e-6)).astype(np.float32)


def _scanner(images: dict[str, np.ndarray], spec: SiteSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Apply the site's gain, bias field, Rician noise and offset to the noise-free images."""
    bias = _bias_field(spec, rng)
    out = {}
    for seq in SEQUENCES:
        if seq == "adc":
            # ADC is a fitted ratio map: receive-coil bias largely cancels and vendor scaling differs less.
            gain, field = 1.0 + 0.5 * (spec.gain - 1.0), bias**0.25
        else:
            gain, field = spec.gain, bias
        signal = gain * images[seq] * field
        sigma = np.float32(spec.noise * gain * _WM[seq])
        n1 = rng.standard_normal(signal.shape, dtype=np.float32)
        n2 = rng.standard_normal(signal.shape, dtype=np.float32)
        # Magnitude of complex Gaussian noise: Rician, so the background stays positive and ~0.
        mag = np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)
        # Scanners store integers (ADC in 1e-6 mm^2/s); integral values also compress ~3x better on disk.
        out[seq] = np.round(mag + np.float32(spec.offset * _WM[seq])).astype(np.float32)
    return out


def _to_image(array: np.ndarray, spec: SiteSpec) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spec.spacing))
    # Physical centre of the grid at the origin of patient space: origins differ between sites.
    image.SetOrigin(tuple(-0.5 * (n - 1) * s for n, s in zip(spec.size, spec.spacing, strict=True)))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def generate_case(spec: SiteSpec, diagnosis: str, rng: np.random.Generator) -> dict[str, sitk.Image]:
    """One synthetic case: {"t1c", "flair", "adc"} float32 images and a uint8 "mask" on a shared geometry.

    Mask labels: 1 = enhancing tumour, 2 = necrosis, 3 = peritumoral edema; each has >= MIN_LABEL_VOXELS voxels.
    """
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    brain = _brain(spec, rng)
    for _ in range(50):
        params = _lesion_params(spec, brain, diagnosis, rng)
        clean, mask = _render(spec, brain, params, rng)
        counts = np.bincount(mask.ravel(), minlength=4)
        if counts[1:].min() >= MIN_LABEL_VOXELS:
            break
    else:
        raise RuntimeError(f"grid of site {spec.name} is too coarse for a lesion with {MIN_LABEL_VOXELS} voxels/label")
    noisy = _scanner(clean, spec, rng)
    case = {seq: _to_image(noisy[seq], spec) for seq in SEQUENCES}
    case["mask"] = _to_image(mask, spec)
    return case
