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

use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip};
use crate::coop::{CoopOptions, PromptLearner};
use crate::error::{Error, Result};
pub use crate::features::Features;
use crate::refiner::{self, Refiner};

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
    /// Use view `epoch % views` of every image in each epoch (with as many precomputed views
    /// as epochs: a fresh augmentation per epoch, as the reference); otherwise one of the
    /// views at random.
    #[serde(default)]
    pub fresh_views: bool,
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
            fresh_views: false,
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
    Step {
        epoch: usize,
        step: usize,
        steps_per_epoch: usize,
        lr: f64,
        global: f32,
        local: f32,
        reg: f32,
        total: f32,
    },
    Epoch {
        epoch: usize,
        train_accuracy: f32,
        mean_loss: f32,
    },
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
        Self {
            vars,
            bufs: vec![None; n],
            momentum,
            weight_decay,
        }
    }
    fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        for (v, buf) in self.vars.iter().zip(self.bufs.iter_mut()) {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
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

/// The state of a run between steps: prompt learner, refiner, optimiser.
pub struct TrainState<'a> {
    clip: &'a Clip,
    pub learner: PromptLearner,
    pub refiner: Option<Refiner>,
    opt: Sgd,
    scale: f64,
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    pub global: f32,
    pub local: f32,
    pub reg: f32,
    pub total: f32,
    pub correct: usize,
}

impl<'a> TrainState<'a> {
    pub fn new(clip: &'a Clip, class_names: &[String], cfg: &TrainConfig) -> Result<Self> {
        let tok = ClipTokenizer::new();
        let learner = PromptLearner::new(clip, &tok, class_names, &cfg.coop)?;
        let d = clip.config.projection_dim;
        let refiner = match cfg.method {
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
        let opt = Sgd::new(vars, cfg.momentum, cfg.weight_decay);
        Ok(Self {
            clip,
            learner,
            refiner,
            opt,
            scale: clip.logit_scale as f64,
        })
    }

    /// One SGD step on a batch of features at learning rate `lr`. A non-finite loss is an error
    /// and leaves the parameters untouched.
    pub fn step(&mut self, b: &Features, lr: f64) -> Result<StepOutput> {
        let clip = self.clip;
        let scale = self.scale;
        let labels = Tensor::from_vec(b.labels.clone(), b.len(), clip.device())?;
        use crate::clip::profile::time;
        let t = time("step: text forward", || {
            l2_normalize(&self.learner.text_features(clip)?)
        })?;
        let (logits, total, l) = match self.refiner.as_mut() {
            None => {
                let logits = (b.image.matmul(&t.t()?)? * scale)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                (logits, loss, None)
            }
            Some(r) => {
                let (_fine, refined) = r.refine(&t)?;
                let (bn, nt, dd) = b.tokens.dims3()?;
                let trans = time("step: local transform", || -> Result<Tensor> {
                    Ok(r.transform
                        .forward_train_normalized(&b.tokens.reshape((bn * nt, dd))?)?)
                })?;
                let l = time("step: losses", || {
                    refiner::losses(
                        &b.image,
                        &t,
                        &refined,
                        &trans.reshape((bn, nt, dd))?,
                        &b.cls_attn,
                        &labels,
                        scale,
                    )
                })?;
                // write after the read, once per batch, no gradient
                time("step: cache write", || r.cache.write(&trans.detach()))?;
                let logits = (b.image.matmul(&refined.t()?)? * scale)?;
                (logits, l.total.clone(), Some(l))
            }
        };
        let total_v = total.to_scalar::<f32>()?;
        if !total_v.is_finite() {
            return Err(Error::Invalid(format!("the loss became {total_v}")));
        }
        let grads = time("step: backward", || total.backward())?;
        time("step: optimiser", || self.opt.step(&grads, lr))?;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let correct = pred.iter().zip(&b.labels).filter(|(p, y)| p == y).count();
        let (global, local, reg) = match &l {
            Some(l) => (
                l.global.to_scalar::<f32>()?,
                l.local.to_scalar::<f32>()?,
                l.reg.to_scalar::<f32>()?,
            ),
            None => (total_v, 0.0, 0.0),
        };
        Ok(StepOutput {
            global,
            local,
            reg,
            total: total_v,
            correct,
        })
    }
}

/// Train on `train` features (labels in `0..class_names.len()`).
pub fn train(
    clip: &Clip,
    class_names: &[String],
    train: &Features,
    cfg: &TrainConfig,
    cancel: &AtomicBool,
    on_event: impl FnMut(&TrainEvent),
) -> Result<Trained> {
    train_checkpointed(clip, class_names, train, cfg, cancel, on_event, |_| Ok(()))
}

/// [`train`], handing the state after every epoch to `save` (so that a run that diverges or is
/// cancelled later keeps its last good checkpoint).
pub fn train_checkpointed(
    clip: &Clip,
    class_names: &[String],
    train: &Features,
    cfg: &TrainConfig,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(&TrainEvent),
    mut save: impl FnMut(&Trained) -> Result<()>,
) -> Result<Trained> {
    if train.is_empty() {
        return Err(Error::Invalid("no training images".into()));
    }
    let mut state = TrainState::new(clip, class_names, cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // One view per image per epoch (drawn at random among the precomputed ones, or view
    // `epoch % views` with fresh_views), so an epoch has as many steps as the reference's.
    let views = train.views.max(1);
    let n = train.len() / views;
    let steps_per_epoch = n.div_ceil(cfg.batch).max(1);
    let mut epochs_done = 0;
    for epoch in 0..cfg.epochs {
        let lr = cfg.lr_at(epoch);
        let mut order: Vec<u32> = (0..n as u32)
            .map(|i| {
                let v = if cfg.fresh_views {
                    (epoch % views) as u32
                } else {
                    rng.random_range(0..views as u32)
                };
                i * views as u32 + v
            })
            .collect();
        order.shuffle(&mut rng);
        let mut correct = 0usize;
        let mut loss_sum = 0f32;
        for (step, chunk) in order.chunks(cfg.batch).enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Invalid(format!(
                    "cancelled in epoch {} at step {}",
                    epoch + 1,
                    step + 1
                )));
            }
            let b = train.select(chunk)?;
            let out = state.step(&b, lr).map_err(|e| match e {
                Error::Invalid(m) if m.starts_with("the loss became") => Error::Invalid(format!(
                    "{m} in epoch {} at step {}: training stopped (lower the learning rate?)",
                    epoch + 1,
                    step + 1
                )),
                e => e,
            })?;
            correct += out.correct;
            loss_sum += out.total * chunk.len() as f32;
            on_event(&TrainEvent::Step {
                epoch: epoch + 1,
                step: step + 1,
                steps_per_epoch,
                lr,
                global: out.global,
                local: out.local,
                reg: out.reg,
                total: out.total,
            });
        }
        epochs_done = epoch + 1;
        save(&Trained {
            learner: state.learner.clone(),
            refiner: state.refiner.clone(),
            config: cfg.clone(),
            epochs_done,
        })?;
        on_event(&TrainEvent::Epoch {
            epoch: epoch + 1,
            train_accuracy: correct as f32 / n as f32,
            mean_loss: loss_sum / n as f32,
        });
    }
    Ok(Trained {
        learner: state.learner,
        refiner: state.refiner,
        config: cfg.clone(),
        epochs_done,
    })
}

