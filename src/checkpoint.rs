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
    /// SHA-256 of the model's config and weights (the feature bank's key).
    #[serde(default)]
    pub model_sha256: Option<String>,
    pub projection_dim: usize,
    pub text_width: usize,
    pub class_names: Vec<String>,
    pub config: TrainConfig,
    pub epochs_done: usize,
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// SHA-256 of the tensors file written with this description (they must belong together).
    #[serde(default)]
    pub tensors_sha256: Option<String>,
}

const FORMAT: &str = "textrefiner-explorer/1";

fn paths(stem: &Path) -> (PathBuf, PathBuf) {
    (
        stem.with_extension("safetensors"),
        stem.with_extension("json"),
    )
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
        for (k, v) in [
            ("w1", &t.w1),
            ("b1", &t.b1),
            ("bn_w", &t.bn_w),
            ("bn_b", &t.bn_b),
            ("w2", &t.w2),
            ("b2", &t.b2),
        ] {
            ts.insert(format!("local.{k}"), v.as_tensor().detach());
        }
        ts.insert("local.running_mean".into(), t.running_mean.clone());
        ts.insert("local.running_var".into(), t.running_var.clone());
    }
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        model: clip.source.clone(),
        model_sha256: clip.identity_hash().ok(),
        projection_dim: clip.config.projection_dim,
        text_width: clip.config.text_config.hidden_size,
        class_names: trained.learner.class_names.clone(),
        config: trained.config.clone(),
        epochs_done: trained.epochs_done,
        metrics,
        tensors_sha256: None,
    };
    let tensors = crate::util::safetensors_bytes(&st, &ts)?;
    let meta = CheckpointMeta {
        tensors_sha256: Some(sha256_hex(&tensors)),
        ..meta
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Invalid(e.to_string()))?;
    // both files are written before either replaces its previous version
    crate::util::write_atomic_all(&[(&st, &tensors), (&js, &json)])?;
    Ok(())
}

/// Load a checkpoint for `clip`; with `class_names`, the checkpoint's class list must match
/// when the context is class-specific.
pub fn load(stem: &Path, clip: &Clip, device: &Device) -> Result<(Trained, CheckpointMeta)> {
    let (st, js) = paths(stem);
    let text = std::fs::read(&js).map_err(|e| Error::io(&js, e))?;
    let tensors = std::fs::read(&st).map_err(|e| Error::io(&st, e))?;
    load_bytes(&text, &tensors, &js, &st, clip, device)
}

