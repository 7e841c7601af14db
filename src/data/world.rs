//! The demo world: a deterministic, seeded generator of small fine-grained images and captions,
//! built for teaching TextRefiner. Nothing binary is stored: every image is drawn on demand
//! from (seed, split, class, index).
//!
//! Classes come in groups that share their global look (body shape and colour) and differ only
//! in a small local detail (a striped tail, three spots, a white crown), so that telling them
//! apart needs local evidence. Nuisance variation (position, scale, rotation, background
//! gradient and noise, a distractor blob) keeps any single pixel from giving a class away.
//!
//! 24 classes: 8 groups (shape x colour) x 3 details. Base classes (the first 12, as in CoOp's
//! base-to-new split) cover red kites, blue fish, green beetles and yellow moths; the new
//! classes recombine those same shapes, colours and details (blue kites, green fish, yellow
//! beetles, red moths), so every attribute of a new class was seen in some base class.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Body shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Kite,
    Fish,
    Beetle,
    Moth,
}

/// Local details that separate the classes of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    StripedTail,
    Spots,
    WhiteCrown,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Colour {
    pub name: &'static str,
    pub rgb: [f32; 3],
}

pub const RED: Colour = Colour {
    name: "red",
    rgb: [0.86, 0.18, 0.16],
};
pub const BLUE: Colour = Colour {
    name: "blue",
    rgb: [0.17, 0.36, 0.86],
};
pub const GREEN: Colour = Colour {
    name: "green",
    rgb: [0.16, 0.66, 0.25],
};
pub const YELLOW: Colour = Colour {
    name: "yellow",
    rgb: [0.93, 0.80, 0.14],
};

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Kite => "kite",
            Shape::Fish => "fish",
            Shape::Beetle => "beetle",
            Shape::Moth => "moth",
        }
    }
}

impl Detail {
    pub fn phrase(self) -> &'static str {
        match self {
            Detail::StripedTail => "with a striped tail",
            Detail::Spots => "with three black spots",
            Detail::WhiteCrown => "with a white crown",
        }
    }
    pub const ALL: [Detail; 3] = [Detail::StripedTail, Detail::Spots, Detail::WhiteCrown];
}

/// One class of the world.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldClass {
    pub shape: Shape,
    pub colour: Colour,
    pub detail: Detail,
}

impl WorldClass {
    /// Human-readable class name, e.g. "red kite with a striped tail".
    pub fn name(&self) -> String {
        format!(
            "{} {} {}",
            self.colour.name,
            self.shape.name(),
            self.detail.phrase()
        )
    }
    /// The group name shared by the fine-grained classes of a group ("red kite").
    pub fn group(&self) -> String {
        format!("{} {}", self.colour.name, self.shape.name())
    }
}

/// The 24 classes in label order: 12 base classes, then 12 new ones.
pub fn classes() -> Vec<WorldClass> {
    let groups = [
        (Shape::Kite, RED),
        (Shape::Fish, BLUE),
        (Shape::Beetle, GREEN),
        (Shape::Moth, YELLOW),
        (Shape::Kite, BLUE),
        (Shape::Fish, GREEN),
        (Shape::Beetle, YELLOW),
        (Shape::Moth, RED),
    ];
    groups
        .iter()
        .flat_map(|&(shape, colour)| {
            Detail::ALL.iter().map(move |&detail| WorldClass {
                shape,
                colour,
                detail,
            })
        })
        .collect()
}

/// Splits of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
    /// Images for pretraining the embedded CLIP (disjoint from the others).
    Pretrain,
}

impl Split {
    fn salt(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00_0001,
            Split::Val => 0x7661_6c00_0000_0002,
            Split::Test => 0x7465_7374_0000_0003,
            Split::Pretrain => 0x7072_6574_7200_0004,
        }
    }
}

