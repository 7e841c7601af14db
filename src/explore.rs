//! What the explorer shows, as plain data computed once by the model thread: test images with
//! their cached image-side features, the class features of each method (zero-shot CLIP, CoOp,
//! CoOp + TextRefiner, later runs), TextRefiner's parts for what-if re-scoring, patch-to-cache
//! scores for heatmaps, and the nearest vocabulary words of the learned context.
//!
//! Everything here is small dense arithmetic on `Vec<f32>` (no model code), so the window can
//! re-score instantly: refinement is text-only and image features are cached.

use std::sync::atomic::AtomicBool;

use candle_core::Tensor;

use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip};
use crate::data::dataset::Subset;
use crate::eval::{top_k, Flip, Ranked};
use crate::experiment::{self, Prepared};
use crate::features::Features;
use crate::train::{
    class_features, zero_shot_features, Method as TrainMethod, TrainConfig, Trained,
};

/// One test image.
#[derive(Debug, Clone)]
pub struct ExploreImage {
    pub subset: Subset,
    /// Label in its subset's class list.
    pub label: u32,
    pub name: String,
    /// RGB8 of the view the model saw (`side x side`).
    pub rgb: Vec<u8>,
    pub side: usize,
    /// Normalised image embedding `[d]`.
    pub embed: Vec<f32>,
    /// Head-averaged CLS attention over patches `[P]`.
    pub cls_attn: Vec<f32>,
    /// Cosine of each transformed patch token with each cache entry `[P, M]` (refined run).
    pub patch_cache: Vec<f32>,
}

/// Class features of one method for the base and the new classes (`[C, d]` row-major).
#[derive(Debug, Clone)]
pub struct MethodFeatures {
    pub name: String,
    pub base: Vec<f32>,
    pub new: Vec<f32>,
}

/// What TextRefiner adds on top of CoOp, for what-if re-scoring.
#[derive(Debug, Clone)]
pub struct RefinerParts {
    /// Normalised CoOp features of the refined run's context.
    pub t_base: Vec<f32>,
    pub t_new: Vec<f32>,
    /// `[d, 2d]`.
    pub extractor: Vec<f32>,
    /// `[M, d]`, rows normalised.
    pub cache: Vec<f32>,
    pub alpha: f32,
}

/// Everything the comparison views need.
#[derive(Debug, Clone)]
pub struct Exploration {
    pub data_name: String,
    pub base_names: Vec<String>,
    pub new_names: Vec<String>,
    pub d: usize,
    pub grid: usize,
    pub logit_scale: f32,
    pub images: Vec<ExploreImage>,
    /// 0: zero-shot CLIP, 1: CoOp, 2: CoOp + TextRefiner, then runs made in the window.
    pub methods: Vec<MethodFeatures>,
    pub refiner: Option<RefinerParts>,
    /// Nearest vocabulary words (and cosine) of each learned context vector.
    pub ctx_words: Vec<Vec<(String, f32)>>,
    /// Seconds the model thread took to prepare everything (features, training, views).
    pub prepare_secs: f32,
}

pub const ZERO_SHOT: usize = 0;
pub const COOP: usize = 1;
pub const REFINED: usize = 2;

