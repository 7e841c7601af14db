//! TextRefiner (shared/spec/TEXTREFINER.md section 3-4): the local-token transform, the local
//! cache with its read and momentum write, the feature aggregation, and the three losses.
//!
//! Where the paper and the public reference code differ, the code is followed:
//! - the cache is not a parameter; it changes only by writes, with no gradient;
//! - a write sends each token to its top-1 entry and weights it by the entry's softmax over
//!   queries divided by that softmax's maximum over all tokens, so
//!   `w_t = exp(S[t,i] - max_u S[u,i])` (the normalisers cancel);
//! - the refined features are not re-normalised before the logits;
//! - the semantic loss uses the L2-normalised transformed tokens (CLS, the 5 patches with the
//!   highest CLS attention, and the mean of all N), without re-normalising the mean.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::clip::l2_normalize;

/// Defaults from the spec.
pub const ALPHA: f64 = 0.2;
pub const MOMENTUM: f64 = 0.8;
pub const BALANCE: f64 = 50.0;
pub const DISTILL: f64 = 20.0;
pub const CACHE_SIZE: usize = 25;
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// `mid_image_trans`: Linear(d, d) -> BatchNorm(d) -> ReLU -> Linear(d, d), with biases, on
/// every local token. BatchNorm uses batch statistics in training (over all tokens of the
/// batch) and running statistics (momentum 0.1, unbiased variance) in evaluation.
#[derive(Debug, Clone)]
pub struct LocalTransform {
    pub w1: Var,
    pub b1: Var,
    pub bn_w: Var,
    pub bn_b: Var,
    pub w2: Var,
    pub b2: Var,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl LocalTransform {
    /// PyTorch's default init for 1x1 convolutions (uniform in +-1/sqrt(fan_in)), BatchNorm at
    /// identity with running mean 0 and variance 1.
    pub fn new(d: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (d as f32).sqrt();
        let mk = |rng: &mut ChaCha8Rng, shape: &[usize]| -> Result<Var> {
            let n = shape.iter().product();
            Var::from_vec(uniform(rng, n, bound), shape, device)
        };
        Ok(Self {
            w1: mk(&mut rng, &[d, d])?,
            b1: mk(&mut rng, &[d])?,
            bn_w: Var::ones(d, DType::F32, device)?,
            bn_b: Var::zeros(d, DType::F32, device)?,
            w2: mk(&mut rng, &[d, d])?,
            b2: mk(&mut rng, &[d])?,
            running_mean: Tensor::zeros(d, DType::F32, device)?,
            running_var: Tensor::ones(d, DType::F32, device)?,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.bn_w.clone(),
            self.bn_b.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }

    /// Training forward on the fused ops of [`crate::clip::train_ops`], L2-normalised: the
    /// same as `l2_normalize(forward(x, true))` with gradients only for the parameters.
    pub fn forward_train_normalized(&mut self, x: &Tensor) -> Result<Tensor> {
        use crate::clip::train_ops;
        if !train_ops::usable(x) {
            return l2_normalize(&self.forward(x, true)?);
        }
        let n = x.dim(0)?;
        let h = train_ops::linear_weight_grad(x, self.w1.as_tensor(), self.b1.as_tensor())?;
        let stats: train_ops::BatchStats = Default::default();
        let z = train_ops::batch_norm_relu(
            &h,
            self.bn_w.as_tensor(),
            self.bn_b.as_tensor(),
            BN_EPS,
            &stats,
        )?;
        let (mean, var) = stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch statistics lock".into()))?
            .clone();
        let d = mean.len();
        let dev = x.device();
        let mean = Tensor::from_vec(mean, d, dev)?;
        let unbiased = (Tensor::from_vec(var, d, dev)? * (n as f64 / (n.max(2) - 1) as f64))?;
        self.running_mean = ((&self.running_mean * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?;
        self.running_var =
            ((&self.running_var * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
        let u = z
            .matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())?;
        train_ops::l2_normalize(&u)
    }

    /// `x`: `[n, d]` tokens. In training the running statistics are updated.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = x
            .matmul(&self.w1.as_tensor().t()?)?
            .broadcast_add(self.b1.as_tensor())?;
        let (mean, var) = if train {
            let n = h.dim(0)?;
            let mean = h.mean(0)?;
            let centred = h.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean(0)?;
            let unbiased = (var.detach() * (n as f64 / (n.max(2) - 1) as f64))?;
            self.running_mean =
                ((&self.running_mean * (1.0 - BN_MOMENTUM))? + (mean.detach() * BN_MOMENTUM)?)?;
            self.running_var =
                ((&self.running_var * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
            (mean, var)
        } else {
            (self.running_mean.clone(), self.running_var.clone())
        };
        let h = h
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        let h = h
            .broadcast_mul(self.bn_w.as_tensor())?
            .broadcast_add(self.bn_b.as_tensor())?
            .relu()?;
        h.matmul(&self.w2.as_tensor().t()?)?
            .broadcast_add(self.b2.as_tensor())
    }
}

/// The local cache: `M` L2-normalised rows of dimension `d`.
#[derive(Debug, Clone)]
pub struct LocalCache {
    pub memory: Tensor,
    pub momentum: f64,
}

impl LocalCache {
    /// Uniform [0, 1) rows, L2-normalised (the reference's init).
    pub fn new(m: usize, d: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..m * d).map(|_| rng.random_range(0.0..1.0f32)).collect();
        Ok(Self {
            memory: l2_normalize(&Tensor::from_vec(v, (m, d), device)?)?,
            momentum: MOMENTUM,
        })
    }

    pub fn from_memory(memory: Tensor) -> Self {
        Self {
            memory,
            momentum: MOMENTUM,
        }
    }

    pub fn size(&self) -> usize {
        self.memory.dim(0).unwrap_or(0)
    }

    /// `A_cache(q)`: each query's softmax over the entries, `[n, M]`.
    pub fn read_weights(&self, q: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax(&q.matmul(&self.memory.t()?)?, D::Minus1)
    }

    /// Read: `A_cache(t) @ cache`, `[C, d]`. The cache carries no gradient.
    pub fn read(&self, t: &Tensor) -> Result<Tensor> {
        self.read_weights(t)?.matmul(&self.memory)
    }

    /// Write the L2-normalised tokens `[n, d]` (no gradient), then re-normalise every row.
    pub fn write(&mut self, tokens: &Tensor) -> Result<()> {
        let tokens = tokens.detach();
        let s: Vec<Vec<f32>> = tokens.matmul(&self.memory.t()?)?.to_vec2()?;
        let tok: Vec<Vec<f32>> = tokens.to_vec2()?;
        let mut mem: Vec<Vec<f32>> = self.memory.to_vec2()?;
        let m = mem.len();
        let d = mem.first().map(|r| r.len()).unwrap_or(0);
        let assign: Vec<usize> = s
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|x| x.0)
                    .unwrap_or(0)
            })
            .collect();
        let col_max: Vec<f32> = (0..m)
            .map(|i| s.iter().map(|r| r[i]).fold(f32::NEG_INFINITY, f32::max))
            .collect();
        let mom = self.momentum as f32;
        for (i, row) in mem.iter_mut().enumerate() {
            let mut acc = vec![0f32; d];
            let mut any = false;
            for (t, &a) in assign.iter().enumerate() {
                if a != i {
                    continue;
                }
                any = true;
                // A_query[t, i] / max_u A_query[u, i]
                let w = (s[t][i] - col_max[i]).exp();
                for (k, v) in acc.iter_mut().enumerate() {
                    *v += w * tok[t][k];
                }
            }
            if any {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = mom * *v + (1.0 - mom) * acc[k];
                }
            }
        }
        let flat: Vec<f32> = mem.into_iter().flatten().collect();
        self.memory = l2_normalize(&Tensor::from_vec(flat, (m, d), self.memory.device())?)?;
        Ok(())
    }
}

/// Feature aggregation: `refined = alpha * extractor(concat(t, fine)) + t`, extractor a
/// bias-free Linear(2d, d).
pub fn aggregate(t: &Tensor, fine: &Tensor, extractor: &Tensor, alpha: f64) -> Result<Tensor> {
    let cat = Tensor::cat(&[t, fine], 1)?;
    (cat.matmul(&extractor.t()?)? * alpha)? + t
}

/// The trainable and stateful parts of TextRefiner.
#[derive(Debug, Clone)]
pub struct Refiner {
    pub transform: LocalTransform,
    pub cache: LocalCache,
    /// `[d, 2d]`.
    pub extractor: Var,
    pub alpha: f64,
}

impl Refiner {
    pub fn new(d: usize, cache_size: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xE7);
        let bound = 1.0 / ((2 * d) as f32).sqrt();
        let extractor = Var::from_vec(uniform(&mut rng, d * 2 * d, bound), (d, 2 * d), device)?;
        Ok(Self {
            transform: LocalTransform::new(d, seed ^ 0x17, device)?,
            cache: LocalCache::new(cache_size, d, seed ^ 0xCA, device)?,
            extractor,
            alpha: ALPHA,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.transform.vars();
        v.push(self.extractor.clone());
        v
    }

    /// `(fine, refined)` for normalised text features `t`.
    pub fn refine(&self, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let fine = self.cache.read(t)?;
        let refined = aggregate(t, &fine, self.extractor.as_tensor(), self.alpha)?;
        Ok((fine, refined))
    }
}

/// The losses of one batch.
#[derive(Debug, Clone)]
pub struct Losses {
    pub global: Tensor,
    pub local: Tensor,
    pub reg: Tensor,
    pub total: Tensor,
}

/// Indices (into the N tokens) of the CLS token's top-k patches per image: `[B][k]`, token
/// numbering (patch j is token j + 1).
pub fn top_patches(cls_attn: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let rows: Vec<Vec<f32>> = cls_attn.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut idx: Vec<usize> = (0..r.len()).collect();
            idx.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
            idx.into_iter().take(k).map(|j| j + 1).collect()
        })
        .collect())
}

