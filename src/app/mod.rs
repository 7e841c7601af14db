//! The desktop explorer (feature `gui`). Panels never call model code: they send
//! [`crate::worker::Request`]s to the model thread and draw what comes back.
//!
//! This first version has the zero-shot view: choose a model (folder, file or hub id), add
//! images (file dialog or drag-and-drop), write prompts, and see per-image probabilities and
//! the last block's CLS attention. The CoOp / TextRefiner views build on it.

mod world_view;
mod zero_shot;

use std::path::PathBuf;

use eframe::egui;

use crate::worker::{Event, ModelSummary, Request, Worker};

const STORAGE_KEY: &str = "textrefiner-explorer-state";

/// What survives a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    pub model_spec: String,
    pub recent_models: Vec<String>,
    pub prompts: String,
    pub images: Vec<PathBuf>,
}

impl Default for Persisted {
    fn default() -> Self {
        Self {
            model_spec: default_model_spec(),
            recent_models: vec![],
            prompts: "a photo of a cat.\na photo of a dog.\na photo of a rocket.\na photo of a cup of coffee.".into(),
            images: vec![],
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
    pub world: world_view::WorldView,
    pub tab: Tab,
    ctx: egui::Context,
    pending_load: Option<u64>,
    pending_score: Option<u64>,
    pending_world: Option<u64>,
}

/// The main views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    World,
    Images,
}

impl ExplorerApp {
    pub fn with_state(ctx: egui::Context, state: Persisted) -> std::io::Result<Self> {
        let waker_ctx = ctx.clone();
        let worker = Worker::spawn(move || waker_ctx.request_repaint())?;
        let mut app = Self {
            state,
            worker,
            model: None,
            busy: None,
            notifications: vec![],
            scores: Default::default(),
            world: Default::default(),
            tab: Tab::World,
            ctx,
            pending_load: None,
            pending_score: None,
            pending_world: None,
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

    pub fn score(&mut self) {
        let texts: Vec<String> =
            self.state.prompts.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        self.busy = Some("scoring ...".into());
        self.pending_score = Some(self.worker.send(Request::Score { images: self.state.images.clone(), texts }));
    }

    fn drain_events(&mut self) {
        for ev in self.worker.poll() {
            match ev {
                Event::Progress { message, .. } => self.busy = Some(message),
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
                            let world_sized = s.image_size == 64;
                            self.model = Some(s);
                            if !self.state.images.is_empty() {
                                self.score();
                                self.tab = Tab::Images;
                            }
                            if world_sized {
                                self.pending_world = Some(self.worker.send(Request::ScoreWorld { per_class: 4 }));
                            }
                        }
                        Err(e) => {
                            self.model = None;
                            self.notifications.push(e);
                        }
                    }
                }
                Event::WorldScored { id, class_names, result } => {
                    if Some(id) != self.pending_world {
                        continue;
                    }
                    self.pending_world = None;
                    self.busy = None;
                    match result {
                        Ok(items) => self.world.set(&self.ctx, class_names, items),
                        Err(e) => self.notifications.push(e),
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
                    self.scores = zero_shot::Scores { texts, results: results.into_iter().filter_map(|r| r.ok()).collect() };
                }
            }
        }
    }

    fn top_bar_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("TextRefiner Explorer");
            ui.separator();
            ui.label("Model:");
            let edit = ui.add(egui::TextEdit::singleline(&mut self.state.model_spec).desired_width(360.0).hint_text("folder, weights file or hub id"));
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Load").clicked() || enter {
                self.load_model(self.state.model_spec.clone());
            }
            if ui.button("Browse…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().pick_folder() {
                    self.load_model(dir.display().to_string());
                }
            }
            if !self.state.recent_models.is_empty() {
                egui::ComboBox::from_id_salt("recent").selected_text("Recent").show_ui(ui, |ui| {
                    for r in self.state.recent_models.clone() {
                        if ui.selectable_label(false, &r).clicked() {
                            self.load_model(r);
                        }
                    }
                });
            }
        });
        ui.horizontal(|ui| {
            match &self.model {
                Some(m) => ui.label(format!(
                    "{}: ViT {} px / patch {}, {} + {} layers, {}-d embeddings",
                    m.source, m.image_size, m.patch_size, m.vision_layers, m.text_layers, m.embedding_dim
                )),
                None => ui.weak("no model loaded"),
            };
            if let Some(b) = &self.busy {
                ui.separator();
                ui.spinner();
                ui.label(b);
            }
        });
    }

    fn notifications_ui(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, n) in self.notifications.iter().enumerate() {
            ui.horizontal(|ui| {
                ui.colored_label(egui::Color32::from_rgb(220, 90, 70), format!("⚠ {n}"));
                if ui.small_button("✕").clicked() {
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
        self.drain_events();
        let dropped: Vec<PathBuf> = ui.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).filter(|p| !p.as_os_str().is_empty()).collect());
        if !dropped.is_empty() {
            self.add_dropped(dropped);
        }
        egui::Panel::top("top").show(ui, |ui| {
            self.top_bar_ui(ui);
            self.notifications_ui(ui);
            ui.horizontal(|ui| {
                ui.selectable_value(&mut self.tab, Tab::World, "Demo world");
                ui.selectable_value(&mut self.tab, Tab::Images, "Your images");
            });
        });
        match self.tab {
            Tab::World => {
                egui::CentralPanel::default().show(ui, |ui| self.world_ui(ui));
            }
            Tab::Images => {
                egui::Panel::left("images").resizable(true).default_size(260.0).show(ui, |ui| self.images_ui(ui));
                egui::CentralPanel::default().show(ui, |ui| self.results_ui(ui));
            }
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.state);
    }
}

impl ExplorerApp {
    fn add_dropped(&mut self, paths: Vec<PathBuf>) {
        let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) = paths.into_iter().partition(|p| p.is_dir());
        // A dropped folder with a config.json or weights is a model; files are images.
        if let Some(d) = dirs.first() {
            self.load_model(d.display().to_string());
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
        viewport: egui::ViewportBuilder::default().with_inner_size([1280.0, 800.0]).with_title("TextRefiner Explorer"),
        ..Default::default()
    };
    eframe::run_native(
        "TextRefiner Explorer",
        options,
        Box::new(move |cc| {
            let mut state: Persisted = cc.storage.and_then(|s| eframe::get_value(s, STORAGE_KEY)).unwrap_or_default();
            if let Some(m) = start.model {
                state.model_spec = m;
            }
            if !start.images.is_empty() {
                state.images = start.images;
            }
            Ok(Box::new(ExplorerApp::with_state(cc.egui_ctx.clone(), state)?))
        }),
    )
        .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
