//! Differentiable CPU ops for training a prompt through the frozen text tower, each with a
//! hand-written backward, so that a CoOp step costs about two forward passes instead of the
//! five that candle's generic autograd spends (shared/design/PERFORMANCE_NOTES.md):
//!
//! - [`layer_norm`]: fused forward; backward `dx = rstd * (g' - mean(g') - x̂ * mean(g' x̂))`
//!   with `g' = g * gamma` (no gradient for the frozen gamma and beta);
//! - [`linear`]: `act(x W^T + b)` for a frozen `W`, `b`: the product runs in candle, bias and
//!   activation (identity or QuickGELU) are fused into the op that links it to `x`; backward
//!   computes only the input gradient `(g * act'(h)) W` (no weight gradient, no per-example
//!   copies);
//! - [`attention`]: multi-head scaled-dot-product attention (the scale is folded into Q) read
//!   straight from the fused QKV rows and written straight into `[rows, D]`, causal or not;
//!   the backward recomputes nothing (the probabilities are kept) and writes dQ, dK, dV into
//!   one `[rows, 3D]` gradient. No head split/merge copies in either direction.
//!
//! Inner loops are slice code with eight independent lanes so that LLVM vectorises them, and
//! compiled a second time for AVX2 + FMA, chosen at run time (as in [`super::kernels`]).
//! Tested against candle's composite ops on random inputs (values and gradients).

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::kernels::{bias_act_rows, contiguous_f32, exp_f32, has_avx2, rows_per_task};

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            s[k] += x[k] * y[k];
        }
    }
    let mut out = s.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        out += x * y;
    }
    out
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

// ---------------------------------------------------------------- layer norm

#[inline(always)]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let mut v = [0f32; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for ch in c {
        for k in 0..8 {
            let d = ch[k] - mean;
            v[k] += d * d;
        }
    }
    let mut var = v.iter().sum::<f32>();
    for &r in rest {
        var += (r - mean) * (r - mean);
    }
    (mean, 1.0 / (var / n + eps).sqrt())
}

#[inline(always)]
fn ln_fwd_row_generic(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
    let (mean, rstd) = ln_stats(x, eps);
    for (((yv, xv), g), b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *yv = (xv - mean) * rstd * g + b;
    }
}

#[inline(always)]
fn ln_bwd_row_generic(x: &[f32], gamma: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
    let (mean, rstd) = ln_stats(x, eps);
    let n = x.len() as f32;
    let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
    let mut i = 0;
    while i + 8 <= x.len() {
        for k in 0..8 {
            let gp = g[i + k] * gamma[i + k];
            a[k] += gp;
            b[k] += gp * (x[i + k] - mean) * rstd;
        }
        i += 8;
    }
    let (mut sa, mut sb) = (a.iter().sum::<f32>(), b.iter().sum::<f32>());
    while i < x.len() {
        let gp = g[i] * gamma[i];
        sa += gp;
        sb += gp * (x[i] - mean) * rstd;
        i += 1;
    }
    let (ma, mb) = (sa / n, sb / n);
    for (k, d) in dx.iter_mut().enumerate() {
        let xh = (x[k] - mean) * rstd;
        *d = rstd * (g[k] * gamma[k] - ma - xh * mb);
    }
}

// ---------------------------------------------------------------- QuickGELU

