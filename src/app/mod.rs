//! The desktop explorer (feature `gui`). Panels never call model code: they send
//! [`crate::worker::Request`]s to the model thread and draw what comes back.
//!
//! Views: Compare (gallery of test images with CoOp and refined predictions, inspector with
//! WGSL heatmaps), Metrics (base / new / HM, per-class accuracy, clickable confusion matrix),
//! Cache (read weights, atlas, nearest words, what-if), Fine-tune (background runs with live
//! plots and cancel) and Your images (zero-shot scoring of your own files).

mod cache_view;
mod finetune;
pub mod gallery;
pub mod heatmap;
mod metrics;
mod zero_shot;

use std::path::PathBuf;

use eframe::egui;

use crate::data::dataset::Subset;
use crate::explore::{Exploration, MethodFeatures, COOP, REFINED};
use crate::worker::{Event, ModelSummary, Request, Worker};

pub use cache_view::WhatIf;
pub use finetune::{FinetuneForm, Job};
pub use gallery::{Gallery, HeatMode, HeatSettings};

const STORAGE_KEY: &str = "textrefiner-explorer-state";

/// What survives a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    pub model_spec: String,
    pub recent_models: Vec<String>,
    pub prompts: String,
    pub images: Vec<PathBuf>,
    #[serde(default = "default_data")]
    pub data: String,
    #[serde(default)]
    pub recent_data: Vec<String>,
    #[serde(default = "default_shots")]
    pub shots: usize,
    #[serde(default)]
    pub heat: HeatSettings,
    #[serde(default)]
    pub finetune: FinetuneForm,
}

fn default_data() -> String {
    "world".into()
}
fn default_shots() -> usize {
    16
}

impl Default for Persisted {
    fn default() -> Self {
        Self {
            model_spec: default_model_spec(),
            recent_models: vec![],
            prompts: "a photo of a cat.\na photo of a dog.\na photo of a rocket.\na photo of a cup of coffee.".into(),
            images: vec![],
            data: default_data(),
            recent_data: vec![],
            shots: default_shots(),
            heat: HeatSettings::default(),
            finetune: FinetuneForm::default(),
        }
    }
}

/// The model the app opens on when nothing else was chosen: the embedded tiny CLIP.
pub fn default_model_spec() -> String {
    crate::clip::EMBEDDED.to_string()
}

pub struct ExplorerApp {
    pub state: Persisted,
    worker: Worker,
    pub model: Option<ModelSummary>,
    pub busy: Option<String>,
    /// Errors to show once (newest last).
    pub notifications: Vec<String>,
    pub scores: zero_shot::Scores,
    pub tab: Tab,
    pub explore: Option<Box<Exploration>>,
    /// Methods compared (A, B): indices into `explore.methods`.
    pub compare: (usize, usize),
    pub gallery: Gallery,
    pub heat: HeatSettings,
    pub whatif: WhatIf,
    pub refined_original: Option<MethodFeatures>,
    pub metrics_subset: Subset,
    pub job: Option<Job>,
    pub runs_started: usize,
    /// Whether heatmaps are drawn by the wgpu shader (false without a wgpu renderer).
    pub gpu_heatmaps: bool,
    pub progress: Option<(String, f32)>,
    /// Recent frame times (seconds), for the status line and the benchmark.
    pub frame_times: std::collections::VecDeque<f32>,
    /// Show the frame time in the status line (off in snapshot tests: it varies).
    pub show_frame_time: bool,
    /// Bumped whenever a method's class features change (what-if), to refresh cached results.
    pub scores_version: u64,
    atlas_clicked: Option<usize>,
    /// Why the last comparison could not be prepared (shown instead of the views).
    pub explore_failed: Option<String>,
    /// Errors reported from callbacks (screenshots), shown as notifications.
    async_errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pending_load: Option<u64>,
    pending_score: Option<u64>,
    pending_explore: Option<u64>,
    pending_add: Option<u64>,
}

/// The main views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Compare,
    Metrics,
    Cache,
    Finetune,
    Images,
}

impl ExplorerApp {
    /// Create the app from eframe's creation context: installs the heatmap pipeline when a
    /// wgpu renderer is there, restores the persisted state unless `state` is given.
    pub fn new(
        cc: &eframe::CreationContext<'_>,
        state: Option<Persisted>,
    ) -> std::io::Result<Self> {
        let state = state.unwrap_or_else(|| {
            cc.storage
                .and_then(|s| eframe::get_value(s, STORAGE_KEY))
                .unwrap_or_default()
        });
        let mut app = Self::with_state(cc.egui_ctx.clone(), state)?;
        if let Some(rs) = cc.wgpu_render_state.as_ref() {
            heatmap::install(rs);
            app.gpu_heatmaps = true;
        }
        Ok(app)
    }

