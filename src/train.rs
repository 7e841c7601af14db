//! Training and evaluating CoOp and CoOp + TextRefiner on precomputed image features.
//!
//! CLIP is frozen, so every image-side output (normalised image embedding, last-block tokens,
//! CLS attention) is computed once per image and per augmented view (the feature bank) and
//! training touches only the text side and TextRefiner's modules. Using `views` precomputed
//! augmented views per training image approximates the reference, which draws a fresh
//! augmentation every epoch; `views = 0` trains on the un-augmented test-style view.
//!
//! The loop is a plain function with a cancel flag and an event callback, so the CLI and the
//! GUI run the same code. Optimiser and schedule follow the reference recipe (Dassl
//! defaults): SGD, momentum 0.9, weight decay 5e-4, one warm-up epoch at constant lr 1e-5,
//! then cosine annealing over the epochs (stepped per epoch, as Dassl's scheduler).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::clip::preprocess::{batch_tensor, normalize_chw, preprocess_eval, train_view};
use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip, VisionOptions};
use crate::coop::{CoopOptions, PromptLearner};
use crate::error::{Error, Result};
use crate::refiner::{self, Refiner};

/// Image-side features of a set of images (one row per image view).
#[derive(Debug, Clone)]
pub struct Features {
    /// `[n, d]`, L2-normalised.
    pub image: Tensor,
    /// `[n, N, d]`: last-block tokens through ln_post and the projection.
    pub tokens: Tensor,
    /// `[n, P]`.
    pub cls_attn: Tensor,
    /// Label of each row.
    pub labels: Vec<u32>,
    /// Rows per image: consecutive rows `i * views .. (i + 1) * views` are views of image i.
    pub views: usize,
}

impl Features {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Rows `idx`.
    pub fn select(&self, idx: &[u32]) -> Result<Features> {
        let i = Tensor::from_vec(idx.to_vec(), idx.len(), self.image.device())?;
        Ok(Features {
            image: self.image.index_select(&i, 0)?,
            tokens: self.tokens.index_select(&i, 0)?,
            cls_attn: self.cls_attn.index_select(&i, 0)?,
            labels: idx.iter().map(|&k| self.labels[k as usize]).collect(),
            views: 1,
        })
    }
}

/// Encode images in batches. `view(i)` gives the i-th view's RGB image and label.
pub fn extract_features(
    clip: &Clip,
    n: usize,
    view: impl Fn(usize) -> Result<(image::RgbImage, u32)> + Sync,
    mut progress: impl FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<Features> {
    use rayon::prelude::*;
    let size = clip.image_size();
    let mut image = Vec::new();
    let mut tokens = Vec::new();
    let mut attn = Vec::new();
    let mut labels = Vec::with_capacity(n);
    const BATCH: usize = 64;
    for start in (0..n).step_by(BATCH) {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Invalid("cancelled".into()));
        }
        let end = (start + BATCH).min(n);
        let items: Vec<Result<(Vec<f32>, u32)>> = (start..end)
            .into_par_iter()
            .map(|i| {
                let (img, label) = view(i)?;
                let pix = if img.width() as usize == size && img.height() as usize == size {
                    normalize_chw(&img)
                } else {
                    preprocess_eval(&img, size as u32)
                };
                Ok((pix, label))
            })
            .collect();
        let mut pix = Vec::with_capacity(end - start);
        for it in items {
            let (p, l) = it?;
            pix.push(p);
            labels.push(l);
        }
        let x = batch_tensor(&pix, size, clip.device())?;
        let out = clip.vision.forward(&x, &VisionOptions::default())?;
        image.push(l2_normalize(&out.image_embeds)?);
        tokens.push(out.tokens);
        attn.push(out.cls_attn);
        progress(end, n);
    }
    if labels.is_empty() {
        return Err(Error::Invalid("no images to encode".into()));
    }
    Ok(Features { image: Tensor::cat(&image, 0)?, tokens: Tensor::cat(&tokens, 0)?, cls_attn: Tensor::cat(&attn, 0)?, labels, views: 1 })
}

/// Which method to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Coop,
    CoopRefiner,
}

/// Hyperparameters (defaults: the reference base-to-new recipe, TEXTREFINER.md section 5).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub method: Method,
    pub coop: CoopOptions,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub warmup_epochs: usize,
    pub warmup_lr: f64,
    pub cache_size: usize,
    pub alpha: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::CoopRefiner,
            coop: CoopOptions::default(),
            epochs: 10,
            batch: 32,
            lr: 0.002,
            momentum: 0.9,
            weight_decay: 5e-4,
            warmup_epochs: 1,
            warmup_lr: 1e-5,
            cache_size: refiner::CACHE_SIZE,
            alpha: refiner::ALPHA,
            seed: 1,
        }
    }
}