/// `g * act'(h + b)` for QuickGELU `v * sigmoid(1.702 v)`.
#[inline(always)]
fn quick_gelu_bwd_row_generic(h: &[f32], bias: &[f32], g: &[f32], dh: &mut [f32]) {
    for (((d, hv), b), gv) in dh.iter_mut().zip(h).zip(bias).zip(g) {
        let v = hv + b;
        let s = 1.0 / (1.0 + exp_f32(-1.702 * v));
        *d = gv * (s + 1.702 * v * s * (1.0 - s));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ln_fwd_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
        super::ln_fwd_row_generic(x, gamma, beta, eps, y)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ln_bwd_row(x: &[f32], gamma: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) {
        super::ln_bwd_row_generic(x, gamma, g, eps, dx)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quick_gelu_bwd_row(h: &[f32], bias: &[f32], g: &[f32], dh: &mut [f32]) {
        super::quick_gelu_bwd_row_generic(h, bias, g, dh)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attn_fwd(
        s: &super::AttnShape,
        g: &super::Group,
        qkv: &[f32],
        o: &mut [f32],
        p: &mut [f32],
    ) {
        super::attn_fwd_generic(s, g, qkv, o, p)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attn_bwd(
        s: &super::AttnShape,
        g: &super::Group,
        qkv: &[f32],
        p: &[f32],
        dout: &[f32],
        dqkv: &mut [f32],
    ) {
        super::attn_bwd_generic(s, g, qkv, p, dout, dqkv)
    }
}

macro_rules! dispatch {
    ($fast:expr, $name:ident ( $($arg:expr),* ), $generic:ident) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $fast {
                // SAFETY: `fast` is true only when AVX2 and FMA were detected at run time.
                unsafe { avx2::$name($($arg),*) }
            } else {
                $generic($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $fast;
            $generic($($arg),*)
        }
    }};
}

/// Apply `f(row_in.., row_out)` over rows in parallel.
fn rows_par(
    n_in: &[&[f32]],
    cols: usize,
    out: &mut [f32],
    f: impl Fn(&[&[f32]], &mut [f32]) + Sync,
) {
    let chunk = cols * rows_per_task(cols);
    out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
        let start = ci * chunk;
        for (r, orow) in o.chunks_mut(cols).enumerate() {
            let off = start + r * cols;
            let rows: Vec<&[f32]> = n_in.iter().map(|s| &s[off..off + cols]).collect();
            f(&rows, orow);
        }
    });
}

/// The f32 data of a CPU tensor without copying it.
fn cpu_slice<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(c) => contiguous_f32(c, layout, "train op"),
        _ => candle_core::bail!("the training ops run on the CPU"),
    }
}

/// Bind `$name: &[f32]` to the data of `$t` (made contiguous if needed) for the rest of the
/// scope, without copying.
macro_rules! f32_slice {
    ($t:expr => $name:ident) => {
        let __t = $t.contiguous()?;
        let __g = __t.storage_and_layout();
        let $name: &[f32] = cpu_slice(&__g.0, __g.1)?;
    };
}


