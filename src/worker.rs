//! A worker thread that owns a CLIP model and answers requests (load a model, score images
//! against texts) over channels, so that a UI never blocks on model code. The core never sees
//! the UI: the waker is a plain `Fn()` called after each event (the GUI passes
//! `ctx.request_repaint`). Dropping the handle stops the thread.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use candle_core::Device;

use crate::clip::preprocess::{batch_tensor, load_rgb, preprocess_eval};
use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip, VisionOptions};

/// Work for the model thread.
#[derive(Debug, Clone)]
pub enum Request {
    LoadModel { spec: String },
    /// Score each image against each text (zero-shot).
    Score { images: Vec<PathBuf>, texts: Vec<String> },
    /// Zero-shot on the demo world's test split: `per_class` images of every class against
    /// the prompts "a photo of a {class}.".
    ScoreWorld { per_class: u64 },
}

/// One demo-world image with its zero-shot result.
#[derive(Debug, Clone)]
pub struct WorldItem {
    pub class: usize,
    pub index: u64,
    /// RGB8 pixels, `size * size * 3`.
    pub rgb: Vec<u8>,
    pub size: usize,
    /// Predicted class (over all classes) and its probability.
    pub predicted: usize,
    pub confidence: f32,
    pub cls_attn: Vec<f32>,
    pub grid: usize,
}

/// Summary of a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub source: String,
    pub image_size: usize,
    pub patch_size: usize,
    pub embedding_dim: usize,
    pub vision_layers: usize,
    pub text_layers: usize,
}

/// One image's zero-shot result.
#[derive(Debug, Clone)]
pub struct ImageScore {
    pub path: PathBuf,
    /// Cosine similarity per text.
    pub cosine: Vec<f32>,
    /// Softmax over texts of logit_scale * cosine.
    pub probs: Vec<f32>,
    /// Last block's CLS attention over the patch grid, row-major, `grid * grid`.
    pub cls_attn: Vec<f32>,
    pub grid: usize,
}

/// What the worker reports. `id` is the request's id, so stale results can be dropped.
#[derive(Debug)]
pub enum Event {
    Progress { id: u64, message: String },
    ModelLoaded { id: u64, result: Result<ModelSummary, String> },
    /// Per image: its score or the error that names the file.
    Scored { id: u64, texts: Vec<String>, results: Vec<Result<ImageScore, String>> },
    /// The demo world scored zero-shot.
    WorldScored { id: u64, class_names: Vec<String>, result: Result<Vec<WorldItem>, String> },
}

/// Handle to the worker thread.
pub struct Worker {
    tx: Option<Sender<(u64, Request)>>,
    rx: Receiver<Event>,
    next_id: u64,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(waker: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        let (tx, req_rx) = mpsc::channel::<(u64, Request)>();
        let (ev_tx, rx) = mpsc::channel::<Event>();
        let thread = std::thread::Builder::new().name("clip-worker".into()).spawn(move || {
            let mut model: Option<Clip> = None;
            let tok = ClipTokenizer::new();
            let send = |e: Event| {
                let _ = ev_tx.send(e);
                waker();
            };
            while let Ok((id, req)) = req_rx.recv() {
                match req {
                    Request::LoadModel { spec } => {
                        send(Event::Progress { id, message: format!("loading {spec} ...") });
                        let result = Clip::load(&spec, &Device::Cpu).map_err(|e| e.to_string()).map(|m| {
                            let s = summary(&m);
                            model = Some(m);
                            s
                        });
                        send(Event::ModelLoaded { id, result });
                    }
                    Request::Score { images, texts } => {
                        let Some(m) = model.as_ref() else {
                            let results = images.iter().map(|_| Err("no model loaded".to_string())).collect();
                            send(Event::Scored { id, texts, results });
                            continue;
                        };
                        send(Event::Progress { id, message: format!("scoring {} images ...", images.len()) });
                        let results = score(m, &tok, &images, &texts);
                        send(Event::Scored { id, texts, results });
                    }
                    Request::ScoreWorld { per_class } => {
                        const WORLD_SEED: u64 = 1;
                        let class_names = crate::data::world::classes().iter().map(|c| c.name()).collect();
                        let result = match model.as_ref() {
                            None => Err("no model loaded".to_string()),
                            Some(m) => {
                                send(Event::Progress { id, message: "scoring the demo world ...".into() });
                                score_world(m, WORLD_SEED, per_class).map_err(|e| e.to_string())
                            }
                        };
                        send(Event::WorldScored { id, class_names, result });
                    }
                }
            }
        })?;
        Ok(Self { tx: Some(tx), rx, next_id: 1, thread: Some(thread) })
    }