impl TrainConfig {
    /// Learning rate of `epoch` (0-based): constant warm-up, then cosine over `epochs`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        if epoch < self.warmup_epochs {
            self.warmup_lr
        } else {
            let t = (epoch - self.warmup_epochs) as f64 / self.epochs.max(1) as f64;
            0.5 * self.lr * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

/// What the loop reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Step { epoch: usize, step: usize, steps_per_epoch: usize, lr: f64, global: f32, local: f32, reg: f32, total: f32 },
    Epoch { epoch: usize, train_accuracy: f32, mean_loss: f32 },
}

/// A trained prompt (and refiner).
#[derive(Debug, Clone)]
pub struct Trained {
    pub learner: PromptLearner,
    pub refiner: Option<Refiner>,
    pub config: TrainConfig,
    pub epochs_done: usize,
}

/// SGD with momentum and weight decay (PyTorch semantics: no dampening, not Nesterov).
struct Sgd {
    vars: Vec<Var>,
    bufs: Vec<Option<Tensor>>,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    fn new(vars: Vec<Var>, momentum: f64, weight_decay: f64) -> Self {
        let n = vars.len();
        Self { vars, bufs: vec![None; n], momentum, weight_decay }
    }
    fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        for (v, buf) in self.vars.iter().zip(self.bufs.iter_mut()) {
            let Some(g) = grads.get(v.as_tensor()) else { continue };
            let g = (g + (v.as_tensor() * self.weight_decay)?)?;
            let b = match buf.take() {
                Some(b) => ((b * self.momentum)? + g)?,
                None => g,
            };
            v.set(&(v.as_tensor() - (&b * lr)?)?)?;
            *buf = Some(b);
        }
        Ok(())
    }
}

/// Train on `train` features (labels in `0..class_names.len()`).
pub fn train(
    clip: &Clip,
    class_names: &[String],
    train: &Features,
    cfg: &TrainConfig,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(&TrainEvent),
) -> Result<Trained> {
    if train.is_empty() {
        return Err(Error::Invalid("no training images".into()));
    }
    let tok = ClipTokenizer::new();
    let learner = PromptLearner::new(clip, &tok, class_names, &cfg.coop)?;
    let d = clip.config.projection_dim;
    let mut refiner = match cfg.method {
        Method::Coop => None,
        Method::CoopRefiner => {
            let mut r = Refiner::new(d, cfg.cache_size, cfg.seed, clip.device())?;
            r.alpha = cfg.alpha;
            Some(r)
        }
    };
    let mut vars = vec![learner.ctx.clone()];
    if let Some(r) = &refiner {
        vars.extend(r.vars());
    }
    let mut opt = Sgd::new(vars, cfg.momentum, cfg.weight_decay);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // One view per image per epoch (drawn at random among the precomputed ones), so an epoch
    // has as many steps as the reference's.
    let views = train.views.max(1);
    let n = train.len() / views;
    let steps_per_epoch = n.div_ceil(cfg.batch).max(1);
    let scale = clip.logit_scale as f64;
    let mut epochs_done = 0;
    for epoch in 0..cfg.epochs {
        let lr = cfg.lr_at(epoch);
        let mut order: Vec<u32> = (0..n as u32).map(|i| i * views as u32 + rng.random_range(0..views as u32)).collect();
        order.shuffle(&mut rng);
        let mut correct = 0usize;
        let mut loss_sum = 0f32;
        for (step, chunk) in order.chunks(cfg.batch).enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Invalid(format!("cancelled in epoch {} at step {}", epoch + 1, step + 1)));
            }
            let b = train.select(chunk)?;
            let labels = Tensor::from_vec(b.labels.clone(), b.len(), clip.device())?;
            let t = l2_normalize(&learner.text_features(clip)?)?;
            let (logits, parts) = match refiner.as_mut() {
                None => {
                    let logits = (b.image.matmul(&t.t()?)? * scale)?;
                    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                    (logits, (loss.clone(), None))
                }
                Some(r) => {
                    let (_fine, refined) = r.refine(&t)?;
                    let (bn, nt, dd) = b.tokens.dims3()?;
                    let trans = r.transform.forward(&b.tokens.reshape((bn * nt, dd))?, true)?;
                    let trans = l2_normalize(&trans)?;
                    let l = refiner::losses(&b.image, &t, &refined, &trans.reshape((bn, nt, dd))?, &b.cls_attn, &labels, scale)?;
                    // write after the read, once per batch, no gradient
                    r.cache.write(&trans.detach())?;
                    let logits = (b.image.matmul(&refined.t()?)? * scale)?;
                    (logits, (l.total.clone(), Some(l)))
                }
            };
            let (total, l) = parts;
            let total_v = total.to_scalar::<f32>()?;
            if !total_v.is_finite() {
                return Err(Error::Invalid(format!(
                    "the loss became {total_v} in epoch {} at step {}: training stopped (lower the learning rate?)",
                    epoch + 1,
                    step + 1
                )));
            }
            let grads = total.backward()?;
            opt.step(&grads, lr)?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += pred.iter().zip(&b.labels).filter(|(p, y)| p == y).count();
            loss_sum += total_v * chunk.len() as f32;
            let (global, local, reg) = match &l {
                Some(l) => (l.global.to_scalar::<f32>()?, l.local.to_scalar::<f32>()?, l.reg.to_scalar::<f32>()?),
                None => (total_v, 0.0, 0.0),
            };
            on_event(&TrainEvent::Step { epoch: epoch + 1, step: step + 1, steps_per_epoch, lr, global, local, reg, total: total_v });
        }
        epochs_done = epoch + 1;
        on_event(&TrainEvent::Epoch { epoch: epoch + 1, train_accuracy: correct as f32 / n as f32, mean_loss: loss_sum / n as f32 });
    }
    Ok(Trained { learner, refiner, config: cfg.clone(), epochs_done })
}