struct LayerNormOp {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tr-train-layer-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "layer_norm")?;
        let cols = self.gamma.len();
        let mut y = vec![0f32; x.len()];
        let fast = has_avx2();
        let (g, b, eps) = (&self.gamma[..], &self.beta[..], self.eps);
        rows_par(&[x], cols, &mut y, |r, o| {
            dispatch!(fast, ln_fwd_row(r[0], g, b, eps, o), ln_fwd_row_generic)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        f32_slice!(arg => x);
        f32_slice!(grad => g);
        let cols = self.gamma.len();
        let mut dx = vec![0f32; x.len()];
        let fast = has_avx2();
        let (gm, eps) = (&self.gamma[..], self.eps);
        rows_par(&[&x, &g], cols, &mut dx, |r, o| {
            dispatch!(fast, ln_bwd_row(r[0], gm, r[1], eps, o), ln_bwd_row_generic)
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// Layer norm over the last dimension with frozen `gamma`, `beta`, differentiable in `x`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp {
        gamma: gamma.to_vec1()?,
        beta: beta.to_vec1()?,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op1(op)
}

struct LinearOp {
    /// `[out, in]`.
    weight: Tensor,
    bias: Vec<f32>,
    quick_gelu: bool,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "tr-train-linear"
    }
    /// `s1` is the input (only linked for the backward), `s2` the product `x W^T`.
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(s2, l2, "linear")?;
        let y = bias_act_rows(h, &self.bias, self.quick_gelu);
        Ok((CpuStorage::F32(y), l2.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dh = if self.quick_gelu {
            f32_slice!(h => hv);
            f32_slice!(grad => g);
            let cols = self.bias.len();
            let mut dh = vec![0f32; hv.len()];
            let fast = has_avx2();
            let b = &self.bias[..];
            rows_par(&[&hv, &g], cols, &mut dh, |r, o| {
                dispatch!(
                    fast,
                    quick_gelu_bwd_row(r[0], b, r[1], o),
                    quick_gelu_bwd_row_generic
                )
            });
            Tensor::from_vec(dh, h.shape(), &Device::Cpu)?
        } else {
            grad.contiguous()?
        };
        Ok((Some(dh.matmul(&self.weight)?), None))
    }
}

/// `act(x W^T + b)` for 2-D `x` (`[rows, in]`) and frozen `weight` `[out, in]`, `bias` `[out]`;
/// `quick_gelu` selects the activation (otherwise identity).
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    quick_gelu: bool,
) -> Result<Tensor> {
    let h = x.detach().matmul(&weight.t()?)?;
    let out = weight.dim(0)?;
    let bias = match bias {
        Some(b) => b.to_vec1()?,
        None => vec![0f32; out],
    };
    x.apply_op2(
        &h,
        LinearOp {
            weight: weight.clone(),
            bias,
            quick_gelu,
        },
    )
}

/// Attention groups over the rows of a fused QKV matrix `[rows, 3D]`: each group is a list of
/// key rows whose last `queries` rows are also its queries. With `causal`, query `k` sees the
/// keys up to and including itself. A batch of sequences is one group per sequence; a batch of
/// prompts that share their first `p` positions (CoOp's "[SOS] X X X X" before the class name)
/// is one group for the shared prefix and one per class (prefix rows + the class's own rows).
pub struct AttnShape {
    pub heads: usize,
    pub hd: usize,
    pub causal: bool,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub keys: Vec<usize>,
    pub queries: usize,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.heads * self.hd
    }
    /// `b` independent sequences of `l` rows.
    pub fn batch(b: usize, l: usize, heads: usize, hd: usize, causal: bool) -> Self {
        let groups = (0..b)
            .map(|i| Group {
                keys: (i * l..(i + 1) * l).collect(),
                queries: l,
            })
            .collect();
        Self {
            heads,
            hd,
            causal,
            groups,
        }
    }
    /// `p` shared prefix rows followed by `c` blocks of `s` rows (causal).
    pub fn shared_prefix(p: usize, c: usize, s: usize, heads: usize, hd: usize) -> Self {
        let mut groups = vec![Group {
            keys: (0..p).collect(),
            queries: p,
        }];
        for ci in 0..c {
            let mut keys: Vec<usize> = (0..p).collect();
            keys.extend(p + ci * s..p + (ci + 1) * s);
            groups.push(Group { keys, queries: s });
        }
        Self {
            heads,
            hd,
            causal: true,
            groups,
        }
    }
}

/// One group forward: returns `o` `[queries, D]` and `probs` `[H, queries, keys]`.
#[inline(always)]
fn attn_fwd_generic(s: &AttnShape, g: &Group, qkv: &[f32], o: &mut [f32], p: &mut [f32]) {
    let (hd, d) = (s.hd, s.d());
    let nk = g.keys.len();
    let nq = g.queries;
    let first_q = nk - nq;
    o.fill(0.0);
    for h in 0..s.heads {
        let ph = &mut p[h * nq * nk..(h + 1) * nq * nk];
        for qi in 0..nq {
            let r = g.keys[first_q + qi];
            let q = &qkv[r * 3 * d + h * hd..r * 3 * d + h * hd + hd];
            let row = &mut ph[qi * nk..(qi + 1) * nk];
            let last = if s.causal { first_q + qi + 1 } else { nk };
            let mut max = f32::NEG_INFINITY;
            for (j, v) in row.iter_mut().enumerate().take(last) {
                let kr = g.keys[j];
                *v = dot(
                    q,
                    &qkv[kr * 3 * d + d + h * hd..kr * 3 * d + d + h * hd + hd],
                );
                max = max.max(*v);
            }
            let mut sum = 0f32;
            for v in row.iter_mut().take(last) {
                *v = exp_f32(*v - max);
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut().take(last) {
                *v *= inv;
            }
            for v in row.iter_mut().skip(last) {
                *v = 0.0;
            }
            let orow = &mut o[qi * d + h * hd..qi * d + h * hd + hd];
            for (j, &pij) in row.iter().enumerate().take(last) {
                let vr = g.keys[j];
                axpy(
                    pij,
                    &qkv[vr * 3 * d + 2 * d + h * hd..vr * 3 * d + 2 * d + h * hd + hd],
                    orow,
                );
            }
        }
    }
}

/// One group backward: `dout` `[queries, D]` -> `dqkv` `[keys, 3D]` (rows in key order).
#[inline(always)]
fn attn_bwd_generic(
    s: &AttnShape,
    g: &Group,
    qkv: &[f32],
    p: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let (hd, d) = (s.hd, s.d());
    let nk = g.keys.len();
    let nq = g.queries;
    let first_q = nk - nq;
    dqkv.fill(0.0);
    let mut ds = vec![0f32; nk];
    for h in 0..s.heads {
        let ph = &p[h * nq * nk..(h + 1) * nq * nk];
        for qi in 0..nq {
            let last = if s.causal { first_q + qi + 1 } else { nk };
            let prow = &ph[qi * nk..(qi + 1) * nk];
            let dorow = &dout[qi * d + h * hd..qi * d + h * hd + hd];
            // dP_ij = dO_i . V_j ; dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)
            let mut acc = 0f32;
            for j in 0..last {
                let vr = g.keys[j];
                ds[j] = dot(
                    dorow,
                    &qkv[vr * 3 * d + 2 * d + h * hd..vr * 3 * d + 2 * d + h * hd + hd],
                );
                acc += prow[j] * ds[j];
            }
            for j in 0..last {
                ds[j] = prow[j] * (ds[j] - acc);
            }
            // dQ_i = sum_j dS_ij K_j ; dK_j += dS_ij Q_i ; dV_j += P_ij dO_i
            let qr = g.keys[first_q + qi];
            let qrow = &qkv[qr * 3 * d + h * hd..qr * 3 * d + h * hd + hd];
            let own = (first_q + qi) * 3 * d + h * hd;
            for j in 0..last {
                let kr = g.keys[j];
                axpy(
                    ds[j],
                    &qkv[kr * 3 * d + d + h * hd..kr * 3 * d + d + h * hd + hd],
                    &mut dqkv[own..own + hd],
                );
                axpy(
                    ds[j],
                    qrow,
                    &mut dqkv[j * 3 * d + d + h * hd..j * 3 * d + d + h * hd + hd],
                );
                axpy(
                    prow[j],
                    dorow,
                    &mut dqkv[j * 3 * d + 2 * d + h * hd..j * 3 * d + 2 * d + h * hd + hd],
                );
            }
        }
    }
}

struct AttentionOp {
    shape: AttnShape,
    probs: Mutex<Vec<Vec<f32>>>,
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "tr-train-attention"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(st, l, "attention")?;
        let sh = &self.shape;
        let d = sh.d();
        let rows = qkv.len() / (3 * d).max(1);
        if l.dims() != [rows, 3 * d]
            || sh
                .groups
                .iter()
                .any(|g| g.keys.iter().any(|&r| r >= rows) || g.queries > g.keys.len())
        {
            candle_core::bail!("attention: qkv of {:?} does not fit the groups", l.dims());
        }
        let fast = has_avx2();
        let parts: Vec<(Vec<f32>, Vec<f32>)> = sh
            .groups
            .par_iter()
            .map(|g| {
                let mut o = vec![0f32; g.queries * d];
                let mut p = vec![0f32; sh.heads * g.queries * g.keys.len()];
                dispatch!(fast, attn_fwd(sh, g, qkv, &mut o, &mut p), attn_fwd_generic);
                (o, p)
            })
            .collect();
        let mut out = vec![0f32; rows * d];
        let mut probs = Vec::with_capacity(parts.len());
        for (g, (o, p)) in sh.groups.iter().zip(parts) {
            let first_q = g.keys.len() - g.queries;
            for (qi, orow) in o.chunks(d).enumerate() {
                let r = g.keys[first_q + qi];
                out[r * d..(r + 1) * d].copy_from_slice(orow);
            }
            probs.push(p);
        }
        if let Ok(mut saved) = self.probs.lock() {
            *saved = probs;
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        f32_slice!(arg => qkv);
        f32_slice!(grad => g);
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))?;
        let sh = &self.shape;
        let d = sh.d();
        let fast = has_avx2();
        let parts: Vec<Vec<f32>> = sh
            .groups
            .par_iter()
            .zip(probs.par_iter())
            .map(|(gr, p)| {
                let first_q = gr.keys.len() - gr.queries;
                let mut dout = vec![0f32; gr.queries * d];
                for (qi, row) in dout.chunks_mut(d).enumerate() {
                    let r = gr.keys[first_q + qi];
                    row.copy_from_slice(&g[r * d..(r + 1) * d]);
                }
                let mut local = vec![0f32; gr.keys.len() * 3 * d];
                dispatch!(
                    fast,
                    attn_bwd(sh, gr, &qkv, p, &dout, &mut local),
                    attn_bwd_generic
                );
                local
            })
            .collect();
        let mut dqkv = vec![0f32; qkv.len()];
        for (gr, local) in sh.groups.iter().zip(parts) {
            for (j, row) in local.chunks(3 * d).enumerate() {
                let r = gr.keys[j];
                for (a, b) in dqkv[r * 3 * d..(r + 1) * 3 * d].iter_mut().zip(row) {
                    *a += b;
                }
            }
        }
        Ok(Some(Tensor::from_vec(dqkv, arg.shape(), &Device::Cpu)?))
    }
}

