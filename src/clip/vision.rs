//! The CLIP vision transformer (ViT), mirroring `transformers.models.clip.CLIPVisionTransformer`
//! plus `visual_projection`, extended to return in one pass what TextRefiner and the heatmaps
//! need: every token of the last block through `post_layernorm` and the projection, and the
//! last block's head-averaged attention of the CLS token over the patches.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::layers::{Block, LayerNorm, Linear};

/// Everything one vision pass yields.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `[B, d]`: CLS -> post_layernorm -> projection (not normalised).
    pub image_embeds: Tensor,
    /// `[B, N, d]`: every token of the last block (CLS first, then the patches in row-major
    /// grid order) through post_layernorm and the projection (not normalised).
    pub tokens: Tensor,
    /// `[B, P]`: last block's attention of the CLS query over the patch keys, heads averaged.
    pub cls_attn: Tensor,
    /// Hidden states requested with [`VisionOptions::hidden_layers`]: index 0 is the input to
    /// the first block (after `pre_layrnorm`), index i the output of block i.
    pub hidden_states: Vec<(usize, Tensor)>,
}

/// Optional outputs of the vision pass.
#[derive(Debug, Clone, Default)]
pub struct VisionOptions {
    pub hidden_layers: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: VisionConfig,
    /// Patch embedding as a matrix `[D, C*p*p]` (the conv kernel, flattened).
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    blocks: Vec<Block>,
    post_layernorm: LayerNorm,
    projection: Linear,
}

impl VisionTransformer {
    /// `vb` at the model root (HF names: `vision_model.*`, `visual_projection.weight`).
    pub fn load(vb: VarBuilder, cfg: &VisionConfig, projection_dim: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let c = cfg.num_channels;
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let conv = emb.get((d, c, p, p), "patch_embedding.weight")?;
        let patch_weight = conv.reshape((d, c * p * p))?;
        let class_embedding = emb.get(d, "class_embedding")?;
        let position_embedding =
            emb.get((cfg.num_patches() + 1, d), "position_embedding.weight")?;
        let pre_layrnorm = LayerNorm::load(vm.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                Block::load(
                    vm.pp(format!("encoder.layers.{i}")),
                    d,
                    cfg.num_attention_heads,
                    cfg.intermediate_size,
                    cfg.hidden_act,
                    cfg.layer_norm_eps,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::load(vm.pp("post_layernorm"), d, cfg.layer_norm_eps)?;
        let projection = Linear::load(vb.pp("visual_projection"), d, projection_dim, false)?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            blocks,
            post_layernorm,
            projection,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Patch embedding as unfold + one GEMM (exactly the stride-p convolution, no bias).
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if h != self.cfg.image_size || w != self.cfg.image_size || c != self.cfg.num_channels {
            candle_core::bail!(
                "pixel tensor is {b}x{c}x{h}x{w}, the model expects Bx{}x{}x{}",
                self.cfg.num_channels,
                self.cfg.image_size,
                self.cfg.image_size
            );
        }
        let g = self.cfg.grid();
        let d = self.cfg.hidden_size;
        let pixels = pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)?;
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // [B, gy, gx, C, py, px]
            .reshape((b * g * g, c * p * p))?;
        let x = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, g * g, d))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.position_embedding)
    }

    /// One pass: image embeddings, all last-block tokens and CLS attention.
    /// `pixels`: `[B, C, H, W]` normalised with CLIP's mean/std.
    pub fn forward(&self, pixels: &Tensor, opts: &VisionOptions) -> Result<VisionOutput> {
        let mut x = self.pre_layrnorm.forward(&self.embed(pixels)?)?;
        let mut hidden_states = Vec::new();
        if opts.hidden_layers.contains(&0) {
            hidden_states.push((0, x.clone()));
        }
        let last = self.blocks.len().saturating_sub(1);
        let mut probs = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, p) = block.forward(&x, None, i == last)?;
            x = y;
            if i == last {
                probs = p;
            }
            if opts.hidden_layers.contains(&(i + 1)) {
                hidden_states.push((i + 1, x.clone()));
            }
        }
        let tokens = self.projection.forward(&self.post_layernorm.forward(&x)?)?;
        let image_embeds = tokens.narrow(1, 0, 1)?.squeeze(1)?;
        let n = tokens.dim(1)?;
        let cls_attn = match probs {
            // [B, H, N, N] -> mean over heads -> CLS row -> patch columns
            Some(p) => p
                .narrow(2, 0, 1)?
                .narrow(3, 1, n - 1)?
                .mean(1)?
                .squeeze(1)?,
            None => Tensor::zeros((tokens.dim(0)?, n - 1), tokens.dtype(), tokens.device())?,
        };
        Ok(VisionOutput {
            image_embeds,
            tokens,
            cls_attn,
            hidden_states,
        })
    }

    /// Image embeddings only (same pass; convenience).
    pub fn embed_images(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self
            .forward(pixels, &VisionOptions::default())?
            .image_embeds)
    }
}

/// L2-normalise along the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&n)
}
