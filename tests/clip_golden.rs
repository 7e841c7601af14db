//! Our CLIP against transformers (and open_clip, for the OpenAI key names) on a tiny random
//! model: tests/fixtures/clip/make_fixtures.py made the fixtures.
mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, golden, rel_l2};
use textrefiner_explorer::clip::{Clip, Naming, VisionOptions};

const TOL: f32 = 1e-5;

fn ids_rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
}

fn check_model(model: &Clip) {
    let g = golden("clip/golden.safetensors");
    let out = model
        .vision
        .forward(&g["pixel_values"], &VisionOptions::default())
        .unwrap();
    let e = rel_l2(&out.image_embeds, &g["image_embeds"]);
    println!("image embeds rel L2 {e:e}");
    assert!(e <= TOL, "image embeds rel L2 {e}");
    let e = rel_l2(&out.tokens, &g["tokens"]);
    println!("last-block tokens rel L2 {e:e}");
    assert!(e <= TOL, "tokens rel L2 {e}");
    let e = rel_l2(&out.cls_attn, &g["cls_attn"]);
    println!("CLS attention rel L2 {e:e}");
    assert!(e <= TOL, "cls attention rel L2 {e}");

    let ids = ids_rows(&g["input_ids"]);
    let text = model.text.forward_ids(&ids).unwrap();
    let e = rel_l2(&text, &g["text_embeds"]);
    println!("text embeds (ids) rel L2 {e:e}");
    assert!(e <= TOL, "text embeds rel L2 {e}");

    let eot: Vec<usize> = g["eot"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as usize)
        .collect();
    let text = model
        .text
        .forward_embeds(&g["prompt_embeds"], &eot)
        .unwrap();
    let e = rel_l2(&text, &g["prompt_text_embeds"]);
    println!("text embeds (prompt embeddings) rel L2 {e:e}");
    assert!(e <= TOL, "prompt text embeds rel L2 {e}");
}

#[test]
fn hf_naming_matches_transformers() {
    let model = Clip::load(fixtures().join("clip/hf").to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(model.naming, Naming::HuggingFace);
    assert_eq!(model.config.vision_config.num_attention_heads, 3);
    assert_eq!(model.config.vision_config.patch_size, 7);
    check_model(&model);
}

#[test]
fn openai_naming_matches_transformers_and_open_clip() {
    let model = Clip::load(
        fixtures().join("clip/openai").to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.naming, Naming::OpenAi);
    check_model(&model);
}

#[test]
fn truncated_text_equals_full_77_tokens() {
    let model = Clip::load(fixtures().join("clip/hf").to_str().unwrap(), &Device::Cpu).unwrap();
    let g = golden("clip/golden.safetensors");
    let eot: Vec<usize> = g["eot"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as usize)
        .collect();
    let prompts = &g["prompt_embeds"];
    // Truncated (our default): computes max(eot)+1 = 12 positions.
    let short = model.text.forward_embeds(prompts, &eot).unwrap();
    // Full 77 tokens: put a dummy prompt whose EOT is the last position, then drop it.
    let (c, l, w) = prompts.dims3().unwrap();
    let extra = Tensor::randn(0f32, 1.0, (1, l, w), &Device::Cpu).unwrap();
    let all = Tensor::cat(&[prompts, &extra], 0).unwrap();
    let mut eot_full = eot.clone();
    eot_full.push(l - 1);
    let full = model
        .text
        .forward_embeds(&all, &eot_full)
        .unwrap()
        .narrow(0, 0, c)
        .unwrap();
    let e = rel_l2(&short, &full);
    println!("truncated vs full 77-token rel L2 {e:e}");
    assert!(e <= 1e-6, "truncation changed the result: {e}");
}

#[test]
fn hidden_states_on_request() {
    let model = Clip::load(fixtures().join("clip/hf").to_str().unwrap(), &Device::Cpu).unwrap();
    let g = golden("clip/golden.safetensors");
    let out = model
        .vision
        .forward(
            &g["pixel_values"],
            &VisionOptions {
                hidden_layers: vec![0, 1, 2],
            },
        )
        .unwrap();
    let layers: Vec<usize> = out.hidden_states.iter().map(|(i, _)| *i).collect();
    assert_eq!(layers, vec![0, 1, 2]);
    assert_eq!(out.hidden_states[1].1.dims(), &[3, 17, 36]);
    // CLS attention rows are probabilities over all keys, so the patch part sums below 1.
    let sums = out.cls_attn.sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(sums.iter().all(|&s| s > 0.0 && s < 1.0), "{sums:?}");
}
