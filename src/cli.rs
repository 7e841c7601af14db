//! Headless commands of the one binary. Each prints human-readable output by default and JSON
//! with `--json`, and returns errors that name the file and the problem.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};

use crate::clip::preprocess::{batch_tensor, load_rgb, preprocess_eval};
use crate::clip::random::{preset, random_clip};
use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip, VisionOptions};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print embeddings and image-text similarities as a table or JSON.
    Embed(EmbedArgs),
    /// Benchmark CLIP encoding at real sizes against PyTorch run in the same session.
    Bench(BenchArgs),
    /// Write the demo world out as an ImageFolder tree (one folder per class) to look at.
    ExportWorld(ExportWorldArgs),
}

#[derive(Debug, Args)]
pub struct ExportWorldArgs {
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Split: train, val, test or pretrain.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Images per class.
    #[arg(long, default_value_t = 8)]
    pub per_class: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Model: a local folder, a weights file, or a hub id (e.g. openai/clip-vit-base-patch16).
    #[arg(long)]
    pub model: String,
    /// Image files (repeatable).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Texts (repeatable).
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// Print JSON (normalised embeddings, cosine similarities, softmax over texts).
    #[arg(long)]
    pub json: bool,
    /// Leave the embedding vectors out of the JSON.
    #[arg(long)]
    pub no_vectors: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Python interpreter with torch + transformers for the reference (skipped if unusable).
    #[arg(long, env = "TEXTREFINER_PYTHON", default_value = "python3")]
    pub python: String,
    /// Timed repetitions per workload and framework (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Workloads to run (default: all): b32-image-1, b32-image-32, b16-image-1, b16-image-32,
    /// text-100, text-100-kernel.
    #[arg(long = "only")]
    pub only: Vec<String>,
    /// Candle only: do not run the PyTorch reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Print where candle's time goes per stage for each workload.
    #[arg(long)]
    pub profile: bool,
    /// Use candle's own ops instead of our fused kernels (to measure what they buy).
    #[arg(long)]
    pub no_fused: bool,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Embed(a) => embed(a),
        Command::Bench(a) => bench(a),
        Command::ExportWorld(a) => export_world(a),
    }
}

