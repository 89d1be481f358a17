"""The one place that knows how to build each provider's callable: fastattn's backends and the peers.

A provider turns a :class:`~bench.workload.Case` and its inputs into a :class:`Prepared` (a forward
closure over its own leaves) or raises :class:`Declined` with the reason. Peers that are not
installed are reported as unavailable and skipped.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn import backends

from .workload import Case, differentiable_inputs

# fastattn's name of the op behind each benchmark mechanism ("full" has no fastattn kernel).
FASTATTN_MECHANISM = {"bigbird": "block_sparse", "linformer": "linformer", "performer": "performer",
                      "performer-causal": "performer"}


class Declined(Exception):
    """The provider cannot run this case (unsupported shape, dtype, device or mode, or too much memory)."""


@dataclass
class Prepared:
    """A forward call on prepared inputs, and the tensors whose gradients a backward computes."""

    run: Callable[[], Tensor]
    leaves: tuple[Tensor, ...]


@dataclass(frozen=True)
class Provider:
    name: str
    family: str  # "fastattn" (gated against the reference) or "peer"
    mechanisms: tuple[str, ...]
    description: str
    prepare: Callable[[Case, dict, bool], Prepared]
    unavailable: Callable[[], str | None] = field(default=lambda: None)
    # Bytes the call may hold at its peak (None: O(N) memory, no estimate needed); used to decline early.
    memory_estimate: Callable[[Case, str], float] | None = None
    compiles: bool = False  # its first call compiles: run once before any measurement


def _leaf(tensor: Tensor, requires_grad: bool) -> Tensor:
    return tensor.detach().requires_grad_(requires_grad)


def _leaves(case: Case, inputs: dict, requires_grad: bool) -> dict[str, object]:
    """The inputs with fresh leaves for the differentiable tensors, other arguments passed as they are."""
    differentiable = differentiable_inputs(case.mechanism)
    return {name: _leaf(value, requires_grad) if name in differentiable else value for name, value in inputs.items()}


def fastattn_function(case: Case, backend: str) -> Callable[..., Tensor]:
    """fastattn's public op for the case's mechanism, forced onto ``backend``, called with the input names."""
    if case.mechanism == "bigbird":
        return lambda q, k, v, layout: fastattn.block_sparse_attention(q, k, v, layout, backend=backend)
    if case.mechanism == "linformer":
        return lambda q, k, v, proj_k, proj_v: fastattn.linformer_attention(q, k, v, proj_k, proj_v, backend=backend)
    if case.mechanism.startswith("performer"):
        return lambda q, k, v, projection: fastattn.performer_attention(q, k, v, projection, causal=case.causal,
                                                                        backend=backend)
    raise ValueError(f"mechanism: fastattn has no kernel for {case.mechanism!r}")


def reference_function(case: Case) -> Callable[..., Tensor]:
    """fastattn.reference's definition of the case's mechanism, with the same argument names."""
    reference = fastattn.reference
    if case.mechanism == "bigbird":
        return lambda q, k, v, layout: reference.block_sparse_attention(q, k, v, layout)
    if case.mechanism == "linformer":
        return lambda q, k, v, proj_k, proj_v: reference.linformer_attention(q, k, v, proj_k, proj_v)
    if case.mechanism.startswith("performer"):
        return lambda q, k, v, projection: reference.performer_attention(q, k, v, projection, causal=case.causal)
    return lambda q, k, v: reference.full_attention(q, k, v, causal=case.causal)


def fastattn_reasons(case: Case, backend: str, q: Tensor) -> list[str]:
    """Why fastattn's ``backend`` declines the case (empty when it can run it)."""
    options = {"causal": case.causal}
    if case.mechanism == "bigbird":
        options["block_size"] = case.block_size
    elif case.mechanism.startswith("performer"):
        options["kernel"] = "softmax"
    return backends.BACKENDS[backend].not_supported_reasons(FASTATTN_MECHANISM[case.mechanism], q, **options)


