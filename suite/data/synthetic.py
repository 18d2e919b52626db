"""Procedural chest radiograph phantoms from seven simulated sites: the suite's offline default.

Real chest X-ray sets need credentials and downloads, so tests, CI and quick benchmarks run
on these phantoms instead. They hold what a classifier has to learn (lungs, heart, ribs and
five findings of graded severity) and what makes multi-site evaluation interesting (every
site acquires differently, and some sites are harder). They are NOT images of patients and
carry no clinical meaning; datasets/synthetic-cxr.md describes the generation model.

Geometry is written in normalised image coordinates, u (left to right) and v (top to
bottom) both in [-1, 1], so the same phantom renders at any size. The phantom is laid out
as a PA film is read: the patient's right lung is on the image left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from suite.data.imageset import XRV_MAX, XRV_MIN, ImageSet

LABELS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumothorax", "Consolidation"]
N_SITES = 7

_PIXELS_PER_CHUNK = 1 << 21   # pixels rendered at once: ~8 MB per float32 layer at any size
_SIDES = (-1.0, 1.0)          # image-left lung (patient's right), image-right lung


@dataclass(frozen=True)
class SiteAcquisition:
    """How one simulated site turns anatomy into pixels, and how often it sees each finding."""

    name: str
    description: str
    prevalence: tuple[float, ...]  # per LABELS
    contrast: float = 1.0          # gain around mid-grey
    gamma: float = 1.0             # exposure curve: < 1 washes out, > 1 darkens
    offset: float = 0.0            # brightness shift after the gain
    noise: float = 0.01            # detector noise std, in [0, 1] units
    blur: float = 0.0              # Gaussian blur sigma, as a fraction of image width
    resolution: float = 1.0        # effective resolution, as a fraction of the output size
    collimation: float = 0.0       # fraction of each edge hidden by the shutters


SITES: tuple[SiteAcquisition, ...] = (
    SiteAcquisition("site-1", "reference: sharp, clean, full contrast",
                    (0.15, 0.20, 0.15, 0.12, 0.18), noise=0.012, blur=0.004),
    SiteAcquisition("site-2", "low contrast, lifted blacks",
                    (0.25, 0.30, 0.12, 0.10, 0.22), contrast=0.72, offset=0.06,
                    noise=0.02, blur=0.006),
    SiteAcquisition("site-3", "portable/ICU: dark and noisy, sickest population",
                    (0.30, 0.35, 0.10, 0.20, 0.30), gamma=1.35, noise=0.05, blur=0.008),
    SiteAcquisition("site-4", "low effective resolution",
                    (0.18, 0.15, 0.20, 0.10, 0.15), noise=0.015, blur=0.008,
                    resolution=0.5),
    SiteAcquisition("site-5", "washed out, tightly collimated",
                    (0.12, 0.12, 0.25, 0.15, 0.12), contrast=0.9, gamma=0.7,
                    noise=0.02, blur=0.005, collimation=0.07),
    SiteAcquisition("site-6", "high contrast, slightly dark",
                    (0.20, 0.25, 0.15, 0.30, 0.20), contrast=1.3, offset=-0.04,
                    noise=0.025, blur=0.004),
    SiteAcquisition("site-7", "hardest: low resolution, noisy, low contrast",
                    (0.22, 0.18, 0.18, 0.14, 0.25), contrast=0.8, gamma=1.15,
                    noise=0.045, blur=0.012, resolution=0.6),
)


# The vendor's (model owner's) own acquisition profiles: a different fleet of scanners and a
# different case mix from every hospital site, so the vendor's model meets a realistic domain
# shift at the hospitals. Its images are disjoint from the hospitals' by construction (their
# own random streams, their own ids and patients) and checked again by `suite.data.roles`.
VENDOR_SITES: tuple[SiteAcquisition, ...] = (
    SiteAcquisition("vendor-1", "vendor's curated archive: modern DR, clean, enriched for findings",
                    (0.25, 0.25, 0.22, 0.18, 0.22), contrast=1.1, noise=0.01, blur=0.003),
    SiteAcquisition("vendor-2", "vendor's partner clinic: older CR, soft and slightly bright",
                    (0.20, 0.22, 0.18, 0.12, 0.20), contrast=0.8, gamma=0.85, offset=0.04,
                    noise=0.02, blur=0.008),
    SiteAcquisition("vendor-3", "vendor's emergency archive: portable, dark and noisy",
                    (0.28, 0.30, 0.12, 0.22, 0.28), gamma=1.3, noise=0.045, blur=0.009,
                    resolution=0.7),
    SiteAcquisition("vendor-4", "vendor's screening van: low resolution, contrasty, collimated",
                    (0.18, 0.18, 0.24, 0.15, 0.18), contrast=1.2, gamma=1.1, noise=0.03,
                    blur=0.01, resolution=0.55, collimation=0.05),
)
VENDOR_STREAM = 0x56454E44    # "VEND": the vendor's streams never coincide with the sites'


def generate_synthetic(n_train_per_site: int = 300, n_test_per_site: int = 100, size: int = 64,
                       seed: int = 0, n_sites: int = N_SITES) -> ImageSet:
    """Phantoms for `n_sites` sites; the same arguments always give bit-identical arrays.

    The first `n_train_per_site` images of each site are 'train', the rest 'test'. Each site
    draws from its own stream spawned from `seed`, so a site's images do not depend on how
    many other sites are generated.
    """
    if not 1 <= n_sites <= N_SITES:
        raise ValueError(f"n_sites must be in 1..{N_SITES}, got {n_sites}")
    if n_train_per_site < 0 or n_test_per_site < 0 or n_train_per_site + n_test_per_site == 0:
        raise ValueError("need at least one image per site")
    streams = np.random.SeedSequence(seed).spawn(N_SITES)[:n_sites]
    return _generate_sites("synthetic", SITES[:n_sites], streams, n_train_per_site,
                           n_test_per_site, size, id_prefix="synth-s", patient_prefix="synth-patient-s",
                           site_names=[f"site-{s}" for s in range(1, n_sites + 1)])


def generate_vendor_synthetic(n_per_site: int = 800, size: int = 64, seed: int = 0) -> ImageSet:
    """The vendor's own training phantoms: `VENDOR_SITES`, all 'train', never a hospital's.

    Ids `synth-vendor-v{k}-{i:06d}`, patients `synth-vendor-patient-v{k}-{i:06d}`; streams
    spawned from (seed, VENDOR_STREAM), so they share no draw with `generate_synthetic`.
    """
    if n_per_site < 1:
        raise ValueError("need at least one vendor image per site")
    streams = np.random.SeedSequence([seed, VENDOR_STREAM]).spawn(len(VENDOR_SITES))
    return _generate_sites("synthetic-vendor", VENDOR_SITES, streams, n_per_site, 0, size,
                           id_prefix="synth-vendor-v", patient_prefix="synth-vendor-patient-v",
                           site_names=[s.name for s in VENDOR_SITES])


def _generate_sites(name: str, sites, streams, n_train: int, n_test: int, size: int,
                    id_prefix: str, patient_prefix: str, site_names: list[str]) -> ImageSet:
    """Render every site from its own stream and stack them into one ImageSet."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    n_sites, n_per_site = len(sites), n_train + n_test
    parts = [_generate_site(np.random.default_rng(stream), site, n_per_site, size)
             for stream, site in zip(streams, sites)]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    site_no = np.repeat(np.arange(1, n_sites + 1), n_per_site)
    index = np.tile(np.arange(n_per_site), n_sites)
    return ImageSet(
        name=name,
        images=images,
        labels=labels,
        label_names=list(LABELS),
        image_ids=np.array([f"{id_prefix}{s}-{i:06d}" for s, i in zip(site_no, index)]),
        sites=np.array([site_names[s - 1] for s in site_no]),
        patient_ids=np.array([f"{patient_prefix}{s}-{i:06d}" for s, i in zip(site_no, index)]),
        splits=np.where(index < n_train, "train", "test"),
    )