/// Attention over fused QKV rows `[b * l, 3D]` (Q pre-scaled) -> `[b * l, D]`.
pub fn attention(qkv: &Tensor, b: usize, l: usize, heads: usize, causal: bool) -> Result<Tensor> {
    let hd = qkv.dim(1)? / 3 / heads;
    attention_groups(qkv, AttnShape::batch(b, l, heads, hd, causal))
}

/// Attention over fused QKV rows arranged in `shape`'s groups.
pub fn attention_groups(qkv: &Tensor, shape: AttnShape) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp {
        shape,
        probs: Mutex::new(Vec::new()),
    })
}

/// Column sums over rows of `a` (and of `a * b` when given), in parallel row chunks.
fn column_sums(
    cols: usize,
    rows: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let chunk = rows
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|ci| {
            let (mut s1, mut s2) = (vec![0f32; cols], vec![0f32; cols]);
            for r in ci * chunk..((ci + 1) * chunk).min(rows) {
                f(r, &mut s1, &mut s2);
            }
            (s1, s2)
        })
        .collect();
    let (mut s1, mut s2) = (vec![0f32; cols], vec![0f32; cols]);
    for (a, b) in parts {
        for k in 0..cols {
            s1[k] += a[k];
            s2[k] += b[k];
        }
    }
    (s1, s2)
}

