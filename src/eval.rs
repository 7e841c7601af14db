//! Evaluation on cached image features: accuracy, per-class accuracy and the confusion matrix
//! of one method, and the CoOp-vs-refined comparison on the same images (both top-5 lists, the
//! flip category, and the change in margin).

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::train::harmonic_mean;

/// Accuracy of one class.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassAccuracy {
    pub name: String,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f32,
}

/// One method on one labelled set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    pub accuracy: f32,
    pub images: usize,
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u32>>,
    /// Predicted class per image.
    pub predictions: Vec<u32>,
}

/// Scaled logits `[n, C]` of normalised image features against class features.
pub fn logits(image: &Tensor, class_features: &Tensor, logit_scale: f32) -> Result<Vec<Vec<f32>>> {
    Ok((image.matmul(&class_features.t()?)? * logit_scale as f64)?.to_vec2()?)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

/// Evaluate class features `w` (`[C, d]`) on normalised image features with labels.
pub fn evaluate(
    image: &Tensor,
    labels: &[u32],
    w: &Tensor,
    class_names: &[String],
) -> Result<Evaluation> {
    let c = w.dim(0)?;
    if class_names.len() != c {
        return Err(Error::Invalid(format!(
            "{} class names for {c} class features",
            class_names.len()
        )));
    }
    if image.dim(0)? != labels.len() {
        return Err(Error::Invalid(format!(
            "{} labels for {} images",
            labels.len(),
            image.dim(0)?
        )));
    }
    let pred: Vec<u32> = image.matmul(&w.t()?)?.argmax(D::Minus1)?.to_vec1()?;
    let mut confusion = vec![vec![0u32; c]; c];
    for (&y, &p) in labels.iter().zip(&pred) {
        if (y as usize) >= c {
            return Err(Error::Invalid(format!("label {y} outside the {c} classes")));
        }
        confusion[y as usize][p as usize] += 1;
    }
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let total: u32 = row.iter().sum();
            ClassAccuracy {
                name: class_names[i].clone(),
                correct: row[i] as usize,
                total: total as usize,
                accuracy: if total > 0 {
                    row[i] as f32 / total as f32
                } else {
                    0.0
                },
            }
        })
        .collect();
    let correct: usize = (0..c).map(|i| confusion[i][i] as usize).sum();
    Ok(Evaluation {
        accuracy: correct as f32 / labels.len().max(1) as f32,
        images: labels.len(),
        per_class,
        confusion,
        predictions: pred,
    })
}

/// How a prediction changed from CoOp to the refined features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flip {
    /// CoOp wrong, refined right.
    Fixed,
    /// CoOp right, refined wrong.
    Broken,
    BothRight,
    BothWrong,
}

impl Flip {
    pub const ALL: [Flip; 4] = [Flip::Fixed, Flip::Broken, Flip::BothRight, Flip::BothWrong];
    pub fn of(a_right: bool, b_right: bool) -> Self {
        match (a_right, b_right) {
            (false, true) => Flip::Fixed,
            (true, false) => Flip::Broken,
            (true, true) => Flip::BothRight,
            (false, false) => Flip::BothWrong,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Flip::Fixed => "fixed",
            Flip::Broken => "broken",
            Flip::BothRight => "both right",
            Flip::BothWrong => "both wrong",
        }
    }
}

/// A class and its probability.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ranked {
    pub class: u32,
    pub prob: f32,
}

/// One image under both methods.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageComparison {
    pub index: usize,
    pub label: u32,
    pub a_top5: Vec<Ranked>,
    pub b_top5: Vec<Ranked>,
    pub flip: Flip,
    /// Logit of the true class minus the best other logit (scaled logits).
    pub a_margin: f32,
    pub b_margin: f32,
}

impl ImageComparison {
    pub fn margin_change(&self) -> f32 {
        self.b_margin - self.a_margin
    }
}

/// Counts of each flip category.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct FlipCounts {
    pub fixed: usize,
    pub broken: usize,
    pub both_right: usize,
    pub both_wrong: usize,
}

