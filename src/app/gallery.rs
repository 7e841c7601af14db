//! The comparison gallery (test images with true label, CoOp and refined predictions, filters
//! by subset, class and flip category, sort by change in margin, keyboard navigation) and the
//! inspector of one image (the image large with a heatmap drawn by our shader, both top-5 lists
//! as bars, and the per-class logit change).

use eframe::egui;

use super::heatmap::{self, HeatmapParams};
use super::ExplorerApp;
use crate::colormap::Colormap;
use crate::data::dataset::Subset;
use crate::eval::Flip;

/// What the inspector's heatmap shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum HeatMode {
    /// The last block's CLS attention, the 5 patches of the semantic loss outlined.
    #[default]
    ClsAttention,
    /// Cosine of each transformed patch with one cache entry.
    CacheEntry,
    /// A class's read weights over entries times the patches' scores.
    ClassMap,
}

impl HeatMode {
    pub fn label(self) -> &'static str {
        match self {
            HeatMode::ClsAttention => "CLS attention",
            HeatMode::CacheEntry => "Patch-to-cache",
            HeatMode::ClassMap => "Class map",
        }
    }
}

/// Display settings of the heatmap (persisted).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeatSettings {
    pub mode: HeatMode,
    pub opacity: f32,
    pub smooth: bool,
    pub colormap: Colormap,
    pub entry: usize,
}

impl Default for HeatSettings {
    fn default() -> Self {
        Self {
            mode: HeatMode::ClsAttention,
            opacity: 0.55,
            smooth: false,
            colormap: Colormap::Viridis,
            entry: 0,
        }
    }
}

/// Per-image results of the compared pair, computed once per change of methods or what-if.
#[derive(Debug, Clone, Default)]
pub struct PairResults {
    pub key: (usize, usize, u64),
    pub pred_a: Vec<u32>,
    pub pred_b: Vec<u32>,
    pub flip: Vec<Flip>,
    pub margin_change: Vec<f32>,
}

/// Gallery filters and selection.
#[derive(Default)]
pub struct Gallery {
    pub subset: Option<Subset>,
    pub flip: Option<Flip>,
    /// (subset, true class) filter, e.g. from a confusion-matrix click.
    pub class: Option<(Subset, u32)>,
    /// (subset, predicted class) filter from a confusion-matrix cell.
    pub predicted: Option<u32>,
    pub sort_by_margin: bool,
    pub selected: Option<usize>,
    /// Class shown by the class map (in the selected image's subset).
    pub map_class: Option<u32>,
    pub textures: Vec<egui::TextureHandle>,
    pub pair: PairResults,
}

const GREEN: egui::Color32 = egui::Color32::from_rgb(90, 190, 110);
const RED: egui::Color32 = egui::Color32::from_rgb(230, 100, 80);

impl ExplorerApp {
    /// Bring the per-image results of the compared pair up to date (cheap when nothing changed).
    pub fn refresh_pair(&mut self) {
        let Some(e) = &self.explore else { return };
        let (a, b) = self.compare;
        let key = (a, b, self.scores_version);
        if self.gallery.pair.key == key && self.gallery.pair.flip.len() == e.images.len() {
            return;
        }
        let n = e.images.len();
        let mut p = PairResults {
            key,
            pred_a: Vec::with_capacity(n),
            pred_b: Vec::with_capacity(n),
            flip: Vec::with_capacity(n),
            margin_change: Vec::with_capacity(n),
        };
        for i in 0..n {
            p.pred_a.push(e.predict(a, i));
            p.pred_b.push(e.predict(b, i));
            let (f, m) = e.flip(a, b, i);
            p.flip.push(f);
            p.margin_change.push(m);
        }
        self.gallery.pair = p;
    }

    /// Indices of the images that pass the filters, in display order.
    pub fn visible_images(&self) -> Vec<usize> {
        let Some(e) = &self.explore else {
            return Vec::new();
        };
        let g = &self.gallery;
        let (a, b) = self.compare;
        let fresh =
            g.pair.key == (a, b, self.scores_version) && g.pair.flip.len() == e.images.len();
        let pred_b = |i: usize| {
            if fresh {
                g.pair.pred_b[i]
            } else {
                e.predict(b, i)
            }
        };
        let flip = |i: usize| {
            if fresh {
                (g.pair.flip[i], g.pair.margin_change[i])
            } else {
                e.flip(a, b, i)
            }
        };
        let mut v: Vec<(usize, f32)> = (0..e.images.len())
            .filter(|&i| {
                let im = &e.images[i];
                g.subset.map(|s| s == im.subset).unwrap_or(true)
                    && g.class
                        .map(|(s, c)| s == im.subset && c == im.label)
                        .unwrap_or(true)
                    && g.predicted.map(|p| pred_b(i) == p).unwrap_or(true)
            })
            .map(|i| (i, flip(i)))
            .filter(|(_, (f, _))| g.flip.map(|x| x == *f).unwrap_or(true))
            .map(|(i, (_, m))| (i, m))
            .collect();
        if g.sort_by_margin {
            v.sort_by(|x, y| y.1.total_cmp(&x.1));
        }
        v.into_iter().map(|x| x.0).collect()
    }

