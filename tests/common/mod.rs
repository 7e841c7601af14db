#![allow(dead_code)]
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Relative L2 error ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}

pub fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

/// The tiny HF fixture with its token embedding widened to OpenAI's 49408-token vocabulary
/// (extra rows random), written to a temp folder: for tests that tokenize real text.
pub fn tiny_model_full_vocab() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("clip/hf");
    let mut ts =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let key = "text_model.embeddings.token_embedding.weight";
    let emb = ts[key].clone();
    let (v, w) = emb.dims2().unwrap();
    let extra = Tensor::randn(0f32, 0.2, (49408 - v, w), &Device::Cpu).unwrap();
    ts.insert(key.to_string(), Tensor::cat(&[&emb, &extra], 0).unwrap());
    candle_core::safetensors::save(&ts, dir.path().join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    let cfg = cfg
        .replace("\"vocab_size\": 1000", "\"vocab_size\": 49408")
        .replace("\"eos_token_id\": 999", "\"eos_token_id\": 49407")
        .replace("\"bos_token_id\": 998", "\"bos_token_id\": 49406");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    dir
}
