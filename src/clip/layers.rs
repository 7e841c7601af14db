//! Building blocks shared by the vision and text towers: linear layers on 2-D input, layer
//! norm, the pre-norm transformer block of CLIP (`transformers.models.clip.CLIPEncoderLayer`),
//! with Q, K and V fused into one matrix product and the attention scale folded into Q.
//!
//! Ops pick candle's fused CPU kernels (layer norm, softmax) when no gradient is tracked, and
//! differentiable composites when one is (training a prompt through the frozen text tower).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::kernels;
use super::profile::time;
use super::train_ops;

/// `y = x W^T + b` for `x` of any rank, computed on the flattened 2-D view (one GEMM, and no
/// per-example weight gradients when differentiating).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Linear {
    /// `x W^T` on the flattened 2-D view: `[rows, out]`.
    fn gemm(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        time("gemm (linear layers)", || {
            x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)
        })
    }

    fn out_dims(&self, x: &Tensor) -> Result<Vec<usize>> {
        let mut dims = x.dims().to_vec();
        match dims.last_mut() {
            Some(last) => *last = self.weight.dim(0)?,
            None => candle_core::bail!("linear layer applied to a scalar"),
        }
        Ok(dims)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            None => Ok(y),
            Some(b) => match time("bias / activation", || kernels::bias_act(&y, b, false))? {
                Some(out) => Ok(out),
                None => y.broadcast_add(b),
            },
        }
    }

    /// `act(x W^T + b)`, fused on the inference path.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let y = self.gemm(x)?;
        let fused = match (&self.bias, act) {
            (Some(b), Activation::QuickGelu) => {
                time("bias / activation", || kernels::bias_act(&y, b, true))?
            }
            _ => None,
        };
        let y = match fused {
            Some(y) => y,
            None => activation(&self.add_bias(y)?, act)?,
        };
        y.reshape(self.out_dims(x)?)
    }

    /// `residual + x W^T + b`, fused on the inference path.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let y = self.gemm(x)?;
        if let Some(b) = &self.bias {
            if let Some(out) = time("bias + residual", || {
                kernels::bias_residual(&y, b, residual)
            })? {
                return Ok(out);
            }
        }
        self.add_bias(y)?.reshape(self.out_dims(x)?)? + residual
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() && train_ops::usable(x) {
            let in_dim = x.dim(D::Minus1)?;
            let rows = x.elem_count() / in_dim.max(1);
            let y = train_ops::linear(
                &x.reshape((rows, in_dim))?,
                &self.weight,
                self.bias.as_ref(),
                false,
            )?;
            return y.reshape(self.out_dims(x)?);
        }
        let y = self.add_bias(self.gemm(x)?)?;
        y.reshape(self.out_dims(x)?)
    }
}

/// Layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() && train_ops::usable(x) {
            train_ops::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else if x.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            time("layer norm", || {
                candle_nn::ops::layer_norm(
                    &x.contiguous()?,
                    &self.weight,
                    &self.bias,
                    self.eps as f32,
                )
            })
        }
    }
}

/// Softmax over the last dimension: fused kernel for inference, composite when differentiating.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        kernels::softmax_last_dim(x)
    }
}

pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        // OpenAI CLIP's QuickGELU: x * sigmoid(1.702 x)
        Activation::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
        Activation::Gelu => x.gelu_erf(),
    }
}

/// Self-attention with fused QKV. Mirrors `CLIPAttention` (q/k/v/out projections with bias,
/// scale head_dim^-0.5).
#[derive(Debug, Clone)]
pub struct Attention {
    /// `[3D, D]`: rows of Q (pre-multiplied by the scale), then K, then V.
    qkv: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    pub fn load(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let get = |name: &str| -> Result<(Tensor, Tensor)> {
            let p = vb.pp(name);
            Ok((p.get((dim, dim), "weight")?, p.get(dim, "bias")?))
        };
        let (qw, qb) = get("q_proj")?;
        let (kw, kb) = get("k_proj")?;
        let (vw, vbias) = get("v_proj")?;
        let scale = ((dim / heads) as f64).powf(-0.5);
        let w = Tensor::cat(&[&(qw * scale)?, &kw, &vw], 0)?;
        let b = Tensor::cat(&[&(qb * scale)?, &kb, &vbias], 0)?;
        let out_proj = Linear::load(vb.pp("out_proj"), dim, dim, true)?;
        Ok(Self {
            qkv: Linear::new(w, Some(b)),
            out_proj,
            heads,
        })
    }

