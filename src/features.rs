//! The feature bank: CLIP is frozen, so the image side of every image view (normalised image
//! embedding, last-block tokens through ln_post and the projection, head-averaged CLS
//! attention) is computed once and kept on disk, keyed by the model's identity (a hash of its
//! config and weights) and the image's content hash (SHA-256 of the file; for demo-world images,
//! of the parameters that draw them), so runs, the CLI and the GUI share it.
//!
//! Layout: `DIR/<model hash[..16]>/<image hash[..2]>/<image hash>-<view>.safetensors`, one small
//! file per image view, written atomically. Views are `eval` (resize + centre crop, as at test
//! time) or `aug<seed>-<k>`: the k-th random resized crop + flip, drawn from a generator seeded
//! by the image hash, the seed and k, so a view does not depend on the order of a run.
//!
//! Training on K precomputed augmented views per image approximates the reference, which draws
//! a fresh augmentation every epoch ([`Views::Augmented`] with K views, one picked per image and
//! epoch); `Views::Eval` trains on the un-augmented view. RESULTS.md measures the difference.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::clip::preprocess::{batch_tensor, normalize_chw, preprocess_eval, train_view};
use crate::clip::{l2_normalize, Clip, VisionOptions};
use crate::data::dataset::{Dataset, Item};
use crate::error::{Error, Result};

/// Image-side features of a list of image views (one row per view).
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
    /// Rows per image: rows `i * views .. (i + 1) * views` are views of image i.
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

/// Which views of each image to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Views {
    /// Resize the shorter side and centre-crop (test-time view).
    Eval,
    /// `count` random resized crops with flips, seeded.
    Augmented { count: usize, seed: u64 },
}

impl Views {
    pub fn per_image(self) -> usize {
        match self {
            Views::Eval => 1,
            Views::Augmented { count, .. } => count.max(1),
        }
    }
    fn tag(self, k: usize) -> String {
        match self {
            Views::Eval => "eval".into(),
            Views::Augmented { seed, .. } => format!("aug{seed}-{k}"),
        }
    }
}

/// Progress of an extraction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    /// Of `done`, how many came from the bank.
    pub cached: usize,
}

/// Where features are kept (or nowhere: `dir = None` computes everything in memory).
#[derive(Debug, Clone)]
pub struct FeatureBank {
    pub dir: Option<PathBuf>,
}

impl FeatureBank {
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
        }
    }
    pub fn none() -> Self {
        Self { dir: None }
    }
    /// `$TEXTREFINER_CACHE/features`, else `$XDG_CACHE_HOME/textrefiner-explorer/features`,
    /// else `~/.cache/textrefiner-explorer/features`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("TEXTREFINER_CACHE") {
            return PathBuf::from(d).join("features");
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("textrefiner-explorer").join("features")
    }

    fn path(&self, model: &str, image: &str, tag: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| {
            d.join(&model[..16.min(model.len())])
                .join(&image[..2])
                .join(format!("{image}-{tag}.safetensors"))
        })
    }
}

struct Row {
    image: Tensor,
    tokens: Tensor,
    attn: Tensor,
}

fn read_row(path: &Path) -> Option<Row> {
    let ts = candle_core::safetensors::load(path, &Device::Cpu).ok()?;
    Some(Row {
        image: ts.get("image")?.clone(),
        tokens: ts.get("tokens")?.clone(),
        attn: ts.get("cls_attn")?.clone(),
    })
}