def _generate_site(rng: np.random.Generator, site: SiteAcquisition, n: int,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of one site, rendered in chunks so memory stays bounded at large sizes."""
    labels = _draw_labels(rng, site, n)
    cases = _draw_cases(rng, labels)
    grid = _pixel_centres(size)
    site_operator = _acquisition_operator(site, size)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    images = np.empty((n, 1, size, size), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        phantom = _render_phantom(rng, grid, {k: v[rows] for k, v in cases.items()})
        pixels = _acquire(rng, site, site_operator, phantom)
        images[rows, 0] = pixels * (XRV_MAX - XRV_MIN) + XRV_MIN
    return images, labels


# ---------------------------------------------------------------- labels and per-image draws

def _draw_labels(rng: np.random.Generator, site: SiteAcquisition, n: int) -> np.ndarray:
    """Bernoulli findings at the site's prevalence, with mild clinical co-occurrence.

    Effusion is likelier with cardiomegaly (heart failure) and consolidation with effusion
    (parapneumonic), so a model cannot treat the labels as fully independent.
    """
    p = np.broadcast_to(np.asarray(site.prevalence, dtype=np.float64), (n, len(LABELS))).copy()
    draws = rng.random((n, len(LABELS)))
    cardiomegaly = draws[:, 0] < p[:, 0]
    p[:, 1] = np.where(cardiomegaly, np.minimum(1.6 * p[:, 1], 0.6), 0.85 * p[:, 1])
    effusion = draws[:, 1] < p[:, 1]
    p[:, 4] = np.where(effusion, np.minimum(1.5 * p[:, 4], 0.6), 0.9 * p[:, 4])
    return (draws < p).astype(np.float32)


def _draw_cases(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image scalars: anatomy that varies between patients plus each finding's severity."""
    n = len(labels)
    normal = lambda mean, sd: rng.normal(mean, sd, n)           # noqa: E731
    uniform = lambda low, high: rng.uniform(low, high, n)       # noqa: E731
    breath = normal(0.0, 1.0)
    cases = {
        # patient position: a small shift, tilt and magnification
        "shift_u": normal(0.0, 0.03), "shift_v": normal(0.0, 0.03),
        "tilt": normal(0.0, 0.04), "zoom": normal(1.0, 0.04),
        # body habitus and breathing
        "body_half_width": normal(0.90, 0.03),
        "lung_x": normal(0.40, 0.015), "lung_a": normal(0.28, 0.012),
        "lung_y": normal(-0.12, 0.02), "lung_b": 0.62 + 0.03 * breath + normal(0, 0.015),
        "dome_y": 0.36 + 0.045 * breath + normal(0, 0.02),
        "lung_dark": normal(0.34, 0.03),
        "heart_y": normal(0.0, 0.02),
        "rib_spacing": normal(0.135, 0.006), "rib_phase": uniform(0.0, 1.0),
        "spine_phase": uniform(0.0, 1.0),
    }
    cases.update(_draw_severities(rng, labels))
    return cases


def _draw_severities(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """How strongly each present finding shows, and where.

    Severities spread from barely visible to obvious: that spread, plus normal anatomical
    variation that mimics findings (a large normal heart), keeps the task imperfect.
    """
    n = len(labels)
    uniform = lambda low, high: rng.uniform(low, high, n)       # noqa: E731
    side = lambda: np.where(rng.random(n) < 0.5, -1.0, 1.0)    # noqa: E731
    cardiomegaly, effusion, nodule, pneumothorax, consolidation = labels.T
    # Cardiothoracic ratio: normal 0.45 +- 0.035, enlarged 0.53 +- 0.04, so the tails overlap.
    ctr = np.where(cardiomegaly > 0, rng.normal(0.53, 0.04, n), rng.normal(0.45, 0.035, n))
    nodule_is_mass = rng.random(n) < 0.15
    return {
        "ctr": np.clip(ctr, 0.33, 0.68),
        "effusion": effusion, "effusion_side": np.where(rng.random(n) < 0.25, 0.0, side()),
        "effusion_height": uniform(0.0, 0.22), "effusion_density": uniform(0.25, 0.75),
        "nodule": nodule, "nodule_side": side(),
        "nodule_du": uniform(-0.6, 0.6), "nodule_dv": uniform(-0.75, 0.35),
        "nodule_radius": np.where(nodule_is_mass, uniform(0.10, 0.15), uniform(0.05, 0.09)),
        "nodule_density": uniform(0.15, 0.45),
        "pneumothorax": pneumothorax, "pneumothorax_side": side(),
        "pneumothorax_collapse": uniform(0.08, 0.35),
        "consolidation": consolidation, "consolidation_side": side(),
        "consolidation_du": uniform(-0.5, 0.5), "consolidation_dv": uniform(-0.5, 0.4),
        "consolidation_radius": uniform(0.12, 0.25),
        "consolidation_density": uniform(0.35, 0.8),
    }


# ---------------------------------------------------------------- rendering the phantom

def _pixel_centres(size: int) -> np.ndarray:
    """Normalised coordinate of each pixel centre along one axis, in (-1, 1)."""
    return ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def _render_phantom(rng: np.random.Generator, grid: np.ndarray,
                    cases: dict[str, np.ndarray]) -> np.ndarray:
    """Ideal density images [B, H, W] in [0, 1] (bright = dense) before any site effects."""
    c = {k: v[:, None, None].astype(np.float32) for k, v in cases.items()}
    u, v = _patient_coordinates(grid, c)
    n, size = len(next(iter(cases.values()))), len(grid)
    vessels = _vessel_markings(rng, n, size)
    consolidation_texture = _smooth_noise(rng, n, size, cells=10)

    body = _body(u, v, c)
    heart, mediastinum = _heart(u, v, c), _mediastinum(u, v)
    not_lung = 1.0 - np.maximum(heart, mediastinum)
    centrality = 1.0 - np.clip(np.abs(u) / c["body_half_width"], 0.0, 1.0)
    density = 0.06 + body * (0.50 + 0.08 * centrality)   # soft tissue is thickest mid-chest
    density += body * (0.09 * _spine(u, v, c) + 0.11 * _clavicles(u, v))
    density -= 0.07 * _trachea(u, v)
    lungs = [_lung(u, v, c, side) * not_lung for side in _SIDES]
    for side, lung in zip(_SIDES, lungs):
        density += _lung_density(u, v, c, side, lung, vessels, consolidation_texture)
    density += 0.08 * _ribs(u, v, c) * body * (0.3 + 0.7 * np.maximum(*lungs))
    return np.clip(density, 0.0, 1.0)


def _patient_coordinates(grid: np.ndarray, c: dict[str, np.ndarray]):
    """Screen coordinates mapped into each patient's frame (shift, tilt, magnification)."""
    u0 = grid[None, None, :] - c["shift_u"]
    v0 = grid[None, :, None] - c["shift_v"]
    cos, sin = np.cos(c["tilt"]), np.sin(c["tilt"])
    return (cos * u0 + sin * v0) / c["zoom"], (-sin * u0 + cos * v0) / c["zoom"]


def _soft_inside(signed_distance: np.ndarray, edge) -> np.ndarray:
    """1 inside a shape, 0 outside, ramping linearly across a band 4 * `edge` wide.

    A clipped ramp instead of a sigmoid: it looks the same after the site's blur and is
    several times cheaper, which matters because every phantom needs dozens of masks.
    """
    ramp = signed_distance / (4.0 * edge)
    ramp += 0.5
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def _ellipse_radius(u, v, cu, cv, a, b):
    """Normalised radius: 1 on the ellipse with centre (cu, cv) and semi-axes a, b."""
    return np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)


def _body(u, v, c):
    """Soft-tissue silhouette: the trunk, a little wider at the shoulders than the waist."""
    half_width = c["body_half_width"] * (1.0 - 0.05 * v)
    return _soft_inside(half_width - np.abs(u), 0.015)


def _lung_geometry(c, side: float):
    """Centre and semi-axes of one lung; the right lung (image left) is a little wider."""
    right = side < 0
    cu = side * c["lung_x"]
    a = c["lung_a"] * (1.04 if right else 1.0)
    return cu, c["lung_y"], a, c["lung_b"]


def _lung_radius(u, v, cu, cv, a, b):
    """Egg-shaped radius: lungs are narrow at the apex and wide at the base."""
    taper = np.clip(1.0 + 0.32 * (v - cv) / b, 0.45, 1.5)
    return _ellipse_radius(u, v, cu, cv, a * taper, b)


def _dome_height(u, c, side: float):
    """Diaphragm dome under one lung; the right hemidiaphragm sits a little higher."""
    cu = side * c["lung_x"]
    return c["dome_y"] - (0.035 if side < 0 else 0.0) + 1.3 * (u - cu - side * 0.03) ** 2


def _lung(u, v, c, side: float):
    """Aerated lung field of one side, cut below by its diaphragm dome."""
    cu, cv, a, b = _lung_geometry(c, side)
    radius = _lung_radius(u, v, cu, cv, a, b)
    return _soft_inside(1.0 - radius, 0.04) * _soft_inside(_dome_height(u, c, side) - v, 0.012)


def _heart(u, v, c):
    """Cardiac silhouette sized by the cardiothoracic ratio and offset to the patient's left."""
    thorax_width = 2.0 * (c["lung_x"] + 1.3 * c["lung_a"])
    half_width = c["ctr"] * thorax_width / 2.0
    half_height = 0.24 * np.sqrt(half_width / 0.35)
    cu = 0.30 * half_width
    cv = c["dome_y"] + 0.02 - half_height + c["heart_y"]
    return _soft_inside(1.0 - _ellipse_radius(u, v, cu, cv, half_width, half_height), 0.015)


def _mediastinum(u, v):
    """Central soft-tissue column above the heart, with the aortic knob on the image right."""
    column = _soft_inside(0.10 + 0.03 * (v + 1.0) - np.abs(u - 0.01), 0.02)
    knob = _soft_inside(1.0 - _ellipse_radius(u, v, 0.12, -0.36, 0.07, 0.06), 0.08)
    return np.maximum(column, knob)


def _trachea(u, v):
    """Air column down the midline that ends at the carina."""
    return _soft_inside(0.028 - np.abs(u), 0.008) * _soft_inside(-0.32 - v, 0.03)


def _spine(u, v, c):
    """Vertebral column behind the mediastinum, with bright endplates every vertebra."""
    column = _soft_inside(0.065 - np.abs(u), 0.012)
    endplates = 0.6 + 0.4 * _narrow_peaks(v / 0.11 + c["spine_phase"])
    return column * endplates


def _clavicles(u, v):
    """Two collarbones rising laterally from the sternal notch."""
    centre_line = -0.74 - 0.14 * np.abs(u) + 0.10 * u ** 2
    along = _soft_inside(0.62 - np.abs(u), 0.03) * _soft_inside(np.abs(u) - 0.07, 0.02)
    return np.exp(-((v - centre_line) / 0.035) ** 2) * along


def _ribs(u, v, c):
    """Posterior ribs as curved bright bands over the chest, plus fainter anterior ribs."""
    au = np.abs(u)
    posterior_curve = 0.7 * au * au - 0.3 * au
    anterior_curve = -0.40 * au
    posterior = _narrow_peaks((v - posterior_curve) / c["rib_spacing"] + c["rib_phase"])
    anterior = _narrow_peaks((v - anterior_curve) / (1.1 * c["rib_spacing"]))
    chest = _soft_inside(v + 0.82, 0.03) * _soft_inside(c["dome_y"] + 0.12 - v, 0.04)
    lateral = _soft_inside(0.78 - au, 0.04) * _soft_inside(au - 0.07, 0.02)
    return (posterior + 0.4 * anterior) * chest * lateral


def _narrow_peaks(phase: np.ndarray) -> np.ndarray:
    """Periodic bands one unit of `phase` apart, each about a third of the period wide."""
    wave = np.cos(2.0 * np.pi * phase)
    wave += 1.0
    wave *= 0.5
    return wave * wave * wave


def _lung_density(u, v, c, side, lung, vessels, texture):
    """Density change inside one lung: air darkens it, vessels and findings brighten it."""
    hilum = np.sqrt((u - side * 0.17) ** 2 + v * v)
    markings = 0.12 * vessels * (0.35 + np.exp(-hilum / 0.22))
    present = lambda key: c[key] * (c[key + "_side"] * side >= 0)   # noqa: E731
    opacity = np.maximum(
        _only_where(present("effusion"), _effusion, u, v, c, side),
        _only_where(present("consolidation"), _consolidation, u, v, c, side, texture))
    density = lung * (markings - c["lung_dark"]) * (1.0 - opacity)
    density += _only_where(present("pneumothorax"), _pneumothorax, u, v, c, side, lung, markings)
    density += _only_where(present("nodule"), _nodule, u, v, c, side)
    return density


def _only_where(present: np.ndarray, render, u, v, c, side, *maps) -> np.ndarray:
    """`render` run only on the images that have the finding on this side; zeros elsewhere.

    Each finding is present in a minority of images, so this skips most of the work.
    """
    rows = np.flatnonzero(present.ravel() > 0)
    out = np.zeros(u.shape, dtype=np.float32)
    if rows.size:
        out[rows] = render(u[rows], v[rows], {k: x[rows] for k, x in c.items()}, side,
                           *(m[rows] for m in maps))
    return out


def _vessel_markings(rng, n, size):
    """Branching linear lung markings: the zero crossings of a smooth random field."""
    field = _smooth_noise(rng, n, size, cells=20)
    return np.exp(-(field / 0.35) ** 2)


# ---------------------------------------------------------------- findings
# Each returns the finding as if present; _only_where decides which images get it.

def _effusion(u, v, c, side):
    """Opacity fraction of dependent fluid: a meniscus rising laterally blunts the angle."""
    cu, _, a, _ = _lung_geometry(c, side)
    lateral = np.clip(side * (u - cu) / (1.3 * a), 0.0, 1.0)
    meniscus = (0.05 + 0.4 * c["effusion_height"]) * lateral ** 2
    level = _dome_height(cu, c, side) - c["effusion_height"] - meniscus
    fluid = _soft_inside(v - level, 0.025) * (0.75 + 0.25 * np.clip((v - level) / 0.15, 0, 1))
    return c["effusion_density"] * fluid


def _consolidation(u, v, c, side, texture):
    """Opacity fraction of patchy airspace disease: smooth noise in a roundish lung region."""
    cu, cv, a, b = _lung_geometry(c, side)
    centre_u = cu + c["consolidation_du"] * a
    centre_v = cv + c["consolidation_dv"] * b
    radius2 = ((u - centre_u) ** 2 + (v - centre_v) ** 2) / c["consolidation_radius"] ** 2
    patch = _soft_inside(0.8 * texture + 1.6 * (1.0 - radius2) - 0.6, 0.25)
    return c["consolidation_density"] * patch


def _nodule(u, v, c, side):
    """Added density of a round opacity, from a faint small nodule to a dense mass."""
    cu, cv, a, b = _lung_geometry(c, side)
    dv = c["nodule_dv"]
    centre_u = cu + c["nodule_du"] * a * np.clip(1.0 + 0.32 * dv, 0.45, 1.5)
    centre_v = cv + dv * b
    distance = np.sqrt((u - centre_u) ** 2 + (v - centre_v) ** 2)
    blob = _soft_inside(c["nodule_radius"] - distance, 0.25 * c["nodule_radius"])
    return c["nodule_density"] * blob


def _pneumothorax(u, v, c, side, lung, markings):
    """Density change of air between chest wall and a collapsed lung: a darker rim without
    vessel markings, edged by a thin pleural line. The lung shrinks towards its hilum, so
    the rim is apical and lateral."""
    cu, cv, a, b = _lung_geometry(c, side)
    keep = 1.0 - c["pneumothorax_collapse"]
    anchor_u, anchor_v = cu - side * 0.5 * a, cv + 0.45 * b
    radius = _lung_radius(anchor_u + (u - anchor_u) / keep, anchor_v + (v - anchor_v) / keep,
                          cu, cv, a, b)
    rim = lung * _soft_inside(radius - 1.0, 0.03)
    inner_lung = _soft_inside(1.0 - _lung_radius(u, v, cu, cv, 0.93 * a, 0.95 * b), 0.02)
    pleural_line = lung * inner_lung * np.exp(-((radius - 1.0) / 0.035) ** 2)
    return -rim * (0.07 + markings) + 0.10 * pleural_line


# ---------------------------------------------------------------- smooth fields, linear operators

def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Unit-variance smooth random fields [n, size, size] with about `cells` blobs across.

    White noise on a coarse lattice is interpolated with a Gaussian kernel by two matrix
    products, so texture scale is the same at every output size and costs no Python loop.
    """
    white = rng.standard_normal((n, cells, cells), dtype=np.float32)
    return _apply_separable(_gaussian_interpolation(size, cells), white)


def _apply_separable(matrix: np.ndarray, images: np.ndarray) -> np.ndarray:
    """`matrix @ image @ matrix.T` for every image of a batch, as two large matrix products.

    numpy's broadcast matmul loops over the batch outside BLAS and is ~25x slower.
    """
    n, height, _ = images.shape
    along_rows = (images.reshape(n * height, -1) @ matrix.T).reshape(n, height, -1)
    both = matrix @ along_rows.transpose(1, 0, 2).reshape(height, -1)
    return np.ascontiguousarray(both.reshape(len(matrix), n, -1).transpose(1, 0, 2))


def _gaussian_interpolation(size: int, cells: int, margin: float = 0.2) -> np.ndarray:
    """[size, cells] weights whose rows have unit norm, so interpolated noise has unit variance."""
    knots = np.linspace(-1.0 - margin, 1.0 + margin, cells, dtype=np.float32)
    spacing = knots[1] - knots[0]
    weights = np.exp(-0.5 * ((_pixel_centres(size)[:, None] - knots[None, :]) / spacing) ** 2)
    return (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- site acquisition

def _acquisition_operator(site: SiteAcquisition, size: int) -> np.ndarray:
    """One [size, size] matrix for the site's optics: blur, then sample at its resolution.

    Both steps are separable and linear, so image -> A @ image @ A.T applies them.
    """
    operator = _gaussian_blur_matrix(size, site.blur * size)
    if site.resolution < 1.0:
        low = max(4, int(round(site.resolution * size)))
        resample = _linear_upsample_matrix(low, size) @ _area_downsample_matrix(size, low)
        operator = resample @ operator
    return operator.astype(np.float32)


def _gaussian_blur_matrix(size: int, sigma_px: float) -> np.ndarray:
    """Row-normalised Gaussian blur along one axis (identity when sigma is tiny)."""
    if sigma_px < 0.05:
        return np.eye(size)
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    weights = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def _area_downsample_matrix(size: int, low: int) -> np.ndarray:
    """[low, size] averaging of the input pixels each coarse pixel covers (any ratio)."""
    fine_edges = np.arange(size + 1) * (low / size)
    starts = np.maximum(fine_edges[None, :-1], np.arange(low)[:, None])
    ends = np.minimum(fine_edges[None, 1:], np.arange(low)[:, None] + 1)
    overlap = np.clip(ends - starts, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _linear_upsample_matrix(low: int, size: int) -> np.ndarray:
    """[size, low] linear interpolation from coarse pixel centres back to the output grid."""
    position = np.clip((np.arange(size) + 0.5) * low / size - 0.5, 0, low - 1)
    left = np.floor(position).astype(int)
    right = np.minimum(left + 1, low - 1)
    weight = position - left
    matrix = np.zeros((size, low))
    matrix[np.arange(size), left] += 1.0 - weight
    matrix[np.arange(size), right] += weight
    return matrix


def _acquire(rng: np.random.Generator, site: SiteAcquisition, operator: np.ndarray,
             phantom: np.ndarray) -> np.ndarray:
    """The site's detector: optics, exposure curve, shutters and noise, clipped to [0, 1]."""
    image = _apply_separable(operator, phantom)
    image = np.clip(image, 0.0, 1.0) ** site.gamma
    image = 0.5 + site.contrast * (image - 0.5) + site.offset
    if site.collimation > 0:
        image = _collimate(image, site.collimation)
    image = image + site.noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _collimate(image: np.ndarray, fraction: float) -> np.ndarray:
    """Shuttered borders receive no exposure and read bright, as on film."""
    grid = np.abs(_pixel_centres(image.shape[-1]))
    open_1d = _soft_inside(1.0 - fraction * 2.0 - grid, 0.01)
    open_2d = open_1d[:, None] * open_1d[None, :]
    return open_2d * image + (1.0 - open_2d) * 0.92
