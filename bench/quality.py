"""How far each approximation is from exact softmax attention, on Gaussian inputs.

For q, k, v ~ N(0, 1) of shape (1, H, N, D), in float64 through fastattn.reference (the semantics every
backend shares), the relative error ||approx - exact||_F / ||exact||_F against exact softmax
attention (causal for performer-causal), averaged over seeds, for each standard deviation of q and
k in ``qk_stds`` (v stays N(0, 1); FAVOR+'s variance grows like exp(|q|^2 + |k|^2)), for: Performer against the number of
random features m (orthogonal features, fastattn.random_features); BigBird against the number of
random blocks (with the layout's density); Linformer against kp, on the inputs its projections are
made for: keys and values that form kp segments of N/kp consecutive tokens sharing one key and one
value each, up to Gaussian noise of std LINFORMER_NOISE (a sequence of rank kp plus noise), with the
projections E = F = the segment means, which a trained Linformer can learn. Without noise and with
kp dividing N Linformer is then exact; the error measures how the noise propagates. (On i.i.d.
Gaussian keys no projection to kp < N keys approximates softmax attention, and a random one gives
errors of 10 to 50: nothing a reader can use.)
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import fastattn
from fastattn import reference

LINFORMER_NOISE = 0.1
QUALITY_COLUMNS = ("mechanism", "parameter", "value", "qk_std", "N", "H", "D", "relative_error_mean", "relative_error_std",
                   "density", "seeds")


@dataclass(frozen=True)
class QualityConfig:
    seq_len: int
    heads: int
    head_dim: int
    block_size: int
    seeds: int
    feature_counts: tuple[int, ...] = (64, 128, 256, 512, 1024)
    kps: tuple[int, ...] = (64, 128, 256, 512)
    random_blocks: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8)
    qk_stds: tuple[float, ...] = (1.0, 0.5)


def segment_means(kp: int, seq_len: int) -> torch.Tensor:
    """(kp, N): row s averages the tokens j of segment s = floor(j * kp / N)."""
    segments = torch.arange(seq_len) * kp // seq_len
    members = (segments[None, :] == torch.arange(kp)[:, None]).double()
    return members / members.sum(dim=1, keepdim=True)


def rank_kp_sequence(x: torch.Tensor, kp: int, generator: torch.Generator) -> torch.Tensor:
    """x's first kp tokens, each repeated over one segment of N/kp tokens, plus noise of std LINFORMER_NOISE."""
    seq_len = x.shape[2]
    segments = torch.arange(seq_len) * kp // seq_len
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x[:, :, :kp][:, :, segments] + LINFORMER_NOISE * noise


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))


def _row(config: QualityConfig, qk_std: float, mechanism: str, parameter: str, value: int, errors: list[float],
         density: float | None = None) -> dict:
    return {
        "mechanism": mechanism, "parameter": parameter, "value": value, "qk_std": qk_std, "N": config.seq_len, "H": config.heads,
        "D": config.head_dim, "relative_error_mean": statistics.fmean(errors),
        "relative_error_std": statistics.pstdev(errors), "density": "" if density is None else density,
        "seeds": len(errors),
    }


def approximation_quality(config: QualityConfig) -> list[dict]:
    rows = []
    for qk_std in config.qk_stds:
        rows += _quality_at(config, qk_std)
    return rows


def _quality_at(config: QualityConfig, qk_std: float) -> list[dict]:
    shape = (1, config.heads, config.seq_len, config.head_dim)
    samples = []
    for seed in range(config.seeds):
        generator = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
        q, k = q * qk_std, k * qk_std
        samples.append((generator, q, k, v, reference.full_attention(q, k, v),
                        reference.full_attention(q, k, v, causal=True)))
    rows = []
    for mechanism, causal in (("performer", False), ("performer-causal", True)):
        for features in config.feature_counts:
            errors = []
            for generator, q, k, v, exact, exact_causal in samples:
                projection = fastattn.random_features(features, config.head_dim, generator=generator,
                                                      dtype=torch.float64)
                approx = reference.performer_attention(q, k, v, projection, causal=causal)
                errors.append(relative_error(approx, exact_causal if causal else exact))
            rows.append(_row(config, qk_std, mechanism, "features", features, errors))
    for kp in config.kps:
        errors = []
        segments = min(kp, config.seq_len)  # kp >= N: segments of one token, and Linformer is exact attention
        projection = segment_means(segments, config.seq_len)
        for generator, q, k, v, _, _ in samples:
            k_kp, v_kp = rank_kp_sequence(k, segments, generator), rank_kp_sequence(v, segments, generator)
            errors.append(relative_error(reference.linformer_attention(q, k_kp, v_kp, projection),
                                         reference.full_attention(q, k_kp, v_kp)))
        rows.append(_row(config, qk_std, "linformer", "kp", kp, errors))
    for random_blocks in config.random_blocks:
        errors, densities = [], []
        for seed, (_, q, k, v, exact, _) in enumerate(samples):
            layout = fastattn.bigbird_layout(config.seq_len, block_size=config.block_size, num_heads=config.heads,
                                             num_random_blocks=random_blocks, seed=seed)
            errors.append(relative_error(reference.block_sparse_attention(q, k, v, layout), exact))
            densities.append(layout.density)
        rows.append(_row(config, qk_std, "bigbird", "random_blocks", random_blocks, errors,
                         statistics.fmean(densities)))
    return rows


def write_quality_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, QUALITY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


def format_quality(rows: list[dict]) -> str:
    if not rows:
        return ""
    first = rows[0]
    lines = [f"approximation quality: relative error vs exact softmax attention, Gaussian q, k, v (Linformer: k, v "
             f"of rank kp plus noise {LINFORMER_NOISE}, segment-mean projections), "
             f"N={first['N']} H={first['H']} D={first['D']}, mean +- std over {first['seeds']} seed(s)",
             f"{'mechanism':18s}{'parameter':15s}{'value':>6s}  {'q,k std':>7s}  {'rel. error':>22s}  density"]
    for row in rows:
        density = f"{row['density']:.3f}" if row["density"] != "" else ""
        lines.append(f"{row['mechanism']:18s}{row['parameter']:15s}{row['value']:6d}  {row['qk_std']:7.2f}  "
                     f"{row['relative_error_mean']:10.4f} +- {row['relative_error_std']:8.4f}  {density}")
    return "\n".join(lines)