/// Encode `items` of `ds` (each with `views.per_image()` views) through `clip`, reusing and
/// filling `bank`. Rows come in item order, views of an item consecutive.
pub fn extract(
    clip: &Clip,
    bank: &FeatureBank,
    ds: &Dataset,
    items: &[Item],
    views: Views,
    mut progress: impl FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Features> {
    if items.is_empty() {
        return Err(Error::Invalid(format!("{}: no images to encode", ds.name)));
    }
    let model = if bank.dir.is_some() {
        clip.identity_hash()?
    } else {
        String::new()
    };
    let size = clip.image_size();
    let per = views.per_image();
    let total = items.len() * per;
    let mut rows: Vec<Option<Row>> = Vec::with_capacity(total);
    let mut p = Progress {
        done: 0,
        total,
        cached: 0,
    };
    progress(&p);
    // items per chunk: about 64 views at a time through the model
    let chunk = (64 / per).max(1);
    for group in items.chunks(chunk) {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Invalid("feature extraction cancelled".into()));
        }
        // hash, look up, and prepare the missing views' pixels in parallel
        let prepared: Vec<Result<Vec<Prep>>> = group
            .par_iter()
            .map(|it| {
                let (img, hash) = ds.load_hashed(&it.image)?;
                let mut out = Vec::with_capacity(per);
                for k in 0..per {
                    let tag = views.tag(k);
                    let path = bank.path(&model, &hash, &tag);
                    if let Some(row) = path.as_deref().and_then(read_row) {
                        out.push(Prep::Cached(row));
                        continue;
                    }
                    let pix = match views {
                        Views::Eval => {
                            if img.width() as usize == size && img.height() as usize == size {
                                normalize_chw(&img)
                            } else {
                                preprocess_eval(&img, size as u32)
                            }
                        }
                        Views::Augmented { seed, .. } => {
                            let mut s = [0u8; 8];
                            for (i, b) in hash.bytes().take(8).enumerate() {
                                s[i] = b;
                            }
                            let mut rng = ChaCha8Rng::seed_from_u64(
                                u64::from_le_bytes(s) ^ seed.rotate_left(21) ^ ((k as u64) << 40),
                            );
                            normalize_chw(&train_view(&mut rng, &img, size as u32))
                        }
                    };
                    out.push(Prep::Todo(pix, path));
                }
                Ok(out)
            })
            .collect();
        let mut group_rows: Vec<Option<Row>> = Vec::new();
        let mut todo_pix = Vec::new();
        let mut todo_slot = Vec::new();
        for r in prepared {
            for prep in r? {
                match prep {
                    Prep::Cached(row) => {
                        group_rows.push(Some(row));
                        p.cached += 1;
                    }
                    Prep::Todo(pix, path) => {
                        todo_pix.push(pix);
                        todo_slot.push((group_rows.len(), path));
                        group_rows.push(None);
                    }
                }
            }
        }
        if !todo_pix.is_empty() {
            let x = batch_tensor(&todo_pix, size, clip.device())?;
            let out = clip.vision.forward(&x, &VisionOptions::default())?;
            let img = l2_normalize(&out.image_embeds)?.to_device(&Device::Cpu)?;
            let tok = out.tokens.to_device(&Device::Cpu)?;
            let att = out.cls_attn.to_device(&Device::Cpu)?;
            for (j, (slot, path)) in todo_slot.into_iter().enumerate() {
                let row = Row {
                    image: img.get(j)?,
                    tokens: tok.get(j)?,
                    attn: att.get(j)?,
                };
                if let Some(path) = path {
                    save_row(&path, &row)?;
                }
                group_rows[slot] = Some(row);
            }
        }
        p.done += group_rows.len();
        rows.extend(group_rows);
        progress(&p);
    }
    let dev = clip.device();
    let mut image = Vec::with_capacity(total);
    let mut tokens = Vec::with_capacity(total);
    let mut attn = Vec::with_capacity(total);
    for r in rows.into_iter().flatten() {
        image.push(r.image);
        tokens.push(r.tokens);
        attn.push(r.attn);
    }
    let labels = items
        .iter()
        .flat_map(|it| std::iter::repeat_n(it.label, per))
        .collect();
    Ok(Features {
        image: Tensor::stack(&image, 0)?
            .to_dtype(DType::F32)?
            .to_device(dev)?,
        tokens: Tensor::stack(&tokens, 0)?
            .to_dtype(DType::F32)?
            .to_device(dev)?,
        cls_attn: Tensor::stack(&attn, 0)?
            .to_dtype(DType::F32)?
            .to_device(dev)?,
        labels,
        views: per,
    })
}

/// A view found in the bank, or its pixels to encode (and where to keep the result).
enum Prep {
    Cached(Row),
    Todo(Vec<f32>, Option<PathBuf>),
}

fn save_row(path: &Path, row: &Row) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut m = std::collections::HashMap::new();
    m.insert("image".to_string(), row.image.contiguous()?);
    m.insert("tokens".to_string(), row.tokens.contiguous()?);
    m.insert("cls_attn".to_string(), row.attn.contiguous()?);
    crate::util::save_safetensors_atomic(path, &m)
}