/// The seven tokens of the semantic loss per image: CLS, the 5 top-attended patches, the mean
/// of all N tokens. `trans`: `[B, N, d]` normalised transformed tokens -> `[B * 7, d]`.
pub fn semantic_tokens(trans: &Tensor, cls_attn: &Tensor) -> Result<Tensor> {
    let (b, n, d) = trans.dims3()?;
    let top = top_patches(cls_attn, 5)?;
    if crate::clip::train_ops::usable(trans) {
        let picked = top.iter().map(|t| std::iter::once(0).chain(t.iter().copied()).collect()).collect();
        return crate::clip::train_ops::pick_and_mean(&trans.reshape((b * n, d))?, b, n, picked);
    }
    let mut idx = Vec::with_capacity(b * 6);
    for (i, t) in top.iter().enumerate() {
        idx.push((i * n) as u32);
        idx.extend(t.iter().map(|&j| (i * n + j) as u32));
    }
    let idx = Tensor::from_vec(idx, b * 6, trans.device())?;
    let picked = trans
        .reshape((b * n, d))?
        .index_select(&idx, 0)?
        .reshape((b, 6, d))?;
    let mean = trans.mean_keepdim(1)?;
    Tensor::cat(&[&picked, &mean], 1)?.reshape((b * 7, d))
}

/// CoOp + TextRefiner objective. `img`, `t`: normalised; `refined` as from [`aggregate`];
/// `trans`: normalised transformed local tokens `[B, N, d]`; `labels`: `[B]` u32.
pub fn losses(
    img: &Tensor,
    t: &Tensor,
    refined: &Tensor,
    trans: &Tensor,
    cls_attn: &Tensor,
    labels: &Tensor,
    logit_scale: f64,
) -> Result<Losses> {
    let global =
        candle_nn::loss::cross_entropy(&(img.matmul(&refined.t()?)? * logit_scale)?, labels)?;
    let tokens7 = semantic_tokens(trans, cls_attn)?;
    let b = labels.dim(0)?;
    let labels7 = labels
        .unsqueeze(1)?
        .broadcast_as((b, 7))?
        .contiguous()?
        .flatten_all()?;
    let local =
        candle_nn::loss::cross_entropy(&(tokens7.matmul(&t.t()?)? * logit_scale)?, &labels7)?;
    let reg = (l2_normalize(refined)? - t)?.abs()?.mean_all()?;
    let total = ((&global + (&local / BALANCE)?)? + (&reg * DISTILL)?)?;
    Ok(Losses {
        global,
        local,
        reg,
        total,
    })
}
