//! `bench-train`: the training step benchmarks of BENCHMARKS.md, each against PyTorch run by
//! scripts/bench_train_step.py on the same machine in the same run.
//!
//! 1. Kernel quality: one CoOp (+ TextRefiner) step on precomputed image features at ViT-B/16
//!    text size (n_ctx 4, batch 32, C = 10 and 100), both frameworks at the same (exact)
//!    sequence length.
//! 2. The whole step as users know it: the reference step (ViT-B/16 image tower on 32 fresh
//!    images, 77-token prompts, backward) in PyTorch against our step on the feature bank.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;

use crate::clip::random::{preset, random_clip};
use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::Clip;
use crate::cli::median;
use crate::features::Features;
use crate::train::{Method, TrainConfig, TrainState};

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Python interpreter with torch + transformers for the reference (skipped if unusable).
    #[arg(long, env = "TEXTREFINER_PYTHON", default_value = "python3")]
    pub python: String,
    /// Timed steps per workload and framework (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Workloads (default: all): refiner-c10, refiner-c100, coop-c10, coop-c100, whole-c10.
    #[arg(long = "only")]
    pub only: Vec<String>,
    /// Candle only.
    #[arg(long)]
    pub no_reference: bool,
    /// Print where candle's time goes.
    #[arg(long)]
    pub profile: bool,
    /// Use candle's own ops (no custom backward kernels) to measure what ours buy.
    #[arg(long)]
    pub no_fused: bool,
}

struct Workload {
    name: &'static str,
    method: Method,
    classes: usize,
    /// PyTorch runs the reference step (image tower + 77 tokens).
    whole: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "refiner-c10",
        method: Method::CoopRefiner,
        classes: 10,
        whole: false,
    },
    Workload {
        name: "refiner-c100",
        method: Method::CoopRefiner,
        classes: 100,
        whole: false,
    },
    Workload {
        name: "coop-c10",
        method: Method::Coop,
        classes: 10,
        whole: false,
    },
    Workload {
        name: "coop-c100",
        method: Method::Coop,
        classes: 100,
        whole: false,
    },
    Workload {
        name: "whole-c10",
        method: Method::CoopRefiner,
        classes: 10,
        whole: true,
    },
];

fn class_names(c: usize) -> Vec<String> {
    crate::cli::bench_class_names().into_iter().take(c).collect()
}

fn python(python: &str, w: &Workload, reps: usize, ids_file: &Path) -> Result<(Vec<f64>, u64)> {
    let method = match w.method {
        Method::Coop => "coop",
        Method::CoopRefiner => "coop-refiner",
    };
    let args = ["--kind", if w.whole { "reference" } else { "step" }, "--method", method, "--reps", &reps.to_string()];
    let v = crate::cli::run_reference_script(python, "bench_train_step.py", &args.map(String::from), ids_file)?;
    Ok((crate::cli::reference_times(&v)?, v["seq_len"].as_u64().unwrap_or(0)))
}

/// Random precomputed features of a batch at ViT-B/16 size (197 tokens of 512).
fn random_batch(batch: usize, classes: usize, d: usize, device: &Device) -> Result<Features> {
    let image = crate::clip::l2_normalize(&Tensor::randn(0f32, 1.0, (batch, d), device)?)?;
    let tokens = Tensor::randn(0f32, 1.0, (batch, 197, d), device)?;
    let cls_attn =
        candle_nn::ops::softmax_last_dim(&Tensor::randn(0f32, 1.0, (batch, 196), device)?)?;
    let labels = (0..batch).map(|i| ((i * 7) % classes) as u32).collect();
    Ok(Features {
        image,
        tokens,
        cls_attn,
        labels,
        views: 1,
    })
}

pub fn bench_train(a: BenchTrainArgs) -> Result<()> {
    let device = Device::Cpu;
    crate::clip::kernels::set_enabled(!a.no_fused);
    // B/16 text tower at full size; the image tower is unused by the step (one layer to save
    // initialisation time)
    let mut cfg = preset("b16").context("preset")?;
    cfg.vision_config.num_hidden_layers = 1;
    let clip: Clip = random_clip(&cfg, 0, &device)?;
    let tok = ClipTokenizer::new();
    let mut lines = Vec::new();
    for w in WORKLOADS
        .iter()
        .filter(|w| a.only.is_empty() || a.only.iter().any(|o| o == w.name))
    {
        let names = class_names(w.classes);
        let tcfg = TrainConfig {
            method: w.method,
            ..Default::default()
        };
        let mut state = TrainState::new(&clip, &names, &tcfg)?;
        let seq_len = state.learner.eot.iter().max().copied().unwrap_or(0) + 1;
        // the same prompt ids for PyTorch
        let placeholder = vec!["X"; state.learner.n_ctx].join(" ");
        let ids: Vec<Vec<u32>> = names
            .iter()
            .map(|c| {
                let mut v = tok.tokenize(&format!("{placeholder} {c}."), 77);
                let e = v
                    .iter()
                    .position(|&t| t == crate::clip::tokenizer::EOT)
                    .unwrap_or(v.len() - 1);
                v.truncate(e + 1);
                v
            })
            .collect();
        let ids_file = std::env::temp_dir().join(format!(
            "textrefiner-bench-train-{}.json",
            std::process::id()
        ));
        std::fs::write(&ids_file, serde_json::to_string(&ids)?)?;
        let reference = if a.no_reference {
            None
        } else {
            match python(&a.python, w, a.reps, &ids_file) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("{}: PyTorch reference unavailable ({e:#})", w.name);
                    None
                }
            }
        };
        let _ = std::fs::remove_file(&ids_file);
        let batch = random_batch(32, w.classes, clip.config.projection_dim, &device)?;
        state.step(&batch, 0.002)?; // warm-up
        crate::clip::profile::reset();
        crate::clip::profile::enable(a.profile);
        let mut times = Vec::new();
        for _ in 0..a.reps {
            let t0 = Instant::now();
            state.step(&batch, 0.002)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        crate::clip::profile::enable(false);
        let ours = median(times);
        if a.profile {
            let report = crate::clip::profile::report();
            println!("{} profile (candle, {} steps):", w.name, a.reps);
            for (stage, secs, calls) in report {
                println!(
                    "  {stage:<32} {:>8.3} s/step {:>5.1}%  ({} calls/step)",
                    secs / a.reps as f64,
                    100.0 * secs / a.reps as f64 / ours,
                    calls / a.reps as u64
                );
            }
        }
        match reference {
            Some((r, their_len)) if !r.is_empty() => {
                let theirs = median(r);
                println!("{:<14} candle {:>7.3} s ({seq_len} tokens)   PyTorch {:>7.3} s ({their_len} tokens{})", w.name, ours, theirs, if w.whole { ", image tower on 32 fresh images" } else { "" });
                lines.push(format!("{}: {:.2}x vs PyTorch", w.name, theirs / ours));
            }
            _ => {
                println!(
                    "{:<14} candle {:>7.3} s ({seq_len} tokens)   PyTorch n/a",
                    w.name, ours
                );
                lines.push(format!("{}: n/a (no PyTorch reference)", w.name));
            }
        }
    }
    println!("ratios (PyTorch time / candle time; above 1 means faster than PyTorch):");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
