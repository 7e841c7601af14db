//! Bad inputs give clear errors naming the file, never a panic.
mod common;

use std::path::Path;

use candle_core::Device;
use common::fixtures;
use textrefiner_explorer::clip::preprocess::load_rgb;
use textrefiner_explorer::clip::Clip;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(path: &Path) -> String {
    match Clip::load(path.to_str().unwrap(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_folder() {
    let e = load_err(Path::new("/nonexistent/model/folder"));
    assert!(
        e.contains("/nonexistent/model/folder") && e.contains("no such folder"),
        "{e}"
    );
}

#[test]
fn folder_without_weights() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("clip/hf/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains(&dir.path().display().to_string()) && e.contains("no CLIP weights"),
        "{e}"
    );
    assert!(e.contains("config.json"), "lists what it found: {e}");
}

#[test]
fn hf_weights_without_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("clip/hf/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

#[test]
fn config_that_does_not_match_weights() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip/hf"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    // claim a wider vision tower than the weights have
    let cfg = cfg.replace("\"hidden_size\": 36", "\"hidden_size\": 48");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("shape mismatch"),
        "{e}"
    );
    assert!(e.contains("do not fit the config"), "{e}");
}

#[test]
fn missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip/hf"), dir.path());
    let mut ts =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    ts.remove("text_model.final_layer_norm.weight");
    candle_core::safetensors::save(&ts, dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("text_model.final_layer_norm.weight"),
        "names the missing key: {e}"
    );
}

#[test]
fn wrong_model_type() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip/hf"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"model_type\": \"clip\"", "\"model_type\": \"siglip\""),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("siglip"), "{e}");
}

#[test]
fn resnet_clip_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ts = std::collections::HashMap::new();
    ts.insert(
        "visual.layer1.0.conv1.weight".to_string(),
        candle_core::Tensor::zeros((4, 4, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    ts.insert(
        "token_embedding.weight".to_string(),
        candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let f = dir.path().join("rn50.safetensors");
    candle_core::safetensors::save(&ts, &f).unwrap();
    let e = load_err(&f);
    assert!(
        e.contains("ResNet") && e.contains("rn50.safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip/hf"), dir.path());
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    let mut garbage = bytes.clone();
    for b in garbage.iter_mut().take(64) {
        *b = 0xAB;
    }
    std::fs::write(&w, &garbage).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    std::fs::write(&w, b"").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn corrupt_pytorch_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip/openai"), dir.path());
    let w = dir.path().join("open_clip_pytorch_model.bin");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("open_clip_pytorch_model.bin"), "{e}");
}

fn image_err(path: &Path) -> String {
    match load_rgb(path) {
        Ok(_) => panic!("{} decoded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_images() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixtures().join("preprocess/chelsea.jpg")).unwrap();

    let zero = dir.path().join("zero.jpg");
    std::fs::write(&zero, b"").unwrap();
    let e = image_err(&zero);
    assert!(e.contains("zero.jpg") && e.contains("empty"), "{e}");

    let trunc = dir.path().join("truncated.jpg");
    std::fs::write(&trunc, &good[..good.len() / 4]).unwrap();
    let e = image_err(&trunc);
    assert!(e.contains("truncated.jpg"), "{e}");

    let mut corrupt = good.clone();
    let n = corrupt.len();
    for b in corrupt[20..n - 20].iter_mut() {
        *b = 0x5A;
    }
    let cpath = dir.path().join("corrupt.jpg");
    std::fs::write(&cpath, &corrupt).unwrap();
    // A JPEG with its entropy data scrambled may still decode into noise; the header tables
    // are scrambled here too, so it must fail.
    let e = image_err(&cpath);
    assert!(e.contains("corrupt.jpg"), "{e}");

    let text = dir.path().join("notes.png");
    std::fs::write(&text, b"this is not an image, just some text\n").unwrap();
    let e = image_err(&text);
    assert!(
        e.contains("notes.png") && e.contains("not a recognised image format"),
        "{e}"
    );

    let missing = dir.path().join("missing.png");
    let e = image_err(&missing);
    assert!(e.contains("missing.png"), "{e}");
}

/// A PNG that declares 100000 x 100000 pixels (40 GB decoded) is refused from its header.
#[test]
fn huge_declared_image_is_refused() {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    }
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.png");
    std::fs::write(&p, &png).unwrap();
    let e = image_err(&p);
    assert!(
        e.contains("huge.png") && (e.contains("100000") || e.contains("limit")),
        "{e}"
    );
}