fn rows(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Exploration {
    pub fn names(&self, s: Subset) -> &[String] {
        match s {
            Subset::New => &self.new_names,
            _ => &self.base_names,
        }
    }

    pub fn num_entries(&self) -> usize {
        self.refiner
            .as_ref()
            .map(|r| r.cache.len() / self.d.max(1))
            .unwrap_or(0)
    }

    fn class_features<'a>(&'a self, method: &'a MethodFeatures, s: Subset) -> &'a [f32] {
        match s {
            Subset::New => &method.new,
            _ => &method.base,
        }
    }

    /// Scaled logits of image `i` under `features` (`[C, d]` for the image's subset).
    pub fn logits_with(&self, i: usize, features: &[f32]) -> Vec<f32> {
        let e = &self.images[i].embed;
        features
            .chunks(self.d)
            .map(|w| self.logit_scale * dot(e, w))
            .collect()
    }

    /// Scaled logits of image `i` under method `m`.
    pub fn logits(&self, m: usize, i: usize) -> Vec<f32> {
        let s = self.images[i].subset;
        self.logits_with(i, self.class_features(&self.methods[m], s))
    }

    pub fn top5(&self, m: usize, i: usize) -> Vec<Ranked> {
        top_k(&self.logits(m, i), 5)
    }

    pub fn predict(&self, m: usize, i: usize) -> u32 {
        self.top5(m, i).first().map(|r| r.class).unwrap_or(0)
    }

    /// Accuracy of method `m` on a subset.
    pub fn accuracy(&self, m: usize, s: Subset) -> f32 {
        let idx: Vec<usize> = (0..self.images.len())
            .filter(|&i| self.images[i].subset == s)
            .collect();
        let ok = idx
            .iter()
            .filter(|&&i| self.predict(m, i) == self.images[i].label)
            .count();
        ok as f32 / idx.len().max(1) as f32
    }

    /// Per-class accuracy and the confusion matrix (`[true][predicted]`) of `m` on a subset.
    pub fn confusion(&self, m: usize, s: Subset) -> Vec<Vec<u32>> {
        let c = self.names(s).len();
        let mut conf = vec![vec![0u32; c]; c];
        for (i, im) in self.images.iter().enumerate() {
            if im.subset == s {
                conf[im.label as usize][self.predict(m, i) as usize] += 1;
            }
        }
        conf
    }

    /// Flip category of image `i` from method `a` to method `b`, and the margin change.
    pub fn flip(&self, a: usize, b: usize, i: usize) -> (Flip, f32) {
        let y = self.images[i].label;
        let (la, lb) = (self.logits(a, i), self.logits(b, i));
        let margin = |l: &[f32]| {
            let other = l
                .iter()
                .enumerate()
                .filter(|(k, _)| *k as u32 != y)
                .map(|(_, v)| *v)
                .fold(f32::NEG_INFINITY, f32::max);
            l[y as usize] - other
        };
        let pa = top_k(&la, 1)[0].class == y;
        let pb = top_k(&lb, 1)[0].class == y;
        (Flip::of(pa, pb), margin(&lb) - margin(&la))
    }

    /// Read weights `A_cache(t)` `[C, M]` of the refined run for a subset, with disabled
    /// entries left out of the softmax.
    pub fn read_weights(&self, s: Subset, enabled: &[bool]) -> Vec<f32> {
        let Some(r) = &self.refiner else {
            return Vec::new();
        };
        let t = if s == Subset::New {
            &r.t_new
        } else {
            &r.t_base
        };
        let m = r.cache.len() / self.d;
        let mut out = Vec::with_capacity(t.len() / self.d * m);
        for tc in t.chunks(self.d) {
            let s: Vec<f32> = r.cache.chunks(self.d).map(|e| dot(tc, e)).collect();
            let on = |k: usize| enabled.get(k).copied().unwrap_or(true);
            let mx = s
                .iter()
                .enumerate()
                .filter(|(k, _)| on(*k))
                .map(|(_, v)| *v)
                .fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s
                .iter()
                .enumerate()
                .map(|(k, v)| if on(k) { (v - mx).exp() } else { 0.0 })
                .collect();
            let z: f32 = e.iter().sum::<f32>().max(1e-30);
            out.extend(e.iter().map(|v| v / z));
        }
        out
    }

    /// Refined class features with another `alpha` and some cache entries switched off:
    /// `t + alpha * extractor(concat(t, A_cache(t) @ cache))` (TEXTREFINER.md aggregation).
    pub fn refined_with(&self, s: Subset, alpha: f32, enabled: &[bool]) -> Vec<f32> {
        let Some(r) = &self.refiner else {
            return Vec::new();
        };
        let d = self.d;
        let t = if s == Subset::New {
            &r.t_new
        } else {
            &r.t_base
        };
        let w = self.read_weights(s, enabled);
        let m = r.cache.len() / d;
        let mut out = Vec::with_capacity(t.len());
        for (c, tc) in t.chunks(d).enumerate() {
            let mut fine = vec![0f32; d];
            for k in 0..m {
                let wk = w[c * m + k];
                if wk != 0.0 {
                    for (f, e) in fine.iter_mut().zip(&r.cache[k * d..(k + 1) * d]) {
                        *f += wk * e;
                    }
                }
            }
            for (o, row) in r.extractor.chunks(2 * d).enumerate() {
                let v = dot(&row[..d], tc) + dot(&row[d..], &fine);
                out.push(tc[o] + alpha * v);
            }
        }
        out
    }

    /// Patch map for cache entry `k`: the cosine of each transformed patch with the entry.
    pub fn entry_map(&self, i: usize, k: usize) -> Vec<f32> {
        let m = self.num_entries();
        self.images[i]
            .patch_cache
            .chunks(m.max(1))
            .map(|row| row.get(k).copied().unwrap_or(0.0))
            .collect()
    }

    /// Class-conditional map: the class's read weights over entries times each patch's
    /// scores, `sum_k A_cache(t_c)[k] * cos(patch, entry k)`.
    pub fn class_map(&self, i: usize, class: usize, enabled: &[bool]) -> Vec<f32> {
        let m = self.num_entries();
        if m == 0 {
            return Vec::new();
        }
        let w = self.read_weights(self.images[i].subset, enabled);
        let wc = &w[class * m..(class + 1) * m];
        self.images[i]
            .patch_cache
            .chunks(m)
            .map(|row| dot(row, wc))
            .collect()
    }

    /// The `k` (image, patch) pairs across the test set closest to cache entry `entry`.
    pub fn atlas(&self, entry: usize, k: usize) -> Vec<(usize, usize, f32)> {
        let m = self.num_entries();
        let mut all: Vec<(usize, usize, f32)> = Vec::new();
        for (i, im) in self.images.iter().enumerate() {
            for (p, row) in im.patch_cache.chunks(m.max(1)).enumerate() {
                if let Some(&v) = row.get(entry) {
                    all.push((i, p, v));
                }
            }
        }
        all.sort_by(|a, b| b.2.total_cmp(&a.2));
        all.truncate(k);
        all
    }
}

/// The model thread's side: build an exploration from prepared data and trained runs.
pub struct Builder<'a> {
    pub clip: &'a Clip,
    pub prepared: &'a Prepared,
}

