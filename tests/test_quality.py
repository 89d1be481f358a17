"""The bench's approximation-quality table: the Linformer row measures Linformer where it can be exact."""
from __future__ import annotations

from bench import quality
from bench.quality import QualityConfig, approximation_quality

CONFIG = QualityConfig(seq_len=128, heads=2, head_dim=16, block_size=16, seeds=2, feature_counts=(8,), kps=(16, 32, 256),
                       random_blocks=(0,), qk_stds=(1.0,))


def linformer_errors() -> list[float]:
    return [row["relative_error_mean"] for row in approximation_quality(CONFIG) if row["mechanism"] == "linformer"]


def test_linformer_is_exact_on_sequences_of_rank_kp(monkeypatch):
    """Also for kp >= N (256 > 128): segments of one token."""
    monkeypatch.setattr(quality, "LINFORMER_NOISE", 0.0)
    assert max(linformer_errors()) < 1e-12


def test_linformer_error_stays_near_the_noise_level():
    errors = linformer_errors()
    assert len(errors) == 3 and max(errors) < quality.LINFORMER_NOISE
