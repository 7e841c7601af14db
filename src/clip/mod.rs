//! CLIP, our own implementation in candle: config, vision and text towers, weight loading
//! (Hugging Face and OpenAI/open_clip key names, local folders and the hub), the OpenAI BPE
//! tokenizer and CLIP's image preprocessing.

pub mod config;
pub mod kernels;
pub mod layers;
pub mod preprocess;
pub mod profile;
pub mod random;
pub mod text;
pub mod tokenizer;
pub mod train_ops;
pub mod vision;
pub mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{Activation, ClipConfig, TextConfig, VisionConfig};
pub use text::TextTransformer;
pub use vision::{l2_normalize, VisionOptions, VisionOutput, VisionTransformer};
pub use weights::{ModelFiles, Naming};

use crate::error::{Error, Result};

/// Zero-shot probabilities from cosine similarities: softmax over `logit_scale * cosine`.
pub fn softmax_scaled(cosine: &[f32], logit_scale: f32) -> Vec<f32> {
    let logits: Vec<f32> = cosine.iter().map(|c| c * logit_scale).collect();
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// The model spec that names the embedded tiny CLIP.
pub const EMBEDDED: &str = "embedded";

/// A loaded CLIP model (both towers, f32).
#[derive(Debug, Clone)]
pub struct Clip {
    pub config: ClipConfig,
    pub vision: VisionTransformer,
    pub text: TextTransformer,
    /// `exp(logit_scale)` (100 for OpenAI weights).
    pub logit_scale: f32,
    /// What the model was loaded from (folder, file or hub id).
    pub source: String,
    pub naming: Naming,
    /// What identifies these weights (for the feature bank); hashed on first use.
    pub identity: Identity,
}

/// What a model's identity hash is computed from.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Compiled-in weights.
    Bytes(&'static [u8]),
    /// Weight files on disk (hashed by content).
    Files(Vec<PathBuf>),
    /// A model made in memory (random init, pretraining): its description.
    Named(String),
}

impl Clip {
    /// SHA-256 (hex) over the config and the weights' content: the key of cached features.
    /// Hashing a ViT-B/16 checkpoint reads its 600 MB once per process (memoised).
    pub fn identity_hash(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::sync::{Mutex, OnceLock};
        static MEMO: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.config).unwrap_or_default());
        let memo_key = match &self.identity {
            Identity::Bytes(b) => {
                h.update(b);
                None
            }
            Identity::Named(n) => {
                h.update(n.as_bytes());
                None
            }
            Identity::Files(files) => {
                let key = format!("{files:?}");
                if let Some(v) = MEMO
                    .get_or_init(Default::default)
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&key).cloned())
                {
                    return Ok(v);
                }
                for f in files {
                    let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
                    std::io::copy(&mut file, &mut h).map_err(|e| Error::io(f, e))?;
                }
                Some(key)
            }
        };
        let v = crate::data::dataset::hex(&h.finalize());
        if let (Some(k), Ok(mut m)) = (memo_key, MEMO.get_or_init(Default::default).lock()) {
            m.insert(k, v.clone());
        }
        Ok(v)
    }
}

impl Clip {
    /// Build from Hugging Face-named tensors (`vb` at the model root).
    pub fn from_varbuilder(
        vb: VarBuilder,
        config: &ClipConfig,
    ) -> candle_core::Result<(VisionTransformer, TextTransformer, f32)> {
        let vision =
            VisionTransformer::load(vb.clone(), &config.vision_config, config.projection_dim)?;
        let text = TextTransformer::load(vb.clone(), &config.text_config, config.projection_dim)?;
        let logit_scale = match vb.get((), "logit_scale") {
            Ok(t) => t.to_scalar::<f32>()?.exp(),
            Err(_) => (config.logit_scale_init_value as f32).exp(),
        };
        Ok((vision, text, logit_scale))
    }

