//! OpenAI's CLIP tokenizer: byte-level BPE over OpenAI's vocabulary (the
//! `instant-clip-tokenizer` crate, which bundles `bpe_simple_vocab_16e6.txt.gz`), preceded by
//! the text clean-up of OpenAI's `simple_tokenizer.py`: `ftfy.fix_text`, `html.unescape`
//! twice, whitespace collapsing, lower-casing; `<|startoftext|>` / `<|endoftext|>` are the
//! special tokens 49406 / 49407.
//!
//! ftfy is reproduced for everything except its mojibake repair (`fix_encoding`), which guesses
//! at mis-decoded UTF-8; prompts and class names do not contain mojibake. The steps and
//! tables below (control characters, ligatures, width map, quote ranges) are ftfy 6.3's.

use instant_clip_tokenizer::{Token, Tokenizer};
use unicode_normalization::UnicodeNormalization;

/// `<|startoftext|>`.
pub const SOT: u32 = 49406;
/// `<|endoftext|>`.
pub const EOT: u32 = 49407;
/// CLIP's context length.
pub const CONTEXT_LENGTH: usize = 77;

/// The OpenAI CLIP tokenizer.
pub struct ClipTokenizer {
    bpe: Tokenizer,
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClipTokenizer")
    }
}

impl ClipTokenizer {
    pub fn new() -> Self {
        Self {
            bpe: Tokenizer::new(),
        }
    }

    /// BPE ids of `text` after clean-up, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = whitespace_clean(&basic_clean(text)).to_lowercase();
        let mut out: Vec<Token> = Vec::new();
        let mut ids = Vec::new();
        let mut rest = cleaned.as_str();
        loop {
            let next = [("<|startoftext|>", SOT), ("<|endoftext|>", EOT)]
                .iter()
                .filter_map(|(s, id)| rest.find(s).map(|i| (i, *s, *id)))
                .min_by_key(|(i, _, _)| *i);
            let (segment, special) = match next {
                Some((i, s, id)) => (&rest[..i], Some((s, id))),
                None => (rest, None),
            };
            // The crate treats "<start_of_text>" / "<end_of_text>" as special; OpenAI's regex
            // splits them at every class boundary, which spacing reproduces exactly.
            let segment = segment
                .replace("<start_of_text>", "< start _ of _ text >")
                .replace("<end_of_text>", "< end _ of _ text >");
            out.clear();
            self.bpe.encode(&segment, &mut out);
            ids.extend(out.iter().map(|t| t.to_u16() as u32));
            match special {
                Some((s, id)) => {
                    ids.push(id);
                    rest = &rest[rest.find(s).unwrap_or(0) + s.len()..];
                }
                None => break,
            }
        }
        ids
    }

    /// `[SOT, ids..., EOT]`, truncated to `context_length` with EOT kept last (as
    /// `clip.tokenize(..., truncate=True)`), not padded.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(context_length);
        ids.push(SOT);
        ids.extend(self.encode(text));
        ids.push(EOT);
        if ids.len() > context_length {
            ids.truncate(context_length);
            if let Some(last) = ids.last_mut() {
                *last = EOT;
            }
        }
        ids
    }

    /// Tokenize and pad with zeros to `context_length`.
    pub fn tokenize_padded(&self, text: &str, context_length: usize) -> Vec<u32> {
        let mut ids = self.tokenize(text, context_length);
        ids.resize(context_length, 0);
        ids
    }

    /// Decode ids back to text (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> String {
        let tokens = ids
            .iter()
            .filter(|&&i| i != SOT && i != EOT && i < 49406)
            .filter_map(|&i| Token::from_u16(i as u16, &self.bpe));
        self.bpe.decode(tokens)
    }

    /// The text of one vocabulary entry (for nearest-word displays).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).trim().to_string()
    }
}

/// `basic_clean`: ftfy.fix_text, then html.unescape twice, then strip.
pub fn basic_clean(text: &str) -> String {
    let mut t = fix_text(text);
    for _ in 0..2 {
        t = html_escape::decode_html_entities(&t).into_owned();
    }
    t.trim().to_string()
}