/// Class features for `class_names` with a trained context (and refiner): normalised CoOp
/// features `t` and, with a refiner, the refined features (computed once per class set).
pub fn class_features(
    clip: &Clip,
    trained: &Trained,
    class_names: &[String],
) -> Result<(Tensor, Option<Tensor>)> {
    let tok = ClipTokenizer::new();
    let mut opts = trained.config.coop.clone();
    opts.init = None;
    opts.n_ctx = trained.learner.n_ctx;
    if opts.class_specific && class_names.len() != trained.learner.num_classes() {
        return Err(Error::Invalid(
            "a class-specific context cannot be applied to other classes".into(),
        ));
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

/// CoOp's zero-shot template for the base-to-new benchmark.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

/// Zero-shot class features with the prompt "a photo of a {class}.".
pub fn zero_shot_features(clip: &Clip, class_names: &[String]) -> Result<Tensor> {
    zero_shot_ensemble(clip, class_names, &[DEFAULT_TEMPLATE.to_string()])
}

/// Zero-shot class features from prompt templates (`{}` is replaced by the class name): the
/// normalised features of each template averaged and re-normalised per class (CLIP's prompt
/// ensembling).
pub fn zero_shot_ensemble(
    clip: &Clip,
    class_names: &[String],
    templates: &[String],
) -> Result<Tensor> {
    if templates.is_empty() {
        return Err(Error::Invalid("no prompt templates".into()));
    }
    let tok = ClipTokenizer::new();
    let ctx = clip.config.text_config.max_position_embeddings;
    let mut sum: Option<Tensor> = None;
    for t in templates {
        if !t.contains("{}") {
            return Err(Error::Invalid(format!(
                "prompt template {t:?} has no {{}} for the class name"
            )));
        }
        let ids: Vec<Vec<u32>> = class_names
            .iter()
            .map(|c| tok.tokenize(&t.replace("{}", c), ctx))
            .collect();
        let f = l2_normalize(&clip.text.forward_ids(&ids)?)?;
        sum = Some(match sum {
            None => f,
            Some(s) => (s + f)?,
        });
    }
    match sum {
        Some(s) => Ok(l2_normalize(&s)?),
        None => Err(Error::Invalid("no prompt templates".into())),
    }
}

/// Accuracy of `features` against class features `w` (`[C, d]`), labels in `0..C`.
pub fn accuracy(features: &Features, w: &Tensor) -> Result<f32> {
    let pred = features
        .image
        .matmul(&w.t()?)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(&features.labels)
        .filter(|(p, y)| p == y)
        .count() as f32
        / features.len().max(1) as f32)
}

/// Harmonic mean of base and new accuracy.
pub fn harmonic_mean(b: f32, n: f32) -> f32 {
    if b + n > 0.0 {
        2.0 * b * n / (b + n)
    } else {
        0.0
    }
}