    pub fn with_state(ctx: egui::Context, state: Persisted) -> std::io::Result<Self> {
        let waker_ctx = ctx.clone();
        let worker = Worker::spawn(move || waker_ctx.request_repaint())?;
        let heat = state.heat.clone();
        let mut app = Self {
            state,
            worker,
            model: None,
            busy: None,
            notifications: vec![],
            scores: Default::default(),
            tab: Tab::Compare,
            explore: None,
            compare: (COOP, REFINED),
            gallery: Gallery::default(),
            heat,
            whatif: WhatIf::default(),
            refined_original: None,
            metrics_subset: Subset::Base,
            job: None,
            runs_started: 0,
            gpu_heatmaps: false,
            progress: None,
            frame_times: Default::default(),
            show_frame_time: true,
            scores_version: 0,
            atlas_clicked: None,
            explore_failed: None,
            async_errors: Default::default(),
            pending_load: None,
            pending_score: None,
            pending_explore: None,
            pending_add: None,
        };
        if !app.state.model_spec.is_empty() {
            app.load_model(app.state.model_spec.clone());
        }
        Ok(app)
    }

    pub fn load_model(&mut self, spec: String) {
        self.state.model_spec = spec.clone();
        self.busy = Some(format!("loading {spec} ..."));
        self.pending_load = Some(self.worker.send(Request::LoadModel { spec }));
    }

    /// Prepare the comparison on the current data (features, zero-shot, CoOp and CoOp +
    /// TextRefiner trained in the background).
    pub fn explore(&mut self) {
        self.explore = None;
        self.explore_failed = None;
        self.gallery = Gallery::default();
        self.progress = Some(("preparing the comparison …".into(), 0.0));
        let data = self.state.data.clone();
        let test_per_class = if data.starts_with("world") {
            None
        } else {
            Some(20)
        };
        self.pending_explore = Some(self.worker.send(Request::Explore {
            data,
            shots: self.state.shots,
            seed: 1,
            test_per_class,
        }));
    }

    pub fn open_data(&mut self, spec: String) {
        self.state.data = spec.clone();
        self.state.recent_data.retain(|r| r != &spec);
        self.state.recent_data.insert(0, spec);
        self.state.recent_data.truncate(8);
        if self.model.is_some() {
            self.explore();
        }
    }

    pub fn add_checkpoint(&mut self, path: PathBuf) {
        self.pending_add = Some(self.worker.send(Request::AddCheckpoint { path }));
    }

    pub fn score(&mut self) {
        let texts: Vec<String> = self
            .state
            .prompts
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        self.busy = Some("scoring ...".into());
        self.pending_score = Some(self.worker.send(Request::Score {
            images: self.state.images.clone(),
            texts,
        }));
    }