struct LinearWeightGradOp {
    /// The constant input `[n, in]`.
    x: Tensor,
}

impl CustomOp3 for LinearWeightGradOp {
    fn name(&self) -> &'static str {
        "tr-train-linear-wgrad"
    }
    /// `(w, b, h = x w^T)` -> `h + b`.
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = contiguous_f32(s2, l2, "linear bias")?;
        let h = contiguous_f32(s3, l3, "linear")?;
        Ok((CpuStorage::F32(bias_act_rows(h, b, false)), l3.shape().clone()))
    }
    fn bwd(
        &self,
        _w: &Tensor,
        _b: &Tensor,
        _h: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dw = g.t()?.matmul(&self.x)?;
        let db = g.sum(0)?;
        Ok((Some(dw), Some(db), None))
    }
}

/// `x W^T + b` for a constant `x` `[n, in]` and trainable `W`, `b`: only the parameter
/// gradients are computed (none for `x`).
pub fn linear_weight_grad(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let x = x.detach().contiguous()?;
    let h = x.matmul(&w.detach().t()?)?;
    w.apply_op3(b, &h, LinearWeightGradOp { x })
}

/// Batch statistics of the last [`batch_norm_relu`] forward: mean and biased variance.
pub type BatchStats = std::sync::Arc<Mutex<(Vec<f32>, Vec<f32>)>>;

struct BatchNormReluOp {
    eps: f32,
    stats: BatchStats,
}

