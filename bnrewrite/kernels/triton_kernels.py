"""Triton kernels of the fused sampled BatchNorm (see ``docs/kernels.md`` for the design).

Every kernel sees the BN input ``(N, C, *S)`` as ``N x C x L`` (``L = prod(S)``) in one of two
canonical layouts, chosen by the constexpr ``CL``:

* ``CL=True``  (channels-last, and any ``(N, C)`` input): element ``(n, c, l)`` at ``(n*L + l)*C + c``,
  i.e. a ``(rows, C)`` matrix with ``rows = N*L``; tiles are ``BLOCK_L`` rows x ``BLOCK_C`` channels,
  contiguous along the channels.
* ``CL=False`` (NCHW-contiguous): element at ``(n*C + c)*L + l``; tiles are ``BLOCK_L`` positions of
  one sample x ``BLOCK_C`` channels, contiguous along the positions.

The sample set (one *part* of it per launch: the real-row sample, or the virtual rows of VDN) is
enumerated as a flat index ``s`` over ``rows_count x m0 x m1 x m2`` and mapped, per channel group
``g = c*G//C``, to

    n  = row_base + (off_row[g] + j_r) mod row_mod
    i_k = (off_k[n, g] + step_k * j_k) mod S_k           (k = 0, 1, 2; spatial dims padded with 1)
    l  = (i0 * S1 + i1) * S2 + i2

which is exactly ``bnrewrite.plan``'s ``(offset + step*j) mod size`` per sampled axis (offsets
``(R, G, A)`` from ``bnrewrite.estimators.draw_offsets``; ``OFF_*`` name the offset column of each
axis, ``-1`` for an axis that is not sampled or for fixed sampling).

Kernels:

* ``sample_stats_kernel``  -- per-program partial (count, mean, M2) over the sample, merged across
  tiles with Chan's formula (numerically stable, deterministic: no atomics).
* ``finalize_stats_kernel`` -- merges the partials into mean, biased variance, ``scale = w*rstd``.
* ``normalize_kernel``     -- ``y = (x - mean) * scale + b`` over the whole tensor (2 passes),
  optionally ``relu(y)`` or ``relu(y + z)`` (the backward kernels then recompute the ReLU mask
  from ``x`` (and ``z``), and the main pass writes ``dz``).
* ``bwd_main_kernel``      -- ``dx = scale * dy`` over the whole tensor, and per-program partials of
  ``dbeta = sum dy`` and ``dgamma = sum dy * xhat`` (3 passes).
* ``reduce_partials_kernel`` -- sums those partials.
* ``bwd_fixup_kernel``     -- on the sample only: ``dx = scale * (dy - (dbeta + xhat*dgamma)/n)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "sample_stats_kernel",
    "finalize_stats_kernel",
    "normalize_kernel",
    "bwd_main_kernel",
    "reduce_partials_kernel",
    "bwd_fixup_kernel",
]


@triton.jit
def _wrap(v, m):
    """``v mod m`` for ``0 <= v < 2*m``."""
    return tl.where(v >= m, v - m, v)


@triton.jit
def _uniform_addresses(
    s,
    c,
    c_mask,
    off_ptr,
    C,
    L,
    G,
    A,
    total,
    row_base,
    row_mod,
    S0,
    S1,
    S2,
    m0,
    m1,
    m2,
    st0,
    st1,
    st2,
    OFF_R: tl.constexpr,
    OFF_0: tl.constexpr,
    OFF_1: tl.constexpr,
    OFF_2: tl.constexpr,
    CL: tl.constexpr,
):
    s_mask = s < total
    j2 = s % m2
    t = s // m2
    j1 = t % m1
    t = t // m1
    j0 = t % m0
    jr = t // m0
    g = (tl.program_id(1) * c.shape[0] * G) // C  # the block's group (scalar)
    if OFF_R >= 0:
        off_r = tl.load(off_ptr + g * A + OFF_R)
        n = row_base + _wrap(off_r + jr, row_mod)
    else:
        n = row_base + jr
    og = (n * G + g) * A
    if OFF_0 >= 0:
        i0 = _wrap(tl.load(off_ptr + og + OFF_0, mask=s_mask, other=0) + st0 * j0, S0)
    else:
        i0 = j0
    if OFF_1 >= 0:
        i1 = _wrap(tl.load(off_ptr + og + OFF_1, mask=s_mask, other=0) + st1 * j1, S1)
    else:
        i1 = j1
    if OFF_2 >= 0:
        i2 = _wrap(tl.load(off_ptr + og + OFF_2, mask=s_mask, other=0) + st2 * j2, S2)
    else:
        i2 = j2
    l_idx = (i0 * S1 + i1) * S2 + i2
    if CL:
        row = (n.to(tl.int64) * L + l_idx) * C
        addr = row[:, None] + c[None, :]
    else:
        row = n.to(tl.int64) * C * L + l_idx
        addr = row[:, None] + (c * L)[None, :]
    mask = s_mask[:, None] & c_mask[None, :]
    return addr, mask


@triton.jit
def _general_addresses(
    s,
    c,
    c_mask,
    off_ptr,
    C,
    L,
    G,
    A,
    total,
    row_base,
    row_mod,
    S0,
    S1,
    S2,
    m0,
    m1,
    m2,
    st0,
    st1,
    st2,
    OFF_R: tl.constexpr,
    OFF_0: tl.constexpr,
    OFF_1: tl.constexpr,
    OFF_2: tl.constexpr,
    CL: tl.constexpr,
):
    s_mask = s < total
    s64 = s.to(tl.int64)
    j2 = s64 % m2
    t = s64 // m2
    j1 = t % m1
    t = t // m1
    j0 = t % m0
    jr = t // m0
    g = (c.to(tl.int64) * G) // C  # channel group, [BLOCK_C]
    mask = s_mask[:, None] & c_mask[None, :]
    if OFF_R >= 0:
        off_r = tl.load(off_ptr + g * A + OFF_R, mask=c_mask, other=0)
        n = row_base + _wrap(off_r[None, :] + jr[:, None], row_mod)
    else:
        n = row_base + jr[:, None] + tl.zeros_like(g)[None, :]
    # spatial offsets are per (row, group): offsets[(n * G + g) * A + col]
    og = (n * G + g[None, :]) * A
    if OFF_0 >= 0:
        o0 = tl.load(off_ptr + og + OFF_0, mask=mask, other=0)
        i0 = _wrap(o0 + st0 * j0[:, None], S0)
    else:
        i0 = j0[:, None]
    if OFF_1 >= 0:
        o1 = tl.load(off_ptr + og + OFF_1, mask=mask, other=0)
        i1 = _wrap(o1 + st1 * j1[:, None], S1)
    else:
        i1 = j1[:, None]
    if OFF_2 >= 0:
        o2 = tl.load(off_ptr + og + OFF_2, mask=mask, other=0)
        i2 = _wrap(o2 + st2 * j2[:, None], S2)
    else:
        i2 = j2[:, None]
    l_idx = (i0 * S1 + i1) * S2 + i2
    if CL:
        addr = (n * L + l_idx) * C + c[None, :]
    else:
        addr = (n * C + c[None, :]) * L + l_idx
    return addr, mask


@triton.jit
def _sample_addresses(
    s,
    c,
    c_mask,
    off_ptr,
    C,
    L,
    G,
    A,
    total,
    row_base,
    row_mod,
    S0,
    S1,
    S2,
    m0,
    m1,
    m2,
    st0,
    st1,
    st2,
    OFF_R: tl.constexpr,
    OFF_0: tl.constexpr,
    OFF_1: tl.constexpr,
    OFF_2: tl.constexpr,
    CL: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    """Element addresses (int64, ``[BLOCK_S, BLOCK_C]``) and mask of sample indices ``s``.

    ``UNIFORM``: every channel of the block is in one group (the launcher checks), so offsets
    and indices are per sample row and the address is ``row + c``: contiguous along channels
    (128-bit loads in channels-last). Otherwise indices are computed per (row, channel).
    """
    if UNIFORM:
        addr, mask = _uniform_addresses(
            s, c, c_mask, off_ptr, C, L, G, A, total, row_base, row_mod,
            S0, S1, S2, m0, m1, m2, st0, st1, st2,
            OFF_R, OFF_0, OFF_1, OFF_2, CL,
        )  # fmt: skip
    else:
        addr, mask = _general_addresses(
            s, c, c_mask, off_ptr, C, L, G, A, total, row_base, row_mod,
            S0, S1, S2, m0, m1, m2, st0, st1, st2,
            OFF_R, OFF_0, OFF_1, OFF_2, CL,
        )  # fmt: skip
    return addr, mask


@triton.jit
def sample_stats_kernel(
    x_ptr,
    off_ptr,
    cnt_ptr,
    mean_ptr,
    m2_ptr,
    C,
    L,
    G,
    A,
    total,
    row_base,
    row_mod,
    S0,
    S1,
    S2,
    m0,
    m1,
    m2,
    st0,
    st1,
    st2,
    tiles_per_prog,
    part_base,
    OFF_R: tl.constexpr,
    OFF_0: tl.constexpr,
    OFF_1: tl.constexpr,
    OFF_2: tl.constexpr,
    CL: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(tiles_per_prog):
        s = (pid_p * tiles_per_prog + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        addr, mask = _sample_addresses(
            s, c, c_mask, off_ptr, C, L, G, A, total, row_base, row_mod,
            S0, S1, S2, m0, m1, m2, st0, st1, st2,
            OFF_R, OFF_0, OFF_1, OFF_2, CL, UNIFORM,
        )  # fmt: skip
        x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum((s < total).to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n_ab = n_a + n_b
        delta = mean_b - mean_a
        frac = n_b / tl.maximum(n_ab, 1.0)
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * n_a * frac
        n_a = n_ab
    p = part_base + pid_p
    tl.store(cnt_ptr + p * C + c, n_a, mask=c_mask)
    tl.store(mean_ptr + p * C + c, mean_a, mask=c_mask)
    tl.store(m2_ptr + p * C + c, m2_a, mask=c_mask)


@triton.jit
def finalize_stats_kernel(
    cnt_ptr,
    pmean_ptr,
    pm2_ptr,
    w_ptr,
    mean_ptr,
    var_ptr,
    scale_ptr,
    rm_ptr,
    rv_ptr,
    nrm_ptr,
    nrv_ptr,
    mom_ptr,
    P,
    C,
    eps,
    momentum,
    unbias,
    HAS_W: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    MOM_TENSOR: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge the partials; with ``HAS_RUNNING`` also the new running statistics (functional):
    ``nrm = (1-m)*rm + m*mean``, ``nrv = (1-m)*rv + m*var*n/(n-1)`` (``m`` from ``mom_ptr`` if
    ``MOM_TENSOR``), as ``bnrewrite.estimators.update_running_stats``."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    tot = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        idx = p[:, None] * C + c[None, :]
        n_p = tl.load(cnt_ptr + idx, mask=mask, other=0.0)
        mu_p = tl.load(pmean_ptr + idx, mask=mask, other=0.0)
        tot += tl.sum(n_p, axis=0)
        acc += tl.sum(n_p * mu_p, axis=0)
    tot = tl.maximum(tot, 1.0)  # masked channels
    mean = acc / tot
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        idx = p[:, None] * C + c[None, :]
        n_p = tl.load(cnt_ptr + idx, mask=mask, other=0.0)
        mu_p = tl.load(pmean_ptr + idx, mask=mask, other=0.0)
        m2_p = tl.load(pm2_ptr + idx, mask=mask, other=0.0)
        d = mu_p - mean[None, :]
        m2 += tl.sum(m2_p + n_p * d * d, axis=0)
    var = m2 / tot
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
        scale = rstd * w
    else:
        scale = rstd
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    if HAS_RUNNING:
        if MOM_TENSOR:
            m = tl.load(mom_ptr).to(tl.float32)
        else:
            m = momentum
        rm = tl.load(rm_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        rm = (1 - m) * rm + m * mean
        rv = (1 - m) * rv + m * (var * unbias)
        tl.store(nrm_ptr + c, rm.to(nrm_ptr.dtype.element_ty), mask=c_mask)
        tl.store(nrv_ptr + c, rv.to(nrv_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _scale(w_ptr, c, c_mask, rstd, HAS_W: tl.constexpr):
    if HAS_W:
        return rstd * tl.load(w_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    else:
        return rstd


@triton.jit
def _pre_activation(x, mean, scale, b_ptr, c, c_mask, HAS_B: tl.constexpr):
    """``(x - mean) * scale + b``: the BN output before the (optional) ReLU epilogue."""
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _tile(pid, c, C, L, LB, n_tiles, CL: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets (int64 base + int32 tile offsets) and mask of row tile ``pid``."""
    n = pid // LB
    lb = pid - n * LB
    lo = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    lim = tl.where(pid < n_tiles, L, 0)  # tiles past the end (last program's loop) are empty
    mask = (lo < lim)[:, None] & (c < C)[None, :]
    if CL:
        base = (n.to(tl.int64) * L + lb * BLOCK_L) * C
        offs = tl.arange(0, BLOCK_L)[:, None] * C + c[None, :]
    else:
        base = n.to(tl.int64) * C * L + lb * BLOCK_L
        offs = c[None, :] * L + tl.arange(0, BLOCK_L)[:, None]
    return base, offs, mask


