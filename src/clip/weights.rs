//! Finding and reading CLIP weights: a local model folder, a single state-dict file, or a
//! Hugging Face hub id (through the hf-hub cache, downloading when online). Reads
//! `model.safetensors` (also sharded), `pytorch_model.bin`, and open_clip / OpenAI state dicts,
//! and renames OpenAI / open_clip keys (`visual.transformer.resblocks.N.attn.in_proj_weight`,
//! ...) to Hugging Face names, the one naming the model code reads.
//!
//! The key correspondence is a fact of the two public formats (transformers'
//! `convert_clip_original_pytorch_to_hf.py` documents the same mapping).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::ClipConfig;
use crate::error::{Error, Result};

/// Key naming of a state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    HuggingFace,
    OpenAi,
}

/// The files that make up a model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named (folder, file or hub id), for messages and identity.
    pub spec: String,
    pub hf_config: Option<PathBuf>,
    pub open_clip_config: Option<PathBuf>,
    /// One or more weight files (several for sharded safetensors).
    pub weights: Vec<PathBuf>,
}

/// Candidate weight file names in a model folder, in order of preference.
const WEIGHT_FILES: &[&str] = &[
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
];

impl ModelFiles {
    /// Resolve a local folder or file.
    pub fn from_path(path: &Path) -> Result<Self> {
        let spec = path.display().to_string();
        if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Ok(Self {
                spec,
                hf_config: Some(dir.join("config.json")).filter(|p| p.is_file()),
                open_clip_config: Some(dir.join("open_clip_config.json")).filter(|p| p.is_file()),
                weights: vec![path.to_path_buf()],
            });
        }
        if !path.is_dir() {
            return Err(Error::model(path, "no such folder or file"));
        }
        let hf_config = Some(path.join("config.json")).filter(|p| p.is_file());
        let open_clip_config = Some(path.join("open_clip_config.json")).filter(|p| p.is_file());
        let index = path.join("model.safetensors.index.json");
        let weights = if index.is_file() {
            shards_from_index(&index)?
        } else if let Some(w) = WEIGHT_FILES
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
        {
            vec![w]
        } else {
            let found: Vec<String> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .take(12)
                .collect();
            return Err(Error::model(
                path,
                format!(
                    "no CLIP weights in this folder: expected one of {} (found: {})",
                    WEIGHT_FILES.join(", "),
                    if found.is_empty() {
                        "nothing".to_string()
                    } else {
                        found.join(", ")
                    }
                ),
            ));
        };
        Ok(Self {
            spec,
            hf_config,
            open_clip_config,
            weights,
        })
    }

    /// Resolve a hub id through the hf-hub cache at `cache_dir` (default: `HF_HOME` or
    /// `~/.cache/huggingface/hub`). Files already cached are used without network access;
    /// missing ones are downloaded unless `HF_HUB_OFFLINE` is set.
    pub fn from_hub(id: &str, cache_dir: Option<PathBuf>) -> Result<Self> {
        let cache = match &cache_dir {
            Some(d) => hf_hub::Cache::new(d.clone()),
            None => hf_hub::Cache::from_env(),
        };
        let cached = cache.model(id.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
            .unwrap_or(false);
        let api = if offline {
            None
        } else {
            hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                .with_progress(true)
                .build()
                .ok()
        };
        let mut errors = Vec::new();
        let mut get = |file: &str| -> Option<PathBuf> {
            if let Some(p) = cached.get(file) {
                return Some(p);
            }
            let api = api.as_ref()?;
            match api.model(id.to_string()).get(file) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.push(format!("{file}: {e}"));
                    None
                }
            }
        };
        let hf_config = get("config.json");
        let mut weights = None;
        for f in WEIGHT_FILES {
            if let Some(p) = get(f) {
                weights = Some(p);
                break;
            }
        }
        let open_clip_config = if hf_config.is_none() {
            get("open_clip_config.json")
        } else {
            None
        };
        match weights {
            Some(w) => Ok(Self {
                spec: id.to_string(),
                hf_config,
                open_clip_config,
                weights: vec![w],
            }),
            None => Err(Error::Hub {
                id: id.to_string(),
                msg: format!(
                    "not in the local hub cache ({}) and {}",
                    cache.path().display(),
                    if offline {
                        "HF_HUB_OFFLINE is set, so nothing was downloaded".to_string()
                    } else if errors.is_empty() {
                        "the hub could not be reached".to_string()
                    } else {
                        format!(
                            "downloading failed: {}",
                            errors.first().cloned().unwrap_or_default()
                        )
                    }
                ),
            }),
        }
    }

    /// A folder or file if it exists, else a hub id if it looks like one (`owner/name`).
    pub fn resolve(spec: &str, hub_cache: Option<PathBuf>) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_path(path);
        }
        if looks_like_hub_id(spec) {
            return Self::from_hub(spec, hub_cache);
        }
        Err(Error::model(
            path,
            "no such folder or file (and not a hub id of the form owner/name)",
        ))
    }
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::weights(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::weights(index, "no weight_map"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Read every tensor of one weights file (safetensors or PyTorch pickle), in its own dtype.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() == 0 {
        return Err(Error::weights(path, "the file is empty (0 bytes)"));
    }
    let is_safetensors = path
        .extension()
        .map(|e| e == "safetensors")
        .unwrap_or(false);
    if is_safetensors {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // Validate first for a precise message on truncated or corrupt files.
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::weights(
                path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::weights(path, format!("cannot read tensors: {e}")))
    } else {
        read_pickle(path)
    }
}

/// PyTorch zip checkpoints: a bare state dict or one under `state_dict` / `model`.
fn read_pickle(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut last_err = None;
    for key in [None, Some("state_dict"), Some("model")] {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(pth) => {
                let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                if names.is_empty() {
                    continue;
                }
                let mut out = HashMap::with_capacity(names.len());
                for name in names {
                    match pth.get(&name) {
                        Ok(Some(t)) => {
                            out.insert(name, t);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return Err(Error::weights(
                                path,
                                format!("cannot read tensor {name}: {e}"),
                            ))
                        }
                    }
                }
                return Ok(out);
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(Error::weights(
        path,
        match last_err {
            Some(e) => format!("not a readable PyTorch checkpoint (zip pickle): {e}"),
            None => "the checkpoint holds no tensors".to_string(),
        },
    ))
}

/// Detect the naming of a state dict, rejecting architectures we do not support.
pub fn detect_naming(keys: &HashMap<String, Tensor>, path: &Path) -> Result<Naming> {
    if keys.contains_key("vision_model.embeddings.patch_embedding.weight") {
        if !keys.contains_key("text_model.embeddings.token_embedding.weight") {
            return Err(Error::weights(
                path,
                "a vision-only CLIP (CLIPVisionModel): the explorer needs both towers",
            ));
        }
        return Ok(Naming::HuggingFace);
    }
    if keys.contains_key("visual.conv1.weight") && keys.contains_key("visual.class_embedding") {
        return Ok(Naming::OpenAi);
    }
    if keys
        .keys()
        .any(|k| k.starts_with("visual.layer1.") || k.starts_with("visual.attnpool."))
    {
        return Err(Error::weights(
            path,
            "a ResNet CLIP (ModifiedResNet): only ViT CLIP models are supported",
        ));
    }
    let sample: Vec<&String> = keys.keys().take(5).collect();
    Err(Error::weights(
        path,
        format!("not a CLIP ViT state dict (neither Hugging Face nor OpenAI/open_clip key names; keys look like {sample:?})"),
    ))
}

/// Strip wrappers some trainers add (`module.`, `model.`) when they prefix every key.
pub fn strip_prefixes(mut ts: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    for prefix in ["module.", "model.", "clip."] {
        if !ts.is_empty() && ts.keys().all(|k| k.starts_with(prefix)) {
            ts = ts
                .into_iter()
                .map(|(k, v)| (k[prefix.len()..].to_string(), v))
                .collect();
        }
    }
    ts
}

fn count_blocks(ts: &HashMap<String, Tensor>, prefix: &str) -> usize {
    ts.keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|n| n.parse::<usize>().ok())
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// Infer a config from an OpenAI state dict (heads from width / 64, as OpenAI's
/// `build_model` does; quick GELU as OpenAI's models use).
pub fn infer_openai_config(ts: &HashMap<String, Tensor>, path: &Path) -> Result<ClipConfig> {
    let dims = |k: &str| -> Result<Vec<usize>> {
        ts.get(k)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| Error::weights(path, format!("missing tensor {k}")))
    };
    let conv = dims("visual.conv1.weight")?;
    let vpos = dims("visual.positional_embedding")?;
    let tok = dims("token_embedding.weight")?;
    let tpos = dims("positional_embedding")?;
    let tproj = dims("text_projection")?;
    if conv.len() != 4 || vpos.len() != 2 || tok.len() != 2 || tpos.len() != 2 || tproj.len() != 2 {
        return Err(Error::weights(
            path,
            "unexpected tensor ranks for an OpenAI CLIP state dict",
        ));
    }
    let vw = conv[0];
    let patch = conv[3];
    let grid = ((vpos[0] - 1) as f64).sqrt().round() as usize;
    let tw = tok[1];
    let mlp = |prefix: &str, w: usize| -> usize {
        ts.get(&format!("{prefix}0.mlp.c_fc.weight"))
            .map(|t| t.dims()[0])
            .unwrap_or(4 * w)
    };
    let mut cfg = ClipConfig::default();
    cfg.vision_config.hidden_size = vw;
    cfg.vision_config.patch_size = patch;
    cfg.vision_config.image_size = grid * patch;
    cfg.vision_config.num_hidden_layers = count_blocks(ts, "visual.transformer.resblocks.");
    cfg.vision_config.num_attention_heads = (vw / 64).max(1);
    cfg.vision_config.intermediate_size = mlp("visual.transformer.resblocks.", vw);
    cfg.text_config.hidden_size = tw;
    cfg.text_config.vocab_size = tok[0];
    cfg.text_config.max_position_embeddings = tpos[0];
    cfg.text_config.num_hidden_layers = count_blocks(ts, "transformer.resblocks.");
    cfg.text_config.num_attention_heads = (tw / 64).max(1);
    cfg.text_config.intermediate_size = mlp("transformer.resblocks.", tw);
    cfg.text_config.eos_token_id = 2; // arg-max pooling, as OpenAI's encode_text
    cfg.projection_dim = tproj[1];
    cfg.validate()
        .map_err(|m| Error::weights(path, format!("inferred config is invalid: {m}")))?;
    Ok(cfg)
}

/// Rename an OpenAI / open_clip state dict to Hugging Face names. Fused `in_proj` weights are
/// split into q/k/v; `proj` / `text_projection` (`x @ P`) are transposed to linear weights.
pub fn openai_to_hf(ts: HashMap<String, Tensor>, path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(ts.len() + 64);
    let wrap =
        |e: candle_core::Error| Error::weights(path, format!("while renaming OpenAI keys: {e}"));
    for (k, t) in ts {
        let new_key = |s: &str| Some(s.to_string());
        let mapped: Option<String> = match k.as_str() {
            "visual.class_embedding" => new_key("vision_model.embeddings.class_embedding"),
            "visual.conv1.weight" => new_key("vision_model.embeddings.patch_embedding.weight"),
            "visual.positional_embedding" => {
                new_key("vision_model.embeddings.position_embedding.weight")
            }
            "visual.ln_pre.weight" => new_key("vision_model.pre_layrnorm.weight"),
            "visual.ln_pre.bias" => new_key("vision_model.pre_layrnorm.bias"),
            "visual.ln_post.weight" => new_key("vision_model.post_layernorm.weight"),
            "visual.ln_post.bias" => new_key("vision_model.post_layernorm.bias"),
            "token_embedding.weight" => new_key("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => new_key("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => new_key("text_model.final_layer_norm.weight"),
            "ln_final.bias" => new_key("text_model.final_layer_norm.bias"),
            "logit_scale" => new_key("logit_scale"),
            "visual.proj" => {
                out.insert(
                    "visual_projection.weight".to_string(),
                    t.t().and_then(|x| x.contiguous()).map_err(wrap)?,
                );
                None
            }
            "text_projection" => {
                out.insert(
                    "text_projection.weight".to_string(),
                    t.t().and_then(|x| x.contiguous()).map_err(wrap)?,
                );
                None
            }
            _ => {
                let (hf_prefix, rest) =
                    if let Some(r) = k.strip_prefix("visual.transformer.resblocks.") {
                        ("vision_model.encoder.layers.", r)
                    } else if let Some(r) = k.strip_prefix("transformer.resblocks.") {
                        ("text_model.encoder.layers.", r)
                    } else {
                        continue; // unused keys (attn_mask buffers, ...)
                    };
                let (idx, name) = rest.split_once('.').unwrap_or((rest, ""));
                let base = format!("{hf_prefix}{idx}.");
                match name {
                    "attn.in_proj_weight" | "attn.in_proj_bias" => {
                        let kind = if name.ends_with("weight") {
                            "weight"
                        } else {
                            "bias"
                        };
                        let n = t.dim(0).map_err(wrap)? / 3;
                        for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            let part = t
                                .narrow(0, i * n, n)
                                .and_then(|x| x.contiguous())
                                .map_err(wrap)?;
                            out.insert(format!("{base}self_attn.{p}.{kind}"), part);
                        }
                        None
                    }
                    _ => {
                        let hf_name = match name {
                            "attn.out_proj.weight" => "self_attn.out_proj.weight",
                            "attn.out_proj.bias" => "self_attn.out_proj.bias",
                            "ln_1.weight" => "layer_norm1.weight",
                            "ln_1.bias" => "layer_norm1.bias",
                            "ln_2.weight" => "layer_norm2.weight",
                            "ln_2.bias" => "layer_norm2.bias",
                            "mlp.c_fc.weight" => "mlp.fc1.weight",
                            "mlp.c_fc.bias" => "mlp.fc1.bias",
                            "mlp.c_proj.weight" => "mlp.fc2.weight",
                            "mlp.c_proj.bias" => "mlp.fc2.bias",
                            _ => continue,
                        };
                        Some(format!("{base}{hf_name}"))
                    }
                }
            }
        };
        if let Some(m) = mapped {
            out.insert(m, t);
        }
    }
    Ok(out)
}

/// Convert every tensor to `dtype` (weights are often stored in f16).
pub fn to_dtype(
    ts: HashMap<String, Tensor>,
    dtype: DType,
) -> candle_core::Result<HashMap<String, Tensor>> {
    ts.into_iter()
        .map(|(k, t)| {
            Ok((
                k,
                if t.dtype() == dtype {
                    t
                } else {
                    t.to_dtype(dtype)?
                },
            ))
        })
        .collect()
}
