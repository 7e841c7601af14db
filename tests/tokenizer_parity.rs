//! Tokenizer parity with OpenAI's simple_tokenizer.py on 1300 strings
//! (tests/fixtures/tokenizer/make_fixtures.py).
mod common;

use textrefiner_explorer::clip::tokenizer::{ClipTokenizer, CONTEXT_LENGTH, EOT, SOT};

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    mojibake: bool,
}

#[test]
fn matches_openai_simple_tokenizer() {
    let path = common::fixtures().join("tokenizer/cases.json");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = ClipTokenizer::new();
    let mut checked = 0;
    let mut skipped = 0;
    let mut failures = Vec::new();
    for c in &cases {
        if c.mojibake {
            skipped += 1;
            continue;
        }
        checked += 1;
        let ids = tok.tokenize(&c.text, CONTEXT_LENGTH);
        if ids != c.ids {
            failures.push(format!(
                "{:?}\n  ours {:?}\n  ref  {:?}",
                c.text, ids, c.ids
            ));
        }
    }
    println!(
        "{checked} strings identical to OpenAI's tokenizer; {skipped} mojibake strings skipped"
    );
    assert!(checked >= 1000, "only {checked} cases");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn start_end_and_truncation() {
    let tok = ClipTokenizer::new();
    let ids = tok.tokenize("a photo of a cat.", 77);
    assert_eq!(ids.first(), Some(&SOT));
    assert_eq!(ids.last(), Some(&EOT));
    assert_eq!(ids.len(), 8);
    let long = "word ".repeat(200);
    let ids = tok.tokenize(&long, 77);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], EOT);
    assert_eq!(tok.tokenize_padded("cat", 16).len(), 16);
    assert_eq!(
        tok.decode(&tok.tokenize("a photo of a cat.", 77)).trim(),
        "a photo of a cat ."
    );
}