    fn drain_events(&mut self) {
        if let Ok(mut v) = self.async_errors.lock() {
            self.notifications.append(&mut v);
        }
        for ev in self.worker.poll() {
            match ev {
                Event::Progress { message, .. } => self.busy = Some(message),
                Event::Fraction {
                    id,
                    message,
                    fraction,
                } => {
                    if Some(id) == self.pending_explore {
                        self.progress = Some((message, fraction));
                    }
                }
                Event::Explored { id, result } => {
                    if Some(id) != self.pending_explore {
                        continue;
                    }
                    self.pending_explore = None;
                    self.progress = None;
                    match result {
                        Ok(e) => {
                            self.refined_original = e.methods.get(REFINED).cloned();
                            self.whatif = WhatIf {
                                alpha: e.refiner.as_ref().map(|r| r.alpha).unwrap_or(0.2),
                                enabled: vec![true; e.num_entries()],
                                active: false,
                            };
                            self.compare = (COOP, REFINED.min(e.methods.len() - 1));
                            self.explore = Some(e);
                            self.scores_version += 1;
                        }
                        Err(e) => {
                            self.explore_failed = Some(e.clone());
                            self.notifications.push(e);
                        }
                    }
                }
                Event::TrainStep { id, event } => self.on_train_step(id, event),
                Event::TrainDone { id, result } => {
                    let Some(j) = self.job.as_mut().filter(|j| j.id == id) else {
                        continue;
                    };
                    j.running = false;
                    match result {
                        Ok(out) => {
                            j.status = format!(
                                "done: base {:.1}%, new {:.1}%, HM {:.1}%{}",
                                100.0 * out.metrics.base,
                                100.0 * out.metrics.new,
                                100.0 * out.metrics.hm,
                                out.checkpoint
                                    .as_ref()
                                    .map(|p| format!(
                                        " · saved {}",
                                        p.with_extension("safetensors").display()
                                    ))
                                    .unwrap_or_default()
                            );
                            j.progress = 1.0;
                            if let Some(e) = self.explore.as_mut() {
                                e.methods.push(out.method);
                            }
                        }
                        Err(e) => {
                            j.status = format!("stopped: {e}");
                            if !e.contains("cancelled") {
                                self.notifications.push(e);
                            }
                        }
                    }
                }
                Event::MethodAdded { id, result } => {
                    if Some(id) != self.pending_add {
                        continue;
                    }
                    self.pending_add = None;
                    match result {
                        Ok(m) => {
                            if let Some(e) = self.explore.as_mut() {
                                e.methods.push(m);
                                self.compare.1 = e.methods.len() - 1;
                            }
                        }
                        Err(e) => self.notifications.push(e),
                    }
                }
                Event::ModelLoaded { id, result } => {
                    if Some(id) != self.pending_load {
                        continue; // stale
                    }
                    self.pending_load = None;
                    self.busy = None;
                    match result {
                        Ok(s) => {
                            let spec = self.state.model_spec.clone();
                            self.state.recent_models.retain(|r| r != &spec);
                            self.state.recent_models.insert(0, spec);
                            self.state.recent_models.truncate(8);
                            self.model = Some(s);
                            if !self.state.images.is_empty() {
                                self.score();
                                self.tab = Tab::Images;
                            }
                            self.explore();
                        }
                        Err(e) => {
                            self.model = None;
                            self.notifications.push(e);
                        }
                    }
                }
                Event::Scored { id, texts, results } => {
                    if Some(id) != self.pending_score {
                        continue;
                    }
                    self.pending_score = None;
                    self.busy = None;
                    for r in &results {
                        if let Err(e) = r {
                            self.notifications.push(e.clone());
                        }
                    }
                    self.scores = zero_shot::Scores {
                        texts,
                        results: results.into_iter().filter_map(|r| r.ok()).collect(),
                    };
                }
            }
        }
    }