/// A seeded world of `size x size` images.
#[derive(Debug, Clone)]
pub struct World {
    pub seed: u64,
    pub size: u32,
    pub classes: Vec<WorldClass>,
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 step over a ^ b: a cheap, well-spread per-image seed
    let mut z = (a ^ b.rotate_left(17)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Pose and nuisance parameters of one drawn image (also what a caption may mention).
#[derive(Debug, Clone)]
pub struct Scene {
    pub class: usize,
    pub cx: f32,
    pub cy: f32,
    pub scale: f32,
    pub angle: f32,
    pub bg_a: [f32; 3],
    pub bg_b: [f32; 3],
    pub bg_angle: f32,
    pub distractor: Option<([f32; 2], f32, [f32; 3])>,
    pub noise_seed: u64,
    pub tint: [f32; 3],
}

impl World {
    pub fn new(seed: u64, size: u32) -> Self {
        Self {
            seed,
            size,
            classes: classes(),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    pub fn class_names(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.name()).collect()
    }

    /// The scene of image `index` of `class` in `split`.
    pub fn scene(&self, split: Split, class: usize, index: u64) -> Scene {
        let s = mix(mix(self.seed, split.salt()), mix(class as u64, index));
        let mut rng = ChaCha8Rng::seed_from_u64(s);
        let size = self.size as f32;
        let muted = |rng: &mut ChaCha8Rng| {
            let base = rng.random_range(0.25..0.75f32);
            [
                base + rng.random_range(-0.12..0.12f32),
                base + rng.random_range(-0.12..0.12f32),
                base + rng.random_range(-0.12..0.12f32),
            ]
        };
        let bg_a = muted(&mut rng);
        let bg_b = muted(&mut rng);
        let distractor = if rng.random_bool(0.4) {
            let c = [
                rng.random_range(0.0..1.0f32),
                rng.random_range(0.0..1.0f32),
                rng.random_range(0.0..1.0f32),
            ];
            Some((
                [rng.random_range(0.0..size), rng.random_range(0.0..size)],
                rng.random_range(0.04..0.1f32) * size,
                c,
            ))
        } else {
            None
        };
        Scene {
            class,
            cx: size * 0.5 + rng.random_range(-0.12..0.12f32) * size,
            cy: size * 0.5 + rng.random_range(-0.12..0.12f32) * size,
            scale: rng.random_range(0.8..1.15f32),
            angle: rng.random_range(-0.5..0.5f32),
            bg_a,
            bg_b,
            bg_angle: rng.random_range(0.0..std::f32::consts::TAU),
            distractor,
            noise_seed: rng.random(),
            tint: [
                rng.random_range(-0.06..0.06f32),
                rng.random_range(-0.06..0.06f32),
                rng.random_range(-0.06..0.06f32),
            ],
        }
    }

    /// Draw image `index` of `class` in `split`.
    pub fn image(&self, split: Split, class: usize, index: u64) -> RgbImage {
        render(
            &self.scene(split, class, index),
            &self.classes[class],
            self.size,
        )
    }

    /// A caption for an image, for contrastive pretraining: the global look always, the local
    /// detail only with probability `detail_prob`, in varied templates.
    pub fn caption<R: Rng>(&self, class: usize, rng: &mut R, detail_prob: f64) -> String {
        let c = &self.classes[class];
        let group = c.group();
        let with_detail = rng.random_bool(detail_prob);
        let subject = if with_detail {
            format!("{group} {}", c.detail.phrase())
        } else {
            group
        };
        const TEMPLATES: [&str; 6] = [
            "a photo of a {}.",
            "a {}.",
            "a picture of a {}.",
            "a small {} on a plain background.",
            "a drawing of a {}.",
            "there is a {} in the picture.",
        ];
        TEMPLATES[rng.random_range(0..TEMPLATES.len())].replace("{}", &subject)
    }
}

/// Coverage of the body and of the detail at object coordinates (u, v) in [-1, 1]^2 (object
/// frame: head up, v grows downwards).
fn body_inside(shape: Shape, u: f32, v: f32) -> bool {
    match shape {
        // diamond with a short tail string
        Shape::Kite => {
            u.abs() / 0.55 + (v + 0.1).abs() / 0.62 <= 1.0
                || (u.abs() < 0.05 && v > 0.5 && v < 0.95)
        }
        // ellipse body + triangular tail at the bottom
        Shape::Fish => {
            (u / 0.42).powi(2) + ((v + 0.12) / 0.6).powi(2) <= 1.0
                || (v > 0.42 && v < 0.9 && u.abs() < (v - 0.42) * 0.9)
        }
        // round body + six legs
        Shape::Beetle => {
            (u / 0.5).powi(2) + (v / 0.62).powi(2) <= 1.0
                || ([-0.25f32, 0.05, 0.35]
                    .iter()
                    .any(|&ly| (v - ly).abs() < 0.045 && u.abs() < 0.78))
        }
        // two pairs of wings around a thin body
        Shape::Moth => {
            let upper = ((u.abs() - 0.38) / 0.36).powi(2) + ((v + 0.22) / 0.34).powi(2) <= 1.0;
            let lower = ((u.abs() - 0.3) / 0.26).powi(2) + ((v - 0.3) / 0.26).powi(2) <= 1.0;
            upper || lower || (u.abs() < 0.07 && v.abs() < 0.75)
        }
    }
}

/// Colour of the local detail at (u, v), if any.
fn detail_colour(c: &WorldClass, u: f32, v: f32) -> Option<[f32; 3]> {
    if !body_inside(c.shape, u, v) {
        return None;
    }
    let black = [0.05, 0.05, 0.06];
    let white = [0.97, 0.97, 0.95];
    match c.detail {
        // stripes across the lower third
        Detail::StripedTail => (v > 0.3 && ((v * 14.0).floor() as i32) % 2 == 0).then_some(black),
        Detail::Spots => {
            let spots = [(-0.18f32, -0.05f32), (0.18, -0.05), (0.0, 0.22)];
            spots
                .iter()
                .any(|&(su, sv)| (u - su).powi(2) + (v - sv).powi(2) < 0.11f32.powi(2))
                .then_some(black)
        }
        Detail::WhiteCrown => (v < -0.4).then_some(white),
    }
}

fn render(s: &Scene, class: &WorldClass, size: u32) -> RgbImage {
    let mut img = RgbImage::new(size, size);
    let n = size as f32;
    let (sin_b, cos_b) = s.bg_angle.sin_cos();
    let (sin_a, cos_a) = s.angle.sin_cos();
    let radius = 0.32 * n * s.scale;
    let body = [
        (class.colour.rgb[0] + s.tint[0]).clamp(0.0, 1.0),
        (class.colour.rgb[1] + s.tint[1]).clamp(0.0, 1.0),
        (class.colour.rgb[2] + s.tint[2]).clamp(0.0, 1.0),
    ];
    let mut noise = ChaCha8Rng::seed_from_u64(s.noise_seed);
    const SS: [f32; 2] = [0.25, 0.75]; // 2x2 supersampling
    for y in 0..size {
        for x in 0..size {
            let mut acc = [0f32; 3];
            for sy in SS {
                for sx in SS {
                    let px = x as f32 + sx;
                    let py = y as f32 + sy;
                    // background: linear gradient between two muted colours
                    let t = (((px / n - 0.5) * cos_b + (py / n - 0.5) * sin_b) + 0.7) / 1.4;
                    let mut c = [0f32; 3];
                    for k in 0..3 {
                        c[k] = s.bg_a[k] * (1.0 - t) + s.bg_b[k] * t;
                    }
                    if let Some(([dx, dy], r, dc)) = s.distractor {
                        if (px - dx).powi(2) + (py - dy).powi(2) < r * r {
                            c = dc;
                        }
                    }
                    // object frame
                    let (ox, oy) = ((px - s.cx) / radius, (py - s.cy) / radius);
                    let u = ox * cos_a + oy * sin_a;
                    let v = -ox * sin_a + oy * cos_a;
                    if body_inside(class.shape, u, v) {
                        c = detail_colour(class, u, v).unwrap_or(body);
                    }
                    for k in 0..3 {
                        acc[k] += c[k] * 0.25;
                    }
                }
            }
            let jitter: f32 = noise.random_range(-0.04..0.04);
            let px =
                Rgb([0, 1, 2].map(|k| ((acc[k] + jitter).clamp(0.0, 1.0) * 255.0).round() as u8));
            img.put_pixel(x, y, px);
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_varied() {
        let w = World::new(1, 64);
        assert_eq!(w.num_classes(), 24);
        let a = w.image(Split::Train, 3, 0);
        assert_eq!(a, w.image(Split::Train, 3, 0));
        assert_ne!(a, w.image(Split::Train, 3, 1));
        assert_ne!(a, w.image(Split::Test, 3, 0));
        assert_ne!(a, World::new(2, 64).image(Split::Train, 3, 0));
        let names = w.class_names();
        assert_eq!(names[0], "red kite with a striped tail");
        let uniq: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(uniq.len(), 24);
    }

    #[test]
    fn new_classes_recombine_base_attributes() {
        let c = classes();
        let (base, new) = c.split_at(12);
        for n in new {
            assert!(base.iter().any(|b| b.shape == n.shape));
            assert!(base.iter().any(|b| b.colour == n.colour));
            assert!(base.iter().any(|b| b.detail == n.detail));
            assert!(
                !base
                    .iter()
                    .any(|b| b.shape == n.shape && b.colour == n.colour),
                "a new group, not a base one"
            );
        }
    }

    #[test]
    fn classes_of_a_group_differ_only_locally() {
        // Same scene, two classes of one group: most pixels agree, some differ.
        let w = World::new(5, 64);
        let scene = w.scene(Split::Train, 0, 7);
        let a = render(&scene, &w.classes[0], 64);
        let b = render(&scene, &w.classes[1], 64);
        let differing = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
        assert!(
            differing > 10 && differing < 64 * 64 / 6,
            "{differing} pixels differ"
        );
    }
}
