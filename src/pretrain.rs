//! Contrastive pretraining of the embedded tiny CLIP on the demo world: symmetric InfoNCE over
//! image-caption pairs, learnable logit scale (clamped at 100 as CLIP does), AdamW (no decay on
//! gains, biases, embeddings and the logit scale), linear warm-up then cosine decay. Images are
//! drawn fresh for every batch; captions always name the global look (colour and shape) and
//! name the local detail only sometimes, as web captions rarely describe small details.
//!
//! The result is saved as an ordinary Hugging Face model folder (config.json +
//! model.safetensors in f16) and loads through the same loader as real CLIP weights.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::clip::preprocess::normalize_chw;
use crate::clip::random::RandomInit;
use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip, ClipConfig, Naming, VisionOptions};
use crate::data::world::{Split, World};
use crate::error::{Error, Result};

/// The embedded model's architecture: ViT on 64 px images with 8 px patches (an 8 x 8 grid),
/// OpenAI's 49408-token BPE vocabulary, a 32-token context.
pub fn tiny_config() -> ClipConfig {
    let mut c = ClipConfig::default();
    let v = &mut c.vision_config;
    v.image_size = 64;
    v.patch_size = 8;
    v.hidden_size = 128;
    v.num_hidden_layers = 4;
    v.num_attention_heads = 4;
    v.intermediate_size = 512;
    let t = &mut c.text_config;
    t.hidden_size = 64;
    t.num_hidden_layers = 4;
    t.num_attention_heads = 4;
    t.intermediate_size = 256;
    t.max_position_embeddings = 32;
    c.projection_dim = 64;
    c
}

/// Pretraining settings.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub seed: u64,
    pub world_seed: u64,
    /// Probability that a caption names the local detail.
    pub detail_prob: f64,
    /// Stop after this many seconds even if steps remain (the schedule is set by `steps`).
    pub max_secs: Option<f64>,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 700,
            batch: 128,
            lr: 1e-3,
            weight_decay: 0.1,
            warmup: 100,
            seed: 0,
            world_seed: 1,
            detail_prob: 0.05,
            max_secs: None,
        }
    }
}

/// Progress of a pretraining run.
#[derive(Debug, Clone)]
pub struct PretrainProgress {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub logit_scale: f32,
    pub lr: f64,
    pub secs: f64,
    /// Zero-shot accuracy over all 24 classes on a small validation set (every so often).
    pub val_accuracy: Option<f32>,
}

fn no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.contains("layer_norm")
        || name.contains("layrnorm")
        || name.contains("layernorm")
        || name.contains("embedding")
        || name == "logit_scale"
}

/// Fresh trainable parameters for `cfg` (initialised by [`RandomInit`]).
fn init_vars(
    cfg: &ClipConfig,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, HashMap<String, Var>)> {
    // Record every tensor the model asks for, then turn each into a Var.
    struct Recorder {
        inner: RandomInit,
        seen: std::sync::Mutex<HashMap<String, Tensor>>,
    }
    impl candle_nn::var_builder::SimpleBackend for Recorder {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let t = self.inner.get(s, name, h, dtype, dev)?;
            if let Ok(mut m) = self.seen.lock() {
                m.insert(name.to_string(), t.clone());
            }
            Ok(t)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.inner.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, _name: &str) -> bool {
            true
        }
    }
    let rec = std::sync::Arc::new(Recorder {
        inner: RandomInit { seed },
        seen: Default::default(),
    });
    struct Shared(std::sync::Arc<Recorder>);
    impl candle_nn::var_builder::SimpleBackend for Shared {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, device.clone());
    Clip::from_varbuilder(vb.clone(), cfg)?;
    // the logit scale is asked for with get((), ..) and falls back when absent: ensure it
    vb.get((), "logit_scale")?;
    let seen = rec.seen.lock().map(|m| m.clone()).unwrap_or_default();
    let varmap = VarMap::new();
    let mut vars = HashMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Invalid("var map lock".into()))?;
        for (k, t) in seen {
            let v = Var::from_tensor(&t)?;
            data.insert(k.clone(), v.clone());
            vars.insert(k, v);
        }
    }
    Ok((varmap, vars))
}