    /// Build from a state dict in either naming plus a config. `path` names the weights in
    /// messages.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        config: &ClipConfig,
        naming: Naming,
        device: &Device,
        path: &Path,
        source: &str,
    ) -> Result<Self> {
        let tensors = match naming {
            Naming::HuggingFace => tensors,
            Naming::OpenAi => weights::openai_to_hf(tensors, path)?,
        };
        let tensors = weights::to_dtype(tensors, DType::F32)?;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let (vision, text, logit_scale) = Self::from_varbuilder(vb, config).map_err(|e| {
            Error::weights(
                path,
                format!("the weights do not fit the config ({e}); is the config for this model?"),
            )
        })?;
        Ok(Self {
            config: config.clone(),
            vision,
            text,
            logit_scale,
            source: source.to_string(),
            naming,
            identity: Identity::Named(source.to_string()),
        })
    }

    /// Load a model named by a folder, a weights file or a hub id; `embedded` names the tiny
    /// CLIP compiled into the binary (assets/tiny-clip).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        if spec == EMBEDDED {
            return Self::load_embedded(device);
        }
        Self::load_with_cache(spec, device, None)
    }

    /// The embedded tiny CLIP (trained on the demo world by `pretrain`, shipped in
    /// assets/tiny-clip and compiled into the binary), through the ordinary loading path.
    pub fn load_embedded(device: &Device) -> Result<Self> {
        const CONFIG: &[u8] = include_bytes!("../../assets/tiny-clip/config.json");
        const WEIGHTS: &[u8] = include_bytes!("../../assets/tiny-clip/model.safetensors");
        let path = Path::new("<embedded>/assets/tiny-clip/model.safetensors");
        let config: ClipConfig = serde_json::from_slice(CONFIG)
            .map_err(|e| Error::config("<embedded>/assets/tiny-clip/config.json", e.to_string()))?;
        let tensors = candle_core::safetensors::load_buffer(WEIGHTS, &Device::Cpu)
            .map_err(|e| Error::weights(path, e.to_string()))?;
        let mut clip = Self::from_tensors(
            tensors,
            &config,
            Naming::HuggingFace,
            device,
            path,
            EMBEDDED,
        )?;
        clip.identity = Identity::Bytes(WEIGHTS);
        Ok(clip)
    }

    /// As [`Clip::load`], with an explicit hub cache folder.
    pub fn load_with_cache(
        spec: &str,
        device: &Device,
        hub_cache: Option<PathBuf>,
    ) -> Result<Self> {
        let files = ModelFiles::resolve(spec, hub_cache)?;
        Self::load_files(&files, device)
    }

    pub fn load_files(files: &ModelFiles, device: &Device) -> Result<Self> {
        let first = files
            .weights
            .first()
            .ok_or_else(|| Error::model(&files.spec, "no weight files"))?;
        let mut tensors = HashMap::new();
        for w in &files.weights {
            tensors.extend(weights::read_tensors(w)?);
        }
        let tensors = weights::strip_prefixes(tensors);
        let naming = weights::detect_naming(&tensors, first)?;
        let config = match naming {
            Naming::HuggingFace => match &files.hf_config {
                Some(c) => ClipConfig::from_hf_json(c)?,
                None => {
                    return Err(Error::model(
                        first.parent().unwrap_or(Path::new(".")),
                        "Hugging Face weights need the model's config.json beside them, and there is none",
                    ))
                }
            },
            Naming::OpenAi => match (&files.open_clip_config, &files.hf_config) {
                (Some(c), _) => ClipConfig::from_open_clip_json(c)?,
                _ => weights::infer_openai_config(&tensors, first)?,
            },
        };
        let mut clip = Self::from_tensors(tensors, &config, naming, device, first, &files.spec)?;
        clip.identity = Identity::Files(files.weights.clone());
        Ok(clip)
    }

    pub fn device(&self) -> &Device {
        self.text.token_embedding().device()
    }

    /// Image size the vision tower expects.
    pub fn image_size(&self) -> usize {
        self.config.vision_config.image_size
    }
}