def _fastattn_provider(backend: str) -> Provider:
    def prepare(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
        reasons = fastattn_reasons(case, backend, inputs["q"])
        if reasons:
            raise Declined("; ".join(reasons))
        arguments = _leaves(case, inputs, requires_grad)
        function = fastattn_function(case, backend)
        leaves = tuple(arguments[name] for name in differentiable_inputs(case.mechanism))
        return Prepared(lambda: function(**arguments), leaves)

    return Provider(f"fastattn-{backend}", "fastattn", tuple(FASTATTN_MECHANISM), backends.BACKENDS[backend].description,
                    prepare)


# --- dense SDPA: the baseline of every speed-up ------------------------------------------------------

def _prepare_sdpa(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
    q, k, v = (_leaf(inputs[name], requires_grad) for name in ("q", "k", "v"))
    return Prepared(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal), (q, k, v))


# --- plain PyTorch compositions of each mechanism ------------------------------------------------------

def _dense_scores_bytes(case: Case, mode: str) -> float:
    """Scores and probabilities (B, H, N, N), twice as many tensors kept alive with a backward."""
    element = torch.finfo(case.dtype).bits // 8
    return case.batch * case.heads * case.seq_len**2 * element * (2 if mode == "fwd" else 4)


def _prefix_sum_bytes(case: Case, mode: str) -> float:
    """The (B, H, N, m, D) outer products and their prefix sums of causal linear attention, in float32."""
    tensor = 4.0 * case.batch * case.heads * case.seq_len * case.features * case.head_dim
    return tensor * (2 if mode == "fwd" else 4)


def _composition_memory(case: Case, mode: str) -> float:
    if case.mechanism == "full":
        return _dense_scores_bytes(case, mode)
    if case.mechanism == "bigbird":
        return case.heads * case.seq_len**2 + _dense_scores_bytes(case, mode)
    if case.mechanism == "performer-causal":
        return _prefix_sum_bytes(case, mode)
    return 0.0


def composition_performer(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool) -> Tensor:
    """FAVOR+ with einsum features and matmuls; causal through cumulative sums of phi(k) v^T.

    The keys share one stabilising constant (their largest logit), which cancels in the ratio.
    """
    scale = q.shape[-1] ** -0.25
    projection = projection.to(q.dtype)

    def logits(x: Tensor) -> Tensor:
        x = x * scale
        return torch.einsum("md,bhnd->bhnm", projection, x) - 0.5 * (x * x).sum(-1, keepdim=True)

    query_logits, key_logits = logits(q), logits(k)
    phi_q = torch.exp(query_logits - query_logits.amax(-1, keepdim=True).detach())
    phi_k = torch.exp(key_logits - key_logits.amax((-2, -1), keepdim=True).detach())
    if causal:
        prefix_kv = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
        numerator = torch.einsum("bhnm,bhnmd->bhnd", phi_q, prefix_kv)
        normaliser = (phi_q * torch.cumsum(phi_k, dim=2)).sum(-1, keepdim=True)
    else:
        numerator = phi_q @ (phi_k.transpose(-1, -2) @ v)
        normaliser = phi_q @ phi_k.sum(-2).unsqueeze(-1)
    return numerator / normaliser


def composition_linformer(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor) -> Tensor:
    """Einsum projections along the sequence, then SDPA over the kp projected keys."""
    k_projected = torch.einsum("pn,bhnd->bhpd", proj_k, k)
    v_projected = torch.einsum("pn,bhnd->bhpd", proj_v, v)
    return F.scaled_dot_product_attention(q, k_projected, v_projected)


def expanded_layout_mask(layout: fastattn.BlockLayout, seq_len: int, device) -> Tensor:
    """The block layout as a bool (1 or H, N, N) mask of allowed (query, key) pairs."""
    size = layout.block_size
    blocks = layout.to_dense().to(device)
    return blocks.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :seq_len, :seq_len]


def _prepare_composition(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
    arguments = _leaves(case, inputs, requires_grad)
    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    leaves = tuple(arguments[name] for name in differentiable_inputs(case.mechanism))
    if case.mechanism == "full":
        scale = case.head_dim**-0.5
        return Prepared(lambda: torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v, leaves)
    if case.mechanism == "bigbird":
        mask = expanded_layout_mask(arguments["layout"], case.seq_len, q.device).unsqueeze(0)
        return Prepared(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), leaves)
    if case.mechanism == "linformer":
        proj_k, proj_v = arguments["proj_k"], arguments["proj_v"]
        return Prepared(lambda: composition_linformer(q, k, v, proj_k, proj_v), leaves)
    projection = arguments["projection"]
    return Prepared(lambda: composition_performer(q, k, v, projection, causal=case.causal), leaves)


# --- FlexAttention -------------------------------------------------------------------------------------