/// [`load`] from the two files' bytes (`js`, `st` name them in errors).
pub fn load_bytes(text: &[u8], tensors: &[u8], js: &Path, st: &Path, clip: &Clip, device: &Device) -> Result<(Trained, CheckpointMeta)> {
    let meta: CheckpointMeta =
        serde_json::from_slice(text).map_err(|e| Error::weights(js, format!("not a checkpoint description: {e}")))?;
    if meta.format != FORMAT {
        return Err(Error::weights(js, format!("unknown checkpoint format {:?}", meta.format)));
    }
    let ts: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(tensors, &Device::Cpu)
        .map_err(|e| Error::weights(st, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
    if let Some(want) = &meta.tensors_sha256 {
        if &sha256_hex(tensors) != want {
            return Err(Error::weights(
                st,
                format!("does not belong to {} (its content changed since that description was written)", js.display()),
            ));
        }
    }
    from_tensors(&ts, meta.class_names.clone(), meta.config.clone(), meta.epochs_done, clip, device, st).map(|t| (t, meta))
}

/// The runs shipped with the embedded model: CoOp and CoOp + TextRefiner on the demo world
/// (`world`, 16 shots, seed 1, 4 views, the reference recipe), made by
/// `textrefiner-explorer train --method coop|coop-refiner --save assets/runs/world-...`.
pub fn shipped_runs(clip: &Clip, device: &Device) -> Result<(Trained, Trained)> {
    const COOP_JSON: &[u8] = include_bytes!("../assets/runs/world-coop.json");
    const COOP_ST: &[u8] = include_bytes!("../assets/runs/world-coop.safetensors");
    const REF_JSON: &[u8] = include_bytes!("../assets/runs/world-coop-refiner.json");
    const REF_ST: &[u8] = include_bytes!("../assets/runs/world-coop-refiner.safetensors");
    let p = |n: &str| PathBuf::from(format!("<embedded>/assets/runs/{n}"));
    let (coop, _) = load_bytes(COOP_JSON, COOP_ST, &p("world-coop.json"), &p("world-coop.safetensors"), clip, device)?;
    let (refined, _) = load_bytes(REF_JSON, REF_ST, &p("world-coop-refiner.json"), &p("world-coop-refiner.safetensors"), clip, device)?;
    Ok((coop, refined))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::data::dataset::hex(&sha2::Sha256::digest(bytes))
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
        return Err(shape_err(
            path,
            "ctx",
            &cdims,
            &format!("[n_ctx, {w}] or [C, n_ctx, {w}]"),
            clip,
        ));
    }
    if cdims.len() == 3 && cdims[0] != class_names.len() {
        return Err(Error::weights(
            path,
            format!(
                "class-specific ctx for {} classes but {} class names",
                cdims[0],
                class_names.len()
            ),
        ));
    }
    let n_ctx = cdims[cdims.len() - 2];
    let tok = ClipTokenizer::new();
    let opts = CoopOptions {
        n_ctx,
        init: None,
        class_specific: cdims.len() == 3,
        ..config.coop.clone()
    };
    let mut learner = PromptLearner::new(clip, &tok, &class_names, &opts)?;
    learner.ctx = Var::from_tensor(&ctx)?;
    let refiner = if ts.contains_key("extractor") {
        let extractor = get("extractor")?;
        if extractor.dims() != [d, 2 * d] {
            return Err(shape_err(
                path,
                "extractor",
                extractor.dims(),
                &format!("[{d}, {}]", 2 * d),
                clip,
            ));
        }
        let cache = get("cache")?;
        if cache.dims().len() != 2 || cache.dims()[1] != d {
            return Err(shape_err(
                path,
                "cache",
                cache.dims(),
                &format!("[M, {d}]"),
                clip,
            ));
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
    Ok(Trained {
        learner,
        refiner,
        config,
        epochs_done,
    })
}

/// Files of a reference PyTorch run (DATA.md): `prompt_learner/` and, for TextRefiner,
/// `Memory/`, each with `model-best.pth.tar` or `model.pth.tar-<epoch>`.
#[derive(Debug, Clone)]
pub struct ReferenceFiles {
    pub prompt_learner: PathBuf,
    pub memory: Option<PathBuf>,
}

/// The newest checkpoint in a reference sub-folder: `model-best.pth.tar` first, else the
/// highest `model.pth.tar-<epoch>`.
fn newest_in(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let best = dir.join("model-best.pth.tar");
    if best.is_file() {
        return Ok(Some(best));
    }
    let mut found: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let epoch = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("model.pth.tar-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(ep) = epoch {
            if found.as_ref().map(|(b, _)| ep > *b).unwrap_or(true) {
                found = Some((ep, p));
            }
        }
    }
    Ok(found.map(|f| f.1))
}

impl ReferenceFiles {
    /// `path`: a run folder (with `prompt_learner/`), a `prompt_learner/` folder, or a
    /// prompt-learner checkpoint file (the Memory file is looked up beside it).
    pub fn locate(path: &Path) -> Result<Self> {
        let (pl, run) = if path.is_file() {
            let run = path
                .parent()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf);
            (path.to_path_buf(), run)
        } else if path.join("prompt_learner").is_dir() {
            let pl = newest_in(&path.join("prompt_learner"))?.ok_or_else(|| {
                Error::weights(
                    path.join("prompt_learner"),
                    "no model-best.pth.tar or model.pth.tar-<epoch> in this folder",
                )
            })?;
            (pl, Some(path.to_path_buf()))
        } else if path
            .file_name()
            .map(|n| n == "prompt_learner")
            .unwrap_or(false)
        {
            let pl = newest_in(path)?.ok_or_else(|| {
                Error::weights(
                    path,
                    "no model-best.pth.tar or model.pth.tar-<epoch> in this folder",
                )
            })?;
            (pl, path.parent().map(Path::to_path_buf))
        } else {
            return Err(Error::weights(
                path,
                "not a reference run: expected a folder with prompt_learner/ (and Memory/) holding model.pth.tar-<epoch> or model-best.pth.tar",
            ));
        };
        let memory = match run {
            Some(run) => {
                // prefer the Memory file of the same epoch as the prompt learner
                let same = run.join("Memory").join(pl.file_name().unwrap_or_default());
                if same.is_file() {
                    Some(same)
                } else {
                    newest_in(&run.join("Memory"))?
                }
            }
            None => None,
        };
        Ok(Self {
            prompt_learner: pl,
            memory,
        })
    }
}

fn find_suffix<'a>(ts: &'a HashMap<String, Tensor>, suffix: &str) -> Option<&'a Tensor> {
    ts.get(suffix).or_else(|| {
        ts.iter()
            .find(|(k, _)| k.ends_with(&format!(".{suffix}")))
            .map(|(_, v)| v)
    })
}

fn read_pth(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let v = candle_core::pickle::read_all_with_key(path, key)
        .map_err(|e| Error::weights(path, format!("not a readable PyTorch checkpoint ({e})")))?;
    Ok(v.into_iter().collect())
}

