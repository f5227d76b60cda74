"""Pixel-level descriptors in pure torch (no OpenCV): foreground silhouette, Canny edges, colour
palette histograms, a palette+stroke style statistic, PSNR and SSIM.

All functions take a batch (N, 3, H, W) in pixel space [-1, 1] and work per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # PSNR of identical images (infinite) is reported as this


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float32."""
    return ((batch.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def luma(batch: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> Rec. 601 luma (N, 1, H, W) in [0, 1]."""
    unit = to_unit(batch)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (unit * weights).sum(dim=1, keepdim=True)


def background_colour(batch: torch.Tensor) -> torch.Tensor:
    """Per-image background colour (N, 3) in [0, 1]: the median of the one-pixel border."""
    unit = to_unit(batch)
    border = torch.cat([unit[..., 0, :], unit[..., -1, :], unit[..., :, 0], unit[..., :, -1]], dim=-1)
    return border.median(dim=-1).values


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Fill holes of boolean masks (N, 1, H, W): background is what connects to the border."""
    free = ~mask
    outside = torch.zeros_like(mask)
    outside[..., 0, :] = free[..., 0, :]
    outside[..., -1, :] = free[..., -1, :]
    outside[..., :, 0] |= free[..., :, 0]
    outside[..., :, -1] |= free[..., :, -1]
    for _ in range(4 * max(mask.shape[-2:])):
        grown = F.max_pool2d(outside.float(), 3, stride=1, padding=1).bool() & free
        if torch.equal(grown, outside):
            break
        outside = grown
    return ~outside


def foreground_mask(batch: torch.Tensor, threshold: float = 0.08, fill: bool = True) -> torch.Tensor:
    """Foreground silhouette (N, 1, H, W) bool.

    A pixel is foreground when some channel differs from the background colour (the border's median,
    white for emoji composited on white, including images whose alpha was composited on white) by more
    than ``threshold`` (in [0, 1] units). ``fill`` fills interior holes (white eyes, teeth).
    """
    unit = to_unit(batch)
    background = background_colour(batch).view(-1, 3, 1, 1)
    mask = (unit - background).abs().amax(dim=1, keepdim=True) > threshold
    return fill_holes(mask) if fill else mask


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), reflect padding."""
    if sigma <= 0:
        return image
    kernel = _gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    channels = image.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    mode = "reflect" if min(image.shape[-2:]) > radius else "replicate"
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode=mode), horizontal, groups=channels)
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode=mode), vertical, groups=channels)


def sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel gradients (gx, gy) of (N, 1, H, W), scaled so a unit step edge has magnitude 1."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 4.0
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))


def canny(batch: torch.Tensor, sigma: float = 1.0, low: float = 0.08, high: float = 0.2,
          colour: bool = True) -> torch.Tensor:
    """Canny edges (N, 1, H, W) bool: Gaussian blur, Sobel, non-maximum suppression, hysteresis.

    colour: per pixel, the gradient of the RGB channel with the largest magnitude (what OpenCV's
    Canny does on a colour image, so ControlNet's canny annotator), which keeps edges between
    colours of equal brightness; False: the gradient of luma. Thresholds are absolute gradient
    magnitudes in [0, 1] units (a full black-white step is 1).
    """
    if colour:
        gx, gy = sobel(gaussian_blur(to_unit(batch), sigma).flatten(0, 1)[:, None])
        gx, gy = gx.view(batch.shape[0], 3, *gx.shape[-2:]), gy.view(batch.shape[0], 3, *gy.shape[-2:])
        channel_magnitude = torch.hypot(gx, gy)
        strongest = channel_magnitude.argmax(dim=1, keepdim=True)
        gx, gy = gx.gather(1, strongest), gy.gather(1, strongest)
        magnitude = channel_magnitude.gather(1, strongest)
    else:
        gx, gy = sobel(gaussian_blur(luma(batch), sigma))
        magnitude = torch.hypot(gx, gy)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45.0) % 4).long()  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width]

    # neighbours along the gradient direction (image y grows downwards)
    pairs = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (a, b) in enumerate(pairs):
        is_max = (magnitude >= shifted(*a)) & (magnitude >= shifted(*b))
        keep |= (sector == index) & is_max
    thin = magnitude * keep
    strong = thin >= high
    weak = thin >= low
    edges = strong
    for _ in range(height * width):
        grown = F.max_pool2d(edges.float(), 3, stride=1, padding=1).bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a (2r+1) square (chessboard distance <= r)."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius).bool()


def edge_f1(predicted: torch.Tensor, reference: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """Per-image F1 (N,) of edge maps (N, 1, H, W) bool with a ``tolerance`` in pixels.

    Precision: predicted edge pixels within ``tolerance`` of a reference edge; recall: reference
    edges within ``tolerance`` of a predicted edge. Both empty: 1; one empty: 0.
    """
    predicted, reference = predicted.bool(), reference.bool()
    n_pred = predicted.flatten(1).sum(1).double()
    n_ref = reference.flatten(1).sum(1).double()
    hit_pred = (predicted & dilate(reference, tolerance)).flatten(1).sum(1).double()
    hit_ref = (reference & dilate(predicted, tolerance)).flatten(1).sum(1).double()
    precision = hit_pred / n_pred.clamp_min(1)
    recall = hit_ref / n_ref.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    f1 = torch.where((n_pred == 0) & (n_ref == 0), torch.ones_like(f1), f1)
    return f1.float()


def edge_f1_chance(predicted: torch.Tensor, reference: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """The F1 (N,) that edge maps of the same extent would score if placed at random.

    A random predicted edge pixel lands within ``tolerance`` of a reference edge with probability
    p0 = |dilate(reference)| / (H W): the expected precision; likewise the expected recall
    r0 = |dilate(predicted)| / (H W). F1_0 = 2 p0 r0 / (p0 + r0).
    """
    area = float(predicted.shape[-1] * predicted.shape[-2])
    precision = dilate(reference.bool(), tolerance).flatten(1).sum(1).double() / area
    recall = dilate(predicted.bool(), tolerance).flatten(1).sum(1).double() / area
    return (2 * precision * recall / (precision + recall).clamp_min(1e-12)).float()


def edge_f1_corrected(predicted: torch.Tensor, reference: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """Chance-corrected edge F1 (N,) in [-1, 1], Cohen's-kappa style: (F1 - F1_0) / (1 - F1_0).

    F1_0 is ``edge_f1_chance``. 1: the shapes agree perfectly; 0: no better than edges of the same
    extent scattered at random; plain F1 rewards any two dense, centred drawings (unrelated emoji
    score 0.45 with a 2 px tolerance), this does not. Both maps empty: 1.
    """
    f1 = edge_f1(predicted, reference, tolerance).double()
    chance = edge_f1_chance(predicted, reference, tolerance).double()
    corrected = (f1 - chance) / (1.0 - chance).clamp_min(1e-6)
    return torch.where(f1 >= 1.0, torch.ones_like(corrected), corrected).clamp(-1.0, 1.0).float()


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union (N,) of masks (N, 1, H, W); both empty: 1."""
    a, b = a.bool(), b.bool()
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union == 0, torch.ones_like(union), inter / union.clamp_min(1)).float()


def palette_histogram(batch: torch.Tensor, bins: int = 8, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Colour histogram (N, bins**3) of foreground pixels (all pixels when the mask is empty); sums to 1."""
    unit = to_unit(batch)
    if mask is None:
        mask = foreground_mask(batch, fill=False)
    quantized = (unit * bins).long().clamp_max(bins - 1)
    codes = (quantized[:, 0] * bins + quantized[:, 1]) * bins + quantized[:, 2]  # (N, H, W)
    histograms = []
    for code, keep in zip(codes, mask[:, 0], strict=True):
        selected = code[keep] if keep.any() else code.flatten()
        histogram = torch.bincount(selected.flatten(), minlength=bins**3).float()
        histograms.append(histogram / histogram.sum().clamp_min(1))
    return torch.stack(histograms)


GRADIENT_EDGES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.6)


def _histogram(values: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    if values.numel() == 0:
        return torch.zeros(len(edges))
    index = torch.bucketize(values, torch.tensor(edges[1:]), right=True)
    return torch.bincount(index, minlength=len(edges)).float() / values.numel()


def style_statistics(batch: torch.Tensor) -> torch.Tensor:
    """Palette + stroke statistics (N, 36): what makes a house style, with content averaged out.

    Per image, over foreground pixels: luma histogram (8), saturation histogram (8), gradient
    magnitude histogram (8, from flat fills to hard outlines), Canny edge density, the share of edges
    that are dark (outlines), mean luma/saturation at edges, colour entropy and number of distinct
    colours (32 levels per channel), share of foreground pixels, and 4 colour-count quantiles.
    """
    unit = to_unit(batch)
    mask = foreground_mask(batch, fill=False)[:, 0]
    gray = luma(batch)
    gx, gy = sobel(gray)
    gradient = torch.hypot(gx, gy)[:, 0]
    edges = canny(batch)[:, 0]
    maxc, minc = unit.amax(dim=1), unit.amin(dim=1)
    saturation = (maxc - minc) / maxc.clamp_min(1e-6)
    codes = ((unit * 31.999).long() * torch.tensor([1024, 32, 1]).view(1, 3, 1, 1)).sum(1)
    rows = []
    for i in range(batch.shape[0]):
        keep = mask[i] if mask[i].any() else torch.ones_like(mask[i])
        count = keep.sum().float()
        y = gray[i, 0][keep]
        s = saturation[i][keep]
        g = gradient[i][keep]
        e = edges[i] & keep
        edge_count = e.sum().float()
        edge_luma = gray[i, 0][e].mean() if edge_count > 0 else torch.tensor(1.0)
        edge_sat = saturation[i][e].mean() if edge_count > 0 else torch.tensor(0.0)
        dark_edges = (gray[i, 0][e] < 0.3).float().mean() if edge_count > 0 else torch.tensor(0.0)
        _, colour_counts = torch.unique(codes[i][keep], return_counts=True)
        p = colour_counts.float() / count
        entropy = -(p * p.log()).sum()
        top = p.sort(descending=True).values
        cumulative = top.cumsum(0)
        quantiles = [float((cumulative < q).sum() + 1) for q in (0.5, 0.8, 0.9, 0.95)]
        rows.append(torch.cat([
            _histogram(y, tuple(i / 8 for i in range(8))),
            _histogram(s, tuple(i / 8 for i in range(8))),
            _histogram(g, GRADIENT_EDGES),
            torch.tensor([
                float(edge_count / count), float(dark_edges), float(edge_luma), float(edge_sat),
                float(entropy), math.log1p(float(colour_counts.numel())), float(count / keep.numel()),
                float(y.std()) if y.numel() > 1 else 0.0,
            ]),
            torch.log1p(torch.tensor(quantiles)),
        ]))
    return torch.stack(rows).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (N,) in dB over [0, 1] pixels; identical images give PSNR_CAP_DB."""
    mse = ((to_unit(a) - to_unit(b)) ** 2).flatten(1).mean(1).double()
    value = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20))
    return value.clamp_max(PSNR_CAP_DB).float()


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (N,) (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03),
    on [0, 1] pixels, averaged over channels and positions. Identical images give 1."""
    x, y = to_unit(a).double(), to_unit(b).double()
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(t.float(), sigma).double()

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(1).float()
