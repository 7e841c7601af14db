//! The CLIP text transformer, mirroring `transformers.models.clip.CLIPTextTransformer` plus
//! `text_projection`, with two entries: token ids (EOT found from the ids) and prompt
//! embeddings with explicit EOT positions (CoOp's learned context replaces token embeddings).
//!
//! Sequences are cut to the longest real prompt (max EOT + 1). This is exact: the causal mask
//! keeps later tokens from influencing any position up to the EOT, where the feature is read.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::TextConfig;
use super::layers::{Block, LayerNorm, Linear};

#[derive(Debug, Clone)]
pub struct TextTransformer {
    cfg: TextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: LayerNorm,
    projection: Linear,
}

/// Additive causal mask `[L, L]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

impl TextTransformer {
    /// `vb` at the model root (HF names: `text_model.*`, `text_projection.weight`).
    pub fn load(vb: VarBuilder, cfg: &TextConfig, projection_dim: usize) -> Result<Self> {
        let w = cfg.hidden_size;
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = emb.get((cfg.vocab_size, w), "token_embedding.weight")?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, w),
            "position_embedding.weight",
        )?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                Block::load(
                    tm.pp(format!("encoder.layers.{i}")),
                    w,
                    cfg.num_attention_heads,
                    cfg.intermediate_size,
                    cfg.hidden_act,
                    cfg.layer_norm_eps,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(tm.pp("final_layer_norm"), w, cfg.layer_norm_eps)?;
        let projection = Linear::load(vb.pp("text_projection"), w, projection_dim, false)?;
        Ok(Self {
            cfg: cfg.clone(),
            token_embedding,
            position_embedding,
            blocks,
            final_layer_norm,
            projection,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embedding table `[V, W]` (CoOp initialises its context from it).
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Token embeddings of `ids` (`[C, L]`, u32) -> `[C, L, W]`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (c, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        self.token_embedding
            .index_select(&flat, 0)?
            .reshape((c, l, self.cfg.hidden_size))
    }

    /// EOT position of each row of `ids`: the first `eos_token_id`, or the arg-max id for
    /// configs with the legacy `eos_token_id == 2` (what transformers does).
    pub fn eot_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                let argmax = || {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
                        .map(|(i, _)| i)
                        .unwrap_or(0)
                };
                if self.cfg.eos_token_id == 2 {
                    argmax()
                } else {
                    row.iter()
                        .position(|&t| t as i64 == self.cfg.eos_token_id)
                        .unwrap_or_else(argmax)
                }
            })
            .collect()
    }

    /// Text features `[C, d]` (not normalised) from token ids.
    pub fn forward_ids(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        if ids.is_empty() {
            candle_core::bail!("no texts to encode");
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.iter().flatten().find(|&&t| t >= vocab) {
            candle_core::bail!(
                "token id {bad} is outside this model's vocabulary of {vocab} (does the model use OpenAI's CLIP BPE vocabulary?)"
            );
        }
        let eot = self.eot_positions(ids);
        let len = eot.iter().max().copied().unwrap_or(0) + 1;
        let emb = self.embed_tokens(&ids_tensor(ids, len, self.token_embedding.device())?)?;
        self.forward_embeds(&emb, &eot)
    }

    /// Text features `[C, d]` from prompt embeddings `[C, L, W]` (before position embeddings)
    /// with explicit EOT positions. Only the first `max(eot) + 1` positions are computed.
    pub fn forward_embeds(&self, prompts: &Tensor, eot: &[usize]) -> Result<Tensor> {
        let (c, l, w) = prompts.dims3()?;
        if eot.len() != c {
            candle_core::bail!("{} EOT positions for {c} prompts", eot.len());
        }
        let len = eot.iter().max().copied().unwrap_or(0) + 1;
        if len > l || len > self.cfg.max_position_embeddings {
            candle_core::bail!("EOT position {} beyond the {l}-token prompts", len - 1);
        }
        let x = prompts.narrow(1, 0, len)?;
        let pos = self.position_embedding.narrow(0, 0, len)?;
        let mut x = x.broadcast_add(&pos)?;
        let mask = causal_mask(len, prompts.device())?;
        for block in &self.blocks {
            x = block.forward(&x, Some(&mask), false)?.0;
        }
        let idx: Vec<u32> = eot
            .iter()
            .enumerate()
            .map(|(i, &e)| (i * len + e) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, c, prompts.device())?;
        let pooled = x.reshape((c * len, w))?.index_select(&idx, 0)?;
        let pooled = self.final_layer_norm.forward(&pooled)?;
        self.projection.forward(&pooled)
    }

    /// [`Self::forward_embeds`] for prompts whose first `shared` positions are identical in
    /// every row (CoOp: "[SOS] X X X X" before the class name). Under the causal mask those
    /// positions have the same hidden states in every prompt, so they are computed once and
    /// every class attends to the one copy: exact, and `shared / L` of the work saved (a
    /// third for four context tokens and short names). The gradient reaches the shared part
    /// through row 0 of `prompts`. Falls back to [`Self::forward_embeds`] off the CPU.
    pub fn forward_embeds_shared(
        &self,
        prompts: &Tensor,
        shared: usize,
        eot: &[usize],
    ) -> Result<Tensor> {
        let (c, l, w) = prompts.dims3()?;
        let len = eot.iter().max().copied().unwrap_or(0) + 1;
        if eot.len() != c
            || shared == 0
            || eot.iter().any(|&e| e < shared)
            || !super::train_ops::usable(prompts)
            || len > l
        {
            return self.forward_embeds(prompts, eot);
        }
        let s = len - shared;
        let pos = &self.position_embedding;
        let prefix = prompts
            .narrow(0, 0, 1)?
            .narrow(1, 0, shared)?
            .squeeze(0)?
            .add(&pos.narrow(0, 0, shared)?)?;
        let suffix = prompts
            .narrow(1, shared, s)?
            .broadcast_add(&pos.narrow(0, shared, s)?)?;
        let mut x = Tensor::cat(&[&prefix, &suffix.reshape((c * s, w))?], 0)?;
        let eot_rows: Vec<usize> = eot.iter().enumerate().map(|(i, &e)| shared + i * s + (e - shared)).collect();
        let n = self.blocks.len();
        for (k, block) in self.blocks.iter().enumerate() {
            let hd = w / block.heads();
            if k + 1 < n {
                x = block.forward_rows(&x, super::train_ops::AttnShape::shared_prefix(shared, c, s, block.heads(), hd))?;
            } else {
                // last block: only the EOT rows are read, so only they are queries and only
                // they go through the projection and MLP (keys and values from every row)
                let groups = (0..c)
                    .map(|i| {
                        let mut keys: Vec<usize> = (0..shared).collect();
                        keys.extend(shared + i * s..=eot_rows[i]);
                        super::train_ops::Group { keys, queries: 1 }
                    })
                    .collect();
                let shape = super::train_ops::AttnShape { heads: block.heads(), hd, causal: true, groups };
                let idx = Tensor::from_vec(eot_rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), c, prompts.device())?;
                x = block.forward_rows_out(&x, shape, Some(&idx))?;
            }
        }
        if n == 0 {
            let idx = Tensor::from_vec(eot_rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), c, prompts.device())?;
            x = x.index_select(&idx, 0)?;
        }
        let pooled = self.final_layer_norm.forward(&x)?;
        self.projection.forward(&pooled)
    }
}

/// Token ids as a `[C, L]` u32 tensor (rows padded with 0).
pub fn ids_tensor(ids: &[Vec<u32>], len: usize, device: &Device) -> Result<Tensor> {
    let rows: Vec<u32> = ids
        .iter()
        .flat_map(|r| (0..len).map(move |j| r.get(j).copied().unwrap_or(0)))
        .collect();
    Tensor::from_vec(rows, (ids.len(), len), device)?.to_dtype(DType::U32)
}