def _flex_unavailable() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _prepare_flex(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask

    if requires_grad and case.device == "cpu":
        raise Declined("FlexAttention has no backward on CPU (forward only)")
    layout = inputs["layout"]
    blocks = layout.to_dense().to(case.device)
    size = layout.block_size

    def listed(batch, head, query, key):
        return blocks[head, query // size, key // size]

    block_mask = create_block_mask(listed, None, case.heads, case.seq_len, case.seq_len, device=case.device,
                                   BLOCK_SIZE=size)
    q, k, v = (_leaf(inputs[name], requires_grad) for name in ("q", "k", "v"))
    flex = _compiled_flex_attention()
    return Prepared(lambda: flex(q, k, v, block_mask=block_mask), (q, k, v))


# --- transformers' BigBird -----------------------------------------------------------------------------

def _missing(module: str, package: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(module) is not None else f"{package} is not installed"


def _prepare_hf_bigbird(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    size, random_blocks, n = case.block_size, case.random_blocks, case.seq_len
    if n % size:
        raise Declined(f"needs N a multiple of the block size {size}, got N={n}")
    shortest = (5 + 2 * random_blocks) * size
    if n <= shortest:
        raise Declined(f"needs N > (5 + 2*random_blocks) * block_size = {shortest} (BigBirdModel falls back to "
                       f"full attention below), got N={n}")
    config = BigBirdConfig(hidden_size=case.heads * case.head_dim, num_attention_heads=case.heads, block_size=size,
                           num_random_blocks=random_blocks, max_position_embeddings=n, attention_type="block_sparse")
    # eval(): transformers draws no random blocks in eval mode (each row gathers block 0 r times instead),
    # the same gathers and FLOPs without numpy's per-call draws on the host.
    attention = BigBirdBlockSparseAttention(config, seed=0).eval()
    padding = torch.ones(case.batch, n, dtype=case.dtype, device=case.device)
    blocked_mask, band_mask, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(padding, size)
    q, k, v = (_leaf(inputs[name], requires_grad) for name in ("q", "k", "v"))

    def run() -> Tensor:
        context, _ = attention.bigbird_block_sparse_attention(
            q, k, v, band_mask, from_mask, to_mask, blocked_mask, blocked_mask, case.heads, random_blocks,
            case.head_dim, size, size, case.batch, n, n, seed=0, plan_from_length=None, plan_num_rand_blocks=None,
            output_attentions=False,
        )
        return context

    return Prepared(run, (q, k, v))


# --- performer-pytorch ---------------------------------------------------------------------------------

def _prepare_performer_pytorch(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
    from performer_pytorch import FastAttention

    # Without fast_transformers' CUDA kernel it prints that the causal variant falls back to its chunked code.
    with contextlib.redirect_stdout(io.StringIO()):
        attention = FastAttention(case.head_dim, nb_features=case.features, causal=case.causal)
    attention = attention.to(case.device)
    with torch.no_grad():
        attention.projection_matrix.copy_(inputs["projection"].float())
    q, k, v = (_leaf(inputs[name], requires_grad) for name in ("q", "k", "v"))
    return Prepared(lambda: attention(q, k, v), (q, k, v))


def _performer_pytorch_memory(case: Case, mode: str) -> float:
    return _prefix_sum_bytes(case, mode) if case.causal else 0.0


# --- the linformer package -----------------------------------------------------------------------------

def _prepare_linformer(case: Case, inputs: dict, requires_grad: bool) -> Prepared:
    from linformer import LinformerSelfAttention

    width = case.heads * case.head_dim
    attention = LinformerSelfAttention(width, case.seq_len, k=case.kp, heads=case.heads, dim_head=case.head_dim)
    # Only the attention core is timed: its q/k/v/output Linear layers become identities.
    attention.to_q = attention.to_k = attention.to_v = attention.to_out = nn.Identity()
    with torch.no_grad():
        attention.proj_k.copy_(inputs["proj_k"].T)
        attention.proj_v.copy_(inputs["proj_v"].T)
    attention = attention.to(device=case.device, dtype=case.dtype)
    attention.proj_k.requires_grad_(requires_grad)
    attention.proj_v.requires_grad_(requires_grad)
    q = inputs["q"]
    x = _leaf(q.transpose(1, 2).reshape(case.batch, case.seq_len, width), requires_grad)
    return Prepared(lambda: attention(x), (x, attention.proj_k, attention.proj_v))


PEERS = (
    Provider("sdpa-dense", "peer", ("full", "bigbird", "linformer", "performer", "performer-causal"),
             "torch.nn.functional.scaled_dot_product_attention over all N keys (causal for performer-causal): "
             "the baseline of every speed-up", _prepare_sdpa),
    Provider("torch-composition", "peer", ("full", "bigbird", "linformer", "performer", "performer-causal"),
             "plain PyTorch: full = matmul-softmax-matmul; bigbird = SDPA with the expanded (H, N, N) layout mask; "
             "linformer = einsum projections + SDPA; performer = einsum features + matmuls (causal: cumsum of "
             "phi(k) v^T)", _prepare_composition, memory_estimate=_composition_memory),
    Provider("flex-attention", "peer", ("bigbird",),
             "torch.compile(flex_attention) with a BlockMask of the same layout (BLOCK_SIZE = block size)",
             _prepare_flex, _flex_unavailable, compiles=True),
    Provider("hf-bigbird", "peer", ("bigbird",),
             "transformers' BigBirdBlockSparseAttention.bigbird_block_sparse_attention on q, k, v (eval mode, "
             "no padding)", _prepare_hf_bigbird, _missing("transformers", "transformers")),
    Provider("performer-pytorch", "peer", ("performer", "performer-causal"),
             "performer_pytorch.FastAttention(nb_features=m) with fastattn's projection (causal: its chunked "
             "non-CUDA fallback)", _prepare_performer_pytorch, _missing("performer_pytorch", "performer-pytorch"),
             _performer_pytorch_memory),
    Provider("linformer-pkg", "peer", ("linformer",),
             "linformer.LinformerSelfAttention with identity q/k/v/out layers, so q = k = v = x of shape "
             "(B, N, H*D): sequence projections, head split/merge and softmax attention", _prepare_linformer,
             _missing("linformer", "linformer")),
)


def all_providers() -> tuple[Provider, ...]:
    """fastattn's backends (all but the reference, which is the ground truth) and then the peers."""
    fastattn_providers = tuple(_fastattn_provider(name) for name in backends.BACKENDS if name != "reference")
    return fastattn_providers + PEERS