    pub(super) fn gallery_ui(&mut self, ui: &mut egui::Ui) {
        let Some(e) = &self.explore else {
            ui.centered_and_justified(|ui| match (&self.explore_failed, &self.model) {
                (Some(err), _) => {
                    ui.label(format!("The comparison could not be prepared: {err}\nChoose another dataset or model above."));
                }
                (None, None) => {
                    ui.weak("Load a model (top left) to start.");
                }
                (None, Some(_)) => {
                    ui.weak("Preparing the comparison … (progress at the top)");
                }
            });
            return;
        };
        if self.gallery.textures.len() != e.images.len() {
            self.gallery.textures = e
                .images
                .iter()
                .enumerate()
                .map(|(i, im)| {
                    ui.ctx().load_texture(
                        format!("img-{i}"),
                        egui::ColorImage::from_rgb([im.side, im.side], &im.rgb),
                        egui::TextureOptions::NEAREST,
                    )
                })
                .collect();
        }
        let (a, b) = self.compare;
        let names_a = e.methods[a].name.clone();
        let names_b = e.methods[b].name.clone();
        ui.horizontal_wrapped(|ui| {
            ui.label("Show:");
            ui.selectable_value(&mut self.gallery.subset, None, "all");
            ui.selectable_value(&mut self.gallery.subset, Some(Subset::Base), "base");
            ui.selectable_value(&mut self.gallery.subset, Some(Subset::New), "new");
            ui.separator();
            ui.selectable_value(&mut self.gallery.flip, None, "any change");
            for f in Flip::ALL {
                ui.selectable_value(&mut self.gallery.flip, Some(f), f.label());
            }
            ui.separator();
            let class_text = match self.gallery.class {
                Some((s, c)) => e.names(s)[c as usize].clone(),
                None => "every class".into(),
            };
            egui::ComboBox::new("class-filter", "class")
                .selected_text(class_text)
                .width(220.0)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.gallery.class, None, "every class");
                    for s in [Subset::Base, Subset::New] {
                        for (c, n) in e.names(s).iter().enumerate() {
                            ui.selectable_value(
                                &mut self.gallery.class,
                                Some((s, c as u32)),
                                format!(
                                    "{} ({})",
                                    n,
                                    if s == Subset::Base { "base" } else { "new" }
                                ),
                            );
                        }
                    }
                });
            if self.gallery.predicted.is_some()
                && ui.button("clear predicted-class filter").clicked()
            {
                self.gallery.predicted = None;
            }
            ui.checkbox(&mut self.gallery.sort_by_margin, "sort by margin change");
        });
        self.refresh_pair();
        let visible = self.visible_images();
        ui.horizontal(|ui| {
            ui.weak(format!(
                "{} images · frame: {} (A) vs {} (B) · left/right arrow keys step through",
                visible.len(),
                names_a,
                names_b
            ));
        });
        // keyboard navigation
        let (left, right) = ui.input(|i| {
            (
                i.key_pressed(egui::Key::ArrowLeft),
                i.key_pressed(egui::Key::ArrowRight),
            )
        });
        if (left || right) && !visible.is_empty() {
            let pos = self
                .gallery
                .selected
                .and_then(|s| visible.iter().position(|&v| v == s));
            let next = match (pos, right) {
                (None, _) => 0,
                (Some(p), true) => (p + 1).min(visible.len() - 1),
                (Some(p), false) => p.saturating_sub(1),
            };
            self.gallery.selected = Some(visible[next]);
        }
        ui.separator();
        egui::Panel::right("inspector")
            .default_size(470.0)
            .resizable(true)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.inspector_ui(ui));
            });
        let mut clicked = None;
        egui::CentralPanel::default().show(ui, |ui| {
            let Some(e) = &self.explore else { return };
            let pair = &self.gallery.pair;
            let selected = self.gallery.selected;
            // only the rows in view are laid out (the gallery can hold thousands of images)
            let cell = 86.0;
            let cols = ((ui.available_width() / cell).floor() as usize).max(1);
            let rows = visible.len().div_ceil(cols);
            egui::ScrollArea::vertical().show_rows(ui, cell, rows, |ui, row_range| {
                for row in row_range {
                    ui.horizontal(|ui| {
                        for &i in visible.iter().skip(row * cols).take(cols) {
                            let im = &e.images[i];
                            let (pa, pb) = (pair.pred_a[i], pair.pred_b[i]);
                            let (flip, dm) = (pair.flip[i], pair.margin_change[i]);
                            let resp = ui
                                .add(
                                    egui::Image::new((
                                        self.gallery.textures[i].id(),
                                        egui::vec2(76.0, 76.0),
                                    ))
                                    .sense(egui::Sense::click()),
                                )
                                .on_hover_text(format!(
                                    "{}\ntrue: {}\n{}: {}\n{}: {}\n{} (margin {:+.2})",
                                    im.name,
                                    e.names(im.subset)[im.label as usize],
                                    names_a,
                                    e.names(im.subset)[pa as usize],
                                    names_b,
                                    e.names(im.subset)[pb as usize],
                                    flip.label(),
                                    dm
                                ));
                            // left half of the frame: A right/wrong; right half: B
                            let r = resp.rect.expand(2.0);
                            let ca = if pa == im.label { GREEN } else { RED };
                            let cb = if pb == im.label { GREEN } else { RED };
                            let p = ui.painter();
                            p.line_segment(
                                [r.left_top(), r.left_bottom()],
                                egui::Stroke::new(3.0, ca),
                            );
                            p.line_segment(
                                [r.left_top(), r.center_top()],
                                egui::Stroke::new(3.0, ca),
                            );
                            p.line_segment(
                                [r.left_bottom(), r.center_bottom()],
                                egui::Stroke::new(3.0, ca),
                            );
                            p.line_segment(
                                [r.right_top(), r.right_bottom()],
                                egui::Stroke::new(3.0, cb),
                            );
                            p.line_segment(
                                [r.center_top(), r.right_top()],
                                egui::Stroke::new(3.0, cb),
                            );
                            p.line_segment(
                                [r.center_bottom(), r.right_bottom()],
                                egui::Stroke::new(3.0, cb),
                            );
                            if selected == Some(i) {
                                p.rect_stroke(
                                    r.expand(2.0),
                                    2.0,
                                    egui::Stroke::new(2.0, egui::Color32::WHITE),
                                    egui::StrokeKind::Outside,
                                );
                            }
                            if resp.clicked() {
                                clicked = Some(i);
                            }
                        }
                    });
                    ui.add_space(6.0);
                }
            });
        });
        if let Some(i) = clicked {
            self.gallery.selected = Some(i);
        }
    }

    /// The values of the current heatmap mode for image `i`, the value range and the label.
    pub fn heat_values(&self, i: usize) -> Option<(Vec<f32>, f32, f32, String, Vec<usize>)> {
        let e = self.explore.as_ref()?;
        let im = &e.images[i];
        let top5 = || {
            let mut idx: Vec<usize> = (0..im.cls_attn.len()).collect();
            idx.sort_by(|&x, &y| im.cls_attn[y].total_cmp(&im.cls_attn[x]));
            idx.truncate(5);
            idx
        };
        let (vals, label, outline) = match self.heat.mode {
            HeatMode::ClsAttention => (
                im.cls_attn.clone(),
                "CLS attention (top 5 outlined: the semantic loss's patches)".to_string(),
                top5(),
            ),
            HeatMode::CacheEntry => {
                if e.num_entries() == 0 {
                    return None;
                }
                let k = self.heat.entry.min(e.num_entries() - 1);
                (
                    e.entry_map(i, k),
                    format!("cosine of each transformed patch with cache entry {k}"),
                    vec![],
                )
            }
            HeatMode::ClassMap => {
                if e.num_entries() == 0 {
                    return None;
                }
                let c = self
                    .gallery
                    .map_class
                    .unwrap_or(im.label)
                    .min(e.names(im.subset).len() as u32 - 1);
                (
                    e.class_map(i, c as usize, &self.whatif.enabled),
                    format!("class map of {}", e.names(im.subset)[c as usize]),
                    vec![],
                )
            }
        };
        if vals.len() != e.grid * e.grid {
            return None;
        }
        let (mn, mx) = vals
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        Some((vals, mn, mx.max(mn + 1e-6), label, outline))
    }

    pub(super) fn inspector_ui(&mut self, ui: &mut egui::Ui) {
        let Some(i) = self.gallery.selected else {
            ui.weak("Click an image to inspect it (the left and right arrow keys step through the gallery).");
            return;
        };
        let Some(e) = &self.explore else { return };
        let im = &e.images[i];
        let names = e.names(im.subset).to_vec();
        let (a, b) = self.compare;
        ui.strong(format!(
            "{} — true class: {}",
            im.name, names[im.label as usize]
        ));
        let (flip, dm) = e.flip(a, b, i);
        ui.label(format!(
            "{} -> {}: {} (margin {:+.2})",
            e.methods[a].name,
            e.methods[b].name,
            flip.label(),
            dm
        ));
        ui.horizontal(|ui| {
            for m in [
                HeatMode::ClsAttention,
                HeatMode::CacheEntry,
                HeatMode::ClassMap,
            ] {
                ui.selectable_value(&mut self.heat.mode, m, m.label());
            }
        });
        ui.horizontal(|ui| {
            ui.add(egui::Slider::new(&mut self.heat.opacity, 0.0..=1.0).text("opacity"));
            ui.checkbox(&mut self.heat.smooth, "smooth");
            egui::ComboBox::new("colormap", "colormap")
                .selected_text(self.heat.colormap.name())
                .show_ui(ui, |ui| {
                    for c in Colormap::ALL {
                        ui.selectable_value(&mut self.heat.colormap, c, c.name());
                    }
                });
        });
        let m_entries = e.num_entries();
        match self.heat.mode {
            HeatMode::CacheEntry if m_entries > 0 => {
                ui.add(
                    egui::Slider::new(&mut self.heat.entry, 0..=m_entries - 1).text("cache entry"),
                );
            }
            HeatMode::ClassMap => {
                let cur = self.gallery.map_class.unwrap_or(im.label) as usize;
                egui::ComboBox::new("map-class", "class")
                    .selected_text(names[cur.min(names.len() - 1)].clone())
                    .width(260.0)
                    .show_ui(ui, |ui| {
                        for (c, n) in names.iter().enumerate() {
                            if ui.selectable_label(c == cur, n).clicked() {
                                self.gallery.map_class = Some(c as u32);
                            }
                        }
                    });
            }
            _ => {}
        }
        let side = ui.available_width().clamp(160.0, 400.0);
        let (rect, _) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
        if let Some(t) = self.gallery.textures.get(i) {
            ui.painter().image(
                t.id(),
                rect,
                egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                egui::Color32::WHITE,
            );
        }
        let heat = self.heat_values(i);
        match &heat {
            Some((vals, mn, mx, label, outline)) => {
                let params = HeatmapParams {
                    grid: self.explore.as_ref().map(|e| e.grid).unwrap_or(0),
                    values: vals.clone(),
                    vmin: *mn,
                    vmax: *mx,
                    opacity: self.heat.opacity,
                    smooth: self.heat.smooth,
                    colormap: self.heat.colormap,
                    outlined: outline.clone(),
                };
                if self.gpu_heatmaps {
                    heatmap::paint(ui, rect, params);
                }
                heatmap::legend_ui(ui, self.heat.colormap, *mn, *mx, label);
            }
            None => {
                ui.weak("this mode needs a CoOp + TextRefiner run (its cache)");
            }
        }
        let Some(e) = &self.explore else { return };
        ui.separator();
        let bars = |ui: &mut egui::Ui, title: &str, m: usize| {
            ui.strong(title);
            for r in e.top5(m, i) {
                ui.horizontal(|ui| {
                    let w = 150.0 * r.prob;
                    let (rr, _) =
                        ui.allocate_exact_size(egui::vec2(150.0, 12.0), egui::Sense::hover());
                    let col = if r.class == im.label {
                        GREEN
                    } else {
                        egui::Color32::from_rgb(120, 140, 200)
                    };
                    ui.painter().rect_filled(
                        egui::Rect::from_min_size(rr.min, egui::vec2(w, rr.height())),
                        2.0,
                        col,
                    );
                    ui.label(format!(
                        "{:>5.1}%  {}",
                        100.0 * r.prob,
                        names[r.class as usize]
                    ));
                });
            }
        };
        bars(ui, &format!("{} top-5", e.methods[a].name), a);
        bars(ui, &format!("{} top-5", e.methods[b].name), b);
        ui.separator();
        ui.strong("Logit change per class (B - A)");
        let (la, lb) = (e.logits(a, i), e.logits(b, i));
        let mut ch: Vec<(usize, f32)> =
            la.iter().zip(&lb).map(|(x, y)| y - x).enumerate().collect();
        ch.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
        let maxabs = ch.first().map(|c| c.1.abs()).unwrap_or(1.0).max(1e-6);
        for (c, d) in ch.iter().take(8) {
            ui.horizontal(|ui| {
                let (rr, _) = ui.allocate_exact_size(egui::vec2(120.0, 10.0), egui::Sense::hover());
                let w = 60.0 * d.abs() / maxabs;
                let x0 = rr.center().x;
                let r = if *d >= 0.0 {
                    egui::Rect::from_x_y_ranges(x0..=x0 + w, rr.y_range())
                } else {
                    egui::Rect::from_x_y_ranges(x0 - w..=x0, rr.y_range())
                };
                ui.painter()
                    .rect_filled(r, 1.0, if *d >= 0.0 { GREEN } else { RED });
                ui.label(format!(
                    "{:+.3}  {}{}",
                    d,
                    names[*c],
                    if *c as u32 == im.label {
                        "  (true)"
                    } else {
                        ""
                    }
                ));
            });
        }
    }
}
