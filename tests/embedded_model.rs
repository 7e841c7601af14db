//! The shipped tiny CLIP (assets/tiny-clip, made by `textrefiner-explorer pretrain`) on the demo
//! world: it loads through the ordinary loader, and zero-shot it is well above chance on base
//! and on new classes.

use candle_core::Device;
use textrefiner_explorer::clip::Clip;

#[test]
fn shipped_model_loads_as_a_folder_and_embedded_identically() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-clip");
    let folder = Clip::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let embedded = Clip::load("embedded", &Device::Cpu).unwrap();
    assert_eq!(folder.config, embedded.config);
    assert_eq!(folder.config.vision_config.image_size, 64);
    assert_eq!(folder.config.text_config.vocab_size, 49408);
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(size <= 10 * 1024 * 1024, "weights are {size} bytes");
}

#[test]
fn zero_shot_is_well_above_chance_on_base_and_new() {
    let model = Clip::load("embedded", &Device::Cpu).unwrap();
    let v = textrefiner_explorer::cli::world_metrics(&model, 20).unwrap();
    let z = &v["zero_shot"];
    let (base, new) = (z["base"].as_f64().unwrap(), z["new"].as_f64().unwrap());
    let chance = z["chance_base"].as_f64().unwrap();
    println!(
        "zero-shot base {base:.3} new {new:.3} (chance {chance:.3}); retrieval {}",
        v["retrieval_recall_at_5"]
    );
    assert!(
        base >= 3.0 * chance,
        "base accuracy {base} is not 3x chance {chance}"
    );
    assert!(
        new >= 3.0 * z["chance_new"].as_f64().unwrap(),
        "new accuracy {new}"
    );
}
