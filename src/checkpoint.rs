//! Checkpoints of a trained prompt (and TextRefiner state): tensors in safetensors
//! (`ctx`, `cache`, `extractor`, `local.{w1,b1,bn_w,bn_b,running_mean,running_var,w2,b2}`) plus
//! JSON metadata (model, class names, hyperparameters, epochs, metrics). Both files are written
//! atomically; loading checks names and shapes against the model and explains a mismatch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::Clip;
use crate::coop::{CoopOptions, PromptLearner};
use crate::error::{Error, Result};
use crate::refiner::{LocalCache, LocalTransform, Refiner};
use crate::train::{TrainConfig, Trained};

/// Metadata stored beside the tensors.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub model: String,
    pub projection_dim: usize,
    pub text_width: usize,
    pub class_names: Vec<String>,
    pub config: TrainConfig,
    pub epochs_done: usize,
    #[serde(default)]
    pub metrics: serde_json::Value,
}

const FORMAT: &str = "textrefiner-explorer/1";

fn paths(stem: &Path) -> (PathBuf, PathBuf) {
    (stem.with_extension("safetensors"), stem.with_extension("json"))
}

/// Save `trained` at `stem` (`stem.safetensors` + `stem.json`).
pub fn save(stem: &Path, clip: &Clip, trained: &Trained, metrics: serde_json::Value) -> Result<()> {
    let (st, js) = paths(stem);
    if let Some(dir) = st.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    ts.insert("ctx".into(), trained.learner.ctx.as_tensor().detach());
    if let Some(r) = &trained.refiner {
        ts.insert("cache".into(), r.cache.memory.clone());
        ts.insert("extractor".into(), r.extractor.as_tensor().detach());
        let t = &r.transform;
        for (k, v) in [("w1", &t.w1), ("b1", &t.b1), ("bn_w", &t.bn_w), ("bn_b", &t.bn_b), ("w2", &t.w2), ("b2", &t.b2)] {
            ts.insert(format!("local.{k}"), v.as_tensor().detach());
        }
        ts.insert("local.running_mean".into(), t.running_mean.clone());
        ts.insert("local.running_var".into(), t.running_var.clone());
    }
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        model: clip.source.clone(),
        projection_dim: clip.config.projection_dim,
        text_width: clip.config.text_config.hidden_size,
        class_names: trained.learner.class_names.clone(),
        config: trained.config.clone(),
        epochs_done: trained.epochs_done,
        metrics,
    };
    crate::util::save_safetensors_atomic(&st, &ts)?;
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::util::write_atomic(&js, &json)?;
    Ok(())
}

/// Load a checkpoint for `clip`; with `class_names`, the checkpoint's class list must match
/// when the context is class-specific.
pub fn load(stem: &Path, clip: &Clip, device: &Device) -> Result<(Trained, CheckpointMeta)> {
    let (st, js) = paths(stem);
    let text = std::fs::read_to_string(&js).map_err(|e| Error::io(&js, e))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| Error::weights(&js, format!("not a checkpoint description: {e}")))?;
    if meta.format != FORMAT {
        return Err(Error::weights(&js, format!("unknown checkpoint format {:?}", meta.format)));
    }
    let ts = crate::clip::weights::read_tensors(&st)?;
    from_tensors(&ts, meta.class_names.clone(), meta.config.clone(), meta.epochs_done, clip, device, &st).map(|t| (t, meta))
}

fn shape_err(path: &Path, what: &str, got: &[usize], want: &str, clip: &Clip) -> Error {
    Error::weights(
        path,
        format!(
            "{what} has shape {got:?} but this model needs {want} (model {} has a {}-d joint space and {}-wide text tower): the checkpoint was trained with another CLIP",
            clip.source, clip.config.projection_dim, clip.config.text_config.hidden_size
        ),
    )
}

/// Assemble a trained prompt from named tensors (our names), checking shapes against `clip`.
pub fn from_tensors(
    ts: &HashMap<String, Tensor>,
    class_names: Vec<String>,
    config: TrainConfig,
    epochs_done: usize,
    clip: &Clip,
    device: &Device,
    path: &Path,
) -> Result<Trained> {
    let d = clip.config.projection_dim;
    let w = clip.config.text_config.hidden_size;
    let get = |k: &str| -> Result<Tensor> {
        ts.get(k)
            .ok_or_else(|| Error::weights(path, format!("missing tensor {k}")))
            .and_then(|t| Ok(t.to_dtype(DType::F32)?.to_device(device)?))
    };
    let ctx = get("ctx")?;
    let cdims = ctx.dims().to_vec();
    if cdims.last() != Some(&w) || !(cdims.len() == 2 || cdims.len() == 3) {
        return Err(shape_err(path, "ctx", &cdims, &format!("[n_ctx, {w}] or [C, n_ctx, {w}]"), clip));
    }
    if cdims.len() == 3 && cdims[0] != class_names.len() {
        return Err(Error::weights(path, format!("class-specific ctx for {} classes but {} class names", cdims[0], class_names.len())));
    }
    let n_ctx = cdims[cdims.len() - 2];
    let tok = ClipTokenizer::new();
    let opts = CoopOptions { n_ctx, init: None, class_specific: cdims.len() == 3, ..config.coop.clone() };
    let mut learner = PromptLearner::new(clip, &tok, &class_names, &opts)?;
    learner.ctx = Var::from_tensor(&ctx)?;
    let refiner = if ts.contains_key("extractor") {
        let extractor = get("extractor")?;
        if extractor.dims() != [d, 2 * d] {
            return Err(shape_err(path, "extractor", extractor.dims(), &format!("[{d}, {}]", 2 * d), clip));
        }
        let cache = get("cache")?;
        if cache.dims().len() != 2 || cache.dims()[1] != d {
            return Err(shape_err(path, "cache", cache.dims(), &format!("[M, {d}]"), clip));
        }
        let v = |k: &str, shape: &[usize]| -> Result<Var> {
            let t = get(k)?;
            if t.dims() != shape {
                return Err(shape_err(path, k, t.dims(), &format!("{shape:?}"), clip));
            }
            Ok(Var::from_tensor(&t)?)
        };
        let transform = LocalTransform {
            w1: v("local.w1", &[d, d])?,
            b1: v("local.b1", &[d])?,
            bn_w: v("local.bn_w", &[d])?,
            bn_b: v("local.bn_b", &[d])?,
            w2: v("local.w2", &[d, d])?,
            b2: v("local.b2", &[d])?,
            running_mean: v("local.running_mean", &[d])?.as_tensor().clone(),
            running_var: v("local.running_var", &[d])?.as_tensor().clone(),
        };
        Some(Refiner {
            transform,
            cache: LocalCache::from_memory(crate::clip::l2_normalize(&cache)?),
            extractor: Var::from_tensor(&extractor)?,
            alpha: config.alpha,
        })
    } else {
        None
    };
    Ok(Trained { learner, refiner, config, epochs_done })
}
