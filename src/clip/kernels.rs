//! Fused, multi-threaded CPU kernels for the inference path (no gradient tracked): bias +
//! activation, bias + residual, and softmax over the last dimension with a vectorisable exp.
//!
//! candle runs element-wise ops on one thread and evaluates `exp` with the scalar libm call;
//! CLIP's MLP activation and attention softmax then cost more than their share (see
//! BENCHMARKS.md). These kernels work row by row across rayon's threads, and their inner loops
//! are plain slices code that LLVM vectorises; on x86-64 with AVX2 + FMA a second copy is
//! compiled for those features and chosen at run time.
//!
//! The exp is Cephes' `expf` (range reduction by ln 2 and a degree-6 polynomial), relative
//! error about 1e-7 over the range used here.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

/// Max and sum with eight independent lanes, so that LLVM vectorises them (a single running
/// accumulator would fix the order of the float operations and keep the loop scalar).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
        }
    }
    let mut out = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in rest {
        out = out.max(v);
    }
    out
}

#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            s[k] += c[k];
        }
    }
    s.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn softmax_row_generic(src: &[f32], dst: &mut [f32]) {
    let max = max_lanes(src);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = exp_f32(*s - max);
    }
    let inv = 1.0 / sum_lanes(dst);
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

#[inline(always)]
fn bias_act_row_generic(src: &[f32], bias: &[f32], dst: &mut [f32], quick_gelu: bool) {
    if quick_gelu {
        for ((d, s), b) in dst.iter_mut().zip(src).zip(bias) {
            let v = *s + *b;
            // OpenAI CLIP's QuickGELU: v * sigmoid(1.702 v)
            *d = v / (1.0 + exp_f32(-1.702 * v));
        }
    } else {
        for ((d, s), b) in dst.iter_mut().zip(src).zip(bias) {
            *d = *s + *b;
        }
    }
}

#[inline(always)]
fn bias_residual_row_generic(src: &[f32], bias: &[f32], res: &[f32], dst: &mut [f32]) {
    for (((d, s), b), r) in dst.iter_mut().zip(src).zip(bias).zip(res) {
        *d = *s + *b + *r;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row(src: &[f32], dst: &mut [f32]) {
        super::softmax_row_generic(src, dst)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bias_act_row(src: &[f32], bias: &[f32], dst: &mut [f32], quick_gelu: bool) {
        super::bias_act_row_generic(src, bias, dst, quick_gelu)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bias_residual_row(src: &[f32], bias: &[f32], res: &[f32], dst: &mut [f32]) {
        super::bias_residual_row_generic(src, bias, res, dst)
    }
}

#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn softmax_row(src: &[f32], dst: &mut [f32], fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is only true when AVX2 and FMA were detected at run time.
        return unsafe { avx2::softmax_row(src, dst) };
    }
    let _ = fast;
    softmax_row_generic(src, dst)
}

fn bias_act_row(src: &[f32], bias: &[f32], dst: &mut [f32], quick_gelu: bool, fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: as above.
        return unsafe { avx2::bias_act_row(src, bias, dst, quick_gelu) };
    }
    let _ = fast;
    bias_act_row_generic(src, bias, dst, quick_gelu)
}

fn bias_residual_row(src: &[f32], bias: &[f32], res: &[f32], dst: &mut [f32], fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: as above.
        return unsafe { avx2::bias_residual_row(src, bias, res, dst) };
    }
    let _ = fast;
    bias_residual_row_generic(src, bias, res, dst)
}

/// Rows per rayon task so that each task has some 16k elements of work.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d,
        _ => candle_core::bail!("{what}: only f32 is supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "tr-softmax-last-dim"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, "softmax")?;
        let cols = l.dims().last().copied().unwrap_or(1);
        let mut dst = vec![0f32; src.len()];
        let fast = has_avx2();
        let chunk = cols * rows_per_task(cols);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| {
                for (dr, sr) in d.chunks_mut(cols).zip(s.chunks(cols)) {
                    softmax_row(sr, dr, fast);
                }
            });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

