//! CLIP configuration, read from a Hugging Face `config.json` (with the Hugging Face defaults
//! for every missing field) or from an open_clip `open_clip_config.json`, or inferred from the
//! shapes of an OpenAI state dict when no config file exists.
//!
//! Defaults follow `transformers.CLIPTextConfig`, `CLIPVisionConfig` and `CLIPConfig`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

/// Activation used in the MLP of each transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI's CLIP.
    QuickGelu,
    /// Exact GELU (erf), used by open_clip models trained without `-quickgelu`.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    Gelu,
}

fn d_quick_gelu() -> Activation {
    Activation::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}

/// Text tower (`transformers.CLIPTextConfig` defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "d_text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_text_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_text_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_bos")]
    pub bos_token_id: i64,
    /// 2 in configs written before transformers PR #24773: then the EOT is the arg-max id.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
}
fn d_text_vocab() -> usize {
    49408
}
fn d_text_hidden() -> usize {
    512
}
fn d_text_inter() -> usize {
    2048
}
fn d_text_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_text_pos() -> usize {
    77
}
fn d_bos() -> i64 {
    49406
}
fn d_eos() -> i64 {
    49407
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: d_text_vocab(),
            hidden_size: d_text_hidden(),
            intermediate_size: d_text_inter(),
            num_hidden_layers: d_text_layers(),
            num_attention_heads: d_text_heads(),
            max_position_embeddings: d_text_pos(),
            hidden_act: d_quick_gelu(),
            layer_norm_eps: d_eps(),
            bos_token_id: d_bos(),
            eos_token_id: d_eos(),
        }
    }
}

/// Vision tower (`transformers.CLIPVisionConfig` defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_vis_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vis_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_vis_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vis_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}
fn d_vis_hidden() -> usize {
    768
}
fn d_vis_inter() -> usize {
    3072
}
fn d_vis_layers() -> usize {
    12
}
fn d_vis_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: d_vis_hidden(),
            intermediate_size: d_vis_inter(),
            num_hidden_layers: d_vis_layers(),
            num_attention_heads: d_vis_heads(),
            num_channels: d_channels(),
            image_size: d_image(),
            patch_size: d_patch(),
            hidden_act: d_quick_gelu(),
            layer_norm_eps: d_eps(),
        }
    }
}

impl VisionConfig {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// Whole model (`transformers.CLIPConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
}
fn d_proj() -> usize {
    512
}
fn d_logit_scale() -> f64 {
    2.6592
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: d_proj(),
            logit_scale_init_value: d_logit_scale(),
        }
    }
}

impl ClipConfig {
    /// Parse a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        if let Some(mt) = raw.get("model_type").and_then(|v| v.as_str()) {
            if mt != "clip" {
                return Err(Error::config(
                    path,
                    format!("model_type is \"{mt}\", expected \"clip\" (a CLIPModel config.json)"),
                ));
            }
        }
        // Configs written by early transformers versions carry `text_config_dict` /
        // `vision_config_dict`, which transformers lets override `text_config` / `vision_config`.
        let mut raw = raw;
        for (dict_key, key) in [
            ("text_config_dict", "text_config"),
            ("vision_config_dict", "vision_config"),
        ] {
            if let Some(serde_json::Value::Object(over)) = raw.get(dict_key).cloned() {
                let entry = raw
                    .as_object_mut()
                    .map(|o| o.entry(key).or_insert_with(|| serde_json::json!({})));
                if let Some(serde_json::Value::Object(base)) = entry {
                    for (k, v) in over {
                        base.insert(k, v);
                    }
                }
            }
        }
        let cfg: ClipConfig = serde_json::from_value(raw)
            .map_err(|e| Error::config(path, format!("cannot read CLIP config: {e}")))?;
        cfg.validate().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// Parse an open_clip `open_clip_config.json` (`{"model_cfg": {...}}`) or a bare open_clip
    /// model config (`{"embed_dim", "vision_cfg", "text_cfg"}`). Defaults follow open_clip's
    /// `CLIPVisionCfg` / `CLIPTextCfg`.
    pub fn from_open_clip_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        let m = raw.get("model_cfg").unwrap_or(&raw);
        let err = |msg: &str| Error::config(path, msg.to_string());
        let vc = m.get("vision_cfg").ok_or_else(|| err("no vision_cfg"))?;
        let tc = m.get("text_cfg").ok_or_else(|| err("no text_cfg"))?;
        if vc
            .get("timm_model_name")
            .map(|v| !v.is_null())
            .unwrap_or(false)
        {
            return Err(err("timm vision towers are not supported (ViT CLIP only)"));
        }
        if vc.get("layers").map(|v| v.is_array()).unwrap_or(false) {
            return Err(err(
                "ResNet (ModifiedResNet) vision towers are not supported: ViT CLIP only",
            ));
        }
        let u = |v: &serde_json::Value, k: &str, d: usize| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(d)
        };
        let f =
            |v: &serde_json::Value, k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let quick = m
            .get("quick_gelu")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let act = if quick {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let vw = u(vc, "width", 768);
        let head_width = u(vc, "head_width", 64);
        let tw = u(tc, "width", 512);
        let vocab = u(tc, "vocab_size", 49408);
        let cfg = ClipConfig {
            vision_config: VisionConfig {
                hidden_size: vw,
                intermediate_size: (vw as f64 * f(vc, "mlp_ratio", 4.0)) as usize,
                num_hidden_layers: u(vc, "layers", 12),
                num_attention_heads: vw / head_width.max(1),
                num_channels: 3,
                image_size: u(vc, "image_size", 224),
                patch_size: u(vc, "patch_size", 16),
                hidden_act: act,
                layer_norm_eps: 1e-5,
            },
            text_config: TextConfig {
                vocab_size: vocab,
                hidden_size: tw,
                intermediate_size: (tw as f64 * f(tc, "mlp_ratio", 4.0)) as usize,
                num_hidden_layers: u(tc, "layers", 12),
                num_attention_heads: u(tc, "heads", 8),
                max_position_embeddings: u(tc, "context_length", 77),
                hidden_act: act,
                layer_norm_eps: 1e-5,
                bos_token_id: vocab as i64 - 2,
                // open_clip pools at the arg-max token id (pool_type "argmax").
                eos_token_id: 2,
            },
            projection_dim: u(m, "embed_dim", 512),
            logit_scale_init_value: 2.6592,
        };
        cfg.validate().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// Sanity checks that keep the model code from panicking on absurd configs.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(format!(
                "image_size {} / patch_size {} is not a valid ViT",
                v.image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
            return Err(format!(
                "vision hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads != 0 {
            return Err(format!(
                "text hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if self.projection_dim == 0 || t.max_position_embeddings < 3 {
            return Err("projection_dim must be > 0 and the text context at least 3 tokens".into());
        }
        Ok(())
    }
}
