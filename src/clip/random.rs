//! Randomly initialised CLIP models of any config: for benchmarks at real sizes without real
//! weights, and as the starting point of the embedded model's pretraining. Deterministic for a
//! seed (each tensor's values depend only on the seed and its name).
//!
//! Init follows the spirit of OpenAI CLIP's `initialize_parameters`: normal(0, 0.02) token
//! embeddings, normal(0, 0.01) position embeddings, layer norms at identity, zero biases,
//! width^-0.5-scaled projections, logit scale ln(1 / 0.07).

use std::hash::{Hash, Hasher};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A VarBuilder backend that makes a fresh tensor for every name it is asked for.
pub struct RandomInit {
    pub seed: u64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    seed ^ h.finish()
}

impl RandomInit {
    fn std_for(name: &str, shape: &Shape) -> Option<f64> {
        let dims = shape.dims();
        let is_norm =
            name.contains("layer_norm") || name.contains("layrnorm") || name.contains("layernorm");
        if is_norm || name.ends_with(".bias") || name == "logit_scale" {
            return None;
        }
        if name.ends_with("token_embedding.weight") || name.ends_with("class_embedding") {
            return Some(0.02);
        }
        if name.ends_with("position_embedding.weight") {
            return Some(0.01);
        }
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        Some((fan_in as f64).powf(-0.5))
    }
}

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let t = if name == "logit_scale" {
            Tensor::new((1.0f32 / 0.07).ln(), dev)?.reshape(s)?
        } else {
            match Self::std_for(name, &s) {
                None if name.ends_with("weight") && !name.ends_with("class_embedding") => {
                    Tensor::ones(s, DType::F32, dev)?
                }
                None => Tensor::zeros(s, DType::F32, dev)?,
                Some(std) => {
                    let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.seed, name));
                    let normal =
                        Normal::new(0.0f32, std as f32).map_err(candle_core::Error::wrap)?;
                    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                    Tensor::from_vec(v, s, dev)?
                }
            }
        };
        t.to_dtype(dtype)
    }
    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init needs a shape for {name}")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A CLIP with random weights for `config`.
pub fn random_clip(
    config: &super::ClipConfig,
    seed: u64,
    device: &Device,
) -> crate::Result<super::Clip> {
    let vb = candle_nn::VarBuilder::from_backend(
        Box::new(RandomInit { seed }),
        DType::F32,
        device.clone(),
    );
    let (vision, text, logit_scale) = super::Clip::from_varbuilder(vb, config)?;
    Ok(super::Clip {
        config: config.clone(),
        vision,
        text,
        logit_scale,
        source: format!("random(seed={seed})"),
        naming: super::Naming::HuggingFace,
        identity: super::Identity::Named(format!("random(seed={seed})")),
    })
}

/// Configs of the real OpenAI ViT models by short name (`b32`, `b16`, `l14`).
pub fn preset(name: &str) -> Option<super::ClipConfig> {
    let mut c = super::ClipConfig::default();
    match name
        .to_ascii_lowercase()
        .replace(['-', '/', '_'], "")
        .as_str()
    {
        "b32" | "vitb32" => c.vision_config.patch_size = 32,
        "b16" | "vitb16" => c.vision_config.patch_size = 16,
        "l14" | "vitl14" => {
            c.vision_config.patch_size = 14;
            c.vision_config.hidden_size = 1024;
            c.vision_config.num_hidden_layers = 24;
            c.vision_config.num_attention_heads = 16;
            c.vision_config.intermediate_size = 4096;
            c.text_config.hidden_size = 768;
            c.text_config.num_attention_heads = 12;
            c.text_config.intermediate_size = 3072;
            c.projection_dim = 768;
        }
        _ => return None,
    }
    Some(c)
}