struct BiasAct {
    quick_gelu: bool,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "tr-bias-act"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s1, l1, "bias_act")?;
        let bias = contiguous_f32(s2, l2, "bias_act bias")?;
        let cols = bias.len();
        if l1.dims().last() != Some(&cols) {
            candle_core::bail!("bias_act: bias of {cols} for input {:?}", l1.dims());
        }
        Ok((CpuStorage::F32(bias_act_rows(src, bias, self.quick_gelu)), l1.shape().clone()))
    }
}

/// `act(src + bias)` row by row across rayon's threads (act = identity or QuickGELU); `src` is
/// row-major with rows of `bias.len()`. Shared by the inference op and the training ops.
pub(crate) fn bias_act_rows(src: &[f32], bias: &[f32], quick_gelu: bool) -> Vec<f32> {
    let cols = bias.len().max(1);
    let mut dst = vec![0f32; src.len()];
    let fast = has_avx2();
    let chunk = cols * rows_per_task(cols);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| {
            for (dr, sr) in d.chunks_mut(cols).zip(s.chunks(cols)) {
                bias_act_row(sr, bias, dr, quick_gelu, fast);
            }
        });
    dst
}

struct BiasResidual;

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "tr-bias-residual"
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
        let src = contiguous_f32(s1, l1, "bias_residual")?;
        let bias = contiguous_f32(s2, l2, "bias_residual bias")?;
        let res = contiguous_f32(s3, l3, "bias_residual residual")?;
        let cols = bias.len();
        if l1.dims().last() != Some(&cols) || src.len() != res.len() {
            candle_core::bail!(
                "bias_residual: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut dst = vec![0f32; src.len()];
        let fast = has_avx2();
        let chunk = cols * rows_per_task(cols);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .zip(res.par_chunks(chunk))
            .for_each(|((d, s), r)| {
                for ((dr, sr), rr) in d.chunks_mut(cols).zip(s.chunks(cols)).zip(r.chunks(cols)) {
                    bias_residual_row(sr, bias, rr, dr, fast);
                }
            });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Switch the fused kernels off (candle's own ops are used instead), to measure what they buy.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether our kernels are switched on.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

fn usable(x: &Tensor) -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && !x.track_op()
}

/// Softmax over the last dimension (inference).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if usable(x) {
        x.contiguous()?.apply_op1_no_bwd(&Softmax)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// `act(x + bias)` with act = identity or QuickGELU; `None` when this path does not apply
/// (gradients tracked, not f32 on CPU), so the caller uses candle's composite.
pub fn bias_act(x: &Tensor, bias: &Tensor, quick_gelu: bool) -> Result<Option<Tensor>> {
    if usable(x) && !bias.track_op() && bias.dtype() == candle_core::DType::F32 {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(
            &bias.contiguous()?,
            &BiasAct { quick_gelu },
        )?))
    } else {
        Ok(None)
    }
}

/// `x + bias + residual`; `None` when this path does not apply.
pub fn bias_residual(x: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Option<Tensor>> {
    if usable(x) && usable(residual) && !bias.track_op() && bias.dtype() == candle_core::DType::F32
    {
        let r = residual.contiguous()?.reshape(x.shape())?;
        Ok(Some(
            x.contiguous()?
                .apply_op3_no_bwd(&bias.contiguous()?, &r, &BiasResidual)?
                .reshape(residual.shape())?,
        ))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp_f32(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn kernels_match_candle() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (37, 53), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 53, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let close = |a: &Tensor, c: &Tensor| {
            let d = (a - c)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "max abs diff {d}");
        };
        close(
            &softmax_last_dim(&x).unwrap(),
            &candle_nn::ops::softmax(&x, 1).unwrap(),
        );
        let xb = x.broadcast_add(&b).unwrap();
        let qg = (&xb * candle_nn::ops::sigmoid(&(&xb * 1.702).unwrap()).unwrap()).unwrap();
        close(&bias_act(&x, &b, true).unwrap().unwrap(), &qg);
        close(&bias_act(&x, &b, false).unwrap().unwrap(), &xb);
        close(
            &bias_residual(&x, &b, &r).unwrap().unwrap(),
            &(&xb + &r).unwrap(),
        );
    }
}