/// Class features for `class_names` with a trained context (and refiner): normalised CoOp
/// features `t` and, with a refiner, the refined features (computed once per class set).
pub fn class_features(clip: &Clip, trained: &Trained, class_names: &[String]) -> Result<(Tensor, Option<Tensor>)> {
    let tok = ClipTokenizer::new();
    let mut opts = trained.config.coop.clone();
    opts.init = None;
    opts.n_ctx = trained.learner.n_ctx;
    if opts.class_specific && class_names.len() != trained.learner.num_classes() {
        return Err(Error::Invalid("a class-specific context cannot be applied to other classes".into()));
    }
    let mut learner = PromptLearner::new(clip, &tok, class_names, &opts)?;
    learner.ctx = Var::from_tensor(&trained.learner.ctx.as_tensor().detach())?;
    let t = l2_normalize(&learner.text_features(clip)?.detach())?;
    let refined = match &trained.refiner {
        Some(r) => Some(r.refine(&t)?.1.detach()),
        None => None,
    };
    Ok((t, refined))
}

/// Zero-shot class features with the prompt "a photo of a {class}.".
pub fn zero_shot_features(clip: &Clip, class_names: &[String]) -> Result<Tensor> {
    let tok = ClipTokenizer::new();
    let ctx = clip.config.text_config.max_position_embeddings;
    let ids: Vec<Vec<u32>> = class_names.iter().map(|c| tok.tokenize(&format!("a photo of a {c}."), ctx)).collect();
    Ok(l2_normalize(&clip.text.forward_ids(&ids)?)?)
}

/// Accuracy of `features` against class features `w` (`[C, d]`), labels in `0..C`.
pub fn accuracy(features: &Features, w: &Tensor) -> Result<f32> {
    let pred = features.image.matmul(&w.t()?)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred.iter().zip(&features.labels).filter(|(p, y)| p == y).count() as f32 / features.len().max(1) as f32)
}

/// Harmonic mean of base and new accuracy.
pub fn harmonic_mean(b: f32, n: f32) -> f32 {
    if b + n > 0.0 {
        2.0 * b * n / (b + n)
    } else {
        0.0
    }
}

/// Views of the demo world for the engine: `shots` training images per base class with
/// `views` augmented views each (0: the plain view), and test images.
pub mod world_data {
    use super::*;
    use crate::data::world::{Split, World};

    /// Few-shot indices per class: `shots` distinct draws from the first 64 train images of each
    /// class, seeded (the world has as many training images as asked for; the pool mirrors a
    /// finite training set).
    pub fn few_shot(classes: &[usize], shots: usize, seed: u64) -> Vec<(usize, u64)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for &c in classes {
            let mut pool: Vec<u64> = (0..64).collect();
            pool.shuffle(&mut rng);
            out.extend(pool.into_iter().take(shots).map(|i| (c, i)));
        }
        out
    }

    pub fn train_features(clip: &Clip, world: &World, picks: &[(usize, u64)], classes: &[usize], views: usize, seed: u64, cancel: &AtomicBool) -> Result<Features> {
        let per = views.max(1);
        let size = clip.image_size() as u32;
        let mut f = extract_features(
            clip,
            picks.len() * per,
            |i| {
                let (c, idx) = picks[i / per];
                let img = world.image(Split::Train, c, idx);
                let label = classes.iter().position(|&x| x == c).unwrap_or(0) as u32;
                if views == 0 {
                    return Ok((img, label));
                }
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((i as u64) << 20) ^ 0xA06);
                Ok((train_view(&mut rng, &img, size), label))
            },
            |_, _| {},
            cancel,
        )?;
        f.views = per;
        Ok(f)
    }

    pub fn test_features(clip: &Clip, world: &World, classes: &[usize], per_class: u64, cancel: &AtomicBool) -> Result<Features> {
        let per = per_class as usize;
        extract_features(
            clip,
            classes.len() * per,
            |i| Ok((world.image(Split::Test, classes[i / per], (i % per) as u64), (i / per) as u32)),
            |_, _| {},
            cancel,
        )
    }

    /// Base / new class indices of the world (CoOp's split: first ceil(n/2) labels are base).
    pub fn base_new(world: &World) -> (Vec<usize>, Vec<usize>) {
        let n = world.num_classes();
        let m = n.div_ceil(2);
        ((0..m).collect(), (m..n).collect())
    }
}
