"""Independent numpy references shared by the tests."""

import numpy as np


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """Run lengths of a binary mask, column-major, first run = background (COCO uncompressed)."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    return np.concatenate([[0], runs]) if flat[0] else runs


def visible_extent(mask: np.ndarray, window, snap: float = 1e-3) -> np.ndarray | None:
    """Tight (x1, y1, x2, y2) box of the union of `mask`'s pixel squares [c, c+1) × [r, r+1)
    clipped to `window` (x1, y1, x2, y2), its edges within `snap` of an integer moved onto it
    first, or None if no pixel overlaps it with positive area."""
    window = np.asarray(window, np.float64)
    window = np.where(np.abs(window - np.round(window)) < snap, np.round(window), window)
    rows, cols = np.nonzero(mask)
    x1, y1 = np.maximum(cols, window[0]), np.maximum(rows, window[1])
    x2, y2 = np.minimum(cols + 1.0, window[2]), np.minimum(rows + 1.0, window[3])
    hit = (x1 < x2) & (y1 < y2)
    if not hit.any():
        return None
    return np.array([x1[hit].min(), y1[hit].min(), x2[hit].max(), y2[hit].max()])


def bilinear_sample(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of a zero-extended mask at points (x, y); pixel centres at k + 0.5."""
    padded = np.pad(mask.astype(np.float64), 1)  # padded[r + 1, c + 1] = mask[r, c]
    u, v = x.astype(np.float64) + 0.5, y.astype(np.float64) + 0.5  # (x - 0.5) + 1 for the pad
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    out = np.zeros(np.shape(x))
    for dc, dr in ((0, 0), (1, 0), (0, 1), (1, 1)):
        c, r = u0 + dc, v0 + dr
        inside = (r >= 0) & (r < padded.shape[0]) & (c >= 0) & (c < padded.shape[1])
        rows = np.clip(r, 0, padded.shape[0] - 1)
        cols = np.clip(c, 0, padded.shape[1] - 1)
        weight = (1 - np.abs(u - c)) * (1 - np.abs(v - r))
        out += weight * np.where(inside, padded[rows, cols], 0.0)
    return out


def box_crop(
    mask: np.ndarray, box: np.ndarray, size: int, scale: float, offset_xy=(0.0, 0.0)
) -> np.ndarray:
    """The CONTRACTS.md GT-box crop, before thresholding: [size, size] float64 values of the
    original-resolution ``mask`` at the centres of a size×size grid over ``box`` (x1, y1, x2, y2
    in the output image, where output = original * scale - offset_xy)."""
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    steps = (np.arange(size) + 0.5) / size
    xs, ys = x1 + steps * (x2 - x1), y1 + steps * (y2 - y1)
    x, y = np.meshgrid((xs + offset_xy[0]) / scale, (ys + offset_xy[1]) / scale)
    return bilinear_sample(mask, x, y)


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] IoU in float64, 0 where the union is 0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def anchor_labels_numpy(anchors, gt_boxes, gt_valid, fg_iou, bg_iou):
    """Matcher with low-quality matches: labels 1/0/-1 and the argmax GT row of every anchor."""
    rows = np.flatnonzero(gt_valid)
    if len(rows) == 0:
        return np.zeros(len(anchors), int), np.zeros(len(anchors), int)
    iou = numpy_iou(gt_boxes[rows], anchors)  # [G, A]
    best = iou.max(axis=0)
    labels = np.where(best >= fg_iou, 1, np.where(best < bg_iou, 0, -1))
    for g in range(len(rows)):
        if iou[g].max() > 0:
            labels[iou[g] == iou[g].max()] = 1
    return labels, rows[iou.argmax(axis=0)]


def encode_numpy(gt, ref, weights=(1.0, 1.0, 1.0, 1.0)):
    """Faster R-CNN deltas of `gt` relative to `ref` (x1, y1, x2, y2), float64."""
    gt, ref = gt.astype(np.float64), ref.astype(np.float64)
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    dx = (gt[:, 0] + gw / 2 - ref[:, 0] - rw / 2) / rw
    dy = (gt[:, 1] + gh / 2 - ref[:, 1] - rh / 2) / rh
    wx, wy, ww, wh = weights
    return np.stack([wx * dx, wy * dy, ww * np.log(gw / rw), wh * np.log(gh / rh)], axis=1)


def bce_numpy(logits, labels):
    """Elementwise sigmoid binary cross-entropy of logits against (soft) labels, float64."""
    logits = logits.astype(np.float64)
    return np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))


def smooth_l1_numpy(x, beta):
    """Elementwise smooth L1 (Huber / beta); `beta = 0` is plain L1."""
    ax = np.abs(x)
    return ax if beta == 0 else np.where(ax < beta, 0.5 * ax**2 / beta, ax - 0.5 * beta)