@triton.jit
def normalize_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    scale_ptr,
    b_ptr,
    z_ptr,
    C,
    L,
    LB,
    n_tiles,
    CL: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    base, offs, mask = _tile(pid, c, C, L, LB, n_tiles, CL, BLOCK_L)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = _pre_activation(x, mean, scale, b_ptr, c, c_mask, HAS_B)
    if HAS_Z:  # residual epilogue: relu(bn(x) + z)
        y = y + tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_main_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    dz_ptr,
    pdb_ptr,
    pdg_ptr,
    C,
    L,
    LB,
    n_tiles,
    tiles_per_prog,
    eps,
    CL: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=c_mask, other=0.0) + eps)
    scale = _scale(w_ptr, c, c_mask, rstd, HAS_W)
    acc_db = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    acc_dg = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for t in range(tiles_per_prog):
        base, offs, mask = _tile(pid * tiles_per_prog + t, c, C, L, LB, n_tiles, CL, BLOCK_L)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:  # gradient at the BN output: recompute the ReLU mask from x (no extra pass)
            pre = _pre_activation(x, mean, scale, b_ptr, c, c_mask, HAS_B)
            if HAS_Z:
                pre = pre + tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.where(pre > 0, dy, 0.0)
            if HAS_Z:  # the residual's gradient is the masked dy
                tl.store(dz_ptr + base + offs, dy.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + base + offs, (dy * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc_db += dy
        acc_dg += dy * (x - mean[None, :])  # dy is 0 outside the mask
    tl.store(pdb_ptr + pid * C + c, tl.sum(acc_db, axis=0), mask=c_mask)
    tl.store(pdg_ptr + pid * C + c, tl.sum(acc_dg, axis=0) * rstd, mask=c_mask)


@triton.jit
def reduce_partials_kernel(
    pdb_ptr,
    pdg_ptr,
    db_ptr,
    dg_ptr,
    P,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        idx = p[:, None] * C + c[None, :]
        db += tl.sum(tl.load(pdb_ptr + idx, mask=mask, other=0.0), axis=0)
        dg += tl.sum(tl.load(pdg_ptr + idx, mask=mask, other=0.0), axis=0)
    tl.store(db_ptr + c, db, mask=c_mask)
    tl.store(dg_ptr + c, dg, mask=c_mask)


@triton.jit
def bwd_fixup_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    off_ptr,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    db_ptr,
    dg_ptr,
    inv_n,
    eps,
    C,
    L,
    G,
    A,
    total,
    row_base,
    row_mod,
    S0,
    S1,
    S2,
    m0,
    m1,
    m2,
    st0,
    st1,
    st2,
    tiles_per_prog,
    OFF_R: tl.constexpr,
    OFF_0: tl.constexpr,
    OFF_1: tl.constexpr,
    OFF_2: tl.constexpr,
    CL: tl.constexpr,
    UNIFORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_Z: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=c_mask, other=0.0) + eps)
    scale = _scale(w_ptr, c, c_mask, rstd, HAS_W)
    db = tl.load(db_ptr + c, mask=c_mask, other=0.0)
    dg = tl.load(dg_ptr + c, mask=c_mask, other=0.0)
    for t in range(tiles_per_prog):
        s = (pid_p * tiles_per_prog + t) * BLOCK_S + tl.arange(0, BLOCK_S)
        addr, mask = _sample_addresses(
            s, c, c_mask, off_ptr, C, L, G, A, total, row_base, row_mod,
            S0, S1, S2, m0, m1, m2, st0, st1, st2,
            OFF_R, OFF_0, OFF_1, OFF_2, CL, UNIFORM,
        )  # fmt: skip
        x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        if RELU:
            pre = _pre_activation(x, mean, scale, b_ptr, c, c_mask, HAS_B)
            if HAS_Z:
                pre = pre + tl.load(z_ptr + addr, mask=mask, other=0.0).to(tl.float32)
            dy = tl.where(pre > 0, dy, 0.0)
        dx = scale[None, :] * (dy - (db[None, :] + xhat * dg[None, :]) * inv_n)
        tl.store(dx_ptr + addr, dx.to(dx_ptr.dtype.element_ty), mask=mask)