impl CustomOp3 for BatchNormReluOp {
    fn name(&self) -> &'static str {
        "tr-train-batch-norm-relu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "batch_norm")?;
        let gamma = contiguous_f32(s2, l2, "batch_norm weight")?;
        let beta = contiguous_f32(s3, l3, "batch_norm bias")?;
        let d = gamma.len();
        let n = y.len() / d.max(1);
        let (sum, _) = column_sums(d, n, |r, s1, _| {
            for (a, v) in s1.iter_mut().zip(&y[r * d..(r + 1) * d]) {
                *a += v;
            }
        });
        let mean: Vec<f32> = sum.iter().map(|v| v / n as f32).collect();
        let (sq, _) = column_sums(d, n, |r, s1, _| {
            for ((a, v), m) in s1.iter_mut().zip(&y[r * d..(r + 1) * d]).zip(&mean) {
                *a += (v - m) * (v - m);
            }
        });
        let var: Vec<f32> = sq.iter().map(|v| v / n as f32).collect();
        let scale: Vec<f32> = var
            .iter()
            .zip(gamma)
            .map(|(v, g)| g / (v + self.eps).sqrt())
            .collect();
        let mut z = vec![0f32; y.len()];
        z.par_chunks_mut(d * rows_per_task(d))
            .enumerate()
            .for_each(|(ci, zc)| {
                let start = ci * d * rows_per_task(d);
                for (ri, zr) in zc.chunks_mut(d).enumerate() {
                    let yr = &y[start + ri * d..start + (ri + 1) * d];
                    for k in 0..d {
                        zr[k] = ((yr[k] - mean[k]) * scale[k] + beta[k]).max(0.0);
                    }
                }
            });
        if let Ok(mut st) = self.stats.lock() {
            *st = (mean, var);
        }
        Ok((CpuStorage::F32(z), l1.shape().clone()))
    }
    fn bwd(
        &self,
        y: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        z: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        f32_slice!(y => yv);
        f32_slice!(z => zv);
        f32_slice!(g => gv);
        let gm = gamma.to_vec1::<f32>()?;
        let (mean, var) = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))?
            .clone();
        let d = gm.len();
        let n = yv.len() / d.max(1);
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        // gz = g where the ReLU passed; sums of gz and gz * y_hat per column
        let (s_gz, s_gzy) = column_sums(d, n, |r, s1, s2| {
            for k in 0..d {
                let i = r * d + k;
                if zv[i] > 0.0 {
                    s1[k] += gv[i];
                    s2[k] += gv[i] * (yv[i] - mean[k]) * rstd[k];
                }
            }
        });
        let mut dy = vec![0f32; yv.len()];
        let nf = n as f32;
        dy.par_chunks_mut(d * rows_per_task(d))
            .enumerate()
            .for_each(|(ci, dc)| {
                let start = ci * d * rows_per_task(d);
                for (ri, dr) in dc.chunks_mut(d).enumerate() {
                    let base = start + ri * d;
                    for k in 0..d {
                        let i = base + k;
                        let gz = if zv[i] > 0.0 { gv[i] } else { 0.0 };
                        let yh = (yv[i] - mean[k]) * rstd[k];
                        dr[k] = gm[k] * rstd[k] * (gz - s_gz[k] / nf - yh * s_gzy[k] / nf);
                    }
                }
            });
        let dev = &Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dy, y.shape(), dev)?),
            Some(Tensor::from_vec(s_gzy, d, dev)?),
            Some(Tensor::from_vec(s_gz, d, dev)?),
        ))
    }
}

/// `relu(BatchNorm(y))` in training mode (batch statistics over the rows of `y` `[n, d]`),
/// differentiable in `y`, `gamma`, `beta`; the batch mean and biased variance land in `stats`.
pub fn batch_norm_relu(
    y: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    stats: &BatchStats,
) -> Result<Tensor> {
    y.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BatchNormReluOp {
            eps: eps as f32,
            stats: stats.clone(),
        },
    )
}

struct L2NormalizeOp;