/// Progress reported while building.
pub type Report<'a> = &'a mut dyn FnMut(&str, f32);

impl Builder<'_> {
    /// Zero-shot CLIP and the two trained methods; runs are trained here (`cfg` decides the
    /// recipe) unless given.
    pub fn build(&self, coop: &Trained, refined: &Trained) -> crate::Result<Exploration> {
        let clip = self.clip;
        let p = self.prepared;
        let d = clip.config.projection_dim;
        let method = |name: &str, b: Tensor, n: Tensor| -> crate::Result<MethodFeatures> {
            Ok(MethodFeatures {
                name: name.into(),
                base: rows(&b)?,
                new: rows(&n)?,
            })
        };
        let zs = method(
            "Zero-shot CLIP",
            zero_shot_features(clip, &p.base.class_names)?,
            zero_shot_features(clip, &p.new.class_names)?,
        )?;
        let feats =
            |t: &Trained| -> crate::Result<(Tensor, Option<Tensor>, Tensor, Option<Tensor>)> {
                let (tb, rb) = class_features(clip, t, &p.base.class_names)?;
                let (tn, rn) = class_features(clip, t, &p.new.class_names)?;
                Ok((tb, rb, tn, rn))
            };
        let (cb, _, cn, _) = feats(coop)?;
        let coop_m = method("CoOp", cb, cn)?;
        let (tb, rb, tn, rn) = feats(refined)?;
        let refined_m = method(
            "CoOp + TextRefiner",
            rb.clone().unwrap_or(tb.clone()),
            rn.clone().unwrap_or(tn.clone()),
        )?;
        let mut images = Vec::new();
        let mut refiner_parts = None;
        let mut transform = refined.refiner.as_ref().map(|r| r.transform.clone());
        let cache = refined.refiner.as_ref().map(|r| r.cache.memory.clone());
        if let Some(r) = &refined.refiner {
            refiner_parts = Some(RefinerParts {
                t_base: rows(&tb)?,
                t_new: rows(&tn)?,
                extractor: rows(r.extractor.as_tensor())?,
                cache: rows(&r.cache.memory)?,
                alpha: r.alpha as f32,
            });
        }
        for (subset, ds, items, f) in [
            (Subset::Base, &p.base, &p.base_test_items, &p.base_test),
            (Subset::New, &p.new, &p.new_test_items, &p.new_test),
        ] {
            let pc = patch_cache(f, transform.as_mut(), cache.as_ref())?;
            let embeds: Vec<Vec<f32>> = f.image.to_vec2()?;
            let attn: Vec<Vec<f32>> = f.cls_attn.to_vec2()?;
            let side = clip.image_size();
            for (i, it) in items.iter().enumerate() {
                let img = ds.load(&it.image)?;
                let view = crate::clip::preprocess::eval_view(&img, side as u32);
                images.push(ExploreImage {
                    subset,
                    label: it.label,
                    name: ds.describe(&it.image),
                    rgb: view.into_raw(),
                    side,
                    embed: embeds[i].clone(),
                    cls_attn: attn[i].clone(),
                    patch_cache: pc.get(i).cloned().unwrap_or_default(),
                });
            }
        }
        let grid = clip.config.vision_config.image_size / clip.config.vision_config.patch_size;
        Ok(Exploration {
            data_name: p.dataset.name.clone(),
            base_names: p.base.class_names.clone(),
            new_names: p.new.class_names.clone(),
            d,
            grid,
            logit_scale: clip.logit_scale,
            images,
            methods: vec![zs, coop_m, refined_m],
            refiner: refiner_parts,
            ctx_words: nearest_words(clip, &refined.learner.ctx.as_tensor().detach(), 3)?,
            prepare_secs: 0.0,
        })
    }
}