/// Build the model from the current values of the vars (rebuilt each step: the model fuses
/// Q/K/V at build time, so it must see the updated weights).
fn build(varmap: &VarMap, cfg: &ClipConfig, device: &Device) -> Result<Clip> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
    let (vision, text, logit_scale) = Clip::from_varbuilder(vb, cfg)?;
    Ok(Clip {
        config: cfg.clone(),
        vision,
        text,
        logit_scale,
        source: "pretraining".into(),
        naming: Naming::HuggingFace,
        identity: crate::clip::Identity::Named("pretraining".into()),
    })
}

/// A batch of freshly drawn images (normalised, `[B, 3, S, S]`) and tokenized captions.
fn batch(
    world: &World,
    rng: &mut ChaCha8Rng,
    b: usize,
    detail_prob: f64,
    tok: &ClipTokenizer,
    ctx: usize,
    device: &Device,
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let picks: Vec<(usize, u64, u64)> = (0..b)
        .map(|_| {
            (
                rng.random_range(0..world.num_classes()),
                rng.random(),
                rng.random(),
            )
        })
        .collect();
    let pixels: Vec<Vec<f32>> = picks
        .par_iter()
        .map(|&(c, idx, _)| normalize_chw(&world.image(Split::Pretrain, c, idx)))
        .collect();
    let ids = picks
        .iter()
        .map(|&(c, _, cap_seed)| {
            let mut r = ChaCha8Rng::seed_from_u64(cap_seed);
            tok.tokenize(&world.caption(c, &mut r, detail_prob), ctx)
        })
        .collect();
    let s = world.size as usize;
    let flat: Vec<f32> = pixels.into_iter().flatten().collect();
    Ok((Tensor::from_vec(flat, (b, 3, s, s), device)?, ids))
}

/// Zero-shot accuracy of `model` on `images` with labels among `classes` (prompt "a photo of a
/// {class}.").
pub fn zero_shot_accuracy(
    model: &Clip,
    world: &World,
    split: Split,
    classes: &[usize],
    per_class: u64,
) -> Result<f32> {
    let names: Vec<String> = classes
        .iter()
        .map(|&c| world.class_names()[c].clone())
        .collect();
    let txt = crate::train::zero_shot_features(model, &names)?;
    let mut correct = 0usize;
    let mut total = 0usize;
    for (label, &c) in classes.iter().enumerate() {
        let pix: Vec<f32> = (0..per_class)
            .into_par_iter()
            .map(|i| normalize_chw(&world.image(split, c, i)))
            .flatten()
            .collect();
        let s = world.size as usize;
        let x = Tensor::from_vec(pix, (per_class as usize, 3, s, s), model.device())?;
        let img = l2_normalize(
            &model
                .vision
                .forward(&x, &VisionOptions::default())?
                .image_embeds,
        )?;
        let pred = img.matmul(&txt.t()?)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += pred.iter().filter(|&&p| p as usize == label).count();
        total += pred.len();
    }
    Ok(correct as f32 / total.max(1) as f32)
}