    fn top_bar_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("TextRefiner Explorer");
            ui.separator();
            ui.label("Model:");
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.state.model_spec)
                    .desired_width(240.0)
                    .hint_text("folder, weights file or hub id"),
            );
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Load").clicked() || enter {
                self.load_model(self.state.model_spec.clone());
            }
            if ui.button("Folder…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                    self.load_model(dir.display().to_string());
                }
            }
            if !self.state.recent_models.is_empty() {
                ui.menu_button("Recent", |ui| {
                    for r in self.state.recent_models.clone() {
                        if ui.button(&r).clicked() {
                            self.load_model(r);
                            ui.close();
                        }
                    }
                });
            }
            ui.separator();
            ui.label("Data:");
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.state.data)
                    .desired_width(160.0)
                    .hint_text("world or a dataset folder"),
            );
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Open").clicked() || enter {
                self.open_data(self.state.data.clone());
            }
            if ui.button("Dataset…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                    self.open_data(dir.display().to_string());
                }
            }
            if !self.state.recent_data.is_empty() {
                ui.menu_button("Recent data", |ui| {
                    for r in self.state.recent_data.clone() {
                        if ui.button(&r).clicked() {
                            self.open_data(r);
                            ui.close();
                        }
                    }
                });
            }
            ui.separator();
            ui.add_enabled_ui(self.explore.is_some(), |ui| {
                ui.menu_button("Add checkpoint", |ui| {
                    if ui.button("Ours (.json / .safetensors)…").clicked() {
                        if let Some(p) = rfd::FileDialog::new().add_filter("checkpoint", &["json", "safetensors"]).pick_file() {
                            self.add_checkpoint(p);
                        }
                        ui.close();
                    }
                    if ui.button("Reference PyTorch run folder…").on_hover_text("a folder with prompt_learner/ (and Memory/)").clicked() {
                        if let Some(p) = rfd::FileDialog::new().pick_folder() {
                            self.add_checkpoint(p);
                        }
                        ui.close();
                    }
                });
            });
            ui.menu_button("Export", |ui| {
                if ui.button("Metrics as CSV…").clicked() {
                    if let Some(p) = rfd::FileDialog::new()
                        .set_file_name("metrics.csv")
                        .save_file()
                    {
                        self.export_csv(&p, true);
                    }
                    ui.close();
                }
                if ui.button("Per-image results as CSV…").clicked() {
                    if let Some(p) = rfd::FileDialog::new()
                        .set_file_name("images.csv")
                        .save_file()
                    {
                        self.export_csv(&p, false);
                    }
                    ui.close();
                }
                if ui.button("Window as PNG…").clicked() {
                    if let Some(p) = rfd::FileDialog::new()
                        .set_file_name("explorer.png")
                        .save_file()
                    {
                        self.request_screenshot(ui.ctx(), p);
                    }
                    ui.close();
                }
            });
        });
        ui.horizontal(|ui| {
            match &self.model {
                Some(m) => ui.label(format!(
                    "{}: ViT {} px / patch {}, {} + {} layers, {}-d",
                    m.source,
                    m.image_size,
                    m.patch_size,
                    m.vision_layers,
                    m.text_layers,
                    m.embedding_dim
                )),
                None => ui.weak("no model loaded"),
            };
            if let Some(b) = &self.busy {
                ui.separator();
                ui.spinner();
                ui.label(b);
            }
            if let Some((msg, f)) = &self.progress {
                // a progress bar without a spinner: no continuous repaints while waiting (they
                // cost a core on software renderers)
                ui.separator();
                ui.add(
                    egui::ProgressBar::new(*f)
                        .desired_width(160.0)
                        .show_percentage(),
                );
                ui.label(msg);
            }
            if let Some(j) = self.job.as_ref().filter(|j| j.running) {
                ui.separator();
                ui.label(format!("fine-tune: {}", j.status));
            }
            if let Some(e) = self.explore.as_ref().filter(|_| self.show_frame_time) {
                ui.separator();
                ui.weak(format!("{}: ready in {:.1} s", e.data_name, e.prepare_secs));
            }
            if let Some(ft) = self.frame_time_ms().filter(|_| self.show_frame_time) {
                ui.separator();
                ui.weak(format!("frame {ft:.1} ms"));
            }
        });
    }

    /// Median of the recent frame times in milliseconds.
    pub fn frame_time_ms(&self) -> Option<f32> {
        if self.frame_times.len() < 5 {
            return None;
        }
        let mut v: Vec<f32> = self.frame_times.iter().copied().collect();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(1000.0 * v[v.len() / 2])
    }

    /// Write metrics (one row per method) or per-image results (both compared methods) as CSV.
    pub fn export_csv(&mut self, path: &std::path::Path, metrics: bool) {
        let Some(e) = &self.explore else { return };
        let text = if metrics {
            metrics_csv(e)
        } else {
            images_csv(e, self.compare)
        };
        if let Err(err) = crate::util::write_atomic(path, text.as_bytes()) {
            self.notifications.push(err.to_string());
        }
    }

    fn request_screenshot(&mut self, ctx: &egui::Context, path: PathBuf) {
        let errors = self.async_errors.clone();
        let waker = ctx.clone();
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
            egui::ScreenshotCallback::new(move |img| {
                if let Err(e) = save_png(&img, &path) {
                    if let Ok(mut v) = errors.lock() {
                        v.push(format!("{}: {e}", path.display()));
                    }
                    waker.request_repaint();
                }
            }),
        ));
    }
}

impl ExplorerApp {
    fn notifications_ui(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, n) in self.notifications.iter().enumerate() {
            ui.horizontal(|ui| {
                ui.colored_label(egui::Color32::from_rgb(220, 90, 70), format!("Error: {n}"));
                if ui.small_button("Dismiss").clicked() {
                    dismiss = Some(i);
                }
            });
        }
        if let Some(i) = dismiss {
            self.notifications.remove(i);
        }
    }
}

impl eframe::App for ExplorerApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let t0 = std::time::Instant::now();
        self.drain_events();
        let dropped: Vec<PathBuf> = ui.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        if !dropped.is_empty() {
            self.add_dropped(dropped);
        }
        egui::Panel::top("top").show(ui, |ui| {
            self.top_bar_ui(ui);
            self.notifications_ui(ui);
            ui.horizontal(|ui| {
                ui.selectable_value(&mut self.tab, Tab::Compare, "Compare");
                ui.selectable_value(&mut self.tab, Tab::Metrics, "Metrics");
                ui.selectable_value(&mut self.tab, Tab::Cache, "Cache");
                ui.selectable_value(&mut self.tab, Tab::Finetune, "Fine-tune");
                ui.selectable_value(&mut self.tab, Tab::Images, "Your images");
            });
        });
        match self.tab {
            Tab::Compare => {
                egui::CentralPanel::default().show(ui, |ui| self.gallery_ui(ui));
            }
            Tab::Metrics => {
                egui::CentralPanel::default().show(ui, |ui| self.metrics_ui(ui));
            }
            Tab::Cache => {
                egui::CentralPanel::default().show(ui, |ui| {
                    egui::ScrollArea::vertical().show(ui, |ui| self.cache_ui(ui))
                });
            }
            Tab::Finetune => {
                egui::CentralPanel::default().show(ui, |ui| self.finetune_ui(ui));
            }
            Tab::Images => {
                egui::Panel::left("images")
                    .resizable(true)
                    .default_size(260.0)
                    .show(ui, |ui| self.images_ui(ui));
                egui::CentralPanel::default().show(ui, |ui| self.results_ui(ui));
            }
        }
        self.frame_times.push_back(t0.elapsed().as_secs_f32());
        if self.frame_times.len() > 60 {
            self.frame_times.pop_front();
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        self.state.heat = self.heat.clone();
        eframe::set_value(storage, STORAGE_KEY, &self.state);
    }
}