fn export_world(a: ExportWorldArgs) -> Result<()> {
    use crate::data::world::{Split, World};
    let split = match a.split.as_str() {
        "train" => Split::Train,
        "val" => Split::Val,
        "test" => Split::Test,
        "pretrain" => Split::Pretrain,
        other => bail!("unknown split {other:?}: use train, val, test or pretrain"),
    };
    let world = World::new(a.seed, a.size);
    for (c, class) in world.classes.iter().enumerate() {
        let dir = a.out.join(class.name().replace(' ', "_"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for i in 0..a.per_class {
            let p = dir.join(format!("{i:05}.png"));
            world.image(split, c, i).save(&p).with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    println!("wrote {} classes x {} images to {}", world.num_classes(), a.per_class, a.out.display());
    Ok(())
}

fn embed(a: EmbedArgs) -> Result<()> {
    if a.images.is_empty() && a.texts.is_empty() {
        bail!("nothing to embed: give --image FILE and/or --text \"...\"");
    }
    let device = Device::Cpu;
    let model = Clip::load(&a.model, &device)?;
    let size = model.image_size() as u32;
    let mut pixels = Vec::new();
    for p in &a.images {
        pixels.push(preprocess_eval(&load_rgb(p)?, size));
    }
    let img = if pixels.is_empty() {
        None
    } else {
        let batch = batch_tensor(&pixels, size as usize, &device)?;
        Some(l2_normalize(&model.vision.forward(&batch, &VisionOptions::default())?.image_embeds)?)
    };
    let tok = ClipTokenizer::new();
    let ctx = model.config.text_config.max_position_embeddings;
    let ids: Vec<Vec<u32>> = a.texts.iter().map(|t| tok.tokenize(t, ctx)).collect();
    let txt = if ids.is_empty() { None } else { Some(l2_normalize(&model.text.forward_ids(&ids)?)?) };
    let sims: Option<Vec<Vec<f32>>> = match (&img, &txt) {
        (Some(i), Some(t)) => Some(i.matmul(&t.t()?)?.to_vec2()?),
        _ => None,
    };
    let probs: Option<Vec<Vec<f32>>> = sims.as_ref().map(|s| {
        s.iter()
            .map(|row| {
                let logits: Vec<f32> = row.iter().map(|c| c * model.logit_scale).collect();
                let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f32 = e.iter().sum();
                e.iter().map(|x| x / z).collect()
            })
            .collect()
    });
    let rows = |t: &Option<Tensor>| -> Result<Vec<Vec<f32>>> {
        Ok(match t {
            Some(t) => t.to_vec2()?,
            None => vec![],
        })
    };
    let img_rows = rows(&img)?;
    let txt_rows = rows(&txt)?;
    if a.json {
        let images: Vec<serde_json::Value> = a
            .images
            .iter()
            .zip(&img_rows)
            .map(|(p, e)| {
                let mut o = serde_json::json!({ "path": p.display().to_string() });
                if !a.no_vectors {
                    o["embedding"] = serde_json::json!(e);
                }
                o
            })
            .collect();
        let texts: Vec<serde_json::Value> = a
            .texts
            .iter()
            .zip(&txt_rows)
            .zip(&ids)
            .map(|((t, e), id)| {
                let mut o = serde_json::json!({ "text": t, "tokens": id.len() });
                if !a.no_vectors {
                    o["embedding"] = serde_json::json!(e);
                }
                o
            })
            .collect();
        let out = serde_json::json!({
            "model": model.source,
            "embedding_dim": model.config.projection_dim,
            "logit_scale": model.logit_scale,
            "images": images,
            "texts": texts,
            "cosine_similarity": sims,
            "softmax_over_texts": probs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("model {} (embedding dim {}, logit scale {:.2})", model.source, model.config.projection_dim, model.logit_scale);
        match (&sims, &probs) {
            (Some(s), Some(p)) => {
                println!("cosine similarity (softmax over texts in brackets):");
                for (i, path) in a.images.iter().enumerate() {
                    println!("  {}", path.display());
                    for (j, t) in a.texts.iter().enumerate() {
                        println!("    {:>7.4} ({:>5.1}%)  {t}", s[i][j], 100.0 * p[i][j]);
                    }
                }
            }
            _ => {
                for (p, e) in a.images.iter().zip(&img_rows) {
                    println!("  {}: [{:.4}, {:.4}, ... ] ({} dims)", p.display(), e[0], e[1], e.len());
                }
                for (t, e) in a.texts.iter().zip(&txt_rows) {
                    println!("  {t:?}: [{:.4}, {:.4}, ... ] ({} dims)", e[0], e[1], e.len());
                }
            }
        }
    }
    Ok(())
}

/// The prompts of the text benchmark (shared with scripts/bench_reference.py).
fn bench_prompts() -> Vec<String> {
    const NAMES: &str = include_str!("../scripts/bench_classnames.txt");
    NAMES.lines().filter(|l| !l.trim().is_empty()).map(|c| format!("a photo of a {}.", c.trim())).collect()
}

fn times_total(r: &[(&'static str, f64, u64)]) -> f64 {
    r.iter().map(|x| x.1).sum::<f64>().max(1e-12)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Workload {
    name: &'static str,
    model: &'static str,
    kind: &'static str,
    batch: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload { name: "b32-image-1", model: "b32", kind: "image", batch: 1 },
    Workload { name: "b32-image-32", model: "b32", kind: "image", batch: 32 },
    Workload { name: "b16-image-1", model: "b16", kind: "image", batch: 1 },
    Workload { name: "b16-image-32", model: "b16", kind: "image", batch: 32 },
    Workload { name: "text-100", model: "b16", kind: "text", batch: 100 },
    Workload { name: "text-100-kernel", model: "b16", kind: "text-kernel", batch: 100 },
];

fn python_reference(python: &str, w: &Workload, reps: usize, ids_file: &Path) -> Result<Vec<f64>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_reference.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--model", w.model, "--kind", w.kind, "--batch", &w.batch.to_string(), "--reps", &reps.to_string()])
        .arg("--ids")
        .arg(ids_file)
        .output()
        .with_context(|| format!("cannot run {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("failed"));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reference output is not JSON")?;
    Ok(v["times"].as_array().context("no times")?.iter().filter_map(|t| t.as_f64()).collect())
}

fn bench(a: BenchArgs) -> Result<()> {
    let device = Device::Cpu;
    crate::clip::kernels::set_enabled(!a.no_fused);
    let tok = ClipTokenizer::new();
    let prompts = bench_prompts();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.tokenize(p, 77)).collect();
    let ids_file = std::env::temp_dir().join(format!("textrefiner-bench-ids-{}.json", std::process::id()));
    std::fs::write(&ids_file, serde_json::to_string(&ids)?)?;
    let selected: Vec<&Workload> =
        WORKLOADS.iter().filter(|w| a.only.is_empty() || a.only.iter().any(|o| o == w.name)).collect();
    let mut lines = Vec::new();
    let mut models: std::collections::HashMap<&str, Clip> = Default::default();
    for w in selected {
        let model = match models.get(w.model) {
            Some(m) => m,
            None => {
                let cfg = preset(w.model).context("preset")?;
                models.insert(w.model, random_clip(&cfg, 0, &device)?);
                &models[w.model]
            }
        };
        let reference = if a.no_reference {
            None
        } else {
            match python_reference(&a.python, w, a.reps, &ids_file) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("{}: PyTorch reference unavailable ({e:#})", w.name);
                    None
                }
            }
        };
        let size = model.image_size();
        let run_once = || -> Result<f64> {
            let t0 = Instant::now();
            match w.kind {
                "image" => {
                    let x = Tensor::randn(0f32, 1.0, (w.batch, 3, size, size), &device)?;
                    let t0 = Instant::now();
                    let out = model.vision.forward(&x, &VisionOptions::default())?;
                    out.tokens.sum_all()?.to_scalar::<f32>()?;
                    return Ok(t0.elapsed().as_secs_f64());
                }
                "text" => {
                    model.text.forward_ids(&ids)?.sum_all()?.to_scalar::<f32>()?;
                }
                _ => {
                    // same sequence length as the reference: all prompts run at 77 tokens
                    let emb = model.text.embed_tokens(&crate::clip::text::ids_tensor(&ids, 77, &device)?)?;
                    let mut eot = model.text.eot_positions(&ids);
                    eot[0] = 76;
                    model.text.forward_embeds(&emb, &eot)?.sum_all()?.to_scalar::<f32>()?;
                }
            }
            Ok(t0.elapsed().as_secs_f64())
        };
        run_once()?; // warm-up
        crate::clip::profile::reset();
        crate::clip::profile::enable(a.profile);
        let mut times = Vec::new();
        for _ in 0..a.reps {
            times.push(run_once()?);
        }
        crate::clip::profile::enable(false);
        let ours = median(times);
        if a.profile {
            let total: f64 = times_total(&crate::clip::profile::report());
            println!("{} profile (candle, {} runs):", w.name, a.reps);
            for (stage, secs, calls) in crate::clip::profile::report() {
                println!("  {stage:<28} {:>8.3} s/run {:>5.1}%  ({} calls/run)", secs / a.reps as f64, 100.0 * secs / total, calls / a.reps as u64);
            }
        }
        match reference {
            Some(r) if !r.is_empty() => {
                let theirs = median(r);
                println!("{:<16} candle {:>8.3} s   PyTorch {:>8.3} s", w.name, ours, theirs);
                lines.push(format!("{}: {:.2}x vs PyTorch", w.name, theirs / ours));
            }
            _ => {
                println!("{:<16} candle {:>8.3} s   PyTorch n/a", w.name, ours);
                lines.push(format!("{}: n/a (no PyTorch reference)", w.name));
            }
        }
    }
    let _ = std::fs::remove_file(&ids_file);
    println!("ratios (PyTorch time / candle time; above 1 means faster than PyTorch):");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