/// `whitespace_clean`: runs of whitespace (Python's `\s`) become one space; strip.
pub fn whitespace_clean(text: &str) -> String {
    text.split(is_py_space)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `str.isspace`, which `re`'s `\s` follows for str patterns: Unicode White_Space
/// plus the information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// ftfy 6.3 `fix_text` with default settings, minus mojibake repair (see module docs).
pub fn fix_text(text: &str) -> String {
    // unescape_html="auto": only when the text does not look like HTML (no '<').
    let mut t = if text.contains('<') {
        text.to_string()
    } else {
        html_escape::decode_html_entities(text).into_owned()
    };
    t = t.chars().map(fix_c1_control).collect();
    t = fix_latin_ligatures(&t);
    t = fix_character_width(&t);
    t = t
        .chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            c => c,
        })
        .collect();
    t = t
        .replace("\r\n", "\n")
        .chars()
        .map(|c| {
            if matches!(c, '\r' | '\u{2028}' | '\u{2029}' | '\u{85}') {
                '\n'
            } else {
                c
            }
        })
        .collect();
    t = remove_terminal_escapes(&t);
    t.retain(|c| !is_control_to_remove(c));
    t.nfc().collect()
}

/// C1 controls (U+0080..U+009F) decoded as Windows-1252 (ftfy `fix_c1_controls`); the five
/// bytes that Windows-1252 leaves undefined stay as they are.
fn fix_c1_control(c: char) -> char {
    const CP1252: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
        '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
        'ž', 'Ÿ',
    ];
    let u = c as u32;
    if (0x80..=0x9f).contains(&u) {
        CP1252[(u - 0x80) as usize]
    } else {
        c
    }
}

fn fix_latin_ligatures(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            'Ĳ' => out.push_str("IJ"),
            'ĳ' => out.push_str("ij"),
            'ŉ' => out.push_str("ʼn"),
            'Ǳ' => out.push_str("DZ"),
            'ǲ' => out.push_str("Dz"),
            'ǳ' => out.push_str("dz"),
            'Ǆ' => out.push_str("DŽ"),
            'ǅ' => out.push_str("Dž"),
            'ǆ' => out.push_str("dž"),
            'Ǉ' => out.push_str("LJ"),
            'ǈ' => out.push_str("Lj"),
            'ǉ' => out.push_str("lj"),
            'Ǌ' => out.push_str("NJ"),
            'ǋ' => out.push_str("Nj"),
            'ǌ' => out.push_str("nj"),
            'ﬀ' => out.push_str("ff"),
            'ﬁ' => out.push_str("fi"),
            'ﬂ' => out.push_str("fl"),
            'ﬃ' => out.push_str("ffi"),
            'ﬄ' => out.push_str("ffl"),
            'ﬅ' => out.push_str("ſt"),
            'ﬆ' => out.push_str("st"),
            c => out.push(c),
        }
    }
    out
}

/// Fullwidth / halfwidth forms (U+FF01..U+FFEF) to their NFKC forms, U+3000 to a space.
fn fix_character_width(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        let u = c as u32;
        if u == 0x3000 {
            out.push(' ');
        } else if (0xff01..0xfff0).contains(&u) {
            out.extend(std::iter::once(c).nfkc());
        } else {
            out.push(c);
        }
    }
    out
}

/// Remove ANSI escapes `ESC [ (digits|;)* letter`.
fn remove_terminal_escapes(t: &str) -> String {
    let chars: Vec<char> = t.chars().collect();
    let mut out = String::with_capacity(t.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn is_control_to_remove(c: char) -> bool {
    let u = c as u32;
    u < 0x09
        || u == 0x0b
        || (0x0e..0x20).contains(&u)
        || u == 0x7f
        || (0x206a..0x2070).contains(&u)
        || u == 0xfeff
        || (0xfff9..0xfffd).contains(&u)
}