/// Import a reference PyTorch run (CoOp or CoOp + TextRefiner as the reference code saves it)
/// for `class_names` (the classes it was trained on, in label order). The context is at
/// `prompt_learner.ctx`; the local transform at `mid_image_trans.conv1.{0,1,3}.*` (1x1
/// convolution weights `[d, d, 1, 1]`); the cache at `memory_item` (fp16) and the extractor
/// at `extractor.weight` in the Memory file. Frozen CLIP weights and token buffers are ignored,
/// except `token_prefix` whose first dimension tells how many classes the run had.
pub fn import_reference(
    path: &Path,
    clip: &Clip,
    class_names: Vec<String>,
    device: &Device,
) -> Result<Trained> {
    let files = ReferenceFiles::locate(path)?;
    let pl_path = &files.prompt_learner;
    let sd = read_pth(pl_path, Some("state_dict"))?;
    let ctx = find_suffix(&sd, "ctx")
        .ok_or_else(|| Error::weights(pl_path, "no prompt_learner.ctx in the state_dict: is this a CoOp / TextRefiner prompt-learner checkpoint?"))?;
    if let Some(prefix) = find_suffix(&sd, "token_prefix") {
        let c = prefix.dim(0)?;
        if c != class_names.len() {
            return Err(Error::weights(
                pl_path,
                format!("the run was trained on {c} classes but {} class names were given (pick the dataset and base/new subset it was trained on)", class_names.len()),
            ));
        }
    }
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    ts.insert("ctx".into(), ctx.clone());
    let d = clip.config.projection_dim;
    let mut config = TrainConfig {
        method: crate::train::Method::Coop,
        ..TrainConfig::default()
    };
    if let Some(mem_path) = &files.memory {
        let top = read_pth(mem_path, None)?;
        let msd = read_pth(mem_path, Some("state_dict")).unwrap_or_default();
        let cache = top.get("memory_item").ok_or_else(|| {
            Error::weights(
                mem_path,
                "no memory_item (the local cache) in this Memory checkpoint",
            )
        })?;
        let extractor = find_suffix(&msd, "extractor.weight")
            .ok_or_else(|| Error::weights(mem_path, "no extractor.weight in the state_dict"))?;
        ts.insert("cache".into(), cache.clone());
        ts.insert("extractor".into(), extractor.clone());
        let conv = |k: &str| -> Result<Tensor> {
            let key = format!("mid_image_trans.conv1.{k}");
            let t = find_suffix(&sd, &key).ok_or_else(|| {
                Error::weights(
                    pl_path,
                    format!("no {key} (TextRefiner's local transform) in the state_dict"),
                )
            })?;
            // 1x1 convolution weights [out, in, 1, 1] are linear weights [out, in]
            Ok(if t.rank() == 4 {
                t.flatten_from(1)?
            } else {
                t.clone()
            })
        };
        for (ours, theirs) in [
            ("w1", "0.weight"),
            ("b1", "0.bias"),
            ("bn_w", "1.weight"),
            ("bn_b", "1.bias"),
            ("running_mean", "1.running_mean"),
            ("running_var", "1.running_var"),
            ("w2", "3.weight"),
            ("b2", "3.bias"),
        ] {
            ts.insert(format!("local.{ours}"), conv(theirs)?);
        }
        config.method = crate::train::Method::CoopRefiner;
        config.cache_size = cache.dim(0)?;
        let _ = d;
    }
    let epoch = pl_path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("model.pth.tar-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    from_tensors(&ts, class_names, config, epoch, clip, device, pl_path)
}

/// Load ours (`STEM`, `STEM.json` or `STEM.safetensors`) or import a reference run, whichever
/// `path` is. Reference runs need the class names they were trained on.
pub fn load_any(
    path: &Path,
    clip: &Clip,
    reference_classes: Option<Vec<String>>,
    device: &Device,
) -> Result<Trained> {
    let stem = match path.extension().and_then(|e| e.to_str()) {
        Some("json") | Some("safetensors") => path.with_extension(""),
        _ => path.to_path_buf(),
    };
    if stem.with_extension("json").is_file() {
        return load(&stem, clip, device).map(|t| t.0);
    }
    match reference_classes {
        Some(names) => import_reference(path, clip, names, device),
        None => Err(Error::weights(path, "not a checkpoint of ours (STEM.json + STEM.safetensors) and no class names given for a reference run")),
    }
}

/// Check that a trained prompt was trained on `expected` (the dataset's classes in label
/// order), naming the first difference.
pub fn check_classes(trained: &Trained, expected: &[String], path: &Path) -> Result<()> {
    let got = &trained.learner.class_names;
    if got.as_slice() == expected {
        return Ok(());
    }
    let detail = if got.len() != expected.len() {
        format!("it has {} classes, the data {}", got.len(), expected.len())
    } else {
        let i = got
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        format!(
            "class {i} is {:?} in the checkpoint but {:?} in the data",
            got[i], expected[i]
        )
    };
    Err(Error::weights(
        path,
        format!("the checkpoint was trained on other classes than these: {detail}"),
    ))
}
