//! Demo-world view: a gallery of the world's test images with their true class and the
//! zero-shot prediction, filterable by base/new and by right/wrong, and a large view of the
//! selected image with the last block's CLS attention over it.

use eframe::egui;

use super::zero_shot::viridis;
use super::ExplorerApp;
use crate::worker::WorldItem;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Subset {
    #[default]
    All,
    Base,
    New,
}

#[derive(Default)]
pub struct WorldView {
    pub class_names: Vec<String>,
    pub items: Vec<WorldItem>,
    textures: Vec<egui::TextureHandle>,
    pub subset: Subset,
    pub only_wrong: bool,
    pub selected: Option<usize>,
}

impl WorldView {
    pub fn set(&mut self, ctx: &egui::Context, class_names: Vec<String>, items: Vec<WorldItem>) {
        self.textures = items
            .iter()
            .map(|it| {
                let img = egui::ColorImage::from_rgb([it.size, it.size], &it.rgb);
                ctx.load_texture(format!("world-{}-{}", it.class, it.index), img, egui::TextureOptions::NEAREST)
            })
            .collect();
        self.class_names = class_names;
        self.items = items;
        self.selected = None;
    }

    fn num_base(&self) -> usize {
        self.class_names.len().div_ceil(2)
    }

    fn visible(&self, i: usize) -> bool {
        let it = &self.items[i];
        let base = it.class < self.num_base();
        let subset_ok = match self.subset {
            Subset::All => true,
            Subset::Base => base,
            Subset::New => !base,
        };
        subset_ok && (!self.only_wrong || it.predicted != it.class)
    }

    /// Accuracy over the visible subset (all-class prediction).
    pub fn accuracy(&self, subset: Subset) -> f32 {
        let nb = self.num_base();
        let sel: Vec<&WorldItem> = self
            .items
            .iter()
            .filter(|it| match subset {
                Subset::All => true,
                Subset::Base => it.class < nb,
                Subset::New => it.class >= nb,
            })
            .collect();
        sel.iter().filter(|it| it.predicted == it.class).count() as f32 / sel.len().max(1) as f32
    }
}

impl ExplorerApp {
    pub(super) fn world_ui(&mut self, ui: &mut egui::Ui) {
        let wv = &mut self.world;
        if wv.items.is_empty() {
            ui.centered_and_justified(|ui| {
                ui.weak("Scoring the demo world …");
            });
            return;
        }
        ui.horizontal(|ui| {
            ui.label(format!(
                "Zero-shot CLIP over all {} classes: {:.0}% (base {:.0}%, new {:.0}%)",
                wv.class_names.len(),
                100.0 * wv.accuracy(Subset::All),
                100.0 * wv.accuracy(Subset::Base),
                100.0 * wv.accuracy(Subset::New)
            ));
            ui.separator();
            ui.selectable_value(&mut wv.subset, Subset::All, "All");
            ui.selectable_value(&mut wv.subset, Subset::Base, "Base");
            ui.selectable_value(&mut wv.subset, Subset::New, "New");
            ui.checkbox(&mut wv.only_wrong, "only mistakes");
        });
        ui.separator();
        egui::Panel::right("world-detail").default_size(340.0).resizable(true).show(ui, |ui| {
            match wv.selected.and_then(|i| wv.items.get(i).map(|it| (i, it))) {
                None => {
                    ui.weak("Click an image to inspect it");
                }
                Some((i, it)) => {
                    ui.strong(&wv.class_names[it.class]);
                    let ok = it.predicted == it.class;
                    ui.colored_label(
                        if ok { egui::Color32::from_rgb(90, 190, 110) } else { egui::Color32::from_rgb(230, 100, 80) },
                        format!("predicted: {} ({:.0}%)", wv.class_names[it.predicted], 100.0 * it.confidence),
                    );
                    let side = ui.available_width().min(300.0);
                    let (rect, _) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
                    let painter = ui.painter_at(rect);
                    painter.image(wv.textures[i].id(), rect, egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)), egui::Color32::WHITE);
                    // CLS attention over the patch grid, semi-transparent
                    let g = it.grid;
                    if g > 0 && it.cls_attn.len() == g * g {
                        let max = it.cls_attn.iter().cloned().fold(f32::MIN, f32::max);
                        let min = it.cls_attn.iter().cloned().fold(f32::MAX, f32::min);
                        let cell = side / g as f32;
                        for (k, v) in it.cls_attn.iter().enumerate() {
                            let t = if max > min { (v - min) / (max - min) } else { 0.0 };
                            let c = viridis(t);
                            let r = egui::Rect::from_min_size(
                                rect.min + egui::vec2((k % g) as f32 * cell, (k / g) as f32 * cell),
                                egui::vec2(cell, cell),
                            );
                            painter.rect_filled(r, 0.0, egui::Color32::from_rgba_unmultiplied(c.r(), c.g(), c.b(), 110));
                        }
                    }
                    ui.weak("overlay: last block's CLS attention over the 8 x 8 patches");
                }
            }
        });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    for i in 0..wv.items.len() {
                        if !wv.visible(i) {
                            continue;
                        }
                        let it = &wv.items[i];
                        let ok = it.predicted == it.class;
                        let stroke = if wv.selected == Some(i) {
                            egui::Stroke::new(3.0, egui::Color32::WHITE)
                        } else if ok {
                            egui::Stroke::new(2.0, egui::Color32::from_rgb(90, 190, 110))
                        } else {
                            egui::Stroke::new(2.0, egui::Color32::from_rgb(230, 100, 80))
                        };
                        let resp = ui
                            .add(egui::Image::new((wv.textures[i].id(), egui::vec2(88.0, 88.0))).sense(egui::Sense::click()))
                            .on_hover_text(format!("true: {}\npredicted: {} ({:.0}%)", wv.class_names[it.class], wv.class_names[it.predicted], 100.0 * it.confidence));
                        ui.painter().rect_stroke(resp.rect, 2.0, stroke, egui::StrokeKind::Outside);
                        if resp.clicked() {
                            wv.selected = Some(i);
                        }
                    }
                });
            });
        });
    }
}