impl CustomOp1 for L2NormalizeOp {
    fn name(&self) -> &'static str {
        "tr-train-l2-normalize"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "l2_normalize")?;
        let d = l.dims().last().copied().unwrap_or(1);
        let mut y = vec![0f32; x.len()];
        rows_par(&[x], d, &mut y, |r, o| {
            let inv = 1.0 / dot(r[0], r[0]).sqrt();
            for (a, b) in o.iter_mut().zip(r[0]) {
                *a = b * inv;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        f32_slice!(arg => x);
        f32_slice!(res => t);
        f32_slice!(grad => g);
        let d = arg.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; x.len()];
        rows_par(&[&x, &t, &g], d, &mut dx, |r, o| {
            let inv = 1.0 / dot(r[0], r[0]).sqrt();
            let gt = dot(r[2], r[1]);
            for k in 0..o.len() {
                o[k] = (r[2][k] - r[1][k] * gt) * inv;
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// Rows divided by their L2 norm, differentiable.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(L2NormalizeOp)
}

struct SemanticTokensOp {
    b: usize,
    n: usize,
    /// Per sequence, the rows picked (token indices within the sequence), in output order.
    picked: Vec<Vec<usize>>,
}

impl CustomOp1 for SemanticTokensOp {
    fn name(&self) -> &'static str {
        "tr-train-semantic-tokens"
    }
    /// `[b * n, d]` -> `[b * (k + 1), d]`: the picked rows of each sequence, then its mean row.
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "semantic_tokens")?;
        let (b, n) = (self.b, self.n);
        let d = x.len() / (b * n).max(1);
        let k = self.picked.first().map(|p| p.len()).unwrap_or(0);
        let mut out = vec![0f32; b * (k + 1) * d];
        out.par_chunks_mut((k + 1) * d).enumerate().for_each(|(i, o)| {
            let seq = &x[i * n * d..(i + 1) * n * d];
            for (j, &r) in self.picked[i].iter().enumerate() {
                o[j * d..(j + 1) * d].copy_from_slice(&seq[r * d..(r + 1) * d]);
            }
            let mean = &mut o[k * d..(k + 1) * d];
            for row in seq.chunks(d) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v;
                }
            }
            let inv = 1.0 / n as f32;
            mean.iter_mut().for_each(|m| *m *= inv);
        });
        Ok((CpuStorage::F32(out), Shape::from((b * (k + 1), d))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        f32_slice!(grad => g);
        let (b, n) = (self.b, self.n);
        let d = arg.dim(1)?;
        let k = self.picked.first().map(|p| p.len()).unwrap_or(0);
        let mut dx = vec![0f32; b * n * d];
        dx.par_chunks_mut(n * d).enumerate().for_each(|(i, dseq)| {
            let gi = &g[i * (k + 1) * d..(i + 1) * (k + 1) * d];
            let gm: Vec<f32> = gi[k * d..].iter().map(|v| v / n as f32).collect();
            for row in dseq.chunks_mut(d) {
                row.copy_from_slice(&gm);
            }
            for (j, &r) in self.picked[i].iter().enumerate() {
                for (a, v) in dseq[r * d..(r + 1) * d].iter_mut().zip(&gi[j * d..(j + 1) * d]) {
                    *a += v;
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), &Device::Cpu)?))
    }
}

/// For `b` sequences of `n` rows (`x`: `[b * n, d]`), the rows `picked[i]` of sequence `i`
/// followed by the mean of all its rows: `[b * (k + 1), d]`, differentiable, in one pass each
/// way (TextRefiner's semantic-loss tokens).
pub fn pick_and_mean(x: &Tensor, b: usize, n: usize, picked: Vec<Vec<usize>>) -> Result<Tensor> {
    if picked.len() != b || picked.iter().any(|p| p.len() != picked[0].len() || p.iter().any(|&r| r >= n)) {
        candle_core::bail!("pick_and_mean: picks do not fit {b} sequences of {n} rows");
    }
    x.contiguous()?.apply_op1(SemanticTokensOp { b, n, picked })
}

/// Whether the training ops apply to `x` (f32 on the CPU, and not switched off).
pub fn usable(x: &Tensor) -> bool {
    super::kernels::enabled() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Value and gradient of ours against candle's composite for a scalar loss `sum(y * w)`.
    fn check(
        f_ours: impl Fn(&Tensor) -> Tensor,
        f_ref: impl Fn(&Tensor) -> Tensor,
        shape: (usize, usize),
        tol: f32,
    ) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let y1 = f_ours(x.as_tensor());
        let y2 = f_ref(x.as_tensor());
        assert!(max_diff(&y1, &y2) < tol, "value {}", max_diff(&y1, &y2));
        let w = Tensor::randn(0f32, 1.0, y1.shape(), &dev).unwrap();
        let g1 = (y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        assert!(
            max_diff(a, b) / scale < tol,
            "grad {}",
            max_diff(a, b) / scale
        );
    }

    #[test]
    fn layer_norm_matches() {
        let dev = Device::Cpu;
        let g = Tensor::randn(1f32, 0.2, 37, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 37, &dev).unwrap();
        check(
            |x| layer_norm(x, &g, &b, 1e-5).unwrap(),
            |x| candle_nn::ops::layer_norm_slow(x, &g, &b, 1e-5).unwrap(),
            (13, 37),
            2e-5,
        );
    }

    #[test]
    fn linear_matches() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (19, 37), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 19, &dev).unwrap();
        for q in [false, true] {
            check(
                |x| linear(x, &w, Some(&b), q).unwrap(),
                |x| {
                    let h = x
                        .matmul(&w.t().unwrap())
                        .unwrap()
                        .broadcast_add(&b)
                        .unwrap();
                    if q {
                        (&h * candle_nn::ops::sigmoid(&(&h * 1.702).unwrap()).unwrap()).unwrap()
                    } else {
                        h
                    }
                },
                (13, 37),
                2e-5,
            );
        }
    }

    #[test]
    fn local_transform_ops_match() {
        let dev = Device::Cpu;
        let xc = Tensor::randn(0f32, 1.0, (29, 11), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 13, &dev).unwrap();
        check(
            |w| linear_weight_grad(&xc, w, &b).unwrap(),
            |w| {
                xc.matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap()
            },
            (13, 11),
            2e-5,
        );
        let gamma = Tensor::randn(1f32, 0.2, 11, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.5, 11, &dev).unwrap();
        let stats: BatchStats = Default::default();
        let reference = |y: &Tensor| {
            let mean = y.mean(0).unwrap();
            let c = y.broadcast_sub(&mean).unwrap();
            let var = c.sqr().unwrap().mean(0).unwrap();
            c.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&gamma)
                .unwrap()
                .broadcast_add(&beta)
                .unwrap()
                .relu()
                .unwrap()
        };
        check(
            |y| batch_norm_relu(y, &gamma, &beta, 1e-5, &stats).unwrap(),
            reference,
            (29, 11),
            2e-5,
        );
        check(
            |x| l2_normalize(x).unwrap(),
            |x| crate::clip::l2_normalize(x).unwrap(),
            (29, 11),
            2e-5,
        );
        // gradients of gamma and beta
        let y = Tensor::randn(0f32, 1.0, (29, 11), &dev).unwrap();
        let gv = Var::from_tensor(&gamma).unwrap();
        let bv = Var::from_tensor(&beta).unwrap();
        let w = Tensor::randn(0f32, 1.0, (29, 11), &dev).unwrap();
        let ours = (batch_norm_relu(&y, gv.as_tensor(), bv.as_tensor(), 1e-5, &stats).unwrap()
            * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mean = y.mean(0).unwrap();
        let c = y.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean(0).unwrap();
        let r = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(gv.as_tensor())
            .unwrap()
            .broadcast_add(bv.as_tensor())
            .unwrap()
            .relu()
            .unwrap();
        let theirs = (r * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&gv, &bv] {
            assert!(
                max_diff(
                    ours.get(v.as_tensor()).unwrap(),
                    theirs.get(v.as_tensor()).unwrap()
                ) < 1e-4
            );
        }
    }

    #[test]
    fn pick_and_mean_matches() {
        let (b, n) = (3, 5);
        let picked = vec![vec![0, 2], vec![4, 1], vec![3, 3]];
        let pk = picked.clone();
        check(
            |x| pick_and_mean(x, b, n, picked.clone()).unwrap(),
            |x| {
                let d = x.dim(1).unwrap();
                let idx: Vec<u32> = pk.iter().enumerate().flat_map(|(i, p)| p.iter().map(move |&r| (i * n + r) as u32)).collect();
                let idx = Tensor::from_vec(idx, b * 2, &Device::Cpu).unwrap();
                let sel = x.index_select(&idx, 0).unwrap().reshape((b, 2, d)).unwrap();
                let mean = x.reshape((b, n, d)).unwrap().mean_keepdim(1).unwrap();
                Tensor::cat(&[&sel, &mean], 1).unwrap().reshape((b * 3, d)).unwrap()
            },
            (b * n, 7),
            2e-5,
        );
    }

    #[test]
    fn attention_matches() {
        let (b, l, heads, hd) = (3, 7, 2, 8);
        let d = heads * hd;
        for causal in [true, false] {
            check(
                |x| attention(x, b, l, heads, causal).unwrap(),
                |x| {
                    let qkv = x
                        .reshape((b, l, 3, heads, hd))
                        .unwrap()
                        .permute((2, 0, 3, 1, 4))
                        .unwrap();
                    let (q, k, v) = (
                        qkv.get(0).unwrap(),
                        qkv.get(1).unwrap(),
                        qkv.get(2).unwrap(),
                    );
                    let mut s = q
                        .contiguous()
                        .unwrap()
                        .matmul(&k.contiguous().unwrap().t().unwrap())
                        .unwrap();
                    if causal {
                        s = s
                            .broadcast_add(
                                &super::super::text::causal_mask(l, &Device::Cpu).unwrap(),
                            )
                            .unwrap();
                    }
                    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                    p.matmul(&v.contiguous().unwrap())
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .reshape((b * l, d))
                        .unwrap()
                },
                (b * l, 3 * d),
                2e-5,
            );
        }
    }
}