    /// `x`: `[B, L, D]` (normalised input); `mask`: additive `[L, L]`. Returns
    /// `residual + attention(x)` and, when asked, the attention probabilities `[B, H, L, L]`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        want_probs: bool,
        residual: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((b, l, 3, self.heads, hd))?;
        let qkv = qkv.permute((2, 0, 3, 1, 4))?; // [3, B, H, L, hd]
        let (q, k, v) = time("copies (head split/merge)", || -> Result<_> {
            Ok((
                qkv.get(0)?.contiguous()?,
                qkv.get(1)?.contiguous()?,
                qkv.get(2)?.contiguous()?,
            ))
        })?;
        let scores = time("attention products", || q.matmul(&k.t()?))?; // [B, H, L, L]
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = time("softmax", || softmax_last_dim(&scores))?;
        let o = time("attention products", || probs.matmul(&v))?; // [B, H, L, hd]
        let o = time("copies (head split/merge)", || {
            o.transpose(1, 2)?.reshape((b, l, d))
        })?;
        let o = self.out_proj.forward_residual(&o, residual)?;
        Ok((o, if want_probs { Some(probs) } else { None }))
    }
}

/// Two-layer MLP (`CLIPMLP`: fc1 -> activation -> fc2).
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn load(vb: VarBuilder, dim: usize, inter: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(vb.pp("fc1"), dim, inter, true)?,
            fc2: Linear::load(vb.pp("fc2"), inter, dim, true)?,
            act,
        })
    }
}

impl Mlp {
    /// `residual + fc2(act(fc1(x)))`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward_residual(&self.fc1.forward_act(x, self.act)?, residual)
    }
}

impl Block {
    /// The block on [`train_ops`]: input-only gradients through frozen weights.
    fn forward_train(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.attn.heads;
        let shape = train_ops::AttnShape::batch(b, l, self.attn.heads, hd, causal);
        self.forward_rows(&x.reshape((b * l, d))?, shape)?
            .reshape((b, l, d))
    }

    /// The block on rows `[rows, D]` whose attention groups are `shape` ([`train_ops`] ops,
    /// differentiable in `x2` when it tracks a gradient).
    pub fn forward_rows(&self, x2: &Tensor, shape: train_ops::AttnShape) -> Result<Tensor> {
        self.forward_rows_out(x2, shape, None)
    }

    /// [`Self::forward_rows`], computing the block's output only at rows `out` (`[k]` u32
    /// indices, each the query of its attention group) and returning `[k, D]`: keys and values
    /// still come from every row, but the attention output, projection and MLP run on the
    /// `k` rows only (the last text block, where only the EOT rows are read).
    pub fn forward_rows_out(&self, x2: &Tensor, shape: train_ops::AttnShape, out: Option<&Tensor>) -> Result<Tensor> {
        let h = train_ops::layer_norm(x2, &self.ln1.weight, &self.ln1.bias, self.ln1.eps)?;
        let qkv = train_ops::linear(
            &h,
            &self.attn.qkv.weight,
            self.attn.qkv.bias.as_ref(),
            false,
        )?;
        let a = train_ops::attention_groups(&qkv, shape)?;
        let (a, x2) = match out {
            Some(idx) => (a.index_select(idx, 0)?, x2.index_select(idx, 0)?),
            None => (a, x2.clone()),
        };
        let o = &self.attn.out_proj;
        let x2 = (x2 + train_ops::linear(&a, &o.weight, o.bias.as_ref(), false)?)?;
        let h = train_ops::layer_norm(&x2, &self.ln2.weight, &self.ln2.bias, self.ln2.eps)?;
        let (fc1, fc2) = (&self.mlp.fc1, &self.mlp.fc2);
        let m = match self.mlp.act {
            Activation::QuickGelu => train_ops::linear(&h, &fc1.weight, fc1.bias.as_ref(), true)?,
            act => activation(
                &train_ops::linear(&h, &fc1.weight, fc1.bias.as_ref(), false)?,
                act,
            )?,
        };
        x2 + train_ops::linear(&m, &fc2.weight, fc2.bias.as_ref(), false)?
    }

    pub fn heads(&self) -> usize {
        self.attn.heads
    }
}

/// Pre-norm residual block (`CLIPEncoderLayer`).
#[derive(Debug, Clone)]
pub struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn load(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        inter: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::load(vb.pp("layer_norm1"), dim, eps)?,
            attn: Attention::load(vb.pp("self_attn"), dim, heads)?,
            ln2: LayerNorm::load(vb.pp("layer_norm2"), dim, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), dim, inter, act)?,
        })
    }

    /// `mask`: the additive causal mask of the text tower, or none. When a gradient is tracked
    /// through `x` (training a prompt), the block runs on our differentiable ops
    /// ([`train_ops`]), which treat any mask as the causal one.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if x.track_op() && !want_probs && train_ops::usable(x) {
            return Ok((self.forward_train(x, mask.is_some())?, None));
        }
        let (x, probs) = self
            .attn
            .forward(&self.ln1.forward(x)?, mask, want_probs, x)?;
        let x = self.mlp.forward_residual(&self.ln2.forward(&x)?, &x)?;
        Ok((x, probs))
    }
}