/// Save an egui screenshot as PNG (atomically).
pub fn save_png(img: &egui::ColorImage, path: &std::path::Path) -> Result<(), String> {
    let [w, h] = img.size;
    let rgba: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
    let im = image::RgbaImage::from_raw(w as u32, h as u32, rgba)
        .ok_or_else(|| "screenshot has the wrong size".to_string())?;
    let mut bytes = Vec::new();
    im.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| e.to_string())?;
    crate::util::write_atomic(path, &bytes).map_err(|e| e.to_string())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row per method: base, new, HM accuracy (in %).
pub fn metrics_csv(e: &Exploration) -> String {
    let mut out = String::from("method,base,new,hm\n");
    for (m, meth) in e.methods.iter().enumerate() {
        let (b, n) = (e.accuracy(m, Subset::Base), e.accuracy(m, Subset::New));
        out += &format!(
            "{},{:.2},{:.2},{:.2}\n",
            csv_field(&meth.name),
            100.0 * b,
            100.0 * n,
            100.0 * crate::train::harmonic_mean(b, n)
        );
    }
    out
}

/// One row per test image: true class, both methods' predictions, flip and margin change.
pub fn images_csv(e: &Exploration, (a, b): (usize, usize)) -> String {
    let mut out = format!(
        "image,subset,label,{},{},flip,margin_change\n",
        csv_field(&e.methods[a].name),
        csv_field(&e.methods[b].name)
    );
    for (i, im) in e.images.iter().enumerate() {
        let names = e.names(im.subset);
        let (f, dm) = e.flip(a, b, i);
        out += &format!(
            "{},{},{},{},{},{},{:.4}\n",
            csv_field(&im.name),
            if im.subset == Subset::New {
                "new"
            } else {
                "base"
            },
            csv_field(&names[im.label as usize]),
            csv_field(&names[e.predict(a, i) as usize]),
            csv_field(&names[e.predict(b, i) as usize]),
            f.label(),
            dm
        );
    }
    out
}

impl ExplorerApp {
    fn add_dropped(&mut self, paths: Vec<PathBuf>) {
        let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
            paths.into_iter().partition(|p| p.is_dir());
        // A dropped folder with a config.json or weights is a model, another folder a dataset,
        // files are images.
        if let Some(d) = dirs.first() {
            let is_model = std::fs::read_dir(d)
                .map(|rd| {
                    rd.filter_map(|e| e.ok()).any(|e| {
                        let n = e.file_name().to_string_lossy().to_lowercase();
                        n == "config.json"
                            || n.ends_with(".safetensors")
                            || n.ends_with(".bin")
                            || n.ends_with(".pt")
                    })
                })
                .unwrap_or(false);
            if is_model {
                self.load_model(d.display().to_string());
            } else {
                self.open_data(d.display().to_string());
            }
        }
        if !files.is_empty() {
            self.state.images.extend(files);
            self.tab = Tab::Images;
            self.score();
        }
    }
}

/// What the command line asked the window to open with.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub model: Option<String>,
    pub images: Vec<PathBuf>,
}

/// Open the explorer window.
pub fn run_native(start: StartOptions) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1280.0, 800.0])
            .with_title("TextRefiner Explorer"),
        ..Default::default()
    };
    eframe::run_native(
        "TextRefiner Explorer",
        options,
        Box::new(move |cc| {
            let mut state: Persisted = cc
                .storage
                .and_then(|s| eframe::get_value(s, STORAGE_KEY))
                .unwrap_or_default();
            if let Some(m) = start.model {
                state.model_spec = m;
            }
            if !start.images.is_empty() {
                state.images = start.images;
            }
            Ok(Box::new(ExplorerApp::new(cc, Some(state))?))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
