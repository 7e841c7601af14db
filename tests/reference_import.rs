//! Import of reference PyTorch checkpoints (fixtures written with torch.save by
//! tests/fixtures/reference/make_fixtures.py): tensors land where they belong, the local
//! transform computes what torch's modules compute, the newest epoch is picked, and mismatches
//! (a 768-wide run on a 512-wide model, another class list) are explained.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use textrefiner_explorer::checkpoint::{check_classes, import_reference, load_any, ReferenceFiles};
use textrefiner_explorer::clip::Clip;
use textrefiner_explorer::data::dataset::{Dataset, Subset};
use textrefiner_explorer::train::Method;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn base_names() -> Vec<String> {
    Dataset::world(1, 64, 1).subset(Subset::Base).class_names
}

#[test]
fn imports_a_textrefiner_run() {
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let run = fixtures().join("run/seed1");
    let files = ReferenceFiles::locate(&run).unwrap();
    assert!(
        files
            .prompt_learner
            .ends_with("prompt_learner/model.pth.tar-10"),
        "{:?}",
        files.prompt_learner
    );
    assert!(files
        .memory
        .as_ref()
        .unwrap()
        .ends_with("Memory/model.pth.tar-10"));
    let t = import_reference(&run, &clip, base_names(), &Device::Cpu).unwrap();
    assert_eq!(t.config.method, Method::CoopRefiner);
    assert_eq!(t.epochs_done, 10);
    let e: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(max_diff(t.learner.ctx.as_tensor(), &e["ctx"]), 0.0);
    let r = t.refiner.as_ref().unwrap();
    assert_eq!(r.cache.size(), 25);
    // the fp16 cache rows are unit length up to fp16 rounding; we re-normalise them
    assert!(max_diff(&r.cache.memory, &e["cache"]) < 2e-3);
    assert_eq!(max_diff(r.extractor.as_tensor(), &e["extractor"]), 0.0);
    let lt = &r.transform;
    for (ours, key) in [
        (&lt.w1, "w1"),
        (&lt.b1, "b1"),
        (&lt.bn_w, "bn_w"),
        (&lt.bn_b, "bn_b"),
        (&lt.w2, "w2"),
        (&lt.b2, "b2"),
    ] {
        assert_eq!(max_diff(ours.as_tensor(), &e[key]), 0.0, "{key}");
    }
    assert_eq!(max_diff(&lt.running_mean, &e["running_mean"]), 0.0);
    assert_eq!(max_diff(&lt.running_var, &e["running_var"]), 0.0);
    // the imported local transform in eval mode equals torch's Conv2d/BatchNorm2d/ReLU/Conv2d
    let mut lt = lt.clone();
    let out = lt.forward(&e["probe_in"], false).unwrap();
    let rel = max_diff(&out, &e["probe_out"])
        / e["probe_out"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    assert!(rel < 1e-5, "local transform rel diff {rel}");
    // load_any takes the run folder too
    let again = load_any(&run, &clip, Some(base_names()), &Device::Cpu).unwrap();
    assert_eq!(max_diff(again.learner.ctx.as_tensor(), &e["ctx"]), 0.0);
    check_classes(&again, &base_names(), &run).unwrap();
}

#[test]
fn a_single_prompt_learner_file_picks_its_memory_epoch() {
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let f = fixtures().join("run/seed1/prompt_learner/model.pth.tar-5");
    let files = ReferenceFiles::locate(&f).unwrap();
    assert!(files.memory.unwrap().ends_with("Memory/model.pth.tar-5"));
    let t = import_reference(&f, &clip, base_names(), &Device::Cpu).unwrap();
    assert_eq!(t.epochs_done, 5);
}

#[test]
fn mismatches_are_explained() {
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let run = fixtures().join("run/seed1");
    // the run has 12 classes
    let all = Dataset::world(1, 64, 1).class_names;
    let err = import_reference(&run, &clip, all, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.pth.tar-10")
            && err.contains("12 classes")
            && err.contains("24 class names"),
        "{err}"
    );
    // same count, other classes: check_classes names the first difference
    let t = import_reference(&run, &clip, base_names(), &Device::Cpu).unwrap();
    let mut other = base_names();
    other.swap(0, 1);
    let err = check_classes(&t, &other, &run).unwrap_err().to_string();
    assert!(
        err.contains("other classes") && err.contains("class 0"),
        "{err}"
    );

    // a 768-wide CoOp run onto a model with a 512-wide text tower
    let mut cfg = textrefiner_explorer::clip::random::preset("b16").unwrap();
    cfg.vision_config.num_hidden_layers = 1;
    cfg.vision_config.hidden_size = 64;
    cfg.vision_config.intermediate_size = 64;
    cfg.vision_config.num_attention_heads = 1;
    cfg.text_config.num_hidden_layers = 1;
    let b16ish = textrefiner_explorer::clip::random::random_clip(&cfg, 0, &Device::Cpu).unwrap();
    let run768 = fixtures().join("coop768");
    let err = import_reference(&run768, &b16ish, base_names(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model-best.pth.tar") && err.contains("[4, 768]") && err.contains("512"),
        "{err}"
    );
    // not a run at all
    let err = import_reference(&fixtures(), &clip, base_names(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a reference run"), "{err}");
}