    /// Queue a request; returns its id.
    pub fn send(&mut self, req: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(tx) = &self.tx {
            let _ = tx.send((id, req));
        }
        id
    }

    /// Events that arrived since the last call (never blocks).
    pub fn poll(&self) -> Vec<Event> {
        self.rx.try_iter().collect()
    }

    /// Wait for the next event (for tests and scripts).
    pub fn recv_timeout(&self, t: std::time::Duration) -> Option<Event> {
        self.rx.recv_timeout(t).ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn summary(m: &Clip) -> ModelSummary {
    ModelSummary {
        source: m.source.clone(),
        image_size: m.config.vision_config.image_size,
        patch_size: m.config.vision_config.patch_size,
        embedding_dim: m.config.projection_dim,
        vision_layers: m.config.vision_config.num_hidden_layers,
        text_layers: m.config.text_config.num_hidden_layers,
    }
}

fn score(m: &Clip, tok: &ClipTokenizer, images: &[PathBuf], texts: &[String]) -> Vec<Result<ImageScore, String>> {
    let inner = || -> crate::Result<Vec<Result<ImageScore, String>>> {
        let ctx = m.config.text_config.max_position_embeddings;
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.tokenize(t, ctx)).collect();
        let txt = if ids.is_empty() { None } else { Some(l2_normalize(&m.text.forward_ids(&ids)?)?) };
        let size = m.image_size();
        let grid = m.config.vision_config.grid();
        let mut out = Vec::with_capacity(images.len());
        for p in images {
            let pix = match load_rgb(p) {
                Ok(img) => preprocess_eval(&img, size as u32),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    continue;
                }
            };
            let x = batch_tensor(&[pix], size, m.device())?;
            let v = m.vision.forward(&x, &VisionOptions::default())?;
            let img = l2_normalize(&v.image_embeds)?;
            let cosine: Vec<f32> = match &txt {
                Some(t) => img.matmul(&t.t()?)?.squeeze(0)?.to_vec1()?,
                None => vec![],
            };
            let probs = crate::clip::softmax_scaled(&cosine, m.logit_scale);
            let cls_attn = v.cls_attn.squeeze(0)?.to_vec1()?;
            out.push(Ok(ImageScore { path: p.clone(), cosine, probs, cls_attn, grid }));
        }
        Ok(out)
    };
    inner().unwrap_or_else(|e| images.iter().map(|_| Err(e.to_string())).collect())
}

/// The world drawn at the model's input size.
fn score_world(m: &Clip, world_seed: u64, per_class: u64) -> crate::Result<Vec<WorldItem>> {
    use crate::data::world::Split;
    let size = m.image_size();
    let world = crate::data::world::World::new(world_seed, size as u32);
    let txt = crate::train::zero_shot_features(m, &world.class_names())?;
    let grid = m.config.vision_config.grid();
    let mut items = Vec::new();
    for c in 0..world.num_classes() {
        let imgs: Vec<image::RgbImage> = (0..per_class).map(|i| world.image(Split::Test, c, i)).collect();
        let pix: Vec<Vec<f32>> = imgs.iter().map(|im| preprocess_eval(im, size as u32)).collect();
        let x = batch_tensor(&pix, size, m.device())?;
        let v = m.vision.forward(&x, &VisionOptions::default())?;
        let img = l2_normalize(&v.image_embeds)?;
        let logits = (img.matmul(&txt.t()?)? * m.logit_scale as f64)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        let attn = v.cls_attn.to_vec2::<f32>()?;
        for (i, ((im, p), a)) in imgs.into_iter().zip(probs).zip(attn).enumerate() {
            let (predicted, confidence) =
                p.iter().cloned().enumerate().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((0, 0.0));
            items.push(WorldItem {
                class: c,
                index: i as u64,
                size: im.width() as usize,
                rgb: im.into_raw(),
                predicted,
                confidence,
                cls_attn: a,
                grid,
            });
        }
    }
    Ok(items)
}
