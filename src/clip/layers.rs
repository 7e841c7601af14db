//! Building blocks shared by the vision and text towers: linear layers on 2-D input, layer
//! norm, the pre-norm transformer block of CLIP (`transformers.models.clip.CLIPEncoderLayer`),
//! with Q, K and V fused into one matrix product and the attention scale folded into Q.
//!
//! Ops pick candle's fused CPU kernels (layer norm, softmax) when no gradient is tracked, and
//! differentiable composites when one is (training a prompt through the frozen text tower).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;

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
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
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
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension: fused kernel for inference, composite when differentiating.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
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
        let q = Linear::load(vb.pp("q_proj"), dim, dim, true)?;
        let k = Linear::load(vb.pp("k_proj"), dim, dim, true)?;
        let v = Linear::load(vb.pp("v_proj"), dim, dim, true)?;
        let scale = ((dim / heads) as f64).powf(-0.5);
        let qw = (q.weight * scale)?;
        let qb = (q.bias.expect("bias") * scale)?;
        let w = Tensor::cat(&[&qw, &k.weight, &v.weight], 0)?;
        let b = Tensor::cat(&[&qb, k.bias.as_ref().expect("bias"), v.bias.as_ref().expect("bias")], 0)?;
        let out_proj = Linear::load(vb.pp("out_proj"), dim, dim, true)?;
        Ok(Self { qkv: Linear::new(w, Some(b)), out_proj, heads })
    }

    /// `x`: `[B, L, D]`; `mask`: additive `[L, L]`. Returns the output and, when asked, the
    /// attention probabilities `[B, H, L, L]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, want_probs: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((b, l, 3, self.heads, hd))?;
        let qkv = qkv.permute((2, 0, 3, 1, 4))?; // [3, B, H, L, hd]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = q.matmul(&k.t()?)?; // [B, H, L, L]
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?;
        let o = probs.matmul(&v)?; // [B, H, L, hd]
        let o = o.transpose(1, 2)?.reshape((b, l, d))?;
        let o = self.out_proj.forward(&o)?;
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

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&activation(&self.fc1.forward(x)?, self.act)?)
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
    pub fn load(vb: VarBuilder, dim: usize, heads: usize, inter: usize, act: Activation, eps: f64) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::load(vb.pp("layer_norm1"), dim, eps)?,
            attn: Attention::load(vb.pp("self_attn"), dim, heads)?,
            ln2: LayerNorm::load(vb.pp("layer_norm2"), dim, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), dim, inter, act)?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, want_probs: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (a, probs) = self.attn.forward(&self.ln1.forward(x)?, mask, want_probs)?;
        let x = (x + a)?;
        let m = self.mlp.forward(&self.ln2.forward(&x)?)?;
        Ok(((x + m)?, probs))
    }
}
