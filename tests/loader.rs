//! The loader on the real architectures' shapes (ViT-B/32, ViT-B/16, ViT-L/14; manifests of
//! key -> shape written by tests/fixtures/clip/make_fixtures.py from transformers on the meta
//! device), in both key namings, and hub ids through a local hf-hub cache.
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use textrefiner_explorer::clip::{weights, Clip, ClipConfig, ModelFiles, Naming};

fn manifest(name: &str) -> serde_json::Value {
    let p = common::fixtures().join(format!("clip/shapes_{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn zeros(shapes: &serde_json::Value) -> HashMap<String, Tensor> {
    shapes
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let dims: Vec<usize> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (
                k.clone(),
                Tensor::zeros(dims, DType::F16, &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

#[test]
fn real_architectures_load_in_both_namings() {
    for (name, patch, width, proj) in [
        ("vit-b-32", 32, 768, 512),
        ("vit-b-16", 16, 768, 512),
        ("vit-l-14", 14, 1024, 768),
    ] {
        let m = manifest(name);
        let cfg: ClipConfig = serde_json::from_value(m["config"].clone()).unwrap();
        let path = std::path::Path::new(name);
        let hf = Clip::from_tensors(
            zeros(&m["hf"]),
            &cfg,
            Naming::HuggingFace,
            &Device::Cpu,
            path,
            name,
        )
        .unwrap();
        assert_eq!(hf.config.vision_config.patch_size, patch);
        drop(hf);
        let oa = zeros(&m["openai"]);
        assert_eq!(weights::detect_naming(&oa, path).unwrap(), Naming::OpenAi);
        let inferred = weights::infer_openai_config(&oa, path).unwrap();
        assert_eq!(inferred.vision_config.patch_size, patch);
        assert_eq!(inferred.vision_config.hidden_size, width);
        assert_eq!(inferred.vision_config.image_size, 224);
        assert_eq!(
            inferred.vision_config.num_attention_heads,
            cfg.vision_config.num_attention_heads
        );
        assert_eq!(
            inferred.vision_config.num_hidden_layers,
            cfg.vision_config.num_hidden_layers
        );
        assert_eq!(
            inferred.vision_config.intermediate_size,
            cfg.vision_config.intermediate_size
        );
        assert_eq!(
            inferred.text_config.num_attention_heads,
            cfg.text_config.num_attention_heads
        );
        assert_eq!(
            inferred.text_config.hidden_size,
            cfg.text_config.hidden_size
        );
        assert_eq!(inferred.projection_dim, proj);
        let model =
            Clip::from_tensors(oa, &inferred, Naming::OpenAi, &Device::Cpu, path, name).unwrap();
        assert_eq!(model.config.projection_dim, proj);
        println!("{name}: loads with Hugging Face and OpenAI key names");
    }
}

fn fake_hub_cache(root: &std::path::Path, id: &str) {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join("0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixtures().join("clip/hf").join(f), snap.join(f)).unwrap();
    }
}

#[test]
fn hub_ids_from_local_cache_and_clear_error_when_absent() {
    // No network in tests: the hub path must work from the cache alone.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let cache = tempfile::tempdir().unwrap();
    fake_hub_cache(cache.path(), "tiny-org/tiny-clip");
    let model = Clip::load_with_cache(
        "tiny-org/tiny-clip",
        &Device::Cpu,
        Some(cache.path().to_path_buf()),
    )
    .unwrap();
    assert_eq!(model.source, "tiny-org/tiny-clip");
    assert_eq!(model.config.vision_config.patch_size, 7);

    let err = ModelFiles::resolve(
        "openai/clip-vit-base-patch16",
        Some(cache.path().to_path_buf()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("openai/clip-vit-base-patch16") && err.contains("not in the local hub cache"),
        "{err}"
    );
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}