/// `[n][P * M]`: cosine of each image's transformed patch tokens with each cache entry.
fn patch_cache(
    f: &Features,
    transform: Option<&mut crate::refiner::LocalTransform>,
    cache: Option<&Tensor>,
) -> crate::Result<Vec<Vec<f32>>> {
    let (Some(tr), Some(cache)) = (transform, cache) else {
        return Ok(Vec::new());
    };
    let (n, nt, d) = f.tokens.dims3()?;
    let patches = f.tokens.narrow(1, 1, nt - 1)?.reshape((n * (nt - 1), d))?;
    let z = l2_normalize(&tr.forward(&patches, false)?)?;
    let s = z.matmul(&cache.t()?)?; // [n * P, M]
    let m = cache.dim(0)?;
    Ok(s.reshape((n, (nt - 1) * m))?.to_vec2()?)
}

/// The `k` vocabulary tokens whose embeddings are closest (cosine) to each context vector.
pub fn nearest_words(
    clip: &Clip,
    ctx: &Tensor,
    k: usize,
) -> crate::Result<Vec<Vec<(String, f32)>>> {
    let ctx = if ctx.rank() == 3 {
        ctx.get(0)?
    } else {
        ctx.clone()
    };
    let table = l2_normalize(clip.text.token_embedding())?;
    let sims: Vec<Vec<f32>> = l2_normalize(&ctx)?.matmul(&table.t()?)?.to_vec2()?;
    let tok = ClipTokenizer::new();
    Ok(sims
        .iter()
        .map(|row| {
            top_k_plain(row, k)
                .into_iter()
                .map(|(id, v)| (tok.token_text(id as u32).trim().to_string(), v))
                .collect()
        })
        .collect())
}

fn top_k_plain(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| row[b].total_cmp(&row[a]));
    let mut top: Vec<(usize, f32)> = idx[..k].iter().map(|&i| (i, row[i])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top
}

/// Train the default CoOp and CoOp + TextRefiner runs on prepared data (the demo's "trained
/// on the spot"), reporting progress.
pub fn train_default_runs(
    clip: &Clip,
    p: &Prepared,
    cancel: &AtomicBool,
    report: Report,
) -> crate::Result<(Trained, Trained)> {
    let mut out = Vec::new();
    for (k, method) in [TrainMethod::Coop, TrainMethod::CoopRefiner]
        .into_iter()
        .enumerate()
    {
        let cfg = TrainConfig {
            method,
            seed: p.spec.seed,
            ..Default::default()
        };
        let epochs = cfg.epochs;
        let name = if k == 0 { "CoOp" } else { "CoOp + TextRefiner" };
        let (t, _) = experiment::run(clip, p, &cfg, cancel, None, |e| {
            if let experiment::Event::Train(crate::train::TrainEvent::Epoch { epoch, .. }) = e {
                report(
                    &format!("training {name}: epoch {epoch}/{epochs}"),
                    (k as f32 + *epoch as f32 / epochs as f32) / 2.0,
                );
            }
        })?;
        out.push(t);
    }
    let refined = out
        .pop()
        .ok_or_else(|| crate::Error::Invalid("no refined run".into()))?;
    let coop = out
        .pop()
        .ok_or_else(|| crate::Error::Invalid("no CoOp run".into()))?;
    Ok((coop, refined))
}

/// Class features of an extra run (trained in the window or imported) for the comparison.
pub fn method_of(
    clip: &Clip,
    p: &Prepared,
    t: &Trained,
    name: &str,
) -> crate::Result<MethodFeatures> {
    let (tb, rb) = class_features(clip, t, &p.base.class_names)?;
    let (tn, rn) = class_features(clip, t, &p.new.class_names)?;
    Ok(MethodFeatures {
        name: name.into(),
        base: rows(&rb.unwrap_or(tb))?,
        new: rows(&rn.unwrap_or(tn))?,
    })
}