/// Run pretraining; `on_progress` sees every step. Returns the trained model's tensors
/// (Hugging Face names, f32).
pub fn pretrain(
    cfg: &PretrainConfig,
    device: &Device,
    mut on_progress: impl FnMut(&PretrainProgress),
) -> Result<HashMap<String, Tensor>> {
    let mcfg = tiny_config();
    let world = World::new(cfg.world_seed, mcfg.vision_config.image_size as u32);
    let tok = ClipTokenizer::new();
    let ctx = mcfg.text_config.max_position_embeddings;
    let (varmap, vars) = init_vars(&mcfg, cfg.seed, device)?;
    let (decay, plain): (Vec<(String, Var)>, Vec<(String, Var)>) =
        vars.clone().into_iter().partition(|(k, _)| !no_decay(k));
    let p = |wd: f64| ParamsAdamW {
        lr: cfg.lr,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: wd,
    };
    let mut opt_decay = AdamW::new(
        decay.into_iter().map(|x| x.1).collect(),
        p(cfg.weight_decay),
    )?;
    let mut opt_plain = AdamW::new(plain.into_iter().map(|x| x.1).collect(), p(0.0))?;
    let logit_scale = vars
        .get("logit_scale")
        .cloned()
        .ok_or_else(|| Error::Invalid("no logit_scale".into()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
    let t0 = Instant::now();
    let all: Vec<usize> = (0..world.num_classes()).collect();
    for step in 0..cfg.steps {
        let lr = if step < cfg.warmup {
            cfg.lr * (step + 1) as f64 / cfg.warmup as f64
        } else {
            let t = (step - cfg.warmup) as f64 / (cfg.steps - cfg.warmup).max(1) as f64;
            0.5 * cfg.lr * (1.0 + (std::f64::consts::PI * t).cos())
        };
        opt_decay.set_learning_rate(lr);
        opt_plain.set_learning_rate(lr);
        let model = build(&varmap, &mcfg, device)?;
        let (x, ids) = batch(
            &world,
            &mut rng,
            cfg.batch,
            cfg.detail_prob,
            &tok,
            ctx,
            device,
        )?;
        let img = l2_normalize(
            &model
                .vision
                .forward(&x, &VisionOptions::default())?
                .image_embeds,
        )?;
        let txt = l2_normalize(&model.text.forward_ids(&ids)?)?;
        let logits = img
            .matmul(&txt.t()?)?
            .broadcast_mul(&logit_scale.as_tensor().exp()?)?;
        let labels = Tensor::arange(0u32, cfg.batch as u32, device)?;
        let loss = ((candle_nn::loss::cross_entropy(&logits, &labels)?
            + candle_nn::loss::cross_entropy(&logits.t()?, &labels)?)?
            * 0.5)?;
        let loss_v = loss.to_scalar::<f32>()?;
        if !loss_v.is_finite() {
            return Err(Error::Invalid(format!(
                "pretraining diverged at step {step}: loss is {loss_v}"
            )));
        }
        let grads = loss.backward()?;
        opt_decay.step(&grads)?;
        opt_plain.step(&grads)?;
        // CLIP clamps the logit scale at 100
        let ls = logit_scale.as_tensor().clamp(0.0f32, 100f32.ln())?;
        logit_scale.set(&ls)?;
        let val_accuracy = if (step + 1) % 100 == 0 || step + 1 == cfg.steps {
            let m = build(&varmap, &mcfg, device)?;
            Some(zero_shot_accuracy(&m, &world, Split::Val, &all, 6)?)
        } else {
            None
        };
        let secs = t0.elapsed().as_secs_f64();
        on_progress(&PretrainProgress {
            step: step + 1,
            steps: cfg.steps,
            loss: loss_v,
            logit_scale: ls.to_scalar::<f32>()?.exp(),
            lr,
            secs,
            val_accuracy,
        });
        if cfg.max_secs.map(|m| secs > m).unwrap_or(false) {
            break;
        }
    }
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Invalid("var map lock".into()))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}

/// Write a model folder atomically: `config.json` (Hugging Face CLIPModel) and
/// `model.safetensors` (f16), each written to a temporary file and renamed.
pub fn save_model_folder(
    dir: &Path,
    cfg: &ClipConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut json = serde_json::to_value(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    json["model_type"] = serde_json::json!("clip");
    json["architectures"] = serde_json::json!(["CLIPModel"]);
    json["text_config"]["model_type"] = serde_json::json!("clip_text_model");
    json["vision_config"]["model_type"] = serde_json::json!("clip_vision_model");
    let cfg_path = dir.join("config.json");
    crate::util::write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(&json)
            .map_err(|e| Error::Invalid(e.to_string()))?
            .as_bytes(),
    )?;
    let half: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F16)?)))
        .collect::<candle_core::Result<_>>()?;
    crate::util::save_safetensors_atomic(&dir.join("model.safetensors"), &half)
}
