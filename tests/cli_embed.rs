//! The `embed` command as a script uses it: JSON on stdout, clear errors on stderr.
mod common;

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_textrefiner-explorer"))
}

#[test]
fn embed_prints_json_with_similarities() {
    let dir = common::tiny_model_full_vocab();
    let model = dir.path().to_path_buf();
    let img = common::fixtures().join("preprocess/chelsea.jpg");
    let out = bin()
        .args([
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
        ])
        .args([
            "--image",
            common::fixtures()
                .join("preprocess/coffee.jpg")
                .to_str()
                .unwrap(),
        ])
        .args([
            "--text",
            "a photo of a cat",
            "--text",
            "a cup of coffee",
            "--text",
            "a rocket",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["embedding_dim"], 20);
    assert_eq!(v["images"].as_array().unwrap().len(), 2);
    let emb: Vec<f64> = v["images"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(emb.len(), 20);
    let norm: f64 = emb.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "normalised embeddings, got norm {norm}"
    );
    let sims = v["cosine_similarity"].as_array().unwrap();
    assert_eq!(sims.len(), 2);
    assert_eq!(sims[0].as_array().unwrap().len(), 3);
    // cosine = dot product of the printed normalised embeddings
    let t0: Vec<f64> = v["texts"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let dot: f64 = emb.iter().zip(&t0).map(|(a, b)| a * b).sum();
    assert!((dot - sims[0][0].as_f64().unwrap()).abs() < 1e-4);
    for row in v["softmax_over_texts"].as_array().unwrap() {
        let s: f64 = row
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((s - 1.0).abs() < 1e-4);
    }
    assert_eq!(v["texts"][0]["tokens"], 7); // SOT a photo of a cat EOT
}

#[test]
fn embed_names_the_bad_file() {
    let model = common::fixtures().join("clip/hf");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let out = bin()
        .args([
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--image",
            bad.to_str().unwrap(),
            "--text",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.jpg"), "{err}");

    let out = bin()
        .args(["embed", "--model", "/no/such/model", "--text", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no/such/model") && err.contains("no such folder"),
        "{err}"
    );
}

#[test]
fn worker_loads_and_scores_off_thread() {
    use std::time::Duration;
    use textrefiner_explorer::worker::{Event, Request, Worker};
    let wakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w2 = wakes.clone();
    let mut w = Worker::spawn(move || {
        w2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    })
    .unwrap();
    let dir = common::tiny_model_full_vocab();
    let id = w.send(Request::LoadModel {
        spec: dir.path().display().to_string(),
    });
    let loaded = loop {
        match w
            .recv_timeout(Duration::from_secs(60))
            .expect("worker answers")
        {
            Event::ModelLoaded { id: got, result } => break (got, result),
            _ => continue,
        }
    };
    assert_eq!(loaded.0, id);
    let summary = loaded.1.unwrap();
    assert_eq!(summary.patch_size, 7);
    let good = common::fixtures().join("preprocess/rocket.jpg");
    let missing = common::fixtures().join("preprocess/missing.jpg");
    w.send(Request::Score {
        images: vec![good, missing],
        texts: vec!["a".into(), "b".into()],
    });
    let results = loop {
        match w
            .recv_timeout(Duration::from_secs(60))
            .expect("worker answers")
        {
            Event::Scored { results, .. } => break results,
            _ => continue,
        }
    };
    let ok = results[0].as_ref().unwrap();
    assert_eq!(ok.probs.len(), 2);
    assert!((ok.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    assert_eq!(ok.cls_attn.len(), ok.grid * ok.grid);
    assert!(results[1].as_ref().unwrap_err().contains("missing.jpg"));
    assert!(
        wakes.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the waker is called per event"
    );
}

#[test]
fn text_outside_the_model_vocabulary_is_a_clear_error() {
    let model = common::fixtures().join("clip/hf"); // 1000-token vocabulary
    let out = bin()
        .args([
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--text",
            "a photo of a cat",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outside this model's vocabulary of 1000"),
        "{err}"
    );
}