/// Method A (CoOp) against method B (refined) on the same images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub a_accuracy: f32,
    pub b_accuracy: f32,
    pub counts: FlipCounts,
    pub images: Vec<ImageComparison>,
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// Top `k` classes of one row of logits, with softmax probabilities.
pub fn top_k(row: &[f32], k: usize) -> Vec<Ranked> {
    let p = softmax(row);
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.into_iter()
        .take(k)
        .map(|i| Ranked {
            class: i as u32,
            prob: p[i],
        })
        .collect()
}

fn margin(row: &[f32], y: usize) -> f32 {
    let other = row
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != y)
        .map(|(_, v)| *v)
        .fold(f32::NEG_INFINITY, f32::max);
    row[y] - other
}

/// Compare class features `a` and `b` (`[C, d]` each) on the same images.
pub fn compare(
    image: &Tensor,
    labels: &[u32],
    a: &Tensor,
    b: &Tensor,
    logit_scale: f32,
) -> Result<Comparison> {
    if a.dims() != b.dims() {
        return Err(Error::Invalid(format!(
            "the two methods have class features of shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let la = logits(image, a, logit_scale)?;
    let lb = logits(image, b, logit_scale)?;
    let mut counts = FlipCounts::default();
    let mut images = Vec::with_capacity(labels.len());
    let (mut ra, mut rb) = (0usize, 0usize);
    for (i, &y) in labels.iter().enumerate() {
        let (pa, pb) = (argmax(&la[i]), argmax(&lb[i]));
        ra += (pa == y) as usize;
        rb += (pb == y) as usize;
        let flip = Flip::of(pa == y, pb == y);
        match flip {
            Flip::Fixed => counts.fixed += 1,
            Flip::Broken => counts.broken += 1,
            Flip::BothRight => counts.both_right += 1,
            Flip::BothWrong => counts.both_wrong += 1,
        }
        images.push(ImageComparison {
            index: i,
            label: y,
            a_top5: top_k(&la[i], 5),
            b_top5: top_k(&lb[i], 5),
            flip,
            a_margin: margin(&la[i], y as usize),
            b_margin: margin(&lb[i], y as usize),
        });
    }
    let n = labels.len().max(1) as f32;
    Ok(Comparison {
        a_accuracy: ra as f32 / n,
        b_accuracy: rb as f32 / n,
        counts,
        images,
    })
}

/// Base / new / HM of one method.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BaseNew {
    pub base: f32,
    pub new: f32,
    pub hm: f32,
}

impl BaseNew {
    pub fn new(base: f32, new: f32) -> Self {
        Self {
            base,
            new,
            hm: harmonic_mean(base, new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn confusion_flips_and_margins() {
        let dev = Device::Cpu;
        // 3 images in a 2-d space; classes along the axes
        let img = Tensor::from_vec(vec![1f32, 0., 0., 1., 0.6, 0.8], (3, 2), &dev).unwrap();
        let a = Tensor::from_vec(vec![1f32, 0., 0., 1.], (2, 2), &dev).unwrap();
        let b = Tensor::from_vec(vec![0f32, 1., 1., 0.], (2, 2), &dev).unwrap();
        let names = vec!["x".to_string(), "y".to_string()];
        let e = evaluate(&img, &[0, 1, 0], &a, &names).unwrap();
        assert_eq!(e.confusion, vec![vec![1, 1], vec![0, 1]]);
        assert!((e.accuracy - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(e.per_class[0].correct, 1);
        let c = compare(&img, &[0, 1, 0], &a, &b, 10.0).unwrap();
        assert_eq!(c.images[0].flip, Flip::Broken);
        assert_eq!(c.images[2].flip, Flip::Fixed);
        assert_eq!(c.counts.fixed, 1);
        assert_eq!(c.counts.broken, 2);
        assert!((c.images[2].a_margin - (6.0 - 8.0)).abs() < 1e-5);
        assert!((c.images[2].margin_change() - 4.0).abs() < 1e-5);
        let p: f32 = c.images[0].a_top5.iter().map(|r| r.prob).sum();
        assert!((p - 1.0).abs() < 1e-6);
    }
}
