//! CLIP image preprocessing: decoding with limits, resize of the shorter side with bicubic
//! filtering, centre crop, CLIP mean/std normalisation (torchvision's `Resize(size,
//! BICUBIC)`, `CenterCrop(size)`, `ToTensor()`, `Normalize(mean, std)` as CLIP uses them), and
//! the training augmentation (`RandomResizedCrop(size, scale=(0.08, 1))` + horizontal flip)
//! driven by a seeded generator.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{ImageReader, RgbImage};
use rand::Rng;

use crate::error::{Error, Result};

/// CLIP's normalisation constants (OpenAI CLIP `_transform`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest image side we decode, and the allocation cap for one decode: a file that declares
/// 100000 x 100000 pixels is refused before any pixel memory is allocated.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

fn limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_BYTES);
    l
}

/// Decode an image file to RGB8 with limits; every failure names the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, path)
}

/// Decode image bytes (named `path` in errors).
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::image(path, "the file is empty (0 bytes)"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    match reader.format() {
        None => return Err(Error::image(path, "not a recognised image format")),
        // JPEG decoders fill a truncated scan with grey instead of failing; PIL refuses such
        // files ("image file is truncated"), and so do we: a JPEG ends with the EOI marker.
        Some(image::ImageFormat::Jpeg) if !jpeg_has_eoi(bytes) => {
            return Err(Error::image(
                path,
                "truncated JPEG (no end-of-image marker)",
            ))
        }
        _ => {}
    }
    reader.limits(limits());
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| Error::image(path, format!("cannot read the image header: {e}")))?;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(Error::image(
            path,
            format!("declares {w} x {h} pixels, larger than the {MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE} limit"),
        ));
    }
    if w == 0 || h == 0 {
        return Err(Error::image(path, "has zero width or height"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::image(path, format!("cannot read: {e}")))?;
    reader.limits(limits());
    let img = reader.decode().map_err(|e| {
        let msg = e.to_string();
        Error::image(
            path,
            format!("cannot decode (corrupt or truncated?): {msg}"),
        )
    })?;
    Ok(img.to_rgb8())
}

fn jpeg_has_eoi(bytes: &[u8]) -> bool {
    // allow trailing padding some writers add after EOI
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != b'\n' && b != b'\r')
        .map(|i| i + 1)
        .unwrap_or(0);
    end >= 2 && bytes[end - 2] == 0xFF && bytes[end - 1] == 0xD9
}

/// torchvision `Resize(size)`: the shorter side becomes `size`, the longer
/// `int(size * long / short)`; bicubic (Catmull-Rom, a = -0.5, as PIL's BICUBIC).
pub fn resize_shorter(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (size, ((size as u64 * h as u64) / w as u64) as u32)
    } else {
        (((size as u64 * w as u64) / h as u64) as u32, size)
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    image::imageops::resize(img, nw.max(1), nh.max(1), FilterType::CatmullRom)
}

/// torchvision `CenterCrop(size)` (offsets `round((h - size) / 2)`, Python's round half to
/// even); pads with black when the image is smaller, as torchvision does.
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w < size || h < size {
        let mut canvas = RgbImage::new(size.max(w), size.max(h));
        let ox = (size.saturating_sub(w)) / 2;
        let oy = (size.saturating_sub(h)) / 2;
        image::imageops::replace(&mut canvas, img, ox as i64, oy as i64);
        return center_crop(&canvas, size);
    }
    let top = (((h - size) as f64) / 2.0).round_ties_even() as u32;
    let left = (((w - size) as f64) / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(img, left, top, size, size).to_image()
}

/// Evaluation transform: resize shorter side, centre crop. Returns RGB8 `size x size`.
pub fn eval_view(img: &RgbImage, size: u32) -> RgbImage {
    center_crop(&resize_shorter(img, size), size)
}

/// RGB8 -> normalised CHW floats.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// Evaluation preprocessing of one image to normalised CHW floats.
pub fn preprocess_eval(img: &RgbImage, size: u32) -> Vec<f32> {
    normalize_chw(&eval_view(img, size))
}

/// Stack CHW float images into a `[B, 3, size, size]` tensor.
pub fn batch_tensor(images: &[Vec<f32>], size: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(images.len() * 3 * size * size);
    for im in images {
        if im.len() != 3 * size * size {
            return Err(Error::Invalid(format!(
                "image tensor has {} values, expected 3x{size}x{size}",
                im.len()
            )));
        }
        data.extend_from_slice(im);
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, size, size),
        device,
    )?)
}

/// Parameters of torchvision's `RandomResizedCrop.get_params` (scale (0.08, 1), ratio
/// (3/4, 4/3)): returns (top, left, height, width).
pub fn random_resized_crop_params<R: Rng>(
    rng: &mut R,
    width: u32,
    height: u32,
    scale: (f64, f64),
) -> (u32, u32, u32, u32) {
    let area = (width as f64) * (height as f64);
    let (r0, r1) = (3.0f64 / 4.0, 4.0f64 / 3.0);
    let (lr0, lr1) = (r0.ln(), r1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let w = (target * aspect).sqrt().round() as i64;
        let h = (target / aspect).sqrt().round() as i64;
        if w > 0 && h > 0 && w <= width as i64 && h <= height as i64 {
            let top = rng.random_range(0..=(height as i64 - h)) as u32;
            let left = rng.random_range(0..=(width as i64 - w)) as u32;
            return (top, left, h as u32, w as u32);
        }
    }
    // Fallback: central crop at the nearest allowed ratio.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < r0 {
        (width, ((width as f64) / r0).round() as u32)
    } else if in_ratio > r1 {
        (((height as f64) * r1).round() as u32, height)
    } else {
        (width, height)
    };
    (
        (height - h.min(height)) / 2,
        (width - w.min(width)) / 2,
        h.min(height),
        w.min(width),
    )
}

/// Training view: random resized crop to `size` (bicubic) and a horizontal flip with
/// probability 1/2.
pub fn train_view<R: Rng>(rng: &mut R, img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (top, left, ch, cw) = random_resized_crop_params(rng, w, h, (0.08, 1.0));
    let crop = image::imageops::crop_imm(img, left, top, cw.max(1), ch.max(1)).to_image();
    let mut out = image::imageops::resize(&crop, size, size, FilterType::CatmullRom);
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    out
}
