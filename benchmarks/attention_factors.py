"""Experiment: what capturing one encoder self-attention costs now, and what it could cost.

    python -m benchmarks.attention_factors [--quick]

The evidence behind ``detr_viz/attention.py`` (the fused path with a sink key, applied; the
"capture now" rows are the weight-building path capture still takes for models that are not
detr-viz's own, such as the torch hub DETR).
``capture`` asks ``nn.MultiheadAttention`` for per-head weights, so every layer materialises
the (heads, L, S) logits and softmax (8 x 3350 x 3350 float32 = 359 MB each for DC5 at
800x1066), then ``_factorise`` reads them once more for each row's maximum. The factors it keeps
(scaled q, k and the row log-sum-exp) can instead come from a fused attention kernel that never
builds the matrix: PyTorch's CPU flash-attention op returns the log-sum-exp alongside the output.

Variants, on the real inputs of the last encoder layer (stand-in weights, 800x1066 photo input):
- ``MHA (as plain forward)``: ``self_attn(q, k, src, key_padding_mask)``, weights averaged,
  exactly what the model runs without capture;
- ``MHA per head + _factorise (capture now)``: what the capture hooks make it run;
- ``MHA need_weights=False (SDPA)``: the fused path, no factors (lower bound);
- ``flash op -> output + factors``: in_proj, ``aten._scaled_dot_product_flash_attention_for_cpu``
  (output and log-sum-exp in one fused pass), out_proj: everything capture needs;
- ``SDPA + chunked logsumexp``: public API only: fused output, then the log-sum-exp of
  ``q k^T`` computed 512 rows at a time (one more L x S x d product, never all of it at once).
Every variant's output and factors are compared with the current ones before timing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.common import (
    LABEL,
    VARIANTS,
    CpuShare,
    common_arguments,
    interleaved,
    official_size_photo,
    paired_ratio,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz import preprocess
from detr_viz.attention import fused_attention
from detr_viz.capture import _factorise
from detr_viz.model import nested_tensor_from_tensor_list

CHUNK = 512


def encoder_inputs(model, x):
    """(src, pos, key_padding_mask) of the encoder, sequence-first, as Transformer.forward."""
    features, pos = model.backbone(nested_tensor_from_tensor_list(x))
    src, mask = features[-1].decompose()
    src = model.input_proj(src).flatten(2).permute(2, 0, 1)
    return src, pos[-1].flatten(2).permute(2, 0, 1), mask.flatten(1)


def _heads(t, heads):  # (L, B, E) -> (B, H, L, d)
    return t.reshape(t.shape[0], t.shape[1], heads, -1).permute(1, 2, 0, 3)


def _padding_bias(mask, dtype):  # (B, S) bool -> (B, 1, 1, S) additive, or None
    if not mask.any():
        return None
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, -math.inf)[:, None, None]


def flash_factors(mha, query, key, value, mask):
    """Attention output (L, B, E) and the factors (q scaled, k, lse) from one fused kernel."""
    heads, dim = mha.num_heads, mha.head_dim
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = _heads(F.linear(query, w_q, b_q), heads)
    k = _heads(F.linear(key, w_k, b_k), heads)
    v = _heads(F.linear(value, w_v, b_v), heads)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q, k, v, 0.0, False, attn_mask=_padding_bias(mask, q.dtype))
    out = out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], heads * dim)
    out = mha.out_proj(out)
    return out, (q * dim ** -0.5, k, lse)


def sdpa_chunked_factors(mha, query, key, value, mask):
    """Fused output via MHA(need_weights=False), lse via q k^T in blocks of CHUNK rows."""
    out = mha(query, key, value, key_padding_mask=mask, need_weights=False)[0]
    heads, dim = mha.num_heads, mha.head_dim
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = _heads(F.linear(query, w_q, b_q), heads) * dim ** -0.5
    k = _heads(F.linear(key, w_k, b_k), heads)
    bias = _padding_bias(mask, q.dtype)
    kt = k.transpose(-1, -2)
    lse = torch.cat([torch.logsumexp(q[:, :, i:i + CHUNK] @ kt if bias is None else
                                     q[:, :, i:i + CHUNK] @ kt + bias, dim=-1)
                     for i in range(0, q.shape[2], CHUNK)], dim=2)
    return out, (q, k, lse)


def bench(variant: str, repeats: int):
    model = stand_in_model(variant)
    x = preprocess(official_size_photo()).tensor
    with torch.inference_mode():
        src, pos, mask = encoder_inputs(model, x)
        mha = model.transformer.encoder.layers[-1].self_attn
        qk = src + pos

        def now_plain():
            return mha(qk, qk, src, key_padding_mask=mask)[0]

        def now_capture():
            out, weights = mha(qk, qk, src, key_padding_mask=mask, need_weights=True,
                               average_attn_weights=False)
            factors = _factorise(mha, (qk, qk), {"value": src, "key_padding_mask": mask},
                                 weights)
            return out, weights.mean(dim=1), factors

        def sdpa_only():
            return mha(qk, qk, src, key_padding_mask=mask, need_weights=False)[0]

        cases = {
            "MHA (as plain forward)": now_plain,
            "MHA per head + _factorise (capture now)": now_capture,
            "detr-viz fused + sink key (applied)": lambda: fused_attention(mha, qk, qk, src,
                                                                          mask),
            "MHA need_weights=False (SDPA)": sdpa_only,
            "flash op -> output + factors": lambda: flash_factors(mha, qk, qk, src, mask),
            "SDPA + chunked logsumexp": lambda: sdpa_chunked_factors(mha, qk, qk, src, mask),
        }
        ref_out, _, ref = now_capture()
        checks = {}
        def applied(*args):
            out, fused = fused_attention(*args)
            return out, (fused.q, fused.k, fused.lse)

        for name, fn in (("flash op -> output + factors", flash_factors),
                         ("SDPA + chunked logsumexp", sdpa_chunked_factors),
                         ("detr-viz fused + sink key (applied)", applied)):
            out, (q, k, lse) = fn(mha, qk, qk, src, mask)
            qk_diff = max((q - ref.q).abs().max().item(), (k - ref.k).abs().max().item())
            checks[name] = (f"{(out - ref_out).abs().max().item():.1e} / {qk_diff:.1e} / "
                            f"{(lse - ref.lse).abs().max().item():.1e} (|lse| up to "
                            f"{ref.lse.abs().max().item():.0f})")
        times = interleaved(cases, repeats=repeats, warmup=1)
    return times, checks, tuple(src.shape[:1]) + (mha.num_heads,)


MEMORY_CHILD = r"""
import resource, sys, torch
from benchmarks.attention_factors import flash_factors, sdpa_chunked_factors
from detr_viz.capture import _factorise
torch.manual_seed(0)
cells, which = int(sys.argv[1]), sys.argv[2]
mha = torch.nn.MultiheadAttention(256, 8).eval()
src, pos = torch.randn(cells, 1, 256), torch.randn(cells, 1, 256)
mask = torch.zeros(1, cells, dtype=torch.bool)
qk = src + pos
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    if which == "capture now":
        out, w = mha(qk, qk, src, key_padding_mask=mask, need_weights=True,
                     average_attn_weights=False)
        factors = _factorise(mha, (qk, qk), {"value": src, "key_padding_mask": mask}, w)
        mean = w.mean(dim=1)
    elif which == "plain":
        out = mha(qk, qk, src, key_padding_mask=mask)
    elif which == "flash":
        out = flash_factors(mha, qk, qk, src, mask)
    else:
        out = sdpa_chunked_factors(mha, qk, qk, src, mask)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def memory_table() -> str:
    """Peak RSS growth of ONE DC5-sized encoder attention call, each in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = []
    for label, which in (("MHA (as plain forward)", "plain"),
                         ("MHA per head + _factorise (capture now)", "capture now"),
                         ("flash op -> output + factors", "flash"),
                         ("SDPA + chunked logsumexp", "chunked")):
        done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, "3350", which], cwd=root,
                              capture_output=True, text=True, check=True)
        rows.append([label, f"{float(done.stdout.split()[-1]):.0f}"])
    return table(["variant (DC5 size: 3350 cells, 8 heads)", "peak RSS growth of one call (MiB)"],
                 rows)


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=7, quick_repeats=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--memory", action="store_true",
                        help="also the peak memory of one DC5-sized call per variant")
    args = resolve(parser.parse_args(argv))
    print_header("One encoder self-attention: capture now vs fused alternatives", args)
    share = CpuShare()
    if args.memory:
        print("### Peak memory of one call (fresh process each)\n")
        print(memory_table() + "\n")
    for variant in args.variants:
        times, checks, (cells, heads) = bench(variant, args.repeats)
        now = times["MHA per head + _factorise (capture now)"]
        plain = times["MHA (as plain forward)"]
        rows = []
        for name, t in times.items():
            rows.append([name, t.seconds(), paired_ratio(t, now).ratio(),
                         paired_ratio(t, plain).ratio(),
                         checks.get(name, "")])
        size = heads * cells * cells * 4 / 2**20
        print(f"### {LABEL[variant]}: L = S = {cells} cells, {heads} heads "
              f"(one (heads, L, S) float32 matrix = {size:.0f} MiB)\n")
        print(table(["variant", "time (1 layer)", "/ capture now", "/ plain MHA",
                     "max abs diff vs capture now: output / q,k / lse"], rows) + "\n")
    print("\n" + share.report())


if __name__ == "__main__":
    main()
